"""`export-file` end to end: where the file goes, refusing to overwrite, mode
0600, stdout, and tampered data that must never leave a file behind."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import Cli, stderr_line
from patient_cli.crypto import Keyring, parse_keys
from patient_cli.export import safe_file_name
from patient_cli.recordformat import CHUNK_SIZE

CONTENT = b"%PDF-1.4\n" + bytes(range(256)) * 8


def execute(db_url: str, query: str, *params: Any) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute(query, params)


def add_file(cli: Cli, path: Path, content: bytes, username: str = "ann") -> int:
    path.write_bytes(content)
    return int(cli.json("add", "-u", username, "-n", "doc", "-f", str(path))["record_id"])


def assert_error(result: Any, code: int, kind: str, message: str) -> None:
    assert result.exit_code == code, result.stderr
    assert json.loads(stderr_line(result)) == {"error": message, "code": code, "type": kind}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def rewrite_meta(db_url: str, key: str, record_id: int, **changes: Any) -> None:
    """Change a record's encrypted metadata, as only a holder of the key could."""
    keyring = Keyring(parse_keys(key))
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT meta FROM patient_records WHERE id = %s", (record_id,)
        ).fetchone()
        assert row is not None
        meta = json.loads(keyring.decrypt(row[0]))
        meta.update(changes)
        conn.execute(
            "UPDATE patient_records SET meta = %s WHERE id = %s",
            (keyring.encrypt(json.dumps(meta).encode()), record_id),
        )


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".patient-records-"))


def test_export_to_the_original_name_in_the_current_folder(ready: Cli, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    record_id = add_file(ready, tmp_path / "in" / "report.pdf", CONTENT)
    out = ready.json("export-file", str(record_id))
    target = tmp_path / "report.pdf"
    assert out == {
        "message": "File exported successfully",
        "record_id": record_id,
        "path": str(target),
        "file_size": len(CONTENT),
        "file_type": "application/pdf",
    }
    assert target.read_bytes() == CONTENT
    assert mode(target) == 0o600
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("stored", "safe"),
    [
        ("../../etc/passwd", "passwd"),
        ("/etc/shadow", "shadow"),
        ("..\\..\\Windows\\win.ini", "win.ini"),
        ("..", "record-7.bin"),
        (".bashrc", "bashrc"),
        ("a\nb\x1b[31m.txt", "a_b_[31m.txt"),
        ("", "record-7.bin"),
        (None, "record-7.bin"),
        ("dossier médical 🩺.pdf", "dossier médical 🩺.pdf"),
    ],
)
def test_safe_file_name(stored: str | None, safe: str) -> None:
    assert safe_file_name(stored, 7) == safe


def test_a_stored_path_cannot_escape_the_current_folder(
    ready: Cli, tmp_path: Path, db_url: str, fernet_key: str
) -> None:
    record_id = add_file(ready, tmp_path / "x.pdf", CONTENT)
    rewrite_meta(db_url, fernet_key, record_id, file_name="../../etc/passwd")
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    os.chdir(work)  # the env fixture's monkeypatch restores the folder
    out = ready.json("export-file", str(record_id))
    assert out["path"] == str(work / "passwd")
    assert (work / "passwd").read_bytes() == CONTENT
    assert not (tmp_path / "etc").exists()


def test_export_to_stdout(ready: Cli, tmp_path: Path) -> None:
    record_id = add_file(ready, tmp_path / "x.pdf", CONTENT)
    result = ready("export-file", str(record_id), "-o", "-")
    assert result.exit_code == 0
    assert result.stdout_bytes == CONTENT
    assert stderr_line(result) == f"exported record {record_id} (2.0 KB)"
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["x.pdf"]


def test_export_to_a_named_file_and_into_a_folder(ready: Cli, tmp_path: Path) -> None:
    record_id = add_file(ready, tmp_path / "scan.pdf", CONTENT)
    ready.json("export-file", str(record_id), "--output", "copy.pdf")
    assert (tmp_path / "copy.pdf").read_bytes() == CONTENT
    (tmp_path / "outbox").mkdir()
    out = ready.json("export-file", str(record_id), "-o", "outbox")
    assert out["path"] == "outbox/scan.pdf"
    assert (tmp_path / "outbox" / "scan.pdf").read_bytes() == CONTENT


def test_an_existing_target_is_refused_and_left_unchanged(ready: Cli, tmp_path: Path) -> None:
    record_id = add_file(ready, tmp_path / "x.pdf", CONTENT)
    target = tmp_path / "mine.pdf"
    target.write_bytes(b"precious")
    target.chmod(0o644)
    result = ready("export-file", str(record_id), "-o", "mine.pdf")
    assert_error(result, 2, "target_exists", "mine.pdf already exists (use --force to overwrite)")
    assert result.stdout == ""
    assert target.read_bytes() == b"precious" and mode(target) == 0o644
    assert leftovers(tmp_path) == []


def test_the_default_name_is_refused_too_when_it_exists(ready: Cli, tmp_path: Path) -> None:
    # The stored file name is encrypted patient content: the message names the
    # record instead (in the current folder, and in a folder given with -o).
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    record_id = add_file(ready, tmp_path / "in" / "Zebra-Quokka.pdf", CONTENT)
    (tmp_path / "Zebra-Quokka.pdf").write_bytes(b"keep")
    (tmp_path / "out" / "Zebra-Quokka.pdf").write_bytes(b"keep")
    result = ready("export-file", str(record_id))
    assert_error(
        result,
        2,
        "target_exists",
        f"{tmp_path}/<record {record_id}'s file name> already exists (use --force to overwrite)",
    )
    result = ready("export-file", str(record_id), "-o", "out")
    assert_error(
        result,
        2,
        "target_exists",
        f"out/<record {record_id}'s file name> already exists (use --force to overwrite)",
    )
    assert (tmp_path / "Zebra-Quokka.pdf").read_bytes() == b"keep"
    assert (tmp_path / "out" / "Zebra-Quokka.pdf").read_bytes() == b"keep"


def test_force_overwrites_with_mode_0600(ready: Cli, tmp_path: Path) -> None:
    record_id = add_file(ready, tmp_path / "x.pdf", CONTENT)
    target = tmp_path / "mine.pdf"
    target.write_bytes(b"old content that is longer than nothing")
    target.chmod(0o644)
    ready.json("export-file", str(record_id), "-o", "mine.pdf", "--force")
    assert target.read_bytes() == CONTENT
    assert mode(target) == 0o600


def test_force_replaces_a_symlink_without_writing_through_it(ready: Cli, tmp_path: Path) -> None:
    record_id = add_file(ready, tmp_path / "x.pdf", CONTENT)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"do not touch")
    (tmp_path / "link.pdf").symlink_to(victim)
    result = ready("export-file", str(record_id), "-o", "link.pdf")
    assert_error(result, 2, "target_exists", "link.pdf already exists (use --force to overwrite)")
    ready.json("export-file", str(record_id), "-o", "link.pdf", "--force")
    assert victim.read_bytes() == b"do not touch"
    assert not (tmp_path / "link.pdf").is_symlink()
    assert (tmp_path / "link.pdf").read_bytes() == CONTENT


def test_missing_target_folder(ready: Cli, tmp_path: Path) -> None:
    record_id = add_file(ready, tmp_path / "x.pdf", CONTENT)
    result = ready("export-file", str(record_id), "-o", "no/such/dir/out.pdf")
    assert_error(result, 2, "usage_error", "folder does not exist: no/such/dir")


def test_unknown_record_and_record_without_file(ready: Cli) -> None:
    assert_error(ready("export-file", "999999"), 4, "not_found", "record 999999 not found")
    no_file = ready.json("add", "-u", "ann", "-n", "text only", "-d", "x")["record_id"]
    assert_error(
        ready("export-file", str(no_file)), 4, "not_found", f"record {no_file} has no file"
    )


def test_record_id_must_be_positive(ready: Cli) -> None:
    assert_error(ready("export-file", "0"), 2, "usage_error", "record id must be a positive number")


def test_export_is_audited(ready: Cli, tmp_path: Path, db_url: str) -> None:
    record_id = add_file(ready, tmp_path / "x.pdf", CONTENT, username="bea")
    ready.json("export-file", str(record_id), "-o", "out.pdf")
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT usernames, record_ids, outcome FROM audit_log "
            "WHERE action = 'export-file' ORDER BY id DESC LIMIT 1"
        ).fetchone()
    assert row == (["bea"], [record_id], "ok")


# -- tampering: exit 7, and no file (not even a partial one) is left ---------------


def two_chunk_records(cli: Cli, tmp_path: Path) -> tuple[int, int]:
    size = CHUNK_SIZE + 1000
    first = add_file(cli, tmp_path / "one.bin", b"1" * size)
    second = add_file(cli, tmp_path / "two.bin", b"2" * size)
    return first, second


def tamper_flip_byte(db_url: str, key: str, first: int, second: int) -> str:
    execute(
        db_url,
        "UPDATE record_chunks SET token = set_byte(token, 40, get_byte(token, 40) # 1) "
        "WHERE record_id = %s AND seq = 1",
        first,
    )
    return f"cannot decrypt chunk 1 of record {first}: wrong key or tampered data"


def tamper_swap_records(db_url: str, key: str, first: int, second: int) -> str:
    execute(
        db_url,
        "UPDATE record_chunks c SET token = o.token FROM record_chunks o "
        "WHERE c.record_id = %s AND o.record_id = %s AND c.seq = o.seq",
        first,
        second,
    )
    return f"record {first}: chunk 0 is out of place (it belongs to another record, position 0)"


def tamper_reorder(db_url: str, key: str, first: int, second: int) -> str:
    execute(
        db_url,
        "UPDATE record_chunks c SET token = o.token FROM record_chunks o "
        "WHERE c.record_id = %s AND o.record_id = c.record_id AND o.seq = 1 - c.seq",
        first,
    )
    return f"record {first}: chunk 0 is out of place (it belongs to this record, position 1)"


def tamper_drop_last(db_url: str, key: str, first: int, second: int) -> str:
    execute(db_url, "DELETE FROM record_chunks WHERE record_id = %s AND seq = 1", first)
    return f"record {first}: has 1 chunks, expected 2"


def tamper_drop_first(db_url: str, key: str, first: int, second: int) -> str:
    execute(db_url, "DELETE FROM record_chunks WHERE record_id = %s AND seq = 0", first)
    return f"record {first}: chunk 0 is missing"


def tamper_size_column(db_url: str, key: str, first: int, second: int) -> str:
    execute(db_url, "UPDATE patient_records SET file_size = 5 WHERE id = %s", first)
    return f"record {first}: stored file size does not match its metadata"


def tamper_hash(db_url: str, key: str, first: int, second: int) -> str:
    rewrite_meta(db_url, key, first, sha256="00" * 32)
    return f"record {first}: file content fails its integrity check"


def tamper_meta_token(db_url: str, key: str, first: int, second: int) -> str:
    execute(
        db_url,
        # Always a different base64 character at byte 30, so the token really changes.
        "UPDATE patient_records SET meta = set_byte(meta, 30, "
        "CASE WHEN get_byte(meta, 30) = 65 THEN 66 ELSE 65 END) WHERE id = %s",
        first,
    )
    return f"cannot decrypt record {first}: wrong key or tampered data"


TAMPERINGS = [
    tamper_flip_byte,
    tamper_swap_records,
    tamper_reorder,
    tamper_drop_last,
    tamper_drop_first,
    tamper_size_column,
    tamper_hash,
    tamper_meta_token,
]


@pytest.mark.parametrize("tamper", TAMPERINGS, ids=lambda f: f.__name__)
def test_tampered_file_exits_7_and_leaves_no_file(
    ready: Cli, tmp_path: Path, db_url: str, fernet_key: str, tamper: Any
) -> None:
    first, second = two_chunk_records(ready, tmp_path)
    message = tamper(db_url, fernet_key, first, second)
    kind = "decryption_failed" if message.startswith("cannot decrypt") else "integrity_failed"
    (tmp_path / "out").mkdir()
    result = ready("export-file", str(first), "-o", "out/restored.bin")
    assert_error(result, 7, kind, message)
    assert list((tmp_path / "out").iterdir()) == []
    # An existing file is left exactly as it was, even with --force.
    (tmp_path / "out" / "restored.bin").write_bytes(b"keep")
    result = ready("export-file", str(first), "-o", "out/restored.bin", "--force")
    assert_error(result, 7, kind, message)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["restored.bin"]
    assert (tmp_path / "out" / "restored.bin").read_bytes() == b"keep"
    # The untouched record still exports.
    if tamper is not tamper_swap_records:
        ready.json("export-file", str(second), "-o", "out/second.bin")
        assert (tmp_path / "out" / "second.bin").read_bytes() == b"2" * (CHUNK_SIZE + 1000)


def test_tampered_export_to_stdout_exits_7(ready: Cli, tmp_path: Path, db_url: str) -> None:
    first, second = two_chunk_records(ready, tmp_path)
    message = tamper_drop_last(db_url, "", first, second)
    result = ready("export-file", str(first), "-o", "-", "--format", "json")
    assert_error(result, 7, "integrity_failed", message)


def test_failed_export_is_audited_as_failed(ready: Cli, tmp_path: Path, db_url: str) -> None:
    first, second = two_chunk_records(ready, tmp_path)
    tamper_drop_last(db_url, "", first, second)
    assert ready("export-file", str(first), "-o", "out.bin").exit_code == 7
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT record_ids, outcome FROM audit_log WHERE action = 'export-file' "
            "ORDER BY id DESC LIMIT 1"
        ).fetchone()
    assert row == ([first], "error:7")


def test_force_never_replaces_a_device_or_fifo(ready: Cli, tmp_path: Path) -> None:
    record_id = add_file(ready, tmp_path / "x.pdf", CONTENT)
    os.mkfifo(tmp_path / "pipe")
    result = ready("export-file", str(record_id), "-o", "pipe", "--force")
    assert_error(result, 2, "usage_error", "pipe is not a regular file; not replacing it")
    assert stat.S_ISFIFO((tmp_path / "pipe").stat().st_mode)
    assert leftovers(tmp_path) == []
    # (Devices are refused the same way; not tried here, as a regression would
    # replace /dev/null on the machine running the tests.)


def test_a_folder_that_cannot_be_written_is_a_usage_error(ready: Cli, tmp_path: Path) -> None:
    record_id = add_file(ready, tmp_path / "x.pdf", CONTENT)
    unwritable = Path("/proc/self")  # nobody, not even root, creates files here
    with pytest.raises(OSError) as expected:
        tempfile.mkstemp(dir=unwritable)
    result = ready("export-file", str(record_id), "-o", str(unwritable / "x.pdf"))
    assert_error(
        result, 2, "usage_error", f"cannot write to {unwritable}: {expected.value.strerror}"
    )


def test_a_target_path_the_system_refuses_is_a_usage_error(ready: Cli, tmp_path: Path) -> None:
    # Checking the target can fail in itself (a name too long, a folder one may not
    # enter): exit 2 with the reason, not an internal error.
    record_id = add_file(ready, tmp_path / "x.pdf", CONTENT)
    too_long = "n" * 300
    result = ready("export-file", str(record_id), "-o", too_long)
    assert_error(result, 2, "usage_error", f"cannot write {too_long}: File name too long")
    result = ready("export-file", str(record_id), "-o", f"{too_long}/x.pdf")
    assert_error(result, 2, "usage_error", f"cannot write {too_long}/x.pdf: File name too long")
    assert leftovers(tmp_path) == []


def test_force_onto_a_file_that_cannot_be_replaced_is_a_usage_error(
    ready: Cli, tmp_path: Path
) -> None:
    # An immutable file stands in for another user's file in a sticky folder such
    # as /tmp: the rename into place is refused even to root.
    record_id = add_file(ready, tmp_path / "x.pdf", CONTENT)
    target = tmp_path / "locked.pdf"
    target.write_bytes(b"keep")
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", str(target)], check=False).returncode:
        pytest.skip("cannot make a file immutable here")
    try:
        result = ready("export-file", str(record_id), "-o", "locked.pdf", "--force")
        assert_error(result, 2, "usage_error", "cannot write locked.pdf: Operation not permitted")
        assert target.read_bytes() == b"keep"
        assert leftovers(tmp_path) == []
    finally:
        subprocess.run([chattr, "-i", str(target)], check=True)

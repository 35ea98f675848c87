"""`verify` end to end: a clean database passes; a flipped byte, a deleted,
swapped or foreign chunk, a truncated file and a damaged legacy row are each
reported by record, with exit 7, while the other records are still checked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.fernet import Fernet

from conftest import Cli, stderr_line
from patient_cli.recordformat import CHUNK_SIZE

THREE_CHUNKS = bytes(range(256)) * (2 * CHUNK_SIZE // 256) + b"tail"


def execute(db_url: str, statement: str, *params: Any) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute(statement, params)


def add(cli: Cli, tmp_path: Path, username: str, content: bytes | None) -> int:
    args = ["add", "-u", username, "-n", "scan", "-d", "note"]
    if content is not None:
        path = tmp_path / f"{username}-{len(content)}.bin"
        path.write_bytes(content)
        args += ["-f", str(path)]
    return int(cli.json(*args)["record_id"])


@pytest.fixture
def records(ready: Cli, tmp_path: Path) -> dict[str, int]:
    return {
        "big": add(ready, tmp_path, "ann", THREE_CHUNKS),
        "other": add(ready, tmp_path, "ann", THREE_CHUNKS[::-1]),
        "small": add(ready, tmp_path, "bob", b"hello"),
        "nofile": add(ready, tmp_path, "bob", None),
    }


def failed(cli: Cli, *args: str) -> tuple[dict[str, Any], str]:
    """Run verify expecting failures: the JSON report and the one stderr line."""
    result = cli("verify", "--format", "json", *args)
    assert result.exit_code == 7, result.stderr
    return json.loads(result.stdout), stderr_line(result)


def test_a_sound_database_verifies(ready: Cli, records: dict[str, int]) -> None:
    result = ready("verify", "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""  # no progress bar when stderr is not a terminal
    report = json.loads(result.stdout)
    assert {k: report[k] for k in ("ok", "checked", "files", "failed", "failures")} == {
        "ok": True,
        "checked": 4,
        "files": 3,
        "failed": 0,
        "failures": [],
    }
    assert report["bytes"] == 2 * len(THREE_CHUNKS) + 5
    meta = ready.json("verify", "--metadata-only")
    assert (meta["checked"], meta["files"], meta["bytes"], meta["metadata_only"]) == (4, 0, 0, True)
    assert ready.json("verify", "-u", "bob")["checked"] == 2
    assert ready.json("verify", "--record", str(records["small"]))["checked"] == 1


def test_table_output_says_what_was_checked(ready: Cli, records: dict[str, int]) -> None:
    result = ready("verify", "--format", "table")
    assert result.exit_code == 0
    assert result.stdout == ""
    assert result.stderr == "checked 4 record(s), 3 file(s), 4.0 MB: all OK\n"


def test_a_flipped_byte_in_a_chunk_is_caught(
    ready: Cli, records: dict[str, int], db_url: str
) -> None:
    big = records["big"]
    execute(
        db_url,
        "UPDATE record_chunks SET token = set_byte(token, 100, get_byte(token, 100) # 1)"
        " WHERE record_id = %s AND seq = 1",
        big,
    )
    report, line = failed(ready)
    assert report["failures"] == [
        {
            "id": big,
            "username": "ann",
            "error": f"cannot decrypt chunk 1 of record {big}: wrong key or tampered data",
        }
    ]
    assert (report["checked"], report["files"]) == (4, 2)  # the others were still checked
    assert json.loads(line) == {
        "error": "1 of 4 record(s) failed verification",
        "code": 7,
        "type": "integrity_failed",
    }
    # File contents are not read with --metadata-only.
    assert ready.json("verify", "--metadata-only")["ok"] is True


def test_a_flipped_byte_in_metadata_is_caught_even_metadata_only(
    ready: Cli, records: dict[str, int], db_url: str
) -> None:
    small = records["small"]
    execute(
        db_url,
        "UPDATE patient_records SET meta = set_byte(meta, 70, get_byte(meta, 70) # 4)"
        " WHERE id = %s",
        small,
    )
    report, _ = failed(ready, "--metadata-only")
    assert report["failures"] == [
        {
            "id": small,
            "username": "bob",
            "error": f"cannot decrypt record {small}: wrong key or tampered data",
        }
    ]
    result = ready("verify", "--format", "table", "-q")
    assert result.exit_code == 7
    assert stderr_line(result) == "Error: 1 of 4 record(s) failed verification"
    assert f"cannot decrypt record {small}" in result.stdout  # the failures table


def test_a_deleted_chunk_is_caught(ready: Cli, records: dict[str, int], db_url: str) -> None:
    big, other = records["big"], records["other"]
    execute(db_url, "DELETE FROM record_chunks WHERE record_id = %s AND seq = 1", big)
    execute(db_url, "DELETE FROM record_chunks WHERE record_id = %s AND seq = 2", other)
    report, line = failed(ready)
    assert report["failures"] == [
        {"id": big, "username": "ann", "error": f"record {big}: chunk 1 is missing"},
        {"id": other, "username": "ann", "error": f"record {other}: has 2 chunks, expected 3"},
    ]
    assert json.loads(line)["error"] == "2 of 4 record(s) failed verification"


def test_a_truncated_file_is_caught_even_with_its_chunk_count_fixed(
    ready: Cli, records: dict[str, int], db_url: str
) -> None:
    big = records["big"]
    execute(db_url, "DELETE FROM record_chunks WHERE record_id = %s AND seq = 2", big)
    execute(db_url, "UPDATE patient_records SET chunk_count = 2 WHERE id = %s", big)
    report, _ = failed(ready, "--record", str(big))
    assert report["failures"] == [
        {
            "id": big,
            "username": "ann",
            "error": f"record {big}: file content fails its integrity check",
        }
    ]


def test_two_swapped_chunks_are_caught(ready: Cli, records: dict[str, int], db_url: str) -> None:
    big = records["big"]
    with psycopg.connect(db_url) as conn:
        conn.execute(
            "UPDATE record_chunks SET seq = 100 + seq WHERE record_id = %s AND seq IN (0, 1)",
            (big,),
        )
        conn.execute(
            "UPDATE record_chunks SET seq = CASE seq WHEN 100 THEN 1 ELSE 0 END"
            " WHERE record_id = %s AND seq IN (100, 101)",
            (big,),
        )
    report, _ = failed(ready, "-u", "ann")
    assert report["failures"] == [
        {
            "id": big,
            "username": "ann",
            "error": f"record {big}: chunk 0 is out of place "
            "(it belongs to this record, position 1)",
        }
    ]


def test_a_chunk_moved_from_another_file_is_caught(
    ready: Cli, records: dict[str, int], db_url: str
) -> None:
    big, other = records["big"], records["other"]
    execute(
        db_url,
        "UPDATE record_chunks SET token = (SELECT token FROM record_chunks"
        " WHERE record_id = %s AND seq = 1) WHERE record_id = %s AND seq = 1",
        other,
        big,
    )
    report, _ = failed(ready)
    assert report["failures"] == [
        {
            "id": big,
            "username": "ann",
            "error": f"record {big}: chunk 1 is out of place "
            "(it belongs to another record, position 1)",
        }
    ]


@pytest.mark.parametrize("which", ["small", "nofile", "big"])
def test_a_record_copied_whole_under_another_id_is_caught(
    ready: Cli, records: dict[str, int], db_url: str, which: str
) -> None:
    # Its metadata and every chunk, as they are: the metadata names its record.
    source = records[which]
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT max(id) + 100 FROM patient_records").fetchone()
        assert row is not None
        copy_id = row[0]
        conn.execute(
            "INSERT INTO patient_records (id, username, created_at, meta, key_id, file_size,"
            " chunk_count) SELECT %s, username, created_at, meta, key_id, file_size, chunk_count"
            " FROM patient_records WHERE id = %s",
            (copy_id, source),
        )
        conn.execute(
            "INSERT INTO record_chunks (username, record_id, seq, key_id, token)"
            " SELECT username, %s, seq, key_id, token FROM record_chunks WHERE record_id = %s",
            (copy_id, source),
        )
    report, _ = failed(ready)
    assert [(f["id"], f["error"]) for f in report["failures"]] == [
        (copy_id, f"record {copy_id}: its metadata belongs to another record")
    ]
    result = ready("export-file", str(copy_id), "-o", "copy.bin")
    assert result.exit_code == 7, result.stderr


def test_a_stray_chunk_on_a_record_without_a_file_is_caught(
    ready: Cli, records: dict[str, int], db_url: str
) -> None:
    nofile, small = records["nofile"], records["small"]
    execute(
        db_url,
        "INSERT INTO record_chunks (username, record_id, seq, key_id, token)"
        " SELECT username, %s, seq, key_id, token FROM record_chunks WHERE record_id = %s",
        nofile,
        small,
    )
    report, _ = failed(ready)
    assert report["failures"] == [
        {
            "id": nofile,
            "username": "bob",
            "error": f"record {nofile}: chunk 0 is out of place "
            "(it belongs to another record, position 0)",
        }
    ]


def test_narrowing_skips_damage_elsewhere(ready: Cli, records: dict[str, int], db_url: str) -> None:
    execute(db_url, "DELETE FROM record_chunks WHERE record_id = %s", records["big"])
    assert ready.json("verify", "-u", "bob")["ok"] is True
    assert ready.json("verify", "--record", str(records["other"]))["ok"] is True
    report, _ = failed(ready, "--record", str(records["big"]))
    assert [f["id"] for f in report["failures"]] == [records["big"]]


def test_unknown_record_and_bad_options(ready: Cli, records: dict[str, int]) -> None:
    result = ready("verify", "--record", "999999", "-F", "table")
    assert result.exit_code == 4
    assert stderr_line(result) == "Error: record 999999 not found"
    result = ready("verify", "--record", "0", "-F", "table")
    assert result.exit_code == 2
    assert stderr_line(result) == "Error: record id must be a positive number"
    # Past the bigint range: not found, as with export-file (not an internal error).
    result = ready("verify", "--record", "99999999999999999999", "-F", "table")
    assert result.exit_code == 4
    assert stderr_line(result) == "Error: record 99999999999999999999 not found"


def test_verify_with_the_wrong_key_fails_cleanly(ready: Cli, records: dict[str, int]) -> None:
    other_key = Fernet.generate_key().decode()
    result = ready("verify", "-F", "table", ENCRYPTION_KEY=other_key)
    assert result.exit_code == 7
    assert stderr_line(result) == ("Error: cannot decrypt stored data: wrong key or tampered data")


def test_legacy_rows_are_verified(cli: Cli, fernet_key: str, db_url: str) -> None:
    from test_rotate import create_legacy_rows

    ids = create_legacy_rows(db_url, fernet_key)
    cli.json("init-db")
    report = cli.json("verify")
    assert (report["ok"], report["checked"], report["files"]) == (True, 3, 2)
    # A record_data token written under some other key cannot be decrypted.
    stranger = Fernet(Fernet.generate_key()).encrypt(b"x").decode()
    execute(db_url, "UPDATE patient_records SET record_data = %s WHERE id = %s", stranger, ids[2])
    report, _ = failed(cli, "--metadata-only")
    assert report["failures"] == [
        {
            "id": ids[2],
            "username": "otter",
            "error": f"cannot decrypt record {ids[2]}: wrong key or tampered data",
        }
    ]


def test_verify_is_audited_with_its_outcome(
    ready: Cli, records: dict[str, int], db_url: str
) -> None:
    ready.json("verify", "-u", "bob")
    execute(db_url, "DELETE FROM record_chunks WHERE record_id = %s", records["big"])
    failed(ready)
    events = ready.json("audit", "--action", "verify")["events"]
    assert [(e["outcome"], e["usernames"], e["record_ids"]) for e in events] == [
        ("error:7", [], [records["big"]]),
        ("ok", ["bob"], []),
    ]
    assert events[0]["details"] == {
        "checked": 4,
        "failed": 1,
        "bytes": len(THREE_CHUNKS) + 5,
        "metadata_only": 0,
    }

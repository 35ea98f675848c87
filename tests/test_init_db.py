"""`init-db`: fresh schema, idempotence, the shape the schema must have, the
in-place upgrade of the original service's table, and concurrent runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.fernet import Fernet

from conftest import Cli, stderr_line
from patient_cli import sql

SEED_TABLE = """
CREATE TABLE patient_records (
    id SERIAL PRIMARY KEY,
    username VARCHAR(80) NOT NULL,
    record_name VARCHAR(255) NOT NULL,
    record_data TEXT,
    file_data BYTEA,
    file_type VARCHAR(50),
    created_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP
)"""
SEED_INSERT = """
INSERT INTO patient_records (username, record_name, record_data, file_data, file_type, created_at)
VALUES (%s, %s, %s, %s, %s, %s) RETURNING id"""

ALL_MIGRATIONS = [
    "0001_seed_table",
    "0002_encrypted_records",
    "0003_audit_log",
    "0004_inline_small_chunks",
]


def query(db_url: str, text: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        cur = conn.execute(text, params)
        return cur.fetchall() if cur.description else []


def test_fresh_database(cli: Cli) -> None:
    out = cli.json("init-db")
    assert out == {
        "message": "Schema upgraded",
        "applied": ALL_MIGRATIONS,
        "schema_version": len(ALL_MIGRATIONS),
        "upgraded_seed_table": False,
        "legacy_rows": 0,
        "generated_key_file": None,
    }


def test_init_db_is_idempotent(ready: Cli) -> None:
    ready.json("add", "-u", "amy", "-n", "kept")
    out = ready.json("init-db")
    assert (out["message"], out["applied"], out["schema_version"]) == (
        "Schema is up to date",
        [],
        len(ALL_MIGRATIONS),
    )
    assert [r["record_name"] for r in ready.json("list", "-u", "amy")["records"]] == ["kept"]


def test_small_chunk_tokens_stay_in_the_chunk_table(ready: Cli, db_url: str) -> None:
    # Migration 0004: tokens of up to a page are not moved out to TOAST.
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT reloptions FROM pg_class WHERE oid = 'record_chunks'::regclass"
        ).fetchone()
    assert row is not None and "toast_tuple_target=8160" in (row[0] or [])


def test_table_format_says_what_it_did_on_stderr(cli: Cli) -> None:
    first = cli("init-db", "--format", "table")
    assert first.exit_code == 0 and first.stdout == ""
    version = len(ALL_MIGRATIONS)
    assert stderr_line(first) == f"Applied: {', '.join(ALL_MIGRATIONS)}; schema version {version}."
    again = cli("init-db", "--format", "table")
    assert stderr_line(again) == f"Applied: nothing (already current); schema version {version}."
    assert cli("init-db", "--format", "table", "-q").stderr == ""


def test_schema_is_ready_to_distribute_by_username(ready: Cli, db_url: str) -> None:
    def primary_key(table: str) -> list[str]:
        rows = query(
            db_url,
            "SELECT a.attname FROM pg_index i "
            "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
            "WHERE i.indrelid = %s::regclass AND i.indisprimary "
            "ORDER BY array_position(i.indkey, a.attnum)",
            table,
        )
        return [r[0] for r in rows]

    assert primary_key("patient_records") == ["username", "id"]
    assert primary_key("record_chunks") == ["username", "record_id", "seq"]
    types = dict(
        query(
            db_url,
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'patient_records'",
        )
    )
    assert types["id"] == "bigint"
    assert types["created_at"] == "timestamp with time zone"
    assert query(
        db_url,
        "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal "
        "AND tgrelid IN ('patient_records'::regclass, 'record_chunks'::regclass)",
    ) == [(0,)]
    # Every unique constraint and foreign key on patient data includes username.
    for (definition,) in query(
        db_url,
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid IN ('patient_records'::regclass, 'record_chunks'::regclass) "
        "AND contype IN ('p', 'u', 'f')",
    ):
        assert "username" in definition, definition
    # Ciphertext is stored without compression attempts.
    storage = dict(
        query(
            db_url,
            "SELECT attrelid::regclass::text || '.' || attname, attstorage FROM pg_attribute "
            "WHERE (attrelid, attname) IN "
            "(('patient_records'::regclass, 'meta'), ('record_chunks'::regclass, 'token'))",
        )
    )
    assert storage == {"patient_records.meta": "e", "record_chunks.token": "e"}


def test_no_key_with_an_explicit_database_generates_none(
    cli: Cli, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ENCRYPTION_KEY")
    result = cli("init-db", "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["generated_key_file"] is None
    assert result.stderr == "No encryption key configured: this init-db was not audited.\n"
    assert not Path(env["PATIENT_RECORDS_HOME"]).exists()
    added = cli("add", "-u", "amy", "-n", "x")
    assert added.exit_code == 5
    assert json.loads(stderr_line(added))["error"] == (
        "no encryption key configured: set ENCRYPTION_KEY, ENCRYPTION_KEY_FILE or "
        "ENCRYPTION_KEY_COMMAND"
    )


# -- the original service's database --------------------------------------------


OLD_PDF = b"%PDF-1.3\n%old plaintext scan\n" + bytes(range(256))


def create_seed_database(db_url: str, key: str) -> list[int]:
    """The table and rows exactly as the original Flask service wrote them."""
    fernet = Fernet(key.encode())
    rows = [
        (
            "turtle",
            "Blood work 2021",
            fernet.encrypt(b"Hb 14.1 g/dL").decode(),
            OLD_PDF,
            "application/pdf",
            datetime(2021, 3, 4, 5, 6, 7),
        ),
        ("turtle", "Note only", fernet.encrypt("é ✓".encode()).decode(), None, None, None),
        ("rabbit", "Empty data", None, None, None, datetime(2020, 1, 1, 0, 0, 0, 123456)),
    ]
    with psycopg.connect(db_url) as conn:
        conn.execute(SEED_TABLE)
        ids = []
        for username, name, data, file_data, file_type, created_at in rows:
            if created_at is None:
                # Taking the column default, as the service always did.
                cur = conn.execute(
                    "INSERT INTO patient_records (username, record_name, record_data) "
                    "VALUES (%s, %s, %s) RETURNING id",
                    (username, name, data),
                )
            else:
                cur = conn.execute(
                    SEED_INSERT, (username, name, data, file_data, file_type, created_at)
                )
            fetched = cur.fetchone()
            assert fetched is not None
            ids.append(int(fetched[0]))
        # Pin the defaulted timestamp so the test knows it.
        conn.execute(
            "UPDATE patient_records SET created_at = '2022-06-30 23:59:59' WHERE id = %s",
            (ids[1],),
        )
    return ids


def test_seed_era_database_is_upgraded_in_place(
    cli: Cli,
    db_url: str,
    fernet_key: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    blood, note, empty = create_seed_database(db_url, fernet_key)
    # Old timestamps are UTC whatever the session's time zone.
    monkeypatch.setenv("PGTZ", "Asia/Kolkata")

    # The upgrade needs no key.
    monkeypatch.delenv("ENCRYPTION_KEY")
    out = cli.json("init-db")
    assert (out["applied"], out["upgraded_seed_table"], out["legacy_rows"]) == (
        ALL_MIGRATIONS,
        True,
        3,
    )
    monkeypatch.setenv("ENCRYPTION_KEY", fernet_key)

    turtle = cli.json("list", "-u", "turtle")["records"]
    for record in turtle:
        record["created_at"] = datetime.fromisoformat(record["created_at"])
    assert turtle == [
        {
            "id": note,
            "username": "turtle",
            "record_name": "Note only",
            "record_data": "é ✓",
            "has_file": False,
            "file_type": None,
            "file_name": None,
            "file_size": None,
            "created_at": datetime(2022, 6, 30, 23, 59, 59, tzinfo=UTC),
        },
        {
            "id": blood,
            "username": "turtle",
            "record_name": "Blood work 2021",
            "record_data": "Hb 14.1 g/dL",
            "has_file": True,
            "file_type": "application/pdf",
            "file_name": None,
            "file_size": len(OLD_PDF),
            "created_at": datetime(2021, 3, 4, 5, 6, 7, tzinfo=UTC),
        },
    ]
    (rabbit,) = cli.json("list", "-u", "rabbit")["records"]
    assert (rabbit["id"], rabbit["record_data"], rabbit["has_file"]) == (empty, None, False)
    assert datetime.fromisoformat(rabbit["created_at"]) == datetime(
        2020, 1, 1, 0, 0, 0, 123456, tzinfo=UTC
    )
    assert cli.json("list", "-u", "turtle", "--until", "2021-12-31")["records"][0]["id"] == blood

    exported = cli.json("export-file", str(blood), "-o", "old.pdf")
    assert (exported["file_size"], exported["file_type"]) == (len(OLD_PDF), "application/pdf")
    assert (tmp_path / "old.pdf").read_bytes() == OLD_PDF
    default = cli.json("export-file", str(blood))
    assert default["path"] == str(tmp_path / f"record-{blood}.bin")
    result = cli("export-file", str(note))
    assert result.exit_code == 4
    assert json.loads(stderr_line(result))["error"] == f"record {note} has no file"

    new_id = cli.json("add", "-u", "turtle", "-n", "after the upgrade")["record_id"]
    assert new_id > max(blood, note, empty)
    assert cli.json("list", "-u", "turtle", "--limit", "1")["records"][0]["id"] == new_id

    again = cli.json("init-db")
    assert (again["applied"], again["upgraded_seed_table"], again["legacy_rows"]) == ([], False, 3)


@pytest.mark.parametrize("first_command", [["list", "-u", "turtle"], ["init-db"]])
def test_a_wrong_key_after_the_upgrade_does_not_lock_the_right_one_out(
    cli: Cli,
    db_url: str,
    fernet_key: str,
    monkeypatch: pytest.MonkeyPatch,
    first_command: list[str],
) -> None:
    blood, note, _ = create_seed_database(db_url, fernet_key)
    monkeypatch.delenv("ENCRYPTION_KEY")
    cli.json("init-db")
    # The first keyed command after the upgrade comes with a valid but wrong key.
    monkeypatch.setenv("ENCRYPTION_KEY", Fernet.generate_key().decode())
    result = cli(*first_command)
    assert result.exit_code == 7
    assert json.loads(stderr_line(result))["error"] in {
        f"cannot decrypt record {record_id}: wrong key or tampered data"
        for record_id in (blood, note)
    }
    assert query(db_url, "SELECT count(*) FROM app_secrets") == [(0,)]
    monkeypatch.setenv("ENCRYPTION_KEY", fernet_key)
    assert len(cli.json("list", "-u", "turtle")["records"]) == 2


def test_seed_ids_are_widened_and_the_sequence_continues(cli: Cli, db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute(SEED_TABLE)
        conn.execute(
            "INSERT INTO patient_records (username, record_name) "
            "SELECT 'u', 'r' || n FROM generate_series(1, 5) n"
        )
        conn.execute("DELETE FROM patient_records WHERE id = 5")  # the sequence stays at 5
    cli.json("init-db")
    assert query(
        db_url,
        "SELECT data_type FROM information_schema.columns "
        "WHERE table_name = 'patient_records' AND column_name = 'id'",
    ) == [("bigint",)]
    assert cli.json("add", "-u", "u", "-n", "new")["record_id"] == 6


def test_ids_continue_after_rows_inserted_with_explicit_ids(cli: Cli, db_url: str) -> None:
    # A restore or a hand-made INSERT can leave the old sequence behind the ids.
    with psycopg.connect(db_url) as conn:
        conn.execute(SEED_TABLE)
        conn.execute(
            "INSERT INTO patient_records (id, username, record_name) "
            "VALUES (10, 'u', 'a'), (20, 'v', 'b')"
        )
    cli.json("init-db")
    first = cli.json("add", "-u", "w", "-n", "new")["record_id"]
    assert first == 21
    assert cli.json("add", "-u", "u", "-n", "new")["record_id"] == 22
    assert [r["id"] for r in cli.json("list", "--all")["records"]] == [22, 21, 20, 10]


def run_init_db_process(env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "patient_cli", "init-db", "--format", "json"],
        env={**os.environ, **env},
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("seed", [False, True], ids=["fresh", "seed-era"])
def test_concurrent_init_db_runs_both_succeed(
    cli: Cli, db_url: str, fernet_key: str, env: dict[str, str], tmp_path: Path, seed: bool
) -> None:
    if seed:
        create_seed_database(db_url, fernet_key)
    # Hold the migration lock until all three runs wait on it, so they really race.
    with psycopg.connect(db_url) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (sql.MIGRATION_LOCK_ID,))
        processes = [run_init_db_process(env, tmp_path) for _ in range(3)]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            waiting = query(
                db_url,
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND objid = %s",
                sql.MIGRATION_LOCK_ID,
            )
            if waiting == [(3,)]:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the init-db runs never waited on the migration lock")
    outputs = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
        outputs.append(json.loads(stdout))
    applied = sorted((o["applied"] for o in outputs), key=len)
    assert applied == [[], [], ALL_MIGRATIONS]
    versions = query(db_url, "SELECT version FROM schema_migrations ORDER BY 1")
    assert versions == [(n,) for n in range(1, len(ALL_MIGRATIONS) + 1)]
    assert query(db_url, "SELECT count(*) FROM app_secrets") == [(2,)]
    expected = 3 if seed else 0
    assert len(cli.json("list", "--all")["records"]) == expected

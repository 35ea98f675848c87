"""Exit codes and error messages: every documented code, as one exact line on
stderr (plain, or a JSON object with --format json), never a traceback, and
never a key, password or record content in the message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.fernet import Fernet
from psycopg.conninfo import conninfo_to_dict

from conftest import Cli, stderr_line

PASSWORD = "Pa55word-Never-Shown"
SECRET_NAME = "Diagnosis-Zebra-Quokka"
SECRET_DATA = "Details-Narwhal-Axolotl"


@dataclass(frozen=True)
class Scenario:
    """How to provoke one error, and the exact message expected for it."""

    name: str
    code: int
    kind: str
    setup: Callable[[Cli, dict[str, str], Path, pytest.MonkeyPatch], list[str]]
    message: Callable[[dict[str, str]], str]


def execute(db_url: str, query: str) -> None:
    with psycopg.connect(db_url) as conn:
        conn.execute(query)


def with_secret_record(cli: Cli, tmp_path: Path) -> int:
    (tmp_path / f"{SECRET_NAME}.pdf").write_bytes(b"%PDF-1.4 " + SECRET_DATA.encode())
    return int(
        cli.json(
            "add", "-u", "pat", "-n", SECRET_NAME, "-d", SECRET_DATA, "-f", f"{SECRET_NAME}.pdf"
        )["record_id"]
    )


def setup_usage(cli: Cli, env: dict[str, str], tmp: Path, mp: pytest.MonkeyPatch) -> list[str]:
    return ["add", "-u", "pat", "-n", SECRET_NAME + "x" * 300, "-d", SECRET_DATA]


def setup_not_found(cli: Cli, env: dict[str, str], tmp: Path, mp: pytest.MonkeyPatch) -> list[str]:
    return ["export-file", "424242"]


def setup_no_key(cli: Cli, env: dict[str, str], tmp: Path, mp: pytest.MonkeyPatch) -> list[str]:
    mp.delenv("ENCRYPTION_KEY")
    return ["add", "-u", "pat", "-n", SECRET_NAME, "-d", SECRET_DATA]


def setup_bad_key(cli: Cli, env: dict[str, str], tmp: Path, mp: pytest.MonkeyPatch) -> list[str]:
    mp.setenv("ENCRYPTION_KEY", "Sekrit-Key-Material-That-Is-Not-Fernet")
    return ["list", "-u", "pat"]


def setup_unreachable(
    cli: Cli, env: dict[str, str], tmp: Path, mp: pytest.MonkeyPatch
) -> list[str]:
    mp.setenv("DATABASE_URL", f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/clinic")
    return ["add", "-u", "pat", "-n", SECRET_NAME, "-d", SECRET_DATA]


def setup_wrong_key(cli: Cli, env: dict[str, str], tmp: Path, mp: pytest.MonkeyPatch) -> list[str]:
    with_secret_record(cli, tmp)
    mp.setenv("ENCRYPTION_KEY", Fernet.generate_key().decode())
    return ["list", "-u", "pat"]


def setup_tampered(cli: Cli, env: dict[str, str], tmp: Path, mp: pytest.MonkeyPatch) -> list[str]:
    record_id = with_secret_record(cli, tmp)
    execute(
        env["DATABASE_URL"],
        "UPDATE record_chunks SET token = set_byte(token, 50, get_byte(token, 50) # 1)",
    )
    return ["export-file", str(record_id), "-o", "out.pdf"]


def setup_internal(cli: Cli, env: dict[str, str], tmp: Path, mp: pytest.MonkeyPatch) -> list[str]:
    # A constraint the product knows nothing about: an unexpected database error.
    execute(
        env["DATABASE_URL"],
        "ALTER TABLE patient_records ADD CONSTRAINT surprise CHECK (id < 0) NOT VALID",
    )
    return ["add", "-u", "pat", "-n", SECRET_NAME, "-d", SECRET_DATA]


SCENARIOS = [
    Scenario(
        "usage",
        2,
        "usage_error",
        setup_usage,
        lambda env: "record name is longer than 255 characters",
    ),
    Scenario("not-found", 4, "not_found", setup_not_found, lambda env: "record 424242 not found"),
    Scenario(
        "no-key",
        5,
        "config_error",
        setup_no_key,
        lambda env: (
            "no encryption key configured: set ENCRYPTION_KEY, ENCRYPTION_KEY_FILE or "
            "ENCRYPTION_KEY_COMMAND"
        ),
    ),
    Scenario(
        "bad-key",
        5,
        "config_error",
        setup_bad_key,
        lambda env: (
            "the key is not a valid Fernet key (32 url-safe base64-encoded bytes); "
            "create one with `patient-records keygen`"
        ),
    ),
    Scenario(
        "unreachable",
        6,
        "database_unavailable",
        setup_unreachable,
        lambda env: (
            "cannot connect to the database (postgresql://postgres:***@127.0.0.1:1/clinic): "
            'connection failed: connection to server at "127.0.0.1", port 1 failed: '
            "Connection refused"
        ),
    ),
    Scenario(
        "wrong-key",
        7,
        "decryption_failed",
        setup_wrong_key,
        lambda env: "cannot decrypt stored data: wrong key or tampered data",
    ),
    Scenario(
        "tampered",
        7,
        "decryption_failed",
        setup_tampered,
        lambda env: "cannot decrypt chunk 0 of record 1: wrong key or tampered data",
    ),
    Scenario(
        "internal",
        1,
        "internal_error",
        setup_internal,
        lambda env: "internal error: CheckViolation (run with --debug for details)",
    ),
]


def assert_nothing_secret(text: str, env: dict[str, str]) -> None:
    for secret in (PASSWORD, SECRET_NAME, SECRET_DATA, "Sekrit", env["ENCRYPTION_KEY"]):
        assert secret not in text
    assert "Traceback" not in text


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_error_is_one_plain_line(
    ready: Cli,
    env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scenario: Scenario,
) -> None:
    args = scenario.setup(ready, dict(env), tmp_path, monkeypatch)
    result = ready(*args, "--format", "table")
    assert result.exit_code == scenario.code, result.stderr
    assert stderr_line(result) == f"Error: {scenario.message(env)}"
    assert result.stdout == ""
    assert_nothing_secret(result.stderr, env)
    assert not (tmp_path / "out.pdf").exists()


@pytest.mark.parametrize("fmt", ["json", "ndjson"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_error_is_one_json_object(
    ready: Cli,
    env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scenario: Scenario,
    fmt: str,
) -> None:
    args = scenario.setup(ready, dict(env), tmp_path, monkeypatch)
    result = ready(*args, "--format", fmt)
    assert result.exit_code == scenario.code, result.stderr
    assert json.loads(stderr_line(result)) == {
        "error": scenario.message(env),
        "code": scenario.code,
        "type": scenario.kind,
    }
    assert result.stdout == ""
    assert_nothing_secret(result.stderr, env)


def test_debug_shows_the_traceback(
    ready: Cli, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = setup_internal(ready, env, tmp_path, monkeypatch)
    result = ready("--debug", *args, "--format", "table")
    assert result.exit_code == 1
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert "CheckViolation" in result.stderr
    assert result.stderr.splitlines()[-1] == "Error: internal error: CheckViolation"


def test_success_is_exit_0_and_quiet(ready: Cli) -> None:
    result = ready("add", "-u", "pat", "-n", "fine", "-q", "--format", "table")
    assert (result.exit_code, result.stderr) == (0, "")
    result = ready("list", "-u", "pat", "-q", "--format", "json")
    assert (result.exit_code, result.stderr) == (0, "")


def test_errors_are_printed_even_with_quiet(ready: Cli) -> None:
    result = ready("export-file", "424242", "-q", "--format", "table")
    assert result.exit_code == 4
    assert stderr_line(result) == "Error: record 424242 not found"


def test_database_missing_is_a_settings_problem(
    ready: Cli, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    parts: dict[str, Any] = conninfo_to_dict(db_url)
    monkeypatch.setenv(
        "DATABASE_URL",
        f"postgresql://{parts['user']}:{PASSWORD}@{parts['host']}:{parts['port']}/absent_db",
    )
    result = ready("list", "-u", "pat", "--format", "table")
    assert result.exit_code == 5
    assert stderr_line(result) == (
        "Error: bad database settings: connection failed: connection to server at "
        f'"{parts["host"]}", port {parts["port"]} failed: FATAL:  database "absent_db" does '
        "not exist"
    )
    assert PASSWORD not in result.stderr


def test_missing_schema_is_a_configuration_error(cli: Cli) -> None:
    result = cli("list", "-u", "pat", "--format", "table")
    assert result.exit_code == 5
    assert stderr_line(result) == (
        "Error: the database schema is missing or out of date: run `patient-records init-db`"
    )


@pytest.mark.parametrize(
    "args",
    [
        ["export-file"],
        ["export-file", "not-a-number"],
        ["list", "--limit", "many"],
        ["list", "--format", "xml", "-u", "pat"],
        ["add", "--no-such-option"],
        ["no-such-command"],
    ],
)
def test_command_line_mistakes_exit_2_without_traceback(ready: Cli, args: list[str]) -> None:
    result = ready(*args)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("Error: ")


@pytest.mark.slow
def test_connection_lost_mid_upload_is_exit_6_and_stores_nothing(
    ready: Cli, db_url: str, env: dict[str, str], tmp_path: Path
) -> None:
    big = tmp_path / "big.bin"
    with big.open("wb") as out:
        out.truncate(60 * 1024 * 1024)
    command = [sys.executable, "-m", "patient_cli", "add", "-u", "pat", "-n", SECRET_NAME]
    with psycopg.connect(db_url, autocommit=True) as monitor:
        process = subprocess.Popen(
            [*command, "-f", str(big), "--format", "table"],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            terminated = 0
            deadline = time.monotonic() + 60
            while not terminated and process.poll() is None and time.monotonic() < deadline:
                row = monitor.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND query LIKE '%INSERT INTO record_chunks%' AND state = 'active'"
                ).fetchone()
                terminated = row[0] if row else 0
                time.sleep(0.005)
            _, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert terminated == 1, "the upload finished before it could be cut off"
    assert process.returncode == 6, stderr
    # Chunks are pipelined: libpq reports the cut where it first sees it (the
    # server's last message, a failed send, a failed read), so the wording varies.
    [line] = stderr.splitlines()
    assert line.startswith("Error: lost the database connection: "), line
    assert line.endswith(
        (
            "server closed the connection unexpectedly",
            "terminating connection due to administrator command",
        )
    ), line
    with psycopg.connect(db_url) as conn:
        assert conn.execute(
            "SELECT (SELECT count(*) FROM patient_records), (SELECT count(*) FROM record_chunks)"
        ).fetchone() == (0, 0)


def test_a_server_error_shows_its_primary_message_only(ready: Cli, db_url: str) -> None:
    # The server's DETAIL and CONTEXT lines may quote row values (a failing row,
    # a duplicate key): they must never reach the message.
    execute(
        db_url,
        """
        CREATE FUNCTION refuse_insert() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'could not extend file'
                USING ERRCODE = 'disk_full',
                      DETAIL = 'Failing row contains (' || NEW.username || ', Zebra-Quokka).';
        END $$;
        CREATE TRIGGER refuse_insert BEFORE INSERT ON patient_records
            FOR EACH ROW EXECUTE FUNCTION refuse_insert();
        """,
    )
    result = ready("add", "-u", "pat", "-n", SECRET_NAME, "-d", SECRET_DATA, "--format", "table")
    assert result.exit_code == 6
    assert stderr_line(result) == (
        "Error: the database could not complete the command: could not extend file"
    )
    assert "Quokka" not in result.stderr and "Failing row" not in result.stderr


def test_an_error_naming_a_path_with_a_line_break_is_still_one_line(ready: Cli) -> None:
    result = ready("add", "-u", "pat", "-n", "x", "-f", "no\nsuch\x1b[2J.pdf", "--format", "table")
    assert result.exit_code == 2
    assert stderr_line(result) == "Error: file not found: no\\x0asuch\\x1b[2J.pdf"


def test_a_read_only_database_is_unavailable_not_an_internal_error(ready: Cli, db_url: str) -> None:
    # A standby after a failover, or a server put in read-only mode: exit 6, so
    # cron retries later.
    ready.json("add", "-u", "pat", "-n", "before", "-d", "x")
    execute(
        db_url,
        "DO $$ BEGIN EXECUTE format("
        "'ALTER DATABASE %I SET default_transaction_read_only = on', current_database()); END $$",
    )
    try:
        for args in (["add", "-u", "pat", "-n", SECRET_NAME], ["list", "-u", "pat"]):
            result = ready(*args, "--format", "table")
            assert result.exit_code == 6, result.stderr
            assert stderr_line(result).startswith(
                "Error: the database accepts no writes (a standby, or read-only mode): "
                "cannot execute "
            )
    finally:
        with psycopg.connect(db_url, autocommit=True) as conn:
            conn.execute("SET default_transaction_read_only = off")
            conn.execute(
                "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I RESET "
                "default_transaction_read_only', current_database()); END $$"
            )


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["list", "-u", "pat", "--actor", "dr-\udcff"], "--actor"),
        (["audit", "--action", "add-\udcff"], "--action"),
        (["list", "-u", "pat", "--name-contains", "x-\udcff"], "--name-contains"),
        (
            ["add", "-u", "pat", "-n", "x", "-f", "scan.pdf", "--mime-type", "a/\udcff"],
            "--mime-type",
        ),
    ],
)
def test_text_options_that_are_not_utf8_are_usage_errors(
    ready: Cli, args: list[str], option: str, tmp_path: Path
) -> None:
    (tmp_path / "scan.pdf").write_bytes(b"%PDF-1.4")
    # Python turns invalid UTF-8 in argv into lone surrogates, which the database
    # driver cannot encode: exit 2, naming the option, not an internal error.
    result = ready(*args, "--format", "table")
    assert result.exit_code == 2, result.stderr
    assert stderr_line(result) == f"Error: {option} is not valid UTF-8"

"""The audit trail end to end: one event per command (with actor, patients,
record ids and outcome, never contents), listing with filters, the database
refusing UPDATE/DELETE, and `audit --verify` finding a row a superuser changed
or removed behind the trigger's back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.fernet import Fernet
from psycopg.conninfo import conninfo_to_dict

from conftest import Cli, stderr_line

NAME = "Highly-Specific-Record-Name"
DATA = "Very-Private-Clinical-Note"


def events(cli: Cli, *args: str, **env: str) -> list[dict[str, Any]]:
    return list(cli.json("audit", *args, **env)["events"])


def execute(db_url: str, *statements: str) -> None:
    with psycopg.connect(db_url) as conn:
        for statement in statements:
            conn.execute(statement)


@pytest.fixture
def busy(
    ready: Cli, tmp_path: Path, fernet_key: str, monkeypatch: pytest.MonkeyPatch
) -> dict[str, int]:
    """One of each command that reads or changes patient data; then the new key is in use."""
    path = tmp_path / "scan.txt"
    path.write_bytes(b"scan bytes")
    first = ready.json("add", "-u", "ann", "-n", NAME, "-d", DATA, "-f", str(path))["record_id"]
    second = ready.json("add", "-u", "bob", "-n", NAME, "--actor", "Dr Who")["record_id"]
    ready.json("list", "-u", "ann")
    ready.json("export-file", str(first), "-o", str(tmp_path / "out.txt"))
    monkeypatch.setenv("ENCRYPTION_KEY", f"{Fernet.generate_key().decode()},{fernet_key}")
    ready.json("rotate-key")
    return {"first": int(first), "second": int(second)}


def test_every_command_appends_one_event(ready: Cli, busy: dict[str, int]) -> None:
    found = events(ready, "-F", "json")
    assert [e["action"] for e in found] == [
        "rotate-key",
        "export-file",
        "list",
        "add",
        "add",
        "init-db",
    ]
    assert [e["id"] for e in found] == sorted((e["id"] for e in found), reverse=True)
    by_action = {e["action"]: e for e in found}
    assert by_action["export-file"]["usernames"] == ["ann"]
    assert by_action["export-file"]["record_ids"] == [busy["first"]]
    assert by_action["list"]["record_ids"] == [busy["first"]]
    assert by_action["list"]["details"] == {"count": 1}
    assert by_action["rotate-key"]["details"]["records"] == 2
    assert all(e["outcome"] == "ok" for e in found)
    first_add, second_add = found[4], found[3]
    assert (first_add["usernames"], first_add["actor"]) == (["ann"], None)
    assert (second_add["usernames"], second_add["actor"]) == (["bob"], "Dr Who")
    assert {e["db_role"] for e in found} == {conninfo_to_dict(os.environ["DATABASE_URL"])["user"]}
    assert all(e["os_user"] for e in found)
    assert all(len(bytes.fromhex(e["hash"])) == 32 for e in found)
    # Listing the trail is itself a read of audit data: it is audited too.
    assert events(ready, "--limit", "1")[0]["action"] == "audit"


def test_audit_rows_hold_no_record_contents(ready: Cli, busy: dict[str, int], db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("SELECT string_agg(audit_log::text, '|') FROM audit_log").fetchone()
    assert row is not None
    dumped = str(row[0])
    for secret in (NAME, DATA, "scan.txt", "scan bytes", "text/plain"):
        assert secret not in dumped


def test_failures_are_audited_with_their_exit_code(ready: Cli) -> None:
    result = ready("export-file", "424242", "-F", "table", "--actor", "nurse")
    assert result.exit_code == 4
    last = events(ready, "--action", "export-file")[0]
    assert (last["outcome"], last["record_ids"], last["actor"]) == ("error:4", [424242], "nurse")


def test_actor_from_the_environment(ready: Cli) -> None:
    ready.json("list", "-u", "ann", PATIENT_RECORDS_ACTOR="script for Dr Quinn")
    assert events(ready, "--action", "list")[0]["actor"] == "script for Dr Quinn"


def test_filters_and_formats(ready: Cli, busy: dict[str, int]) -> None:
    assert {e["action"] for e in events(ready, "-u", "bob")} == {"add"}
    assert [e["action"] for e in events(ready, "--action", "add")] == ["add", "add"]
    assert len(events(ready, "--limit", "2")) == 2
    assert events(ready, "--since", "2999-01-01") == []
    assert len(events(ready, "--since", "2000-01-01T00:00")) >= 6
    result = ready("audit", "--action", "add", "-F", "ndjson")
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["action"] for line in lines] == ["add", "add"]
    table = ready("audit", "-u", "bob", "-F", "table")
    assert table.exit_code == 0
    assert "2 event(s)" in table.stdout  # bob's two: his add, then the -u bob listing
    # The audit listing of bob's events is itself recorded under bob.
    assert [e["action"] for e in events(ready, "-u", "bob")][:2] == ["audit", "audit"]


def test_bad_audit_options(ready: Cli) -> None:
    for args, message in [
        (("--limit", "0"), "Error: --limit must be between 1 and 1000000"),
        (
            ("--since", "yesterday"),
            "Error: --since must be an ISO date like 2026-01-31 or 2026-01-31T08:00",
        ),
        (("--verify", "-u", "ann"), "Error: --verify checks the whole chain and takes no filters"),
        (("-u", " "), "Error: username must not be empty"),
    ]:
        result = ready("audit", *args, "-F", "table")
        assert result.exit_code == 2, args
        assert stderr_line(result) == message


def test_the_database_refuses_update_delete_and_truncate(
    ready: Cli, busy: dict[str, int], db_url: str
) -> None:
    for statement in (
        "UPDATE audit_log SET outcome = 'ok' WHERE id = 1",
        "DELETE FROM audit_log WHERE id = 1",
        "TRUNCATE audit_log",
    ):
        with (
            psycopg.connect(db_url) as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"),
        ):
            conn.execute(statement)
    assert ready.json("audit", "--verify")["ok"] is True


def test_verify_passes_on_an_intact_chain(ready: Cli, busy: dict[str, int]) -> None:
    report = ready.json("audit", "--verify")
    assert report["ok"] is True and report["first_broken_id"] is None
    assert report["checked"] == 6
    assert report["last_id"] == events(ready, "--limit", "2")[1]["id"]
    table = ready("audit", "--verify", "-F", "table")
    assert table.exit_code == 0
    assert table.stderr.startswith("audit chain OK: ")


def behind_the_trigger(db_url: str, statement: str) -> None:
    """What a superuser can do: switch the guard off, change the table, switch it on."""
    execute(
        db_url,
        "ALTER TABLE audit_log DISABLE TRIGGER audit_log_no_update_delete",
        statement,
        "ALTER TABLE audit_log ENABLE TRIGGER audit_log_no_update_delete",
    )


def test_a_row_changed_by_a_superuser_is_found(
    ready: Cli, busy: dict[str, int], db_url: str
) -> None:
    target = events(ready, "--action", "export-file")[0]["id"]
    behind_the_trigger(db_url, f"UPDATE audit_log SET actor = 'someone else' WHERE id = {target}")
    result = ready("audit", "--verify", "-F", "json")
    assert result.exit_code == 7
    assert json.loads(result.stdout) == {
        "ok": False,
        "checked": target - 1,
        "first_broken_id": target,
        "reason": "its content does not match its hash",
        "last_id": target - 1,
        "last_hash": events(ready, "--action", "list")[-1]["hash"],
    }
    assert json.loads(stderr_line(result)) == {
        "error": f"audit chain broken at event {target}: its content does not match its hash",
        "code": 7,
        "type": "integrity_failed",
    }
    table = ready("audit", "--verify", "-F", "table")
    assert table.exit_code == 7
    assert stderr_line(table) == (
        f"Error: audit chain broken at event {target}: its content does not match its hash"
    )


def test_a_forged_hash_does_not_help(ready: Cli, busy: dict[str, int], db_url: str) -> None:
    """Without the HMAC key a consistent replacement hash cannot be computed."""
    target = events(ready, "--action", "list")[0]["id"]
    behind_the_trigger(
        db_url,
        "UPDATE audit_log SET outcome = 'error:4', "
        f"hash = sha256(prev_hash || 'error:4'::bytea) WHERE id = {target}",
    )
    result = ready("audit", "--verify", "-F", "table")
    assert result.exit_code == 7
    assert stderr_line(result) == (
        f"Error: audit chain broken at event {target}: its content does not match its hash"
    )


def test_a_deleted_row_is_found(ready: Cli, busy: dict[str, int], db_url: str) -> None:
    target = events(ready, "--action", "list")[0]["id"]
    behind_the_trigger(db_url, f"DELETE FROM audit_log WHERE id = {target}")
    result = ready("audit", "--verify", "-F", "table")
    assert result.exit_code == 7
    assert stderr_line(result) == (
        f"Error: audit chain broken at event {target + 1}: it does not link to the event before it"
    )


def test_audit_verify_is_itself_audited(ready: Cli) -> None:
    ready.json("audit", "--verify")
    last = events(ready, "--action", "audit-verify")[0]
    assert last["outcome"] == "ok" and last["details"] == {"checked": 1}


@pytest.mark.slow
def test_concurrent_commands_keep_one_linear_chain(ready: Cli, env: dict[str, str]) -> None:
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys\nfrom typer.testing import CliRunner\n"
                "from patient_cli.cli import app\n"
                "runner = CliRunner()\n"
                "for n in range(8):\n"
                "    args = ['add', '-u', sys.argv[1], '-n', f'r{n}', '-F', 'json']\n"
                "    r = runner.invoke(app, args)\n"
                "    assert r.exit_code == 0, r.stderr\n",
                f"user{number}",
            ],
            env={**os.environ, **env},
        )
        for number in range(4)
    ]
    for process in processes:
        assert process.wait(timeout=120) == 0
    report = ready.json("audit", "--verify")
    assert report["ok"] is True
    assert report["checked"] == 1 + 4 * 8  # init-db and every add

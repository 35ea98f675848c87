"""`status` end to end, and keys from ENCRYPTION_KEY_COMMAND: the configuration
in effect without secrets, and how much each key id still protects."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from conftest import Cli, stderr_line
from patient_cli.crypto import key_id
from patient_cli.schema import latest_version


def kid(key: str) -> str:
    return key_id(key.encode())


def with_password(db_url: str, password: str) -> str:
    params = conninfo_to_dict(db_url)
    params["password"] = password
    return make_conninfo("", **{k: str(v) for k, v in params.items() if v is not None})


def test_status_of_a_fresh_database(ready: Cli, fernet_key: str, db_url: str) -> None:
    params = conninfo_to_dict(db_url)
    result = ready("status", "-F", "json", DATABASE_URL=with_password(db_url, "pa55-word"))
    assert result.exit_code == 0, result.stderr
    assert "pa55-word" not in result.stdout + result.stderr
    assert fernet_key not in result.stdout + result.stderr
    status = json.loads(result.stdout)
    assert status == {
        "database": f"postgresql://{params['user']}:***@{params['host']}:{params['port']}"
        f"/{params['dbname']}",
        "embedded": False,
        "server_version": status["server_version"],
        "schema_version": latest_version(),
        "schema_latest": latest_version(),
        "key_source": "ENCRYPTION_KEY",
        "keys": [
            {
                "key_id": kid(fernet_key),
                "role": "primary",
                "secrets": 2,
                "records": 0,
                "chunks": 0,
                "chunk_bytes": 0,
            }
        ],
        "legacy_rows": 0,
        "rotation_needed": False,
    }
    assert status["server_version"][0].isdigit()


def test_status_counts_what_each_key_protects(ready: Cli, fernet_key: str, tmp_path: Path) -> None:
    scan = tmp_path / "scan.bin"
    scan.write_bytes(b"x" * 3000)
    ready.json("add", "-u", "ann", "-n", "with file", "-f", str(scan))
    ready.json("add", "-u", "ann", "-n", "without file")
    new = Fernet.generate_key().decode()
    stray = Fernet.generate_key().decode()
    ready.json("add", "-u", "bob", "-n", "stray", ENCRYPTION_KEY=f"{stray},{fernet_key}")
    status = ready.json("status", ENCRYPTION_KEY=f"{new},{fernet_key}")
    keys = {k["key_id"]: k for k in status["keys"]}
    assert [k["role"] for k in status["keys"]] == ["primary", "older", "not configured"]
    assert (keys[kid(new)]["records"], keys[kid(new)]["secrets"]) == (0, 0)
    old = keys[kid(fernet_key)]
    assert (old["secrets"], old["records"], old["chunks"]) == (2, 2, 1)
    assert old["chunk_bytes"] > 3000
    assert keys[kid(stray)]["records"] == 1
    assert status["rotation_needed"] is True

    table = ready("status", "-F", "table", ENCRYPTION_KEY=f"{new},{fernet_key}")
    assert table.exit_code == 0
    assert kid(stray) in table.stdout and "not configured" in table.stdout
    assert table.stderr == (
        "Some data is under a key that is not configured and cannot be read: "
        "add that key to ENCRYPTION_KEY.\n"
    )
    for key in (new, stray, fernet_key):
        assert key not in table.stdout + table.stderr


def test_status_before_init_db(cli: Cli) -> None:
    status = cli.json("status")
    assert (status["schema_version"], status["keys"][0]["secrets"]) == (0, 0)
    table = cli("status", "-F", "table")
    assert table.exit_code == 0
    assert table.stderr == "The schema is not current: run `patient-records init-db`.\n"


def test_status_without_a_key(ready: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENCRYPTION_KEY")
    result = ready("status", "-F", "table")
    assert result.exit_code == 5
    assert stderr_line(result) == (
        "Error: no encryption key configured: set ENCRYPTION_KEY, ENCRYPTION_KEY_FILE or "
        "ENCRYPTION_KEY_COMMAND"
    )


# -- ENCRYPTION_KEY_COMMAND ----------------------------------------------------


def key_command(tmp_path: Path, text: str, status: int = 0) -> str:
    """A command (as a password manager or KMS client would be) printing `text`."""
    script = tmp_path / f"kms-{status}.py"
    script.write_text(f"import sys\nsys.stdout.write({text!r})\nsys.exit({status})\n")
    return f"{sys.executable} {script}"


def test_keys_from_a_command(
    ready: Cli, fernet_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ready.json("add", "-u", "ann", "-n", "before")
    monkeypatch.delenv("ENCRYPTION_KEY")
    monkeypatch.setenv("ENCRYPTION_KEY_COMMAND", key_command(tmp_path, fernet_key + "\n"))
    assert [r["record_name"] for r in ready.json("list", "-u", "ann")["records"]] == ["before"]
    result = ready("status", "-F", "json")
    assert fernet_key not in result.stdout + result.stderr
    status = json.loads(result.stdout)
    assert status["key_source"] == "ENCRYPTION_KEY_COMMAND"
    assert [k["key_id"] for k in status["keys"]] == [kid(fernet_key)]

    # Rotation with both keys from the command, then the new key alone.
    new = Fernet.generate_key().decode()
    monkeypatch.setenv("ENCRYPTION_KEY_COMMAND", key_command(tmp_path, f"{new},{fernet_key}"))
    rotated = ready("rotate-key", "-F", "json")
    assert rotated.exit_code == 0, rotated.stderr
    assert new not in rotated.stdout + rotated.stderr
    monkeypatch.setenv("ENCRYPTION_KEY_COMMAND", key_command(tmp_path, new))
    assert ready.json("list", "-u", "ann")["records"][0]["record_name"] == "before"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda tmp: key_command(tmp, "irrelevant", status=3),
            "Error: ENCRYPTION_KEY_COMMAND exited with status 3",
        ),
        (
            lambda tmp: "/nonexistent/kms-client --get key",
            "Error: ENCRYPTION_KEY_COMMAND not found: /nonexistent/kms-client",
        ),
        (
            lambda tmp: key_command(tmp, "not-a-key"),
            "Error: the key is not a valid Fernet key (32 url-safe base64-encoded bytes); "
            "create one with `patient-records keygen`",
        ),
        (lambda tmp: key_command(tmp, ""), "Error: the encryption key is empty"),
        (lambda tmp: "'unbalanced", "Error: ENCRYPTION_KEY_COMMAND cannot be parsed"),
    ],
)
def test_a_failing_key_command_is_a_configuration_error(
    ready: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: object, message: str
) -> None:
    monkeypatch.delenv("ENCRYPTION_KEY")
    assert callable(make)
    monkeypatch.setenv("ENCRYPTION_KEY_COMMAND", make(tmp_path))
    for command in (["status"], ["list", "-u", "ann"], ["rotate-key"]):
        result = ready(*command, "-F", "table")
        assert result.exit_code == 5, command
        assert stderr_line(result) == message
        assert result.stdout == ""


def test_a_key_command_that_prints_a_wrong_key(
    ready: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = Fernet.generate_key().decode()
    monkeypatch.delenv("ENCRYPTION_KEY")
    monkeypatch.setenv("ENCRYPTION_KEY_COMMAND", key_command(tmp_path, other))
    result = ready("list", "-u", "ann", "-F", "table")
    assert result.exit_code == 7
    assert stderr_line(result) == ("Error: cannot decrypt stored data: wrong key or tampered data")
    assert other not in result.stdout + result.stderr

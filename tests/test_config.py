"""Configuration: DATABASE_URL and the seed's DB_* variables, .env and --env-file,
and every source of the encryption key (env, file, command, several keys)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from psycopg.conninfo import conninfo_to_dict

from conftest import Cli, stderr_line
from patient_cli.config import load_env_file, load_settings
from patient_cli.crypto import parse_keys

DOTENV_VARIABLES = ("DATABASE_URL", "ENCRYPTION_KEY", "DB_HOST", "DB_PORT", "DB_NAME")


@pytest.fixture(autouse=True)
def restore_dotenv_variables(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """python-dotenv writes straight into os.environ; make monkeypatch put every
    variable a .env file here may set back as it was."""
    for name in DOTENV_VARIABLES:
        monkeypatch.setenv(name, os.environ.get(name, "placeholder"))
        if name not in env:
            monkeypatch.delenv(name)


def assert_error(result: Any, code: int, kind: str, message: str) -> None:
    assert result.exit_code == code, result.stderr
    assert json.loads(stderr_line(result)) == {"error": message, "code": code, "type": kind}


def lists_ok(cli: Cli, *args: str) -> None:
    result = cli(*args, "list", "-u", "amy", "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"records": []}


def db_parts(db_url: str) -> dict[str, str]:
    return {k: str(v) for k, v in conninfo_to_dict(db_url).items()}


# -- the database ------------------------------------------------------------------


def test_seed_db_variables(ready: Cli, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = db_parts(db_url)
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.setenv("DB_USERNAME", parts["user"])
    monkeypatch.setenv("DB_PASSWORD", "unused-with-trust-auth")
    monkeypatch.setenv("DB_HOST", parts["host"])
    monkeypatch.setenv("DB_PORT", parts["port"])
    monkeypatch.setenv("DB_NAME", parts["dbname"])
    monkeypatch.setenv("DB_SSLMODE", "disable")
    settings = load_settings()
    assert not settings.embedded
    assert settings.display_database == (
        f"postgresql://{parts['user']}:***@{parts['host']}:{parts['port']}/{parts['dbname']}"
    )
    assert "unused-with-trust-auth" not in repr(settings)
    lists_ok(ready)


def test_database_url_wins_over_db_variables(ready: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_HOST", "host.invalid")
    monkeypatch.setenv("DB_PORT", "1")
    lists_ok(ready)


def test_db_sslmode_passes_through(ready: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DB_SSLMODE", "verify-full-please")
    assert_error(
        ready("list", "-u", "amy"),
        5,
        "config_error",
        'bad database settings: connection is bad: invalid sslmode value: "verify-full-please"',
    )


def test_db_port_must_be_a_number(ready: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.setenv("DB_HOST", "127.0.0.1")
    monkeypatch.setenv("DB_PORT", "fivefourthreetwo")
    assert_error(ready("list", "-u", "amy"), 5, "config_error", "DB_PORT must be a number")


def test_a_bad_port_in_database_url_names_database_url(
    ready: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "host=127.0.0.1 password=secret port=abc")
    result = ready("list", "-u", "amy")
    assert_error(result, 5, "config_error", "the port in DATABASE_URL must be a number")
    assert "secret" not in result.stderr


def test_malformed_database_url(ready: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "this is = not a = dsn")
    assert_error(
        ready("list", "-u", "amy"),
        5,
        "config_error",
        "DATABASE_URL is not a valid PostgreSQL connection string",
    )


def test_missing_database(ready: Cli, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = db_parts(db_url)
    url = f"postgresql://{parts['user']}@{parts['host']}:{parts['port']}/no_such_database_here"
    monkeypatch.setenv("DATABASE_URL", url)
    result = ready("list", "-u", "amy")
    assert result.exit_code == 5
    error = json.loads(stderr_line(result))["error"]
    assert error.startswith("bad database settings: ")
    assert error.endswith('database "no_such_database_here" does not exist')


# -- .env and --env-file -------------------------------------------------------


def test_dotenv_in_the_current_folder_is_read(
    ready: Cli, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text(
        f"# settings\nDATABASE_URL={env['DATABASE_URL']}\nENCRYPTION_KEY={env['ENCRYPTION_KEY']}\n"
    )
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.delenv("ENCRYPTION_KEY")
    ready.json("add", "-u", "amy", "-n", "from .env")
    assert len(ready.json("list", "-u", "amy")["records"]) == 1


def test_real_environment_wins_over_dotenv(ready: Cli, tmp_path: Path) -> None:
    bad_key = Fernet.generate_key().decode()
    (tmp_path / ".env").write_text(
        f"DATABASE_URL=postgresql://postgres@127.0.0.1:1/nowhere\nENCRYPTION_KEY={bad_key}\n"
    )
    ready.json("add", "-u", "amy", "-n", "environment wins")
    assert len(ready.json("list", "-u", "amy")["records"]) == 1


def test_dotenv_is_read_only_from_the_current_folder(
    ready: Cli, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text(f"ENCRYPTION_KEY={env['ENCRYPTION_KEY']}\n")
    (tmp_path / "sub").mkdir()
    os.chdir(tmp_path / "sub")
    monkeypatch.delenv("ENCRYPTION_KEY")
    result = ready("add", "-u", "amy", "-n", "x")
    assert result.exit_code == 5  # the parent folder's .env is not used


def test_env_file_option_replaces_dotenv(
    ready: Cli, env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("DATABASE_URL=postgresql://postgres@127.0.0.1:1/nowhere\n")
    settings_file = tmp_path / "clinic.env"
    settings_file.write_text(
        f"DATABASE_URL={env['DATABASE_URL']}\nENCRYPTION_KEY='{env['ENCRYPTION_KEY']}'\n"
    )
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.delenv("ENCRYPTION_KEY")
    lists_ok(ready, "--env-file", str(settings_file))


def test_env_file_missing(ready: Cli) -> None:
    assert_error(
        ready("--env-file", "missing.env", "list", "-u", "amy"),
        5,
        "config_error",
        "env file not found: missing.env",
    )


def test_an_unparsable_dotenv_line_is_skipped_with_a_warning_that_quiet_silences(
    ready: Cli,
    env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (tmp_path / ".env").write_text(
        f"DATABASE_URL={env['DATABASE_URL']}\nsecret words, not a setting\n"
        f"ENCRYPTION_KEY={env['ENCRYPTION_KEY']}\n"
    )
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.delenv("ENCRYPTION_KEY")
    result = ready("list", "-u", "amy", "--format", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"records": []}  # the lines around it were read
    assert result.stderr == "Warning: line 2 of .env could not be parsed; it was ignored\n"
    assert not [r for r in caplog.records if r.name.startswith("dotenv")]  # not twice
    quiet = ready("list", "-u", "amy", "--format", "json", "-q")
    assert (quiet.exit_code, quiet.stderr) == (0, "")


def test_the_warning_names_the_env_file_given_and_shows_its_controls(
    ready: Cli, tmp_path: Path
) -> None:
    settings_file = tmp_path / "clinic\x1b[31m.env"
    settings_file.write_text("PATIENT_RECORDS_ACTOR=desk\n'unterminated\n")
    result = ready("--env-file", str(settings_file), "list", "-u", "amy", "--format", "json")
    assert result.exit_code == 0, result.stderr
    shown = str(settings_file).replace("\x1b", "\\x1b")
    assert result.stderr == f"Warning: line 2 of {shown} could not be parsed; it was ignored\n"


def test_env_files_read_as_the_original_services_loader_read_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What python-dotenv accepts (export, quotes, ${VAR}, CRLF, a byte-order
    mark) still works now that the file is read here first."""
    names = ("PR_T_FIRST", "PR_T_EXPORTED", "PR_T_QUOTED", "PR_T_REF", "PR_T_REAL")
    for name in names:
        monkeypatch.setenv(name, "placeholder")  # so that monkeypatch removes them after
        monkeypatch.delenv(name)
    monkeypatch.setenv("PR_T_REAL", "from the environment")
    path = tmp_path / "clinic.env"
    path.write_bytes(
        b"\xef\xbb\xbfPR_T_FIRST=one\r\n"
        b"export PR_T_EXPORTED=two # a comment\r\n"
        b"PR_T_QUOTED='three four'\r\n"
        b"PR_T_REF=${PR_T_FIRST}-${PR_T_REAL}\r\n"
        b"PR_T_REAL=from the file\r\n"
    )
    assert load_env_file(path) == []
    assert [os.environ[name] for name in names] == [
        "one",
        "two",
        "three four",
        "one-from the environment",
        "from the environment",
    ]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"ENCRYPTION_KEY=\xff\xfe\n", "cannot read env file {}: it is not UTF-8 text"),
        (
            b"PATIENT_RECORDS_ACTOR=a\x00b\n",
            "cannot use env file {}: a value holds a NUL character",
        ),
    ],
    ids=["not-utf8", "nul"],
)
def test_an_env_file_it_cannot_use_is_a_config_error(
    ready: Cli, tmp_path: Path, content: bytes, problem: str
) -> None:
    settings_file = tmp_path / "clinic.env"
    settings_file.write_bytes(content)
    result = ready("--env-file", str(settings_file), "list", "-u", "amy")
    assert_error(result, 5, "config_error", problem.format(settings_file))


def test_an_unreadable_env_file_is_a_config_error(
    ready: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings_file = tmp_path / "clinic.env"
    settings_file.write_text("PATIENT_RECORDS_ACTOR=x\n")
    settings_file.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: fail the read as it fails for others

        def refuse(self: Path, *args: Any, **kwargs: Any) -> str:
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(Path, "read_text", refuse)
    assert_error(
        ready("--env-file", str(settings_file), "list", "-u", "amy"),
        5,
        "config_error",
        f"cannot read env file {settings_file}: Permission denied",
    )


def test_python_dotenv_disabled_turns_the_env_file_off(
    ready: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_bytes(b"\xff not even text\n")
    monkeypatch.setenv("PYTHON_DOTENV_DISABLED", "1")
    lists_ok(ready)


# -- keys --------------------------------------------------------------------------


def key_file(tmp_path: Path, key: str, mode: int = 0o600, name: str = "patient.key") -> Path:
    path = tmp_path / name
    path.write_text(key + "\n")
    path.chmod(mode)
    return path


def test_key_file(
    ready: Cli, fernet_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ready.json("add", "-u", "amy", "-n", "with env key", "-d", "x")
    monkeypatch.delenv("ENCRYPTION_KEY")
    monkeypatch.setenv("ENCRYPTION_KEY_FILE", str(key_file(tmp_path, fernet_key)))
    assert ready.json("list", "-u", "amy")["records"][0]["record_data"] == "x"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_file_readable_by_others_is_refused(
    ready: Cli, fernet_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int
) -> None:
    path = key_file(tmp_path, fernet_key, mode)
    monkeypatch.delenv("ENCRYPTION_KEY")
    monkeypatch.setenv("ENCRYPTION_KEY_FILE", str(path))
    result = ready("list", "-u", "amy")
    assert_error(
        result,
        5,
        "config_error",
        f"key file {path} is readable by group or others (mode {mode:04o}); "
        f"fix with: chmod 600 {path}",
    )
    assert fernet_key not in result.stderr


def test_key_file_owned_by_another_user_is_refused(
    ready: Cli, fernet_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whoever owns the file could replace the key with one of their own.
    path = key_file(tmp_path, fernet_key)
    stranger = 4242 if os.geteuid() != 4242 else 4243
    try:
        os.chown(path, stranger, -1)
    except PermissionError:
        pytest.skip("only root can give a file away")
    monkeypatch.delenv("ENCRYPTION_KEY")
    monkeypatch.setenv("ENCRYPTION_KEY_FILE", str(path))
    result = ready("list", "-u", "amy")
    assert_error(
        result,
        5,
        "config_error",
        f"key file {path} belongs to another user (uid {stranger}); use a key file that you own",
    )
    assert fernet_key not in result.stderr


def test_key_file_behind_a_symlink_is_checked_at_its_target(
    ready: Cli, fernet_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ready.json("add", "-u", "amy", "-n", "with env key", "-d", "x")
    target = key_file(tmp_path, fernet_key, 0o644, name="shared.key")
    link = tmp_path / "link.key"
    link.symlink_to(target)
    monkeypatch.delenv("ENCRYPTION_KEY")
    monkeypatch.setenv("ENCRYPTION_KEY_FILE", str(link))
    assert ready("list", "-u", "amy").exit_code == 5
    target.chmod(0o600)
    assert ready.json("list", "-u", "amy")["records"][0]["record_data"] == "x"


def test_key_file_missing_or_not_a_file(
    ready: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ENCRYPTION_KEY")
    monkeypatch.setenv("ENCRYPTION_KEY_FILE", str(tmp_path / "nope.key"))
    assert_error(
        ready("list", "-u", "amy"),
        5,
        "config_error",
        f"key file not found: {tmp_path / 'nope.key'}",
    )
    (tmp_path / "keys").mkdir(mode=0o700)
    monkeypatch.setenv("ENCRYPTION_KEY_FILE", str(tmp_path / "keys"))
    assert_error(
        ready("list", "-u", "amy"),
        5,
        "config_error",
        f"key file is not a regular file: {tmp_path / 'keys'}",
    )


def test_key_file_with_garbage(ready: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENCRYPTION_KEY")
    monkeypatch.setenv("ENCRYPTION_KEY_FILE", str(key_file(tmp_path, "hunter2-not-a-key")))
    result = ready("list", "-u", "amy")
    assert_error(
        result,
        5,
        "config_error",
        "the key is not a valid Fernet key (32 url-safe base64-encoded bytes); "
        "create one with `patient-records keygen`",
    )
    assert "hunter2" not in result.stderr


def test_key_command(
    ready: Cli, fernet_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ready.json("add", "-u", "amy", "-n", "r", "-d", "via command")
    path = key_file(tmp_path, fernet_key)
    monkeypatch.delenv("ENCRYPTION_KEY")
    monkeypatch.setenv("ENCRYPTION_KEY_COMMAND", f"cat '{path}'")
    assert ready.json("list", "-u", "amy")["records"][0]["record_data"] == "via command"
    monkeypatch.setenv("ENCRYPTION_KEY_COMMAND", "false")
    assert_error(
        ready("list", "-u", "amy"),
        5,
        "config_error",
        "ENCRYPTION_KEY_COMMAND exited with status 1",
    )


def test_only_one_key_source(
    ready: Cli, fernet_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENCRYPTION_KEY_FILE", str(key_file(tmp_path, fernet_key)))
    assert_error(
        ready("list", "-u", "amy"),
        5,
        "config_error",
        "set only one of ENCRYPTION_KEY, ENCRYPTION_KEY_FILE",
    )


def test_no_key_with_an_explicit_database(ready: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENCRYPTION_KEY")
    assert_error(
        ready("add", "-u", "amy", "-n", "x"),
        5,
        "config_error",
        "no encryption key configured: set ENCRYPTION_KEY, ENCRYPTION_KEY_FILE or "
        "ENCRYPTION_KEY_COMMAND",
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("not-a-fernet-key", "the key is not a valid Fernet key"),
        ("c2hvcnQ=", "the key is not a valid Fernet key"),
        (" , ,", "the encryption key is empty"),
        ("{good},oops-second", "key 2 of 2 is not a valid Fernet key"),
        ("bad-first,{good}", "key 1 of 2 is not a valid Fernet key"),
        ("{good}\u00e9", "the key is not a valid Fernet key"),
    ],
)
def test_bad_encryption_key_value(
    ready: Cli, fernet_key: str, monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    value = value.replace("{good}", fernet_key)
    monkeypatch.setenv("ENCRYPTION_KEY", value)
    result = ready("add", "-u", "amy", "-n", "x")
    assert result.exit_code == 5
    error = json.loads(stderr_line(result))
    assert error["error"].startswith(message), error
    assert error["type"] == "config_error"
    for part in value.split(","):
        if part.strip():
            assert part.strip() not in result.stderr


def test_several_keys_first_encrypts_all_decrypt(
    ready: Cli, fernet_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    old_id = ready.json("add", "-u", "amy", "-n", "old", "-d", "under the old key")["record_id"]
    new_key = Fernet.generate_key().decode()
    monkeypatch.setenv("ENCRYPTION_KEY", f" {new_key} , {fernet_key} ")
    new_id = ready.json("add", "-u", "amy", "-n", "new", "-d", "under the new key")["record_id"]
    records = {r["id"]: r["record_data"] for r in ready.json("list", "-u", "amy")["records"]}
    assert records == {old_id: "under the old key", new_id: "under the new key"}
    # The new record really is under the new key: the old key alone cannot read it.
    # (The HMAC secrets stay under the old key until rotate-key, so keep it second.)
    monkeypatch.setenv("ENCRYPTION_KEY", f"{fernet_key},{Fernet.generate_key().decode()}")
    result = ready("list", "-u", "amy")
    assert_error(
        result,
        7,
        "decryption_failed",
        f"cannot decrypt record {new_id}: wrong key or tampered data",
    )


# -- keygen ------------------------------------------------------------------------


def test_keygen_prints_a_new_valid_key(cli: Cli) -> None:
    first, second = cli("keygen"), cli("keygen")
    assert first.exit_code == 0 and first.stderr == ""
    key = first.stdout.strip()
    assert first.stdout == key + "\n"
    assert parse_keys(key) == [key.encode()]
    Fernet(key.encode())
    assert second.stdout != first.stdout


def test_keygen_write_creates_a_0600_file_and_never_overwrites(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys" / "clinic.key"
    result = cli("keygen", "--write", str(path))
    assert result.exit_code == 0
    assert result.stdout == ""  # the key never goes to the terminal
    assert stderr_line(result) == f"Wrote a new key to {path} (mode 0600). Back it up."
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = path.read_text().strip()
    assert parse_keys(key) == [key.encode()]
    assert key not in result.stderr

    again = cli("keygen", "--write", str(path))
    assert again.exit_code == 2
    assert json.loads(stderr_line(again)) == {
        "error": f"key file already exists, not overwriting: {path}",
        "code": 2,
        "type": "target_exists",
    }
    assert path.read_text().strip() == key

    # The written file is accepted as a key source.
    monkeypatch.delenv("ENCRYPTION_KEY")
    monkeypatch.setenv("ENCRYPTION_KEY_FILE", str(path))
    assert cli("init-db", "-q").exit_code == 0
    assert cli.json("add", "-u", "amy", "-n", "with keygen's key")["record_id"] > 0


def test_keygen_write_to_a_folder_asks_for_a_file_name(cli: Cli, tmp_path: Path) -> None:
    result = cli("keygen", "--write", str(tmp_path))
    assert result.exit_code == 2
    assert json.loads(stderr_line(result)) == {
        "error": f"{tmp_path} is a folder; give the key file's name (e.g. {tmp_path / 'key'})",
        "code": 2,
        "type": "usage_error",
    }
    assert list(tmp_path.iterdir()) == []  # no temporary file left either


def test_keygen_write_into_a_missing_folder_it_cannot_create(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    for target in (tmp_path / "file" / "k.key", tmp_path / "file" / "sub" / "k.key"):
        result = cli("keygen", "--write", str(target))
        assert result.exit_code == 5, result.stderr
        assert json.loads(stderr_line(result))["error"].startswith(
            f"cannot create key file {target}"
        )

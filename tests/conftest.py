"""Shared fixtures: a real PostgreSQL database per test, a configured
environment, and a CLI runner.

The server is the one named by PATIENT_RECORDS_TEST_DATABASE_URL (a fresh
database is created on it for this run), or else a throwaway server the suite
starts itself. Each test starts from an empty `public` schema.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.fernet import Fernet
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from typer.testing import CliRunner, Result

from patient_cli.config import CONFIG_VARIABLES
from pgserver import ThrowawayServer

ENV_VARIABLES = (*CONFIG_VARIABLES, "NO_COLOR")


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    given = os.environ.get("PATIENT_RECORDS_TEST_DATABASE_URL")
    if given:
        yield given
        return
    server = ThrowawayServer()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def test_database(server_url: str) -> Iterator[str]:
    """A database of our own on the server, dropped at the end of the run."""
    name = f"pr_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')  # name is ours, not user input
    params = conninfo_to_dict(server_url)
    params["dbname"] = name
    yield make_conninfo("", **{k: str(v) for k, v in params.items() if v is not None})
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def db_url(test_database: str) -> str:
    """The test database with an empty public schema."""
    with psycopg.connect(test_database, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
    return test_database


@pytest.fixture
def fernet_key() -> str:
    return Fernet.generate_key().decode("ascii")


@pytest.fixture
def env(
    db_url: str, fernet_key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """A clean environment pointing at the test database, run from tmp_path."""
    for name in ENV_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    values = {
        "DATABASE_URL": db_url,
        "ENCRYPTION_KEY": fernet_key,
        "PATIENT_RECORDS_HOME": str(tmp_path / "home"),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return values


class Cli:
    """Runs the app in-process, as a user would type it."""

    def __init__(self) -> None:
        from patient_cli.cli import app

        self.app = app
        self.runner = CliRunner()

    def __call__(self, *args: str, input: bytes | str | None = None, **env: str) -> Result:
        return self.runner.invoke(self.app, list(args), input=input, env=env or None)

    def json(self, *args: str, **kwargs: Any) -> Any:
        import json

        result = self(*args, "--format", "json", **kwargs)
        assert result.exit_code == 0, (result.exit_code, result.stderr)
        return json.loads(result.stdout)


@pytest.fixture
def cli(env: dict[str, str]) -> Cli:
    return Cli()


@pytest.fixture
def ready(cli: Cli) -> Cli:
    """A CLI whose database has the schema."""
    result = cli("init-db", "--format", "json")
    assert result.exit_code == 0, result.stderr
    return cli


def stderr_line(result: Result) -> str:
    """The single line a failing command printed on stderr."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def wait_for_other_sessions_to_end(db_url: str) -> None:
    """A killed process's server sessions may still be finishing a COMMIT it
    sent just before it died: wait until they are gone, so that what a test
    counts next is final."""
    deadline = time.monotonic() + 30
    with psycopg.connect(db_url, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            ).fetchone()
            if row is not None and row[0] == 0:
                return
            time.sleep(0.01)
    raise AssertionError("the killed process's database sessions did not end")

"""The README's quick start on the embedded default, run as a real process with
no database configured: it must just work for a normal user, and refuse
clearly (exit 5) as root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import ENV_VARIABLES


@pytest.fixture
def embedded_env() -> Iterator[dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARIABLES}
    env.pop("PATIENT_RECORDS_TEST_DATABASE_URL", None)
    # A short home keeps the socket path inside the 0700 home.
    home = Path(tempfile.mkdtemp(prefix="prq-", dir="/tmp"))
    env["PATIENT_RECORDS_HOME"] = str(home / "h")
    yield env
    if os.geteuid() != 0:
        run(env, "server", "stop")
    subprocess.run(["rm", "-rf", str(home)], check=False)


def run(
    env: dict[str, str], *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "patient_cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="root-only behaviour")
def test_embedded_default_refuses_root(embedded_env: dict[str, str]) -> None:
    done = run(embedded_env, "init-db")
    assert done.returncode == 5
    assert (
        done.stderr.strip()
        == (
            "Error: the embedded database cannot run as root; set DATABASE_URL "
            "(or DB_HOST/DB_NAME/...) to use a PostgreSQL server, or run as a normal user"
        )
        or json.loads(done.stderr)["code"] == 5
    )
    home = Path(embedded_env["PATIENT_RECORDS_HOME"])
    assert not (home / "key").exists(), "no key is generated when the server is refused"


@pytest.mark.skipif(os.geteuid() == 0, reason="PostgreSQL does not run as root")
def test_quick_start_on_embedded_default(embedded_env: dict[str, str], tmp_path: Path) -> None:
    env = embedded_env
    init = run(env, "init-db", "--format", "json", cwd=tmp_path)
    assert init.returncode == 0, init.stderr
    key_file = Path(env["PATIENT_RECORDS_HOME"]) / "key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert str(key_file) in init.stderr and "Back it up" in init.stderr
    assert key_file.read_text().strip() not in init.stderr + init.stdout

    note = tmp_path / "note.txt"
    note.write_bytes(b"hello from the quick start\n")
    added = run(
        env,
        "add",
        "-u",
        "turtle",
        "-n",
        "Blood test",
        "-d",
        "All values normal",
        "-f",
        str(note),
        "--format",
        "json",
        cwd=tmp_path,
    )
    assert added.returncode == 0, added.stderr
    record_id = json.loads(added.stdout)["record_id"]

    listed = run(env, "list", "-u", "turtle", "--format", "json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    [record] = json.loads(listed.stdout)["records"]
    assert record["record_name"] == "Blood test"
    assert record["record_data"] == "All values normal"

    out = tmp_path / "copy.txt"
    exported = run(env, "export-file", str(record_id), "-o", str(out), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert out.read_bytes() == note.read_bytes()

    status = run(env, "server", "status", "--format", "json")
    assert json.loads(status.stdout)["running"] is True
    stopped = run(env, "server", "stop")
    assert stopped.returncode == 0
    status = run(env, "server", "status", "--format", "json")
    assert json.loads(status.stdout)["running"] is False


@pytest.mark.skipif(os.geteuid() == 0, reason="PostgreSQL does not run as root")
def test_explicit_database_never_generates_a_key(embedded_env: dict[str, str]) -> None:
    env = {**embedded_env, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}
    done = run(env, "init-db")
    assert done.returncode == 6  # unreachable: the upgrade itself needs no key
    assert not (Path(env["PATIENT_RECORDS_HOME"]) / "key").exists()
    added = run(env, "add", "-u", "turtle", "-n", "x")
    assert added.returncode == 5  # explicit database and no key: an error, never a new key
    assert not (Path(env["PATIENT_RECORDS_HOME"]) / "key").exists()

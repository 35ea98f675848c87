"""Interrupted uploads leave nothing behind: `kill -9`, SIGTERM and Ctrl-C of an
`add` that is streaming a large file, caught while its COPY is running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import Cli

BIG_FILE_SIZE = 60 * 1024 * 1024

pytestmark = pytest.mark.slow


def start_add(env: dict[str, str], folder: Path) -> subprocess.Popen[bytes]:
    big = folder / "big.bin"
    with big.open("wb") as out:
        out.truncate(BIG_FILE_SIZE)  # sparse: cheap to make, just as slow to encrypt
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "patient_cli",
            "add",
            "-u",
            "killme",
            "-n",
            "big",
            "-f",
            str(big),
            "--format",
            "json",
        ],
        env={**os.environ, **env},
        cwd=folder,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def client_sessions(monitor: psycopg.Connection[Any], query_part: str) -> int:
    row = monitor.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND application_name = 'patient-records' "
        "AND query LIKE %s AND state <> 'idle'",
        ("%" + query_part + "%",),
    ).fetchone()
    assert row is not None
    return int(row[0])


def wait_until(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.01)
    pytest.fail(f"timed out waiting for {what}")


def interrupt_mid_upload(
    db_url: str, env: dict[str, str], folder: Path, signum: int
) -> tuple[int, bytes]:
    """Start an add of a big file, send `signum` while its chunks are being sent,
    and return its exit status and stderr once the server has cleaned up."""
    with psycopg.connect(db_url, autocommit=True) as monitor:
        process = start_add(env, folder)
        try:
            wait_until(
                lambda: (
                    client_sessions(monitor, "INSERT INTO record_chunks") == 1
                    or process.poll() is not None
                ),
                60,
                "the upload's COPY",
            )
            assert process.poll() is None, "the add finished before it could be interrupted"
            time.sleep(0.2)  # let some chunks reach the server
            assert process.poll() is None, "the add finished before it could be interrupted"
            process.send_signal(signum)
            _, stderr = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        # The server notices the client is gone and rolls its transaction back.
        wait_until(lambda: client_sessions(monitor, "") == 0, 30, "the server to clean up")
    return process.returncode, stderr


def assert_nothing_stored(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        counts = conn.execute(
            "SELECT (SELECT count(*) FROM patient_records), (SELECT count(*) FROM record_chunks),"
            " (SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            "   WHERE a.application_name = 'patient-records'"
            "   AND a.datname = current_database())"
        ).fetchone()
    assert counts == (0, 0, 0)


def test_kill_9_mid_upload_leaves_nothing(
    ready: Cli, db_url: str, env: dict[str, str], tmp_path: Path
) -> None:
    status, _ = interrupt_mid_upload(db_url, env, tmp_path, signal.SIGKILL)
    assert status == -signal.SIGKILL
    assert_nothing_stored(db_url)
    assert ready.json("list", "-u", "killme") == {"records": []}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_ctrl_c_mid_upload_exit_130_and_store_nothing(
    ready: Cli, db_url: str, env: dict[str, str], tmp_path: Path, signum: int
) -> None:
    status, stderr = interrupt_mid_upload(db_url, env, tmp_path, signum)
    assert status == 130, stderr
    assert json.loads(stderr.decode()) == {
        "error": "interrupted; nothing was half-written",
        "code": 130,
        "type": "interrupted",
    }
    assert_nothing_stored(db_url)
    # The interrupted attempt is not a half-done record, and the next add works.
    (tmp_path / "small.txt").write_text("fine")
    added = ready.json("add", "-u", "killme", "-n", "after", "-f", "small.txt")
    assert [r["id"] for r in ready.json("list", "-u", "killme")["records"]] == [added["record_id"]]


def test_sigterm_while_waiting_on_the_server_cancels_the_statement(db_url: str) -> None:
    # SIGTERM becomes Terminated, which unwinds like Ctrl-C: psycopg cancels
    # the running statement only for a KeyboardInterrupt, and the connection
    # was left busy ("lost the database connection", exit 6, during import).
    import threading

    from patient_cli.cli import _on_sigterm
    from patient_cli.cli_app import Terminated

    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        with psycopg.connect(db_url) as conn:
            started = time.monotonic()
            timer.start()
            with pytest.raises(Terminated):
                conn.execute("SELECT pg_sleep(30)")
            assert time.monotonic() - started < 10
            conn.rollback()
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        timer.join()
        signal.signal(signal.SIGTERM, previous)

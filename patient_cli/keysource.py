"""Read the Fernet key(s) from where the configuration says they are.

Sources: ENCRYPTION_KEY, a key file (refused when group or others can read it,
as ssh refuses private keys), or ENCRYPTION_KEY_COMMAND's stdout. Error messages
name the source, never the key.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import tempfile
from pathlib import Path

from patient_cli.config import KeySource
from patient_cli.crypto import Keyring, generate_key, parse_keys
from patient_cli.errors import ConfigError, TargetExists, UsageError

KEY_COMMAND_TIMEOUT = 30


def load_keyring(source: KeySource) -> Keyring:
    """Return the configured keys, or raise ConfigError saying how to configure one."""
    if source.kind == "env":
        return Keyring(parse_keys(source.value))
    if source.kind in ("file", "default-file"):
        assert source.path is not None
        if source.kind == "default-file" and not source.path.exists():
            raise ConfigError(
                "no encryption key configured: run `patient-records init-db` to create one, "
                "or set ENCRYPTION_KEY"
            )
        return Keyring(parse_keys(read_key_file(source.path)))
    if source.kind == "command":
        return Keyring(parse_keys(run_key_command(source.value)))
    raise ConfigError(
        "no encryption key configured: set ENCRYPTION_KEY, ENCRYPTION_KEY_FILE or "
        "ENCRYPTION_KEY_COMMAND"
    )


def read_key_file(path: Path) -> str:
    # Checked and read through one descriptor, so the file checked is the file read.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"key file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read key file {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"key file is not a regular file: {path}")
        if info.st_mode & 0o077:
            raise ConfigError(
                f"key file {path} is readable by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); fix with: chmod 600 {path}"
            )
        if info.st_uid not in (os.geteuid(), 0):
            # Its owner could swap in a key of their own and read what is written next.
            raise ConfigError(
                f"key file {path} belongs to another user (uid {info.st_uid}); "
                "use a key file that you own"
            )
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read().decode("ascii")
    except (OSError, UnicodeDecodeError):
        raise ConfigError(f"cannot read key file {path}") from None
    finally:
        os.close(fd)


def run_key_command(command: str) -> str:
    try:
        argv = shlex.split(command)
    except ValueError:
        raise ConfigError("ENCRYPTION_KEY_COMMAND cannot be parsed") from None
    if not argv:
        raise ConfigError("ENCRYPTION_KEY_COMMAND is empty")
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=KEY_COMMAND_TIMEOUT,
            check=False,
        )
    except FileNotFoundError:
        raise ConfigError(f"ENCRYPTION_KEY_COMMAND not found: {argv[0]}") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(
            f"ENCRYPTION_KEY_COMMAND did not finish within {KEY_COMMAND_TIMEOUT} s"
        ) from None
    if done.returncode != 0:
        raise ConfigError(f"ENCRYPTION_KEY_COMMAND exited with status {done.returncode}")
    try:
        return done.stdout.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigError("ENCRYPTION_KEY_COMMAND printed something that is not a key") from None


def write_key_file(path: Path) -> None:
    """Create `path` (mode 0600, never overwriting) holding a new key.

    The key is written to a temporary file and linked into place, so a crash
    never leaves an empty or half-written key file behind.
    """
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give the key file's name (e.g. {path / 'key'})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".key-", suffix=".tmp")
    except FileExistsError:
        raise ConfigError(f"cannot create key file {path}: a parent is not a folder") from None
    except OSError as exc:
        raise ConfigError(f"cannot create key file {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as out:  # mkstemp creates it 0600
            out.write(generate_key() + b"\n")
            out.flush()
            os.fsync(out.fileno())
        try:
            os.link(tmp_name, path)
        except FileExistsError:
            raise TargetExists(f"key file already exists, not overwriting: {path}") from None
        except OSError as exc:
            raise ConfigError(f"cannot create key file {path}: {exc.strerror}") from None
    finally:
        os.unlink(tmp_name)

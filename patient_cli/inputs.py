"""Checking what users type and opening the files they name.

Every check raises UsageError (exit 2) with a one-line message that names the
offending option but never echoes patient content.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import BinaryIO

from patient_cli.errors import UsageError

MAX_USERNAME_LENGTH = 80  # the original service's VARCHAR(80)
MAX_RECORD_NAME_LENGTH = 255


def check_username(username: str | None) -> str:
    if username is None or username.strip() == "":
        raise UsageError("username must not be empty")
    _check_text(username, "username")
    if len(username) > MAX_USERNAME_LENGTH:
        raise UsageError(f"username is longer than {MAX_USERNAME_LENGTH} characters")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in username):
        raise UsageError("username must not contain control characters")
    return username


def check_record_name(name: str | None) -> str:
    if name is None or name.strip() == "":
        raise UsageError("record name must not be empty")
    _check_text(name, "record name")
    if len(name) > MAX_RECORD_NAME_LENGTH:
        raise UsageError(f"record name is longer than {MAX_RECORD_NAME_LENGTH} characters")
    if "\x00" in name:
        raise UsageError("record name must not contain NUL characters")
    return name


def check_record_data(data: str | None) -> str | None:
    if data is not None:
        _check_text(data, "record data")
    return data


# type "/" subtype (RFC 6838's restricted names), then optional parameters
# ("; charset=utf-8") of printable ASCII.
_MIME_NAME = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_MIME_TYPE = re.compile(rf"{_MIME_NAME}/{_MIME_NAME}(?:[ \t]*;[\x20-\x7e]*)?")
MAX_MIME_TYPE_LENGTH = 255


def check_mime_type(mime_type: str | None) -> str | None:
    """A MIME type given by the user (never quoted back: it may be sensitive)."""
    if mime_type is None:
        return None
    _check_text(mime_type, "--mime-type")
    if len(mime_type) > MAX_MIME_TYPE_LENGTH or not _MIME_TYPE.fullmatch(mime_type):
        raise UsageError(
            "--mime-type must be a MIME type such as application/pdf or text/plain; charset=utf-8"
        )
    return mime_type


def check_text(text: str | None, what: str) -> str | None:
    """Any other text option (an actor name, a filter): it must be valid UTF-8."""
    if text is not None:
        _check_text(text, what)
    return text


def decode_utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{what} is not valid UTF-8") from None


def _check_text(text: str, what: str) -> None:
    # Python turns invalid UTF-8 in argv into lone surrogates.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(f"{what} is not valid UTF-8") from None


def open_regular_file(path: str | Path) -> tuple[BinaryIO, os.stat_result]:
    """Open `path` for reading, refusing anything but a regular file (following
    symlinks). Never blocks on a FIFO. Returns the file and its fstat."""
    fd, info = _open_regular(path)
    try:
        return os.fdopen(fd, "rb", buffering=0), info
    except BaseException:
        os.close(fd)
        raise


class FileChanged(Exception):
    """The file changed while it was read."""


def read_regular_file(path: str, limit: int) -> tuple[bytes | None, os.stat_result]:
    """The whole of a regular file of at most `limit` bytes (None for a larger
    one), checked not to have changed while it was read, and its fstat.

    For import's many small files: plain descriptor calls, no file object, and
    one read where the size is right (a short read of a regular file is its
    end; had it grown since the fstat, the read would return one byte more).
    """
    fd, before = _open_regular(path, blocking=False)
    try:
        size = before.st_size
        if size > limit:
            return None, before
        data = b""
        while len(data) <= size:
            try:
                try:
                    more = os.read(fd, size + 1 - len(data))
                except BlockingIOError:  # see _open_regular: rare enough to wait for
                    os.set_blocking(fd, True)
                    continue
            except OSError as exc:
                raise UsageError(f"cannot read file: {exc.strerror or exc}") from None
            if not more:
                break
            data += more
            if len(data) == size:
                break
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if len(data) != size or changed_since(before, after):
        raise FileChanged()
    return data, before


def changed_since(before: os.stat_result, after: os.stat_result) -> bool:
    """Whether two fstats of one file tell that it was written in between."""
    return before.st_size != after.st_size or before.st_mtime_ns != after.st_mtime_ns


def _open_regular(path: str | Path, blocking: bool = True) -> tuple[int, os.stat_result]:
    """Open a regular file (never waiting on a FIFO); `blocking=False` leaves
    the descriptor non-blocking, for a caller that handles BlockingIOError
    (two system calls fewer per file, for import's many small ones)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"not a regular file: {path}") from None
    except OSError as exc:
        raise UsageError(f"cannot open {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"not a regular file: {path}")
        # O_NONBLOCK only kept open() from waiting on a FIFO. Local files ignore
        # it, but a FUSE or network file might not, and a read answering "try
        # again" would look like the end of the file.
        if blocking:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def display_file_name(path: Path) -> str:
    """The name stored with a file: its last path component, as valid UTF-8."""
    name = path.name
    _check_text(name, "file name")
    return name

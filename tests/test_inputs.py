"""Opening input files: regular files only, never waiting on a FIFO."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from patient_cli.errors import UsageError
from patient_cli.inputs import FileChanged, open_regular_file, read_regular_file


def test_a_regular_file_opens_blocking_with_its_stat(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"hello")
    source, info = open_regular_file(str(path))
    with source:
        # Opened O_NONBLOCK (for FIFOs), then set back: a read that could answer
        # "try again" would look like the end of the file.
        assert os.get_blocking(source.fileno())
        assert info.st_size == 5
        assert source.read() == b"hello"


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match=r"^not a regular file: "):
        open_regular_file(fifo)


def test_read_regular_file_reads_whole_files_up_to_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    content = os.urandom(5000)
    path.write_bytes(content)
    data, info = read_regular_file(str(path), 5000)
    assert (data, info.st_size) == (content, 5000)
    assert read_regular_file(str(path), 4999)[0] is None  # too big: the caller streams it
    (tmp_path / "empty").write_bytes(b"")
    assert read_regular_file(str(tmp_path / "empty"), 10)[0] == b""


def test_read_regular_file_refuses_what_open_refuses(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match=r"^not a regular file: "):
        read_regular_file(str(fifo), 100)
    with pytest.raises(UsageError, match=r"^file not found: "):
        read_regular_file(str(tmp_path / "missing"), 100)
    with pytest.raises(UsageError, match=r"^not a regular file: "):
        read_regular_file(str(tmp_path), 100)


def test_a_file_that_changes_size_under_the_read_is_reported(tmp_path: Path) -> None:
    # /proc files report size 0 but hold data: what was read is not what fstat said.
    status = Path("/proc/self/status")
    if not status.exists():
        pytest.skip("needs /proc")
    with pytest.raises(FileChanged):
        read_regular_file(str(status), 1 << 20)


def test_a_read_that_would_block_is_waited_for_not_taken_as_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # read_regular_file leaves the descriptor non-blocking (local files never
    # answer "try again"); a file system that does is then read blocking.
    path = tmp_path / "a.bin"
    content = os.urandom(3000)
    path.write_bytes(content)
    real_read = os.read
    calls: list[bool] = []

    def read_once_busy(fd: int, size: int) -> bytes:
        calls.append(os.get_blocking(fd))
        if len(calls) == 1:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real_read(fd, size)

    monkeypatch.setattr(os, "read", read_once_busy)
    data, _ = read_regular_file(str(path), 5000)
    assert data == content
    assert calls == [False, True]

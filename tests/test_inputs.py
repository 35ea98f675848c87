"""Opening input files: regular files only, never waiting on a FIFO."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from patient_cli.errors import UsageError
from patient_cli.inputs import open_regular_file


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

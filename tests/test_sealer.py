"""The sealer thread: order, totals, errors handed over, and an early stop."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator

import pytest

from patient_cli.sealer import ChunkSealer


def seal(seq: int, piece: bytes) -> bytes:
    return seq.to_bytes(4, "big") + piece[::-1]


def test_chunks_come_out_sealed_in_order_with_totals() -> None:
    pieces = [bytes([n]) * (n + 1) for n in range(20)]
    with ChunkSealer(iter(pieces), seal, depth=3) as sealer:
        got = list(sealer)
    assert got == [(seal(n, p), len(p)) for n, p in enumerate(pieces)]
    assert sealer.count == 20
    assert sealer.size == sum(map(len, pieces))
    assert sealer.digest == hashlib.sha256(b"".join(pieces)).digest()


def test_digest_is_refused_before_the_last_chunk() -> None:
    with ChunkSealer(iter([b"a", b"b"]), seal) as sealer:
        next(iter(sealer))
        with pytest.raises(RuntimeError):
            _ = sealer.digest


def test_a_read_error_reaches_the_consumer_after_the_chunks_before_it() -> None:
    def pieces() -> Iterator[bytes]:
        yield b"first"
        raise OSError(5, "Input/output error")

    with ChunkSealer(pieces(), seal) as sealer:
        chunks = iter(sealer)
        assert next(chunks) == (seal(0, b"first"), 5)
        with pytest.raises(OSError, match="Input/output error"):
            next(chunks)


def test_leaving_early_stops_the_thread_without_reading_everything() -> None:
    read = 0

    def endless() -> Iterator[bytes]:
        nonlocal read
        while True:
            read += 1
            yield b"x" * 1024

    before = threading.active_count()
    with ChunkSealer(endless(), seal, depth=2) as sealer:
        next(iter(sealer))
    assert threading.active_count() == before
    assert read < 10

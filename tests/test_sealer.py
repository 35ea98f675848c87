"""The sealer thread: order, totals, reused buffers, errors handed over, and an early stop."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator

import pytest

from patient_cli.sealer import ChunkSealer

CAPACITY = 64


def sealed(seq: int, piece: bytes | memoryview) -> bytes:
    return seq.to_bytes(4, "big") + bytes(piece)[::-1]


def seal(seq: int, piece: memoryview, out: bytearray) -> int:
    token = sealed(seq, piece)
    out[: len(token)] = token
    return len(token)


def views(pieces: list[bytes]) -> Iterator[memoryview]:
    # Like store._pieces: every piece in one reused buffer.
    buffer = bytearray(CAPACITY)
    for piece in pieces:
        buffer[: len(piece)] = piece
        yield memoryview(buffer)[: len(piece)]


def test_chunks_come_out_sealed_in_order_with_totals() -> None:
    pieces = [bytes([n]) * (n + 1) for n in range(20)]
    with ChunkSealer(views(pieces), seal, CAPACITY, depth=3) as sealer:
        # Each token is valid until the next is asked for: copy it now.
        got = [(bytes(token), length) for token, length in sealer]
    assert got == [(sealed(n, p), len(p)) for n, p in enumerate(pieces)]
    assert sealer.count == 20
    assert sealer.size == sum(map(len, pieces))
    assert sealer.digest == hashlib.sha256(b"".join(pieces)).digest()


def test_buffers_are_reused_not_allocated_per_chunk() -> None:
    with ChunkSealer(views([b"x"] * 50), seal, CAPACITY, depth=2) as sealer:
        buffers = {id(token.obj) for token, _ in sealer}
    assert len(buffers) <= 3  # depth + the one the consumer holds


def test_digest_is_refused_before_the_last_chunk() -> None:
    with ChunkSealer(views([b"a", b"b"]), seal, CAPACITY) as sealer:
        next(iter(sealer))
        with pytest.raises(RuntimeError):
            _ = sealer.digest


def test_a_read_error_reaches_the_consumer_after_the_chunks_before_it() -> None:
    def pieces() -> Iterator[memoryview]:
        yield memoryview(b"first")
        raise OSError(5, "Input/output error")

    with ChunkSealer(pieces(), seal, CAPACITY) as sealer:
        chunks = iter(sealer)
        token, length = next(chunks)
        assert (bytes(token), length) == (sealed(0, b"first"), 5)
        with pytest.raises(OSError, match="Input/output error"):
            next(chunks)


def test_leaving_early_stops_the_thread_without_reading_everything() -> None:
    read = 0

    def endless() -> Iterator[memoryview]:
        nonlocal read
        while True:
            read += 1
            yield memoryview(b"x" * 16)

    before = threading.active_count()
    with ChunkSealer(endless(), seal, CAPACITY, depth=2) as sealer:
        next(iter(sealer))
    assert threading.active_count() == before
    assert read < 10


def test_a_sealer_without_room_ahead_is_refused() -> None:
    with pytest.raises(ValueError):
        ChunkSealer(views([b"x"]), seal, CAPACITY, depth=0)

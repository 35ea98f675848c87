"""Reading, hashing and encrypting a file's chunks ahead of the statements that send them.

Streaming a large file is two kinds of work: ours (read, SHA-256, AES, HMAC;
cryptography and hashlib release the GIL for all of it) and the server's
(receiving and storing each chunk). Done in one thread they take turns: the
server idles while the next chunk is encrypted, and we idle while it stores the
last one. A `ChunkSealer` runs ours in a thread of its own, a few chunks ahead,
so both proceed at once and the slower side sets the pace.

Tokens are written into a small pool of reused buffers: a fresh megabyte per
token (allocated, zeroed by the kernel, then copied) cost about as much as
encrypting it.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Final

# Chunks sealed ahead of the sender: enough to ride out a slow moment on either
# side, small enough to bound memory (each is one buffer of about a chunk).
DEPTH: Final = 8
# How often a blocked producer looks whether the consumer has gone away.
_POLL_SECONDS: Final = 0.1

_DONE: Final = object()

# seal(seq, piece, out) writes the token of `piece` into `out`, returns its length.
Seal = Callable[[int, memoryview, bytearray], int]


class ChunkSealer:
    """Yields (token, plaintext length) for each piece of `pieces`, sealed by
    `seal` in a background thread into buffers of `capacity` bytes; afterwards
    `count`, `size` and `digest` describe the whole plaintext.

    Each token is a view of a reused buffer, valid until the next one is asked
    for (the consumer must have sent it by then). Use as a context manager:
    leaving it early (an error, Ctrl-C) stops the thread before the next chunk.
    """

    def __init__(
        self, pieces: Iterator[memoryview], seal: Seal, capacity: int, depth: int = DEPTH
    ) -> None:
        if depth < 1:
            raise ValueError("the sealer needs at least one chunk of room ahead")
        self._pieces = pieces
        self._seal = seal
        self._ready: queue.Queue[object] = queue.Queue()
        self._free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(depth + 1):  # +1: the one the consumer holds
            self._free.put(bytearray(capacity))
        self._stop = threading.Event()
        self._hasher = hashlib.sha256()
        self._finished = False
        self.size = 0
        self.count = 0
        self._thread = threading.Thread(target=self._run, name="chunk-sealer", daemon=True)

    def __enter__(self) -> ChunkSealer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def __iter__(self) -> Iterator[tuple[memoryview, int]]:
        held: bytearray | None = None
        try:
            while True:
                item = self._ready.get()
                if held is not None:  # the previous token has been sent
                    self._free.put(held)
                    held = None
                if item is _DONE:
                    self._finished = True
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, tuple)
                held, used, length = item
                yield memoryview(held)[:used], length
        finally:
            if held is not None:
                self._free.put(held)

    @property
    def digest(self) -> bytes:
        """SHA-256 of everything sealed (only once every chunk has been taken)."""
        if not self._finished:
            raise RuntimeError("the digest is known only after the last chunk")
        return self._hasher.digest()

    def _run(self) -> None:
        try:
            for seq, piece in enumerate(self._pieces):
                out = self._take_free()
                if out is None:
                    return
                self._hasher.update(piece)
                self.size += len(piece)
                self.count += 1
                self._ready.put((out, self._seal(seq, piece, out), len(piece)))
            self._ready.put(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._ready.put(exc)

    def _take_free(self) -> bytearray | None:
        while not self._stop.is_set():
            try:
                return self._free.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
        return None

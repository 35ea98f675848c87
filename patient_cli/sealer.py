"""Reading, hashing and encrypting a file's chunks ahead of the COPY that sends them.

Streaming a large file is two kinds of work: ours (read, SHA-256, AES, HMAC;
cryptography and hashlib release the GIL for all of it) and the server's
(receiving and storing each chunk). Done in one thread they take turns: the
server idles while the next chunk is encrypted, and we idle while it stores the
last one. A `ChunkSealer` runs ours in a thread of its own, a few chunks ahead,
so both proceed at once and the slower side sets the pace.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Final

# Chunks sealed ahead of the sender: enough to ride out a slow moment on either
# side, small enough to bound memory (each is one token of about a chunk).
DEPTH: Final = 8
# How often a blocked producer looks whether the consumer has gone away.
_POLL_SECONDS: Final = 0.1

_DONE: Final = object()

Seal = Callable[[int, bytes], bytes]


class ChunkSealer:
    """Yields (token, plaintext length) for each piece of `pieces`, sealed by
    `seal(seq, piece)` in a background thread; afterwards `count`, `size` and
    `digest` describe the whole plaintext. Use as a context manager: leaving it early
    (an error, Ctrl-C) stops the thread before the next chunk."""

    def __init__(self, pieces: Iterator[bytes], seal: Seal, depth: int = DEPTH) -> None:
        self._pieces = pieces
        self._seal = seal
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
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

    def __iter__(self) -> Iterator[tuple[bytes, int]]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                self._finished = True
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, tuple)
            yield item

    @property
    def digest(self) -> bytes:
        """SHA-256 of everything sealed (only once every chunk has been taken)."""
        if not self._finished:
            raise RuntimeError("the digest is known only after the last chunk")
        return self._hasher.digest()

    def _run(self) -> None:
        try:
            for seq, piece in enumerate(self._pieces):
                if self._stop.is_set():
                    return
                self._hasher.update(piece)
                self.size += len(piece)
                self.count += 1
                if not self._put((self._seal(seq, piece), len(piece))):
                    return
            self._put(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._put(exc)

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

"""Holding Ctrl-C and SIGTERM back for a moment, where being cut short would
misreport what was done."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_HELD = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def held() -> Iterator[None]:
    """SIGINT and SIGTERM that arrive in the block take effect at its end, through
    the handlers in place before it (Ctrl-C's KeyboardInterrupt, the CLI's
    Terminated, or the default action). Only the main thread can set signal
    handlers: elsewhere the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[tuple[int, FrameType | None]] = []

    def note(signum: int, frame: FrameType | None) -> None:
        arrived.append((signum, frame))

    previous = {signum: signal.signal(signum, note) for signum in _HELD}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if arrived:
            first, frame = arrived[0]
            handler = previous[signal.Signals(first)]
            if callable(handler):
                handler(first, frame)  # raises KeyboardInterrupt or Terminated
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), first)

"""Keeping freed memory for reuse during an import (glibc's malloc tuning).

An import of many small files allocates and frees a few kilobytes per file
over and over (the file, its tokens, a batch's rows). glibc's malloc hands
memory at the top of its heap back to the kernel as soon as 128 KiB of it is
free, so the next batch pays again for fresh pages: a page fault and the
kernel zeroing each page. Measured here, unpickling a batch of prepared
records took 6-10 µs per record that way against 2.7-4.6 µs with freed memory
kept. So, for the import only, the heap keeps up to TRIM_THRESHOLD of free
memory and grows by TOP_PAD at a time. Peak memory is what the import really
uses at once, as before (untouched pages of the pad are not resident); only
its return to the kernel is put off until the command ends.

Elsewhere than glibc (musl, macOS) this does nothing.
"""

from __future__ import annotations

import contextlib
import gc
import sys
from collections.abc import Iterator

TRIM_THRESHOLD = 64 << 20
TOP_PAD = 16 << 20
_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_TOP_PAD = -2


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as above; returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (present only in glibc)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) and mallopt(_M_TOP_PAD, TOP_PAD))


# The cyclic garbage collector's first threshold during an import (Python's
# default is 700 allocations).
IMPORT_GC_THRESHOLD = 100_000


@contextlib.contextmanager
def collect_rarely() -> Iterator[None]:
    """Run the cyclic garbage collector every IMPORT_GC_THRESHOLD allocations
    instead of every 700 while the block runs.

    An import allocates a handful of small containers per file (scan entries,
    results, outcomes) and keeps thousands alive for a second at a time, so
    the default threshold ran 131 collections over them for 5,000 files: 25-35
    ms of the main process's CPU here. Such objects form no cycles, and what
    little cyclic garbage the run makes is still collected, just later.
    """
    before = gc.get_threshold()
    gc.set_threshold(IMPORT_GC_THRESHOLD, *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)

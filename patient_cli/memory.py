"""Process-wide memory settings: glibc's malloc keeps freed memory during an
import, and Python's cyclic garbage collector runs rarely in a command.

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


# The cyclic garbage collector's first threshold for a command (Python's
# default is 700 allocations).
RARE_GC_THRESHOLD = 100_000


def collect_rarely_from_now() -> None:
    """Run the cyclic garbage collector every RARE_GC_THRESHOLD allocations
    instead of every 700, for the rest of the process.

    A command is a short-lived process that allocates many objects and keeps
    most of them (the modules it imports, the rows it fetches), making little
    cyclic garbage; the default threshold made Python walk them over and over:
    6 ms of `--version` here, 20 ms of a `list` of 5,000 records. What little
    cyclic garbage there is still gets collected, later.
    """
    gc.set_threshold(RARE_GC_THRESHOLD, *gc.get_threshold()[1:])


@contextlib.contextmanager
def collect_rarely() -> Iterator[None]:
    """collect_rarely_from_now while the block runs (for `import` called as a
    service: an import allocates a handful of small containers per file and
    keeps thousands alive for a second at a time, so the default threshold ran
    131 collections over them for 5,000 files, 25-35 ms of the main process's
    CPU here)."""
    before = gc.get_threshold()
    collect_rarely_from_now()
    try:
        yield
    finally:
        gc.set_threshold(*before)

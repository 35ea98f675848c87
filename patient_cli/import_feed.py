"""Keeping `import`'s worker processes fed, and taking their answers in scan order.

No database here (and no psycopg import): the feed is started, and its first
files sent, before the main process has imported psycopg or connected, so the
workers read and encrypt while it does (see import_pool).
"""

from __future__ import annotations

import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from patient_cli import scan
from patient_cli.errors import UsageError
from patient_cli.import_pool import Prepare, Result, Task, WorkerPool, WorkerSettings
from patient_cli.import_request import ImportRequest
from patient_cli.inputs import check_record_name

# Files go to the workers in batches of this size, up to this many files ahead
# of the one being taken in, so that workers never wait for the main process
# to ask (what they have made is bounded by import_pool.AHEAD_BYTES; ahead of
# that they hold only paths)...
POOL_BATCH = 32
AHEAD_FILES = 4096
# ...and at the start, before the main process imports psycopg and connects,
# this many files of at most this many bytes in all: about what the workers get
# through meanwhile (scanning them is on the main process's way, about 8 µs a
# file). What they seal then is sealed even if the database then says it is
# stored already: a rerun over stored files encrypts no more than this.
START_FILES = 2048
START_BYTES = 32 << 20


def file_names(
    request: ImportRequest, item: scan.ScanItem
) -> tuple[str | None, str, Result | None]:
    """A file's user and record name, or why it cannot be imported (a result)."""
    username = request.username or item.username
    if item.problem is not None:
        return username, "", ("failed", item.problem.code, item.problem.error)
    try:
        return username, check_record_name(record_name(request, item)), None
    except UsageError as exc:
        return username, "", ("failed", scan.BAD_NAME, exc.message)


def record_name(request: ImportRequest, item: scan.ScanItem) -> str:
    if request.name_from == "name":
        return item.name
    if request.name_from == "relpath":
        return item.user_rel
    # The name without its last extension, as pathlib's `stem` has it.
    name = item.name
    dot = name.rfind(".")
    return name[:dot] if 0 < dot < len(name) - 1 else name


# A file on its way to a worker: its scan item, user and record name, and its
# task (None when it already failed, with the failure in its place).
Entry = tuple[scan.ScanItem, str | None, str, Task | None, Result | None]


@dataclass
class _SentBatch:
    """A batch given to a worker: its files, and how many have their result."""

    entries: list[Entry]
    answered: int = 0


class WorkerFeed:
    """The scan's files, given to a WorkerPool a few batches ahead, and taken
    back (`next_done`) in scan order with what the workers made of them."""

    def __init__(self, pool: WorkerPool, request: ImportRequest) -> None:
        self.pool = pool
        self.request = request
        self._items: Iterator[scan.ScanItem] = scan.scan(request.scan_options)
        self._sent: deque[_SentBatch] = deque()
        self._current: deque[tuple[Entry, Result]] = deque()
        # Record ids for the tasks (once configured): the workers then seal each
        # record whole, metadata and rows included (recordformat.SealedRows).
        self._take_ids: Callable[[int], list[int]] | None = None
        self._spare_ids: deque[int] = deque()
        self._peeked: scan.ScanItem | None = None  # the scan's next file, taken early

    @classmethod
    def start(cls, workers: int, prepare: Prepare, request: ImportRequest) -> WorkerFeed:
        """Fork the workers and give them the first files (START_FILES)."""
        pool = WorkerPool(workers, prepare)
        try:
            feed = cls(pool, request)
            feed._send_ahead(START_FILES, START_BYTES)
        except BaseException:
            pool.close()
            raise
        return feed

    def configure(self, settings: WorkerSettings, take_ids: Callable[[int], list[int]]) -> None:
        """Tell the workers what the database said, and give the files sent
        after this a record id each, taken by `take_ids(count)` (reserved ids,
        in ascending order; the import gives an id whose file came back
        unsealed to a later file, see import_job._recycle_id)."""
        self.pool.send_settings(settings)
        self._take_ids = take_ids

    def files_in_flight(self) -> int:
        """How many files the workers have been given and not yet answered."""
        return sum(
            sum(1 for entry in batch.entries[batch.answered :] if entry[3] is not None)
            for batch in self._sent
        )

    def close(self) -> None:
        self.pool.close()

    def next_done(self) -> tuple[Entry, Result] | None:
        """The next file, in scan order, with what its worker made of it; None
        when there are no more. Keeps the workers a few batches ahead."""
        if not self._current:
            self._send_ahead()
            if not self._sent:
                return None
            self._take_part(self._sent[0])
            self._send_ahead()
        return self._current.popleft()

    def give_back(self, items: Iterable[scan.ScanItem]) -> None:
        """After a rollback: `items` (taken in, now undone) and every file given
        to the workers but not taken in yet are to be given again, first; the
        answers still on their way are dropped."""
        left = list(items)
        left.extend(entry[0] for entry, _ in self._current)
        self._current.clear()
        for batch in self._sent:
            left.extend(entry[0] for entry in batch.entries[batch.answered :])
        while self._sent:
            if self.pool.receive()[1]:
                self._sent.popleft()
        if self._peeked is not None:
            left.append(self._peeked)
            self._peeked = None
        self._items = itertools.chain(left, self._items)

    def _take_part(self, batch: _SentBatch) -> None:
        """Pair the next part of a batch's results with its files (and the
        files that failed before, in their place) into `current`."""
        part, complete = self.pool.receive()
        results = iter(part)
        left = len(part)
        entries = batch.entries
        while batch.answered < len(entries):
            entry = entries[batch.answered]
            if entry[3] is not None:
                if not left:
                    break
                left -= 1
            result = entry[4] if entry[3] is None else next(results)
            assert result is not None
            self._current.append((entry, result))
            batch.answered += 1
        if complete:
            assert batch.answered == len(entries)
            self._sent.popleft()

    def _send_ahead(self, files: int | None = None, max_bytes: int | None = None) -> None:
        """Send batches until `files` (by default AHEAD_FILES) are in flight, or
        (when given) files of `max_bytes` in all have been sent (checked file
        by file)."""
        files = AHEAD_FILES if files is None else files
        sent_bytes = 0
        while len(self._sent) < files // POOL_BATCH and self._more_files():
            # Ids first: if taking them fails, no file has left the scan yet.
            if self._take_ids is not None and len(self._spare_ids) < POOL_BATCH:
                self._spare_ids.extend(self._take_ids(POOL_BATCH - len(self._spare_ids)))
            batch: list[Entry] = []
            while len(batch) < POOL_BATCH and (max_bytes is None or sent_bytes < max_bytes):
                item = self._next_file()
                if item is None:
                    break
                batch.append(self._entry(item))
                if max_bytes is not None and batch[-1][3] is not None:
                    sent_bytes += _size(item.path)
            if not batch:
                return
            self.pool.send([entry[3] for entry in batch if entry[3] is not None])
            self._sent.append(_SentBatch(batch))

    def _more_files(self) -> bool:
        if self._peeked is None:
            self._peeked = next(self._items, None)
        return self._peeked is not None

    def _next_file(self) -> scan.ScanItem | None:
        if self._peeked is not None:
            item, self._peeked = self._peeked, None
            return item
        return next(self._items, None)

    def _entry(self, item: scan.ScanItem) -> Entry:
        """A file for the workers (one the scan found bad carries its failure
        instead, so that outcomes stay in scan order)."""
        username, name, failure = file_names(self.request, item)
        task: Task | None = None
        if failure is None:
            assert username is not None
            record_id = self._spare_ids.popleft() if self._spare_ids else None
            task = (item.path, username, name, item.name, record_id)
        return (item, username, name, task, failure)


def _size(path: str) -> int:
    """A file's size, or 0 if it cannot be had (its worker will report why)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0

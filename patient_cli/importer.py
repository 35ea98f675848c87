"""The service behind `import`: every file of a folder becomes one record, fast,
idempotently, and safely when two imports run at once.

Files stream from `scan` in sorted order. Small files are encrypted into
batches sent by binary COPY (from a thread, while the next batch is encrypted),
large ones streamed in chunks, both through `store`. Work is committed about
once a second with one audit event per commit, so a killed run keeps nearly all
it did, and a rerun skips every file whose keyed fingerprint is already stored
for its user (unique in the database, so a concurrent run skips too). One bad
file is reported and the import goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import psycopg
from psycopg.pq import TransactionStatus

from patient_cli import recordformat, scan, sql, store
from patient_cli.app_secrets import FINGERPRINT_KEY
from patient_cli.audit import AuditEvent, append_event, audited
from patient_cli.crypto import Keyring
from patient_cli.db import translate_db_errors
from patient_cli.errors import UsageError
from patient_cli.import_pool import (
    CHANGED,
    WHOLE_FILE_BYTES,
    Result,
    SmallFilePreparer,
    Task,
    WorkerPool,
    default_workers,
    failure_code,
)
from patient_cli.import_request import (
    Failure,
    FileOutcome,
    ImportRequest,
    ImportSummary,
    NameFrom,
    Status,
    check_request,
    count_planned,
)
from patient_cli.inputs import (
    FileChanged,
    changed_since,
    check_record_name,
    open_regular_file,
    read_regular_file,
)
from patient_cli.memory import keep_freed_memory
from patient_cli.mime import detect_mime_type
from patient_cli.session import Session

__all__ = [
    "Failure",
    "FileOutcome",
    "ImportRequest",
    "ImportSummary",
    "NameFrom",
    "Status",
    "check_request",
    "count_planned",
    "import_folder",
]

# Commit about once a second (and after this many bytes), so a killed run loses
# at most about a second of work while commits stay cheap.
COMMIT_SECONDS = 1.0
COMMIT_BYTES = 32 << 20
# Small files go to the server by COPY in batches of this size.
BATCH_FILES = 500
BATCH_BYTES = 8 << 20
ID_BLOCK = 500
# Files whose size matches a stored file's are checked in one query per this many.
CHECK_FILES = 500
CHECK_BYTES = 8 << 20
# A deadlock with another import over overlapping folders: redo that second of work.
# Both runs may keep meeting the same rows: wait a random moment (up to
# RETRY_PAUSE seconds times the attempt number) so that they fall out of step.
UNIT_ATTEMPTS = 5
RETRY_PAUSE = 0.2
# Files go to the worker processes (import_pool) in batches of this many, with
# this many batches per worker sent ahead of the one being taken in.
POOL_BATCH = 32
POOL_AHEAD = 2

# Failure code besides those of `scan` and `import_pool`.
DATABASE_REJECTED = "database_rejected"
# Per-file database errors: the file's data was refused; the next file may be fine.
_FILE_DB_ERRORS = (psycopg.DataError, psycopg.IntegrityError)


OutcomeCallback = Callable[[FileOutcome], None]
BytesCallback = Callable[[int], None]


def import_folder(
    session: Session,
    request: ImportRequest,
    on_outcome: OutcomeCallback | None = None,
    on_bytes: BytesCallback | None = None,
) -> ImportSummary:
    """Import every file under `request.root`; see the module docstring."""
    started = time.monotonic()
    check_request(request)
    keyring = session.keyring
    run_event = AuditEvent("import")
    with translate_db_errors(), audited(session, run_event):
        session.load_secrets()
        job = _ImportJob(session, request, keyring, run_event, on_outcome, on_bytes)
        workers = request.workers if request.workers is not None else default_workers()
        if request.dry_run:
            workers = 0  # it reads only files that may be stored already
        else:
            keep_freed_memory()  # before the fork: the workers inherit it
        if workers and job.dedupe and request.username is not None:
            job.give_workers_stored_sizes(request.username)
        # Each unit of work must be a transaction of its own, not a savepoint.
        if session.conn.info.transaction_status != TransactionStatus.IDLE:
            session.conn.commit()
        # Forked here, before any thread of this run starts.
        with WorkerPool(workers, job.preparer) if workers else contextlib.nullcontext() as pool:
            job.pool = pool
            job.run(scan.scan(request.scan_options))
    job.summary.seconds = time.monotonic() - started
    return job.summary


_Pending = tuple[FileOutcome, recordformat.PreparedRecord]
# A batch sent by the background thread: its records, what came of each, and
# the record ids it reserved after them.
_Flushed = tuple[list[_Pending], list[store.StoredRecord | None], list[int]]


@dataclass(frozen=True)
class _Check:
    """A small file read (and, from a worker, already encrypted) whose content
    may already be stored (fingerprint set), or that waits behind one that may."""

    item: scan.ScanItem
    username: str
    record_name: str
    size: int
    data: bytes | None
    prepared: recordformat.PreparedRecord | None
    fingerprint: bytes | None


# A file on its way to a worker: its scan item, user and record name, and its
# task (None when it already failed, with the failure in its place).
_Entry = tuple[scan.ScanItem, str | None, str, Task | None, Result | None]


@dataclass
class _SentBatch:
    """A batch given to a worker: its files, and how many have their result."""

    entries: list[_Entry]
    answered: int = 0


class _ImportJob:
    """One run's state: the open batch, this second's outcomes, and totals."""

    def __init__(
        self,
        session: Session,
        request: ImportRequest,
        keyring: Keyring,
        run_event: AuditEvent,
        on_outcome: OutcomeCallback | None,
        on_bytes: BytesCallback | None,
    ) -> None:
        self.session = session
        self.conn = session.conn
        self.request = request
        self.keyring = keyring
        self.fingerprint_key = session.secret(FINGERPRINT_KEY)
        self.dedupe = not request.allow_duplicates
        self.run_event = run_event
        self.on_outcome = on_outcome
        self.on_bytes = on_bytes
        self.summary = ImportSummary(dry_run=request.dry_run)
        self.audited_once = False
        # This unit of work (one transaction): outcomes in scan order, and the
        # prepared small records not yet sent.
        self.unit: list[FileOutcome] = []
        self.unit_ids: list[int] = []
        self.unit_bytes = 0
        self.pending: list[_Pending] = []
        self.pending_bytes = 0
        # The batch being sent by a background thread, and what came of it.
        self.flushing: threading.Thread | None = None
        self.flushed: _Flushed | None = None
        self.flush_error: BaseException | None = None
        self.free_ids: list[int] = []
        # Small files waiting for one query to tell which are already stored.
        self.checks: list[_Check] = []
        self.checks_bytes = 0
        # File sizes already fingerprinted for the current user: only a file of
        # such a size can be a duplicate, so only those are hashed up front.
        self.sizes_user: str | None = None
        self.sizes: set[int] = set()
        # Worker processes (none in a dry run or on one core): the batch being
        # gathered, and those sent, oldest first.
        self.preparer = SmallFilePreparer(
            keyring, self.fingerprint_key, request.record_data, self.dedupe
        )
        self.pool: WorkerPool | None = None
        self.sent: deque[_SentBatch] = deque()
        self.gathered: list[scan.ScanItem] = []  # taken from the scan, not yet sent
        self.current: deque[tuple[_Entry, Result]] = deque()

    def give_workers_stored_sizes(self, username: str) -> None:
        """Let the workers hash, not encrypt, files of a size stored for the
        run's one user (before they are forked: they inherit it)."""
        self._size_stored(username, -1)  # loads self.sizes
        self.preparer = dataclasses.replace(self.preparer, stored_sizes=frozenset(self.sizes))

    # -- the run ----------------------------------------------------------------

    def run(self, items: Iterator[scan.ScanItem]) -> None:
        if self.request.dry_run:
            for item in items:
                self._process(item)
                self._settle()
            self._run_checks()
            self._settle()
            self._audit(last=True)
            self.conn.commit()
            return
        source: Iterator[scan.ScanItem] = items
        more = True
        while more:
            more, source = self._run_unit(source)

    def _run_unit(self, items: Iterator[scan.ScanItem]) -> tuple[bool, Iterator[scan.ScanItem]]:
        """Process files for about a second in one transaction and commit.

        Returns whether files remain, and the iterator to continue from.
        """
        for attempt in range(UNIT_ATTEMPTS):
            # A unit must commit, not become a savepoint of an open transaction.
            assert self.conn.info.transaction_status == TransactionStatus.IDLE
            taken: list[scan.ScanItem] = []
            try:
                with self.conn.transaction():
                    try:
                        more = self._fill_unit(items, taken)
                        self._run_checks()
                        self._flush()
                        self._audit(last=not more)
                    finally:
                        self._stop_background_flush()
            except psycopg.OperationalError as exc:
                # A deadlock with another import over overlapping folders
                # (SQLSTATE class 40, "transaction rollback") rolled this unit
                # back: redo its files (each is then stored or skipped).
                if not (exc.sqlstate or "").startswith("40") or attempt == UNIT_ATTEMPTS - 1:
                    raise
                self._reset_unit()
                items = itertools.chain(taken, self._abandon_sent(), items)
                time.sleep(random.uniform(0, RETRY_PAUSE * (attempt + 1)))  # noqa: S311
                continue
            self._settle()
            return more, items
        raise AssertionError("unreachable")

    def _fill_unit(self, items: Iterator[scan.ScanItem], taken: list[scan.ScanItem]) -> bool:
        """Take in files until the unit is full (True) or none are left (False)."""
        started = time.monotonic()
        while time.monotonic() - started < COMMIT_SECONDS and self.unit_bytes < COMMIT_BYTES:
            if self.pool is None:
                item = next(items, None)
                if item is None:
                    return False
                taken.append(item)
                self._process(item)
                continue
            done = self._next_done(items)
            if done is None:
                return False
            (item, username, record_name, _, _), result = done
            taken.append(item)
            self._take_result(item, username, record_name, result)
        return True

    def _reset_unit(self) -> None:
        self.checks.clear()
        self.checks_bytes = 0
        self.unit.clear()
        self.unit_ids.clear()
        self.pending.clear()
        self.unit_bytes = self.pending_bytes = 0
        self.free_ids.clear()
        self.sizes_user = None

    def _audit(self, last: bool) -> None:
        """One event per commit that stored something, and at least one per run."""
        if not self.unit_ids and (self.audited_once or not last):
            return
        counts = {"imported": 0, "would_import": 0, "skipped": 0, "failed": 0}
        usernames = set()
        for outcome in self.unit:
            counts[outcome.status] += 1
            if outcome.username is not None:
                usernames.add(outcome.username)
        details: dict[str, int | str] = {
            "imported": counts["imported"],
            "skipped": counts["skipped"],
            "failed": counts["failed"],
        }
        if self.request.dry_run:
            details = {
                "dry_run": 1,
                "would_import": self.summary.would_import,
                "skipped": self.summary.skipped,
                "failed": self.summary.failed,
            }
        append_event(self.session, AuditEvent("import", usernames, list(self.unit_ids), details))
        self.audited_once = True

    def _settle(self) -> None:
        """Count and report this unit's outcomes (called once they are committed)."""
        summary = self.summary
        for outcome in self.unit:
            if outcome.status == "imported":
                summary.imported += 1
                summary.bytes += outcome.size or 0
            elif outcome.status == "would_import":
                summary.would_import += 1
            elif outcome.status == "skipped":
                summary.skipped += 1
            else:
                summary.failed += 1
                summary.failures.append(
                    Failure(outcome.path, outcome.error or "failed", outcome.code or "failed")
                )
            if outcome.username is not None:
                self.run_event.usernames.add(outcome.username)
            if self.on_outcome is not None:
                self.on_outcome(outcome)
        self.run_event.details = {
            "imported": summary.imported,
            "skipped": summary.skipped,
            "failed": summary.failed,
        }
        self.unit.clear()
        self.unit_ids.clear()
        self.unit_bytes = 0

    # -- one file ---------------------------------------------------------------

    def _process(self, item: scan.ScanItem) -> None:
        username, record_name, failure = self._named(item)
        if failure is not None:
            self._fail(item, username, failure[1], failure[2])
            return
        assert username is not None
        self._read_whole(item, username, record_name, recordformat.CHUNK_SIZE, self._small)

    def _named(self, item: scan.ScanItem) -> tuple[str | None, str, Result | None]:
        """The file's user and record name, or why it cannot be imported."""
        username = self.request.username or item.username
        if item.problem is not None:
            return username, "", ("failed", item.problem.code, item.problem.error)
        try:
            return username, check_record_name(self._record_name(item)), None
        except UsageError as exc:
            return username, "", ("failed", scan.BAD_NAME, exc.message)

    def _read_whole(
        self,
        item: scan.ScanItem,
        username: str,
        record_name: str,
        limit: int,
        take: Callable[[scan.ScanItem, str, str, bytes], None],
    ) -> None:
        """Read a file of up to `limit` bytes whole and `take` it; stream a
        larger one; report one that cannot be read."""
        try:
            data, _ = read_regular_file(item.path, limit)
        except FileChanged:
            self._fail(item, username, CHANGED, "file changed while it was read")
            return
        except UsageError as exc:
            self._fail(item, username, failure_code(exc.message), exc.message)
            return
        if data is None:
            self._open_large(item, username, record_name)
        else:
            take(item, username, record_name, data)

    def _open_large(self, item: scan.ScanItem, username: str, record_name: str) -> None:
        try:
            source, before = open_regular_file(item.path)
            with source:
                self._large(item, username, record_name, source, before)
        except FileChanged:
            self._fail(item, username, CHANGED, "file changed while it was read")
        except UsageError as exc:
            self._fail(item, username, failure_code(exc.message), exc.message)

    # -- with worker processes --------------------------------------------------

    def _next_done(self, items: Iterator[scan.ScanItem]) -> tuple[_Entry, Result] | None:
        """The next file, in scan order, with what its worker made of it; None
        when there are no more. Keeps the workers a few batches ahead."""
        assert self.pool is not None
        if not self.current:
            self._send_ahead(items)
            if not self.sent:
                return None
            self._take_part(self.sent[0])
            self._send_ahead(items)
        return self.current.popleft()

    def _take_part(self, batch: _SentBatch) -> None:
        """Pair the next part of a batch's results with its files (and the
        files that failed before, in their place) into `current`."""
        assert self.pool is not None
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
            self.current.append((entry, result))
            batch.answered += 1
        if complete:
            assert batch.answered == len(entries)
            self.sent.popleft()

    def _send_ahead(self, items: Iterator[scan.ScanItem]) -> None:
        assert self.pool is not None
        while len(self.sent) < self.pool.size * POOL_AHEAD:
            # Held where a rollback finds them: making an entry may wait for the
            # background COPY, and a deadlock it met is raised there.
            self.gathered = list(itertools.islice(items, POOL_BATCH))
            if not self.gathered:
                return
            batch = [self._entry(item) for item in self.gathered]
            self.pool.send([entry[3] for entry in batch if entry[3] is not None])
            self.sent.append(_SentBatch(batch))
            self.gathered = []

    def _abandon_sent(self) -> list[scan.ScanItem]:
        """After a rollback: the files given to workers (or about to be) but not
        taken in yet, to be given again (with new record ids); their results
        are dropped."""
        left = [entry[0] for entry, _ in self.current]
        self.current.clear()
        for batch in self.sent:
            left.extend(entry[0] for entry in batch.entries[batch.answered :])
        left += self.gathered
        self.gathered = []
        assert self.pool is not None or not self.sent
        while self.sent:
            assert self.pool is not None
            if self.pool.receive()[1]:
                self.sent.popleft()
        return left

    def _entry(self, item: scan.ScanItem) -> _Entry:
        """A file for the workers (one the scan found bad carries its failure
        instead, so that outcomes stay in scan order)."""
        username, record_name, failure = self._named(item)
        task: Task | None = None
        if failure is None:
            assert username is not None
            task = (self._next_id(), item.path, username, record_name, item.name)
        return (item, username, record_name, task, failure)

    def _take_result(
        self, item: scan.ScanItem, username: str | None, record_name: str, result: Result
    ) -> None:
        kind = result[0]
        if kind == "failed":
            self._fail(item, username, result[1], result[2])
            return
        assert username is not None
        if kind == "large":  # the main process streams it
            self._open_large(item, username, record_name)
            return
        if kind == "check":  # perhaps stored: ask the database with others
            if self.on_bytes is not None:
                self.on_bytes(result[1])
            self._queue_check(_Check(item, username, record_name, result[1], None, None, result[2]))
            return
        prepared: recordformat.PreparedRecord = result[1]
        size = prepared.file_size or 0
        if self.on_bytes is not None:
            self.on_bytes(size)
        fingerprint: bytes | None = None
        if self.dedupe and self._size_stored(username, size):
            fingerprint = prepared.fingerprint
        if fingerprint is None and not self.checks:
            self._take_prepared(item, username, prepared)
            return
        self._queue_check(_Check(item, username, record_name, size, None, prepared, fingerprint))

    def _queue_check(self, check: _Check) -> None:
        self.checks.append(check)
        self.checks_bytes += check.size
        if len(self.checks) >= CHECK_FILES or self.checks_bytes >= CHECK_BYTES:
            self._run_checks()

    def _record_name(self, item: scan.ScanItem) -> str:
        if self.request.name_from == "name":
            return item.name
        if self.request.name_from == "relpath":
            return item.user_rel
        # The name without its last extension, as pathlib's `stem` has it.
        name = item.name
        dot = name.rfind(".")
        return name[:dot] if 0 < dot < len(name) - 1 else name

    def _content(
        self, item: scan.ScanItem, username: str, record_name: str, head: bytes
    ) -> recordformat.RecordContent:
        mime = detect_mime_type(item.name, head)
        return recordformat.RecordContent(
            username, record_name, self.request.record_data, item.name, mime
        )

    def _small(self, item: scan.ScanItem, username: str, record_name: str, data: bytes) -> None:
        if self.on_bytes is not None:
            self.on_bytes(len(data))
        fingerprint = None
        if self.dedupe and self._size_stored(username, len(data)):
            fingerprint = recordformat.file_fingerprint(
                self.fingerprint_key, hashlib.sha256(data).digest()
            )
        if fingerprint is None and not self.checks:
            self._take_small(item, username, record_name, data)
            return
        # Possibly stored already: ask the database about many such files at once.
        # Later files queue behind it, so records still go in in scan order.
        self._queue_check(_Check(item, username, record_name, len(data), data, None, fingerprint))

    def _take_small(
        self, item: scan.ScanItem, username: str, record_name: str, data: bytes
    ) -> None:
        """Encrypt a small file into the pending batch (or note it, in a dry run)."""
        if self.request.dry_run:
            self._add(FileOutcome(item.shown, "would_import", username, len(data)))
            return
        content = self._content(item, username, record_name, data)
        prepared = recordformat.prepare_small(
            self.keyring, self.fingerprint_key, self._next_id(), content, data, self.dedupe
        )
        self._take_prepared(item, username, prepared)

    def _take_prepared(
        self, item: scan.ScanItem, username: str, prepared: recordformat.PreparedRecord
    ) -> None:
        size = prepared.file_size or 0
        outcome = FileOutcome(item.shown, "imported", username, size)
        self._add(outcome)
        self.pending.append((outcome, prepared))
        self.pending_bytes += size
        self.unit_bytes += size
        if len(self.pending) >= BATCH_FILES or self.pending_bytes >= BATCH_BYTES:
            self._flush(wait=False)

    def _large(
        self,
        item: scan.ScanItem,
        username: str,
        record_name: str,
        source: BinaryIO,
        before: os.stat_result,
    ) -> None:
        self._run_checks()  # files before this one go in first
        size = before.st_size
        if self.dedupe and self._already_stored(username, size, lambda: _hash_file(source)):
            if self.on_bytes is not None:
                self.on_bytes(size)
            self._add(FileOutcome(item.shown, "skipped", username, size))
            return
        if self.request.dry_run:
            self._add(FileOutcome(item.shown, "would_import", username, size))
            return
        source.seek(0)
        head = store.read_head(source)
        content = self._content(item, username, record_name, head)
        # Keep inserts in scan order (two runs over one folder then take row
        # locks in the same order and cannot deadlock).
        self._flush()
        try:
            with self.conn.transaction():
                stored = store.store_streamed(
                    self.conn,
                    self.keyring,
                    self.fingerprint_key,
                    content,
                    source,
                    head,
                    dedupe=self.dedupe,
                    on_bytes=self.on_bytes,
                )
                if stored is not None and (
                    stored.file_size != size or changed_since(before, os.fstat(source.fileno()))
                ):
                    raise FileChanged()
        except _FILE_DB_ERRORS as exc:
            self._fail(item, username, DATABASE_REJECTED, _db_rejection(exc))
            return
        self.unit_bytes += size
        if stored is None:
            self._add(FileOutcome(item.shown, "skipped", username, size))
            return
        self.unit_ids.append(stored.record_id)
        self._add(FileOutcome(item.shown, "imported", username, size, stored.record_id))

    def _size_stored(self, username: str, size: int) -> bool:
        """Whether some file of this size is stored for `username`: only then can
        this one be a duplicate, so only then is it hashed before encrypting."""
        if username != self.sizes_user:
            self._run_checks()  # they are the previous user's
            self._finish_flush()
            with self.conn.cursor() as cur:
                cur.execute(sql.SELECT_FINGERPRINTED_SIZES, (username,))
                self.sizes = {int(row[0]) for row in cur}
            self.sizes_user = username
        return size in self.sizes

    def _run_checks(self) -> None:
        """Skip the queued files whose content is stored; take in the others."""
        if not self.checks:
            return
        checks, self.checks = self.checks, []
        self.checks_bytes = 0
        asked = [c.fingerprint for c in checks if c.fingerprint is not None]
        stored: set[bytes] = set()
        if asked:
            self._finish_flush()
            with self.conn.cursor() as cur:
                cur.execute(sql.STORED_FINGERPRINTS, (checks[0].username, asked))
                stored = {bytes(row[0]) for row in cur}
        for check in checks:
            if check.fingerprint is not None and check.fingerprint in stored:
                outcome = FileOutcome(check.item.shown, "skipped", check.username, check.size)
                self._add(outcome)
            elif check.prepared is not None:
                self._take_prepared(check.item, check.username, check.prepared)
            elif check.data is not None:
                self._take_small(check.item, check.username, check.record_name, check.data)
            else:  # a worker only hashed it: read it again here
                item, user, name = check.item, check.username, check.record_name
                self._read_whole(item, user, name, WHOLE_FILE_BYTES, self._take_small)

    def _already_stored(self, username: str, size: int, digest: Callable[[], bytes]) -> bool:
        """Whether this (large) file's content is already stored for `username`."""
        if not self._size_stored(username, size):
            return False
        fingerprint = recordformat.file_fingerprint(self.fingerprint_key, digest())
        self._finish_flush()
        with self.conn.cursor() as cur:
            cur.execute(sql.FINGERPRINT_EXISTS, (username, fingerprint))
            row = cur.fetchone()
        return bool(row and row[0])

    def _next_id(self) -> int:
        if not self.free_ids:
            self._finish_flush()  # it may bring ids
            if not self.free_ids:
                self._reserve_ids()
        return self.free_ids.pop()

    def _reserve_ids(self) -> None:
        more = store.reserve_ids(self.conn, ID_BLOCK)
        more.reverse()
        self.free_ids = more + self.free_ids

    def _flush(self, wait: bool = True) -> None:
        """Send the pending small records; with wait=False a thread sends them
        while this one reads and encrypts the next batch (it mostly waits on the
        server, without the GIL). Nothing else uses the connection meanwhile:
        every other database call first waits for it (_finish_flush)."""
        self._finish_flush()
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        self.pending_bytes = 0
        if wait:
            self._apply(pending, self._insert_batch(pending))
            return
        # Ids for the files after these, reserved by the thread too (a round trip
        # of ~5 ms this thread would otherwise wait for), a block ahead of need.
        reserve = len(self.free_ids) < 2 * ID_BLOCK

        def send() -> None:
            try:
                results = self._insert_batch(pending)
                ids = store.reserve_ids(self.conn, ID_BLOCK) if reserve else []
                self.flushed = (pending, results, ids)
            except BaseException as exc:  # re-raised by _finish_flush
                self.flush_error = exc

        self.flushing = threading.Thread(target=send, name="import-flush", daemon=True)
        self.flushing.start()

    def _finish_flush(self) -> None:
        """Wait for the background batch, if any, and take in its results."""
        if self.flushing is None:
            return
        self.flushing.join()
        self.flushing = None
        error, self.flush_error = self.flush_error, None
        if error is not None:
            raise error
        done, self.flushed = self.flushed, None
        assert done is not None
        pending, results, ids = done
        self._apply(pending, results)
        ids.reverse()
        self.free_ids = ids + self.free_ids  # popped from the end: lowest first

    def _stop_background_flush(self) -> None:
        """Never end the transaction while a batch is being sent; after an error
        its outcome no longer matters (the transaction rolls back)."""
        if self.flushing is not None:
            self.flushing.join()
            self.flushing = None
            self.flushed = None
            self.flush_error = None

    def _insert_batch(self, pending: list[_Pending]) -> list[store.StoredRecord | None]:
        """Insert by COPY; if that fails (a duplicate, or a row the database
        refuses), by INSERT ... ON CONFLICT DO NOTHING; if a row is refused, one
        at a time so that only its file fails."""
        batch = [prepared for _, prepared in pending]
        try:
            with self.conn.transaction():
                return list(store.copy_prepared(self.conn, batch))
        except _FILE_DB_ERRORS:
            pass
        try:
            with self.conn.transaction():
                return store.insert_prepared(self.conn, batch)
        except _FILE_DB_ERRORS:
            return [self._insert_alone(outcome, prepared) for outcome, prepared in pending]

    def _apply(self, pending: list[_Pending], results: list[store.StoredRecord | None]) -> None:
        for (outcome, _), stored in zip(pending, results, strict=True):
            if outcome.status == "failed":
                continue
            if stored is None:
                outcome.status = "skipped"
            else:
                outcome.record_id = stored.record_id
                self.unit_ids.append(stored.record_id)

    def _insert_alone(
        self, outcome: FileOutcome, prepared: recordformat.PreparedRecord
    ) -> store.StoredRecord | None:
        try:
            with self.conn.transaction():
                return store.insert_prepared(self.conn, [prepared])[0]
        except _FILE_DB_ERRORS as exc:
            outcome.status = "failed"
            outcome.code = DATABASE_REJECTED
            outcome.error = _db_rejection(exc)
            return None

    def _add(self, outcome: FileOutcome) -> None:
        self.unit.append(outcome)

    def _fail(self, item: scan.ScanItem, username: str | None, code: str, error: str) -> None:
        self._run_checks()  # keep outcomes in scan order
        self.unit.append(FileOutcome(item.shown, "failed", username, error=error, code=code))


def _hash_file(source: BinaryIO) -> bytes:
    hasher = hashlib.sha256()
    while True:
        try:
            piece = source.read(recordformat.CHUNK_SIZE)
        except OSError as exc:
            raise UsageError(f"cannot read file: {exc.strerror or exc}") from None
        if not piece:
            return hasher.digest()
        hasher.update(piece)


def _db_rejection(exc: psycopg.Error) -> str:
    # The server's message may quote the offending value: name only the class.
    return f"the database refused this file (SQLSTATE {exc.sqlstate}: {type(exc).__name__})"

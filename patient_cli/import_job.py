"""The database side of `import` (importer.import_folder starts it): every
file of a folder becomes one record, idempotently, and safely when two imports
run at once.

Files come in scan order, from the worker processes (import_feed) or read and
encrypted here. Small files go to the server by binary COPY in batches (from a
thread, while the next batch is taken in), large ones are streamed in chunks,
both through `store`. Work is committed about once a second with one audit
event per commit, so a killed run keeps nearly all it did, and a rerun skips
every file whose keyed fingerprint is already stored for its user (unique in
the database, so a concurrent run skips too). One bad file is reported and the
import goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import psycopg
from psycopg.pq import TransactionStatus

from patient_cli import interrupts, recordformat, scan, sql, store
from patient_cli.app_secrets import FINGERPRINT_KEY
from patient_cli.audit import AuditEvent, append_event, audited
from patient_cli.db import translate_db_errors
from patient_cli.errors import UsageError
from patient_cli.import_feed import WorkerFeed, file_names
from patient_cli.import_pool import (
    CHANGED,
    WHOLE_FILE_BYTES,
    Result,
    WorkerSettings,
    failure_code,
)
from patient_cli.import_request import (
    BytesCallback,
    Failure,
    FileOutcome,
    ImportRequest,
    ImportSummary,
    OutcomeCallback,
)
from patient_cli.inputs import (
    FileChanged,
    changed_since,
    open_regular_file,
    read_regular_file,
)
from patient_cli.mime import detect_mime_type
from patient_cli.session import Session

# Commit about once a second (and after this many bytes), so a killed run loses
# at most about a second of work while commits stay cheap.
COMMIT_SECONDS = 1.0
COMMIT_BYTES = 32 << 20
# Small files go to the server by COPY in batches of this size.
BATCH_FILES = 500
BATCH_BYTES = 8 << 20
# Record ids are reserved FIRST_ID_BLOCK at first, then twice as many each
# time up to ID_BLOCK (the workers' tasks take them ahead of the files being
# taken in, import_feed.AHEAD_FILES): a small import reserves few.
FIRST_ID_BLOCK = 64
ID_BLOCK = 2048
# Files whose size matches a stored file's are checked in one query per this many.
CHECK_FILES = 500
CHECK_BYTES = 8 << 20
# A deadlock with another import over overlapping folders: redo that second of work.
# Both runs may keep meeting the same rows: wait a random moment (up to
# RETRY_PAUSE seconds times the attempt number) so that they fall out of step.
UNIT_ATTEMPTS = 5
RETRY_PAUSE = 0.2
# Interrupted while a batch is being sent: cancel its statement (waiting up to
# this long for the server to take the request), and at this many
# interruptions give up waiting for it (see _stop_background_flush).
CANCEL_SECONDS = 5.0
FORCE_QUIT_INTERRUPTS = 3
# Failure code besides those of `scan` and `import_pool`.
DATABASE_REJECTED = "database_rejected"
# Per-file database errors: the file's data was refused; the next file may be fine.
_FILE_DB_ERRORS = (psycopg.DataError, psycopg.IntegrityError)


def run_import(
    session: Session,
    request: ImportRequest,
    feed: WorkerFeed | None,
    on_outcome: OutcomeCallback | None = None,
    on_bytes: BytesCallback | None = None,
    on_force_quit: Callable[[], None] | None = None,
) -> ImportSummary:
    """Import every file under `request.root` (checked), taking small files
    from `feed` when there are workers; see the module docstring."""
    run_event = AuditEvent("import")
    with translate_db_errors(), audited(session, run_event):
        session.load_secrets()
        job = _ImportJob(session, request, run_event, feed, on_outcome, on_bytes, on_force_quit)
        if feed is not None:
            job.configure_feed(feed)
        # Each unit of work must be a transaction of its own, not a savepoint.
        if session.conn.info.transaction_status != TransactionStatus.IDLE:
            session.conn.commit()
        job.run(scan.scan(request.scan_options) if feed is None else iter(()))
    return job.summary


_Pending = tuple[FileOutcome, recordformat.SealedRows]
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
    prepared: recordformat.PreparedRecord | recordformat.SealedRows | None
    fingerprint: bytes | None


class _ImportJob:
    """One run's state: the open batch, this second's outcomes, and totals."""

    def __init__(
        self,
        session: Session,
        request: ImportRequest,
        run_event: AuditEvent,
        feed: WorkerFeed | None,
        on_outcome: OutcomeCallback | None,
        on_bytes: BytesCallback | None,
        on_force_quit: Callable[[], None] | None,
    ) -> None:
        self.session = session
        self.conn = session.conn
        self.request = request
        self.keyring = session.keyring
        self.fingerprint_key = session.secret(FINGERPRINT_KEY)
        self.dedupe = not request.allow_duplicates
        self.run_event = run_event
        self.on_outcome = on_outcome
        self.on_bytes = on_bytes
        self.on_force_quit = on_force_quit
        self.summary = ImportSummary(dry_run=request.dry_run)
        self.audited_once = False
        # What the committed units since the last audit event did (an event is
        # written only for a unit that stored something, and at the end): the
        # next event counts it too, so a run's events add up to its summary.
        self.unaudited: Counter[str] = Counter()
        self.unaudited_users: set[str] = set()
        self.audited_unit = False  # this unit's transaction holds an event
        # This unit of work (one transaction): outcomes in scan order, and the
        # prepared small records not yet sent.
        self.unit: list[FileOutcome] = []
        self.unit_ids: list[int] = []
        self.unit_bytes = 0
        self.pending: list[_Pending] = []
        self.pending_bytes = 0
        # The batch being sent by a background thread, and what came of it.
        self.flushing: threading.Thread | None = None
        self.flush_done = threading.Event()  # set when the thread's batch is done
        self.flushed: _Flushed | None = None
        self.flush_error: BaseException | None = None
        self.free_ids: list[int] = []
        self.id_block = FIRST_ID_BLOCK
        # Ids for the records sealed here, so that ids follow scan order: the
        # workers' first files (sent before connecting) come before the rest.
        self.first_ids: list[int] = []
        self.ids_taken = 0  # from free_ids since the last batch was sent
        # Small files waiting for one query to tell which are already stored.
        self.checks: list[_Check] = []
        self.checks_bytes = 0
        # File sizes already fingerprinted for the current user: only a file of
        # such a size can be a duplicate, so only those are hashed up front.
        self.sizes_user: str | None = None
        self.sizes: set[int] = set()
        # The worker processes' feed (none in a dry run, on one core or with
        # --workers 0: files are then read and encrypted here).
        self.feed = feed

    def configure_feed(self, feed: WorkerFeed) -> None:
        """Tell the workers the fingerprint key and, for the run's one user, the
        sizes already stored (they then only hash files of those sizes)."""
        sizes: frozenset[int] = frozenset()
        if self.dedupe and self.request.username is not None:
            self._size_stored(self.request.username, -1)  # loads self.sizes
            sizes = frozenset(self.sizes)
        # The files sent already get their ids when taken in; reserved first,
        # they come before the later files' ids, which their tasks carry.
        if sent := feed.files_in_flight():
            self.first_ids = store.reserve_ids(self.conn, sent)[::-1]
        feed.configure(WorkerSettings(self.fingerprint_key, sizes), self._ids_for_workers)

    def _ids_for_workers(self, count: int) -> list[int]:
        return [self._next_id() for _ in range(count)]

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
                if self.feed is not None:
                    self.feed.give_back(taken)
                else:
                    items = itertools.chain(taken, items)
                time.sleep(random.uniform(0, RETRY_PAUSE * (attempt + 1)))  # noqa: S311
                continue
            # Committed: report all of it, even if Ctrl-C comes meanwhile.
            with interrupts.held():
                self._settle()
            return more, items
        raise AssertionError("unreachable")

    def _fill_unit(self, items: Iterator[scan.ScanItem], taken: list[scan.ScanItem]) -> bool:
        """Take in files until the unit is full (True) or none are left (False)."""
        started = time.monotonic()
        while time.monotonic() - started < COMMIT_SECONDS and self.unit_bytes < COMMIT_BYTES:
            if self.feed is None:
                item = next(items, None)
                if item is None:
                    return False
                taken.append(item)
                self._process(item)
                continue
            done = self.feed.next_done()
            if done is None:
                return False
            (item, username, record_name, task, _), result = done
            taken.append(item)
            if task is not None and task[4] is not None and result[0] != "rows":
                self._recycle_id(task[4])  # its worker sealed nothing with it
            self._take_result(item, username, record_name, result)
        return True

    def _reset_unit(self) -> None:
        self.audited_unit = False
        self.checks.clear()
        self.checks_bytes = 0
        self.unit.clear()
        self.unit_ids.clear()
        self.pending.clear()
        self.unit_bytes = self.pending_bytes = 0
        self.free_ids.clear()
        self.sizes_user = None

    def _audit(self, last: bool) -> None:
        """An event for a unit that stored something, and at the end for what the
        units since the last event did (at least one event per run)."""
        counts, usernames = self._tally()
        counts.update(self.unaudited)
        usernames |= self.unaudited_users
        if not self.unit_ids and not (last and (not self.audited_once or counts)):
            return
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
        self.audited_once = self.audited_unit = True

    def _tally(self) -> tuple[Counter[str], set[str]]:
        """This unit's outcomes by status, and the users of the files it did not
        fail on (a file that failed touched no record: its folder name may not
        even be a valid username)."""
        counts: Counter[str] = Counter(outcome.status for outcome in self.unit)
        usernames = {
            outcome.username
            for outcome in self.unit
            if outcome.username is not None and outcome.status != "failed"
        }
        return counts, usernames

    def _settle(self) -> None:
        """Count and report this unit's outcomes (called once they are committed)."""
        if self.audited_unit:
            self.unaudited.clear()
            self.unaudited_users.clear()
        else:
            counts, usernames = self._tally()
            self.unaudited.update(counts)
            self.unaudited_users |= usernames
        self.audited_unit = False
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
            if outcome.username is not None and outcome.status != "failed":
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
        username, record_name, failure = file_names(self.request, item)
        if failure is not None:
            self._fail(item, username, failure[1], failure[2])
            return
        assert username is not None
        self._read_whole(item, username, record_name, recordformat.CHUNK_SIZE, self._small)

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
        prepared: recordformat.PreparedRecord | recordformat.SealedRows
        if kind == "rows":  # sealed whole, with the id its task carried
            prepared = result[1]
        else:  # sealed before the fingerprint key reached the worker: none yet
            prepared = recordformat.with_fingerprint(result[1], self.fingerprint_key, self.dedupe)
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
            self.keyring, self.fingerprint_key, None, content, data, self.dedupe
        )
        self._take_prepared(item, username, prepared)

    def _take_prepared(
        self,
        item: scan.ScanItem,
        username: str,
        prepared: recordformat.PreparedRecord | recordformat.SealedRows,
    ) -> None:
        size = prepared.file_size or 0
        if isinstance(prepared, recordformat.PreparedRecord):
            # It gets its id now; the metadata names its record.
            record_id = self.first_ids.pop() if self.first_ids else self._next_id()
            recordformat.assign_id(prepared, self.keyring, record_id)
            prepared = recordformat.sealed_rows(prepared)
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
                if isinstance(check.prepared, recordformat.SealedRows):
                    self._recycle_id(check.prepared.record_id)  # its rows are dropped
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
        self.ids_taken += 1
        if not self.free_ids:
            self._finish_flush()  # it may bring ids
            if not self.free_ids:
                self._reserve_ids()
        return self.free_ids.pop()

    def _recycle_id(self, record_id: int) -> None:
        """An id given to a file whose rows were never made or are dropped: the
        next file takes it (a nightly rerun over stored files then reserves a
        few thousand ids, not one per file)."""
        self.free_ids.append(record_id)  # popped next: the lowest, mostly

    def _reserve_ids(self) -> None:
        self._add_ids(store.reserve_ids(self.conn, self._next_block()))

    def _next_block(self) -> int:
        block = min(self.id_block, ID_BLOCK)
        self.id_block = 2 * block
        return block

    def _add_ids(self, ids: list[int]) -> None:
        """Take in reserved ids (ascending), to be used before those held now."""
        self.free_ids = ids[::-1] + self.free_ids  # popped from the end: lowest first

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
        # The next files need ids while these are sent: with less than a batch's
        # worth left, reserve a block now (one round trip), or this thread would
        # wait for the whole COPY to get them. More are reserved by the thread
        # (a round trip it makes anyway), to keep a block ahead of need. Only
        # while ids are being taken: most of a small import's files got theirs
        # before it connected (first_ids).
        reserve = 0
        if self.ids_taken:
            self.ids_taken = 0
            if len(self.free_ids) < BATCH_FILES:
                self._reserve_ids()
            if len(self.free_ids) < 2 * ID_BLOCK:
                reserve = self._next_block()

        done = threading.Event()

        def send() -> None:
            try:
                results = self._insert_batch(pending)
                ids = store.reserve_ids(self.conn, reserve) if reserve else []
                self.flushed = (pending, results, ids)
            except BaseException as exc:  # re-raised by _finish_flush
                self.flush_error = exc
            finally:
                done.set()

        thread = threading.Thread(target=send, name="import-flush", daemon=True)
        self.flush_done = done
        self.flushing = thread
        thread.start()  # if this fails, _stop_background_flush sees it never started

    def _finish_flush(self) -> None:
        """Wait for the background batch, if any, and take in its results."""
        if self.flushing is None:
            return
        self.flush_done.wait()  # if interrupted, _stop_background_flush waits
        self.flushing.join()  # it has finished: at once
        self.flushing = None
        error, self.flush_error = self.flush_error, None
        if error is not None:
            raise error
        done, self.flushed = self.flushed, None
        assert done is not None
        pending, results, ids = done
        self._apply(pending, results)
        self._add_ids(ids)

    def _stop_background_flush(self) -> None:
        """Never end the transaction while a batch is being sent; after an error
        its outcome no longer matters (the transaction rolls back).

        Waits on the thread's own event, not Thread.join: a join interrupted by
        Ctrl-C can leave the thread marked as stopped while it still runs
        (CPython 3.11), and the transaction would then end under its COPY. An
        interruption while waiting here is raised once the thread is done; the
        batch's statement is cancelled on the server, so the wait is short. A
        thread stuck on a server that no longer answers cannot be cancelled:
        at the FORCE_QUIT_INTERRUPTS-th interruption `on_force_quit` (the CLI
        exits at once; the server rolls back what was not committed).
        """
        thread = self.flushing
        if thread is None:
            return
        interrupted: BaseException | None = None
        # Called from a `finally`: an interruption that is unwinding the unit
        # (Ctrl-C, SIGTERM; not an error) counts as the first.
        unwinding = sys.exc_info()[1]
        interrupts = 0 if unwinding is None or isinstance(unwinding, Exception) else 1
        # Still sending: the unit is being abandoned (an error, Ctrl-C), so the
        # batch's outcome no longer matters. Cancel it rather than wait.
        cancel = not self.flush_done.is_set()
        while not self.flush_done.is_set() and thread.ident is not None:  # (None: never started)
            try:
                if cancel:
                    cancel = False
                    with contextlib.suppress(Exception):
                        self.conn.cancel_safe(timeout=CANCEL_SECONDS)
                self.flush_done.wait(0.1)
            except BaseException as exc:  # Ctrl-C, SIGTERM: first let the thread end
                interrupted = interrupted or exc
                interrupts += 1
                cancel = True
                if interrupts >= FORCE_QUIT_INTERRUPTS and self.on_force_quit is not None:
                    self.on_force_quit()
        if thread.ident is not None:
            thread.join()
        self.flushing = None
        self.flushed = None
        self.flush_error = None
        if interrupted is not None:
            raise interrupted

    def _insert_batch(self, pending: list[_Pending]) -> list[store.StoredRecord | None]:
        """Insert by COPY; if that fails (a duplicate, or a row the database
        refuses), by INSERT ... ON CONFLICT DO NOTHING; if a row is refused, one
        at a time so that only its file fails."""
        batch = [prepared for _, prepared in pending]
        try:
            with self.conn.transaction():
                return list(store.copy_rows(self.conn, batch))
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
        self, outcome: FileOutcome, prepared: recordformat.SealedRows
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

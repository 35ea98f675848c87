"""The service behind `rotate-key`: re-encrypt everything under the first key,
and bring rows still in the original service's plaintext format into the
encrypted one.

Online and resumable: work is found by walking each table's primary key without
locks, then done in short transactions of a few MiB that lock only the rows they
rewrite (one username per statement, skipping rows another transaction holds).
Whatever finished is committed, so a rerun does only the rest. The HMAC secrets go
first and are re-encrypted, never regenerated: import fingerprints and the audit
chain stay valid once the old key is dropped.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any, Protocol

from psycopg import errors as pgerrors

from patient_cli import recordformat, sql
from patient_cli.app_secrets import FINGERPRINT_KEY
from patient_cli.audit import AuditEvent, append_event, audited
from patient_cli.crypto import Keyring
from patient_cli.db import Connection, connect, translate_db_errors
from patient_cli.errors import ConfigError, DecryptionFailed
from patient_cli.session import Session
from patient_cli.status import Usage, key_usage

BATCH_BYTES = 16 << 20  # of tokens rewritten per transaction
BATCH_ROWS = 500  # rows per transaction, however small
MAX_AUDITED_IDS = 1000  # failed record ids kept in the audit event
JOBS = 2  # chunk rewriters: one encrypts while another waits on the database


class Progress(Protocol):
    """Where progress goes (a terminal bar, or nowhere); units are bytes."""

    def start(self, total: int) -> None: ...

    def advance(self, amount: int) -> None: ...


@dataclass(frozen=True)
class RotationOptions:
    dry_run: bool = False
    batch_bytes: int = BATCH_BYTES
    batch_rows: int = BATCH_ROWS
    jobs: int = JOBS


@dataclass(frozen=True)
class ItemFailure:
    """Something that could not be re-encrypted or converted (no contents in `error`)."""

    record_id: int | None
    username: str | None
    error: str


@dataclass
class RotationResult:
    """What was re-encrypted (or, in a dry run, would be)."""

    primary_key_id: str
    dry_run: bool = False
    secrets: int = 0
    records: int = 0
    chunks: int = 0
    chunk_bytes: int = 0
    legacy_rows: int = 0
    failures: list[ItemFailure] = field(default_factory=list)
    remaining: int = 0  # items still under an older key or in the legacy format
    not_configured: list[str] = field(default_factory=list)  # key ids found but not configured
    seconds: float = 0.0

    @property
    def changed(self) -> int:
        return self.secrets + self.records + self.chunks + self.legacy_rows


def rotate_key(
    session: Session, options: RotationOptions | None = None, progress: Progress | None = None
) -> RotationResult:
    """Re-encrypt every token not under the first key and convert legacy rows."""
    options = options or RotationOptions()
    started = time.monotonic()
    keyring = session.keyring
    result = RotationResult(keyring.primary_id, dry_run=options.dry_run)
    event = AuditEvent("rotate-key")
    with translate_db_errors(), audited(session, event):
        # Which keys are in use comes first: with the HMAC secrets under a key
        # that is not configured, decrypting them would fail as "wrong key or
        # tampered data" (exit 7) instead of naming the missing key (exit 5).
        usage = key_usage(session.conn)
        session.conn.rollback()
        result.not_configured = sorted(set(usage.by_key) - set(keyring.key_ids))
        secrets_unreadable = any(usage.by_key[k].secrets for k in result.not_configured)
        if result.not_configured and (secrets_unreadable or not options.dry_run):
            raise ConfigError(_not_configured_message(usage, result.not_configured))
        session.load_secrets()
        if options.dry_run:
            _plan_only(result, usage)
        else:
            todo = usage.not_under(keyring.primary_id)
            if progress is not None:
                progress.start(
                    todo.secrets
                    + todo.record_bytes
                    + todo.chunk_bytes
                    + usage.legacy_rows
                    + usage.legacy_bytes
                )
            rotator = _Rotator(
                session.conn,
                keyring,
                session.secret(FINGERPRINT_KEY),
                options,
                result,
                progress,
                on_commit=lambda: _describe(event, result),
            )
            if todo.secrets:
                rotator.rotate_secrets()
            if usage.legacy_rows:
                rotator.convert_legacy_rows()
            if todo.records:
                rotator.rotate_records()
            if todo.chunks:
                if options.jobs > 1:
                    try:
                        _rotate_chunks_in_parallel(session, options, result, progress)
                    finally:
                        _describe(event, result)
                else:
                    rotator.rotate_chunks()
            after = key_usage(session.conn)
            result.remaining = after.not_under(keyring.primary_id).items + after.legacy_rows
        result.seconds = time.monotonic() - started
        _describe(event, result)
        if result.failures:
            event.outcome = f"error:{DecryptionFailed.exit_code}"
        append_event(session, event)
        session.conn.commit()
    return result


def _plan_only(result: RotationResult, usage: Usage) -> None:
    todo = usage.not_under(result.primary_key_id)
    result.secrets, result.records = todo.secrets, todo.records
    result.chunks, result.chunk_bytes = todo.chunks, todo.chunk_bytes
    result.legacy_rows = usage.legacy_rows
    result.remaining = result.changed


def _not_configured_message(usage: Usage, key_ids: Sequence[str]) -> str:
    count = sum(usage.by_key[k].items for k in key_ids)
    return (
        f"{count} item(s) are encrypted under key id(s) {', '.join(key_ids)}, which are not "
        "configured: add those keys to ENCRYPTION_KEY after the new one, then run rotate-key"
    )


def _describe(event: AuditEvent, result: RotationResult) -> None:
    event.details.update(
        {
            "key_id": result.primary_key_id,
            "dry_run": int(result.dry_run),
            "secrets": result.secrets,
            "records": result.records,
            "chunks": result.chunks,
            "bytes": result.chunk_bytes,
            "legacy_converted": result.legacy_rows,
            "failed": len(result.failures),
            "remaining": result.remaining,
        }
    )
    failed_ids = sorted({f.record_id for f in result.failures if f.record_id is not None})
    event.record_ids[:] = failed_ids[:MAX_AUDITED_IDS]


def _rotate_chunks_in_parallel(
    session: Session, options: RotationOptions, result: RotationResult, progress: Progress | None
) -> None:
    """Rewrite chunks with `options.jobs` threads, each on its own connection and its
    own share of the chunks. Encryption holds the GIL, but waiting on the database
    does not, so one thread encrypts while the others' batches are read or written."""
    stop = threading.Event()
    workers: list[_Rotator] = []
    try:
        for _ in range(options.jobs):
            worker_result = RotationResult(result.primary_key_id)
            conn = connect(session.settings)
            workers.append(
                _Rotator(conn, session.keyring, b"", options, worker_result, progress, stop=stop)
            )
        with ThreadPoolExecutor(options.jobs, thread_name_prefix="rotate-key") as pool:
            futures = [
                pool.submit(worker.rotate_chunks, number, options.jobs)
                for number, worker in enumerate(workers)
            ]
            try:
                pending = set(futures)
                while pending:  # short waits, so Ctrl-C reaches this thread promptly
                    done, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
                    if any(f.exception() for f in done):
                        break
            finally:
                stop.set()  # on Ctrl-C or a failure, the others finish their batch and stop
            for future in futures:
                future.result()
    finally:
        for worker in workers:
            result.chunks += worker.result.chunks
            result.chunk_bytes += worker.result.chunk_bytes
            result.failures.extend(worker.result.failures)
            worker.conn.close()


class _Rotator:
    """One pass over a table; counts go into `result` as batches commit, so an
    interrupted run still reports (and audits) what it did."""

    def __init__(
        self,
        conn: Connection,
        keyring: Keyring,
        fingerprint_key: bytes,
        options: RotationOptions,
        result: RotationResult,
        progress: Progress | None,
        on_commit: Callable[[], None] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.conn = conn
        self.keyring = keyring
        self.primary = keyring.primary_id
        self.fingerprint_key = fingerprint_key
        self.options = options
        self.result = result
        self.progress = progress
        self.on_commit = on_commit
        self.stop = stop

    def _committed(self, amount: int) -> None:
        self.conn.commit()
        if self.on_commit is not None:
            self.on_commit()
        if self.progress is not None:
            self.progress.advance(amount)

    def _fail(self, record_id: int | None, username: str | None, error: str) -> None:
        self.result.failures.append(ItemFailure(record_id, username, error))

    # -- app secrets: a handful of rows, one transaction -------------------------

    def rotate_secrets(self) -> None:
        with self.conn.cursor(binary=True) as cur:
            cur.execute(sql.SELECT_SECRETS_TO_ROTATE, (self.primary,))
            updates = []
            for name, token in cur.fetchall():
                try:
                    fresh = self.keyring.rotate(token, what=f"the {name} secret")
                except DecryptionFailed as exc:
                    self._fail(None, None, exc.message)
                    continue
                updates.append((fresh, self.primary, name))
            if updates:
                cur.executemany(sql.UPDATE_SECRET_TOKEN, updates)
        self.result.secrets += len(updates)
        self._committed(len(updates))

    # -- record metadata -------------------------------------------------------

    def rotate_records(self) -> None:
        for batch in self._batches(sql.SELECT_RECORDS_TO_ROTATE, ("username", "id")):
            done = size = 0
            with self.conn.cursor(binary=True) as cur:
                for username, group in groupby(batch, key=lambda row: row[0]):
                    ids = [int(row[1]) for row in group]
                    cur.execute(
                        sql.LOCK_RECORDS_TO_ROTATE,
                        {"username": username, "ids": ids, "primary": self.primary},
                    )
                    updates = []
                    for record_id, token in cur.fetchall():
                        size += len(token)
                        try:
                            fresh = self.keyring.rotate(token, what=f"record {record_id}")
                        except DecryptionFailed as exc:
                            self._fail(record_id, username, exc.message)
                            continue
                        updates.append((fresh, self.primary, username, record_id))
                    if updates:
                        cur.executemany(sql.UPDATE_RECORD_META_TOKEN, updates)
                    done += len(updates)
            self.result.records += done
            self._committed(size)

    # -- file chunks -------------------------------------------------------------

    def rotate_chunks(self, slice_index: int = 0, slices: int = 1) -> None:
        extra = {"slice": slice_index, "slices": slices}
        for batch in self._batches(
            sql.SELECT_CHUNKS_TO_ROTATE, ("username", "record_id", "seq"), extra
        ):
            done = size = 0
            with self.conn.cursor(binary=True) as cur:
                for username, group in groupby(batch, key=lambda row: row[0]):
                    keys = [(int(row[1]), int(row[2])) for row in group]
                    cur.execute(
                        sql.LOCK_CHUNKS_TO_ROTATE,
                        {
                            "username": username,
                            "record_ids": [k[0] for k in keys],
                            "seqs": [k[1] for k in keys],
                            "primary": self.primary,
                        },
                    )
                    updates = []
                    for record_id, seq, token in cur.fetchall():
                        size += len(token)
                        try:
                            fresh = self.keyring.rotate(
                                token, what=f"chunk {seq} of record {record_id}"
                            )
                        except DecryptionFailed as exc:
                            self._fail(record_id, username, exc.message)
                            continue
                        updates.append((fresh, self.primary, username, record_id, seq))
                    if updates:
                        cur.executemany(sql.UPDATE_CHUNK_TOKEN, updates)
                    done += len(updates)
            self.result.chunks += done
            self.result.chunk_bytes += size
            self._committed(size)

    # -- legacy rows: one transaction each -------------------------------------

    def convert_legacy_rows(self) -> None:
        for batch in self._batches(sql.SELECT_LEGACY_TO_CONVERT, ("username", "id")):
            for username, record_id, size in batch:
                try:
                    converted = self._convert_legacy(username, int(record_id))
                except pgerrors.UniqueViolation:
                    # Chunks already stored under this id: never overwrite them.
                    self.conn.rollback()
                    self._fail(record_id, username, f"record {record_id}: chunks already exist")
                    converted = False
                if converted:
                    self.result.legacy_rows += 1
                self._committed(int(size) + 1)

    def _convert_legacy(self, username: str, record_id: int) -> bool:
        """Rewrite one legacy row in the current format; False if skipped or failed."""
        with self.conn.cursor(binary=True) as cur:
            cur.execute(sql.LOCK_LEGACY_RECORD, (username, record_id))
            row = cur.fetchone()
            if row is None:
                return False  # converted meanwhile, or held by another transaction
            name, data_token, file_data, file_type = row
            try:
                data = legacy_record_data(self.keyring, data_token, record_id)
            except DecryptionFailed as exc:
                self._fail(record_id, username, exc.message)
                return False
            content = recordformat.RecordContent(username, name or "", data, None, file_type)
            size = sha = fingerprint = chunk_count = None
            if file_data is not None:
                payload = bytes(file_data)
                digest = hashlib.sha256(payload).digest()
                size, sha = len(payload), digest.hex()
                fingerprint = recordformat.file_fingerprint(self.fingerprint_key, digest)
                chunk_count = self._write_chunks(cur, username, record_id, payload)
            cur.execute(
                sql.CONVERT_LEGACY_RECORD,
                {
                    "meta": recordformat.seal_meta(self.keyring, content, record_id, size, sha),
                    "key_id": self.primary,
                    "file_size": size,
                    "chunk_count": chunk_count,
                    "fingerprint": fingerprint,
                    "username": username,
                    "id": record_id,
                },
            )
        return True

    def _write_chunks(self, cur: Any, username: str, record_id: int, payload: bytes) -> int:
        """The file in the same chunk format `add` writes; returns the chunk count."""
        count = 0
        with cur.copy(sql.COPY_CHUNKS) as copy:
            copy.set_types(sql.CHUNK_COPY_TYPES)
            for start in range(0, len(payload), recordformat.CHUNK_SIZE):
                piece = payload[start : start + recordformat.CHUNK_SIZE]
                token = recordformat.seal_chunk(self.keyring, record_id, count, piece)
                copy.write_row((username, record_id, count, self.primary, token))
                count += 1
        return count

    # -- finding work ------------------------------------------------------------

    def _batches(
        self,
        statement: Any,
        key_names: Sequence[str],
        extra: Mapping[str, object] | None = None,
    ) -> Iterator[list[tuple[Any, ...]]]:
        """Rows of work (key columns, then a size) in primary-key order, cut into
        batches of at most batch_rows rows and about batch_bytes bytes."""
        after: tuple[Any, ...] = ("", *([0] * (len(key_names) - 1)))
        while self.stop is None or not self.stop.is_set():
            params: dict[str, object] = {
                **dict(zip(key_names, after, strict=True)),
                "primary": self.primary,
                "limit": self.options.batch_rows,
                **(extra or {}),
            }
            with self.conn.cursor() as cur:
                cur.execute(statement, params)
                rows = cur.fetchall()
            if not rows:
                self.conn.commit()
                return
            batch = _cut(rows, self.options.batch_bytes)
            after = tuple(batch[-1][: len(key_names)])
            yield batch


def _cut(rows: list[tuple[Any, ...]], budget: int) -> list[tuple[Any, ...]]:
    """The longest prefix within `budget` bytes (the size is each row's last column),
    and at least one row."""
    total = 0
    for number, row in enumerate(rows):
        total += int(row[-1] or 0)
        if total > budget and number > 0:
            return rows[:number]
    return rows


def legacy_record_data(keyring: Keyring, token: str | None, record_id: int) -> str | None:
    """The original service's record_data: a Fernet token stored as text."""
    if token is None:
        return None
    try:
        plain = keyring.decrypt_text_token(token, what=f"record {record_id}")
    except UnicodeEncodeError:
        raise DecryptionFailed(f"cannot decrypt record {record_id}: not a Fernet token") from None
    try:
        return plain.decode("utf-8")
    except UnicodeDecodeError:
        raise DecryptionFailed(f"record {record_id}: its data is not UTF-8 text") from None

"""The service behind `verify`: decrypt every record's metadata and stream every
file through decryption, checking it against its stored size and SHA-256.

store.iter_chunks catches chunks that are missing, duplicated, swapped or moved
from another file (each chunk's plaintext names its record and position); the
size and hash catch a truncated file. Memory stays bounded: files are hashed as
they stream, and records are read a page at a time.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from patient_cli import recordformat, sql, store
from patient_cli.audit import AuditEvent, append_event, audited
from patient_cli.db import translate_db_errors
from patient_cli.errors import DecryptionFailed, IntegrityFailed, NotFound, UsageError
from patient_cli.inputs import check_username
from patient_cli.rotation import MAX_AUDITED_IDS, Progress, legacy_record_data
from patient_cli.session import Session

PAGE_ROWS = 100
MAX_RECORD_ID = 2**63 - 1


@dataclass(frozen=True)
class VerifyRequest:
    username: str | None = None
    record_id: int | None = None
    metadata_only: bool = False


@dataclass(frozen=True)
class RecordFailure:
    """A record that failed a check; `error` names what failed, never contents."""

    record_id: int
    username: str
    error: str


@dataclass
class VerifyReport:
    checked: int = 0
    files: int = 0
    bytes: int = 0
    metadata_only: bool = False
    failures: list[RecordFailure] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures


def verify(
    session: Session, request: VerifyRequest, progress: Progress | None = None
) -> VerifyReport:
    """Check the records `request` selects; failures are collected, not raised."""
    if request.username is not None:
        check_username(request.username)
    if request.record_id is not None and request.record_id <= 0:
        raise UsageError("record id must be a positive number")
    if request.record_id is not None and request.record_id > MAX_RECORD_ID:
        raise NotFound(f"record {request.record_id} not found")  # ids are bigint
    started = time.monotonic()
    report = VerifyReport(metadata_only=request.metadata_only)
    event = AuditEvent("verify")
    if request.username is not None:
        event.usernames.add(request.username)
    if request.record_id is not None:
        event.record_ids.append(request.record_id)
    with translate_db_errors(), audited(session, event):
        session.load_secrets()  # also proves the HMAC secrets decrypt
        filters = {"username": request.username, "record_id": request.record_id}
        with session.conn.cursor() as cur:
            cur.execute(sql.COUNT_RECORDS_TO_VERIFY, filters)
            row = cur.fetchone()
            assert row is not None
            count, total_bytes = int(row[0]), int(row[1])
        session.conn.rollback()
        if request.record_id is not None and count == 0:
            raise NotFound(f"record {request.record_id} not found")
        if progress is not None:
            progress.start(count + (0 if request.metadata_only else total_bytes))
        _Verifier(session, request, report, progress).run(filters)
        report.seconds = time.monotonic() - started
        event.details.update(
            {
                "checked": report.checked,
                "failed": len(report.failures),
                "bytes": report.bytes,
                "metadata_only": int(request.metadata_only),
            }
        )
        if report.failures:
            event.outcome = f"error:{IntegrityFailed.exit_code}"
            if request.record_id is None:
                failed = sorted({f.record_id for f in report.failures})
                event.record_ids.extend(failed[:MAX_AUDITED_IDS])
        append_event(session, event)
        session.conn.commit()
    return report


class _Verifier:
    def __init__(
        self,
        session: Session,
        request: VerifyRequest,
        report: VerifyReport,
        progress: Progress | None,
    ) -> None:
        self.conn = session.conn
        self.keyring = session.keyring
        self.request = request
        self.report = report
        self.progress = progress

    def run(self, filters: Mapping[str, object]) -> None:
        after: tuple[str, int] = ("", 0)
        while True:
            rows = self._page(filters, after)
            if not rows:
                self.conn.rollback()
                return
            for row in rows:
                self._check(row)
            self.conn.rollback()  # read-only: nothing to commit
            after = (rows[-1][1], int(rows[-1][0]))

    def _page(self, filters: Mapping[str, object], after: tuple[str, int]) -> list[tuple[Any, ...]]:
        # Each page reads one snapshot, so a record rotated or converted meanwhile
        # is seen either wholly before or wholly after.
        with self.conn.cursor(binary=True) as cur:
            cur.execute(sql.SET_REPEATABLE_READ)
            cur.execute(
                sql.SELECT_RECORDS_TO_VERIFY,
                {
                    **filters,
                    "after_username": after[0],
                    "after_id": after[1],
                    "limit": PAGE_ROWS,
                },
            )
            return cur.fetchall()

    def _check(self, row: tuple[Any, ...]) -> None:
        record_id, username, meta_token, file_size, chunk_count = row[:5]
        read = 0
        try:
            if meta_token is None:
                read = self._check_legacy(record_id, username, *row[5:])
            else:
                read = self._check_current(record_id, username, meta_token, file_size, chunk_count)
        except DecryptionFailed as exc:  # IntegrityFailed included
            self.report.failures.append(RecordFailure(record_id, username, exc.message))
            # A failed chunk stream cancels its query: start a fresh transaction.
            self.conn.rollback()
            self.conn.execute(sql.SET_REPEATABLE_READ)
        self.report.checked += 1
        if self.progress is not None:
            self.progress.advance(1 + (0 if self.request.metadata_only else read))

    def _check_current(
        self,
        record_id: int,
        username: str,
        meta_token: bytes,
        file_size: int | None,
        chunk_count: int | None,
    ) -> int:
        try:
            meta = recordformat.open_meta(self.keyring, meta_token, record_id, username)
        except (ValueError, KeyError, TypeError):
            raise IntegrityFailed(f"record {record_id}: metadata is malformed") from None
        if meta.file_size != file_size:
            raise IntegrityFailed(
                f"record {record_id}: stored file size does not match its metadata"
            )
        if self.request.metadata_only:
            return 0
        hasher = hashlib.sha256()
        size = 0
        # A record without a file must have no chunks either: count 0 checks that.
        for piece in store.iter_chunks(
            self.conn,
            self.keyring,
            username,
            record_id,
            int(chunk_count or 0),
            meta.chunk_binding(record_id),
        ):
            hasher.update(piece)
            size += len(piece)
        if meta.file_size is None:
            return 0
        if size != meta.file_size or hasher.hexdigest() != meta.sha256:
            raise IntegrityFailed(f"record {record_id}: file content fails its integrity check")
        self.report.files += 1
        self.report.bytes += size
        return size

    def _check_legacy(
        self,
        record_id: int,
        username: str,
        data_token: str | None,
        has_file: bool,
        file_size: int | None,
    ) -> int:
        """A row in the original format: its data token decrypts, its file reads."""
        legacy_record_data(self.keyring, data_token, record_id)
        if not has_file or self.request.metadata_only:
            return 0
        with self.conn.cursor(binary=True) as cur:
            cur.execute(sql.SELECT_LEGACY_FILE, (username, record_id))
            row = cur.fetchone()
        if row is None or row[0] is None or len(row[0]) != file_size:
            raise IntegrityFailed(f"record {record_id}: file could not be read in full")
        self.report.files += 1
        self.report.bytes += len(row[0])
        return len(row[0])


def report_json(report: VerifyReport) -> dict[str, Any]:
    """The machine-readable report (what `verify --format json` prints)."""
    return {
        "ok": report.ok,
        "checked": report.checked,
        "files": report.files,
        "bytes": report.bytes,
        "metadata_only": report.metadata_only,
        "failed": len(report.failures),
        "failures": [
            {"id": f.record_id, "username": f.username, "error": f.error} for f in report.failures
        ],
        "seconds": round(report.seconds, 3),
    }

"""Adding and listing records: the service behind `add` and `list`.

Functions take a Session and plain dataclasses and return dataclasses; they
validate input before touching keys or the database, and append an audit event
in the same transaction as the change (writes) or before returning (reads).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from patient_cli import recordformat, sql, store
from patient_cli.app_secrets import FINGERPRINT_KEY
from patient_cli.audit import AuditEvent, append_event, audited
from patient_cli.db import translate_db_errors
from patient_cli.errors import UsageError
from patient_cli.inputs import (
    check_mime_type,
    check_record_data,
    check_record_name,
    check_text,
    check_username,
    display_file_name,
    open_regular_file,
)
from patient_cli.mime import detect_mime_type
from patient_cli.session import Session

LIST_LIMIT_MAX = 1_000_000


@dataclass(frozen=True)
class AddRequest:
    username: str
    record_name: str
    record_data: str | None = None
    file_path: Path | None = None
    mime_type: str | None = None


@dataclass(frozen=True)
class AddResult:
    record_id: int
    username: str
    created_at: datetime
    file_type: str | None
    file_size: int | None


@dataclass(frozen=True)
class RecordQuery:
    username: str | None = None  # None: every patient (--all)
    limit: int | None = None
    since: datetime | None = None
    until: datetime | None = None
    name_contains: str | None = None


@dataclass(frozen=True)
class RecordSummary:
    id: int
    username: str
    record_name: str
    record_data: str | None
    has_file: bool
    file_type: str | None
    file_name: str | None
    file_size: int | None
    created_at: datetime | None


def add_record(session: Session, request: AddRequest) -> AddResult:
    """Encrypt and store one record (and its file, streamed), atomically."""
    username = check_username(request.username)
    content = recordformat.RecordContent(
        username=username,
        record_name=check_record_name(request.record_name),
        record_data=check_record_data(request.record_data),
    )
    if request.mime_type is not None and request.file_path is None:
        raise UsageError("--mime-type needs --file")
    check_mime_type(request.mime_type)
    if request.file_path is None:
        return _add_without_file(session, content)
    source, info = open_regular_file(request.file_path)
    with source:
        head = store.read_head(source, info.st_size)
        file_name = display_file_name(request.file_path)
        mime = request.mime_type or detect_mime_type(file_name, head)
        content = recordformat.RecordContent(
            content.username, content.record_name, content.record_data, file_name, mime
        )
        keyring = session.keyring
        event = AuditEvent("add", usernames={username})
        with translate_db_errors(), audited(session, event):
            session.load_secrets()
            fingerprint_key = session.secret(FINGERPRINT_KEY)
            if len(head) <= recordformat.CHUNK_SIZE:
                record_id = store.reserve_ids(session.conn, 1)[0]
                prepared = recordformat.prepare_small(
                    keyring, fingerprint_key, record_id, content, head
                )
                stored = store.insert_prepared(session.conn, [prepared])[0]
            else:
                stored = store.store_streamed(
                    session.conn, keyring, fingerprint_key, content, source, head
                )
            assert stored is not None  # no de-duplication for add
            event.record_ids.append(stored.record_id)
            append_event(session, event)
            session.conn.commit()
    return AddResult(stored.record_id, username, stored.created_at, mime, stored.file_size)


def _add_without_file(session: Session, content: recordformat.RecordContent) -> AddResult:
    keyring = session.keyring
    event = AuditEvent("add", usernames={content.username})
    with translate_db_errors(), audited(session, event):
        session.load_secrets()
        record_id = store.reserve_ids(session.conn, 1)[0]
        prepared = recordformat.prepare_small(keyring, None, record_id, content, None)
        stored = store.insert_prepared(session.conn, [prepared])[0]
        assert stored is not None
        event.record_ids.append(stored.record_id)
        append_event(session, event)
        session.conn.commit()
    return AddResult(stored.record_id, content.username, stored.created_at, None, None)


def list_records(session: Session, query: RecordQuery) -> list[RecordSummary]:
    """Records newest first; decrypts metadata only, never file contents."""
    if query.username is not None:
        check_username(query.username)
    if query.limit is not None and not 0 < query.limit <= LIST_LIMIT_MAX:
        raise UsageError(f"--limit must be between 1 and {LIST_LIMIT_MAX}")
    if query.name_contains is not None:
        check_text(query.name_contains, "--name-contains")
    keyring = session.keyring
    event = AuditEvent("list")
    if query.username is not None:
        event.usernames.add(query.username)
    needle = _folded(query.name_contains) if query.name_contains else None
    # The name is encrypted, so a name filter is applied after decryption and the
    # limit after that.
    sql_limit = None if needle is not None else query.limit
    records: list[RecordSummary] = []
    with translate_db_errors(), audited(session, event):
        session.load_secrets()
        with session.conn.cursor() as cur:
            cur.execute(
                sql.LIST_RECORDS,
                {
                    "username": query.username,
                    "since": query.since,
                    "until": query.until,
                    "limit": sql_limit,
                },
            )
            for row in cur:
                summary = _summary(keyring, row)
                if needle is not None and needle not in _folded(summary.record_name):
                    continue
                records.append(summary)
                if query.limit is not None and len(records) >= query.limit:
                    break
        event.usernames.update(r.username for r in records)
        event.record_ids.extend(r.id for r in records)
        event.details["count"] = len(records)
        append_event(session, event)
        session.conn.commit()
    return records


def _folded(text: str) -> str:
    """Case-folded and in one Unicode form: "Café" typed (NFC) matches "Café" stored
    from a macOS file name (NFD)."""
    return unicodedata.normalize("NFC", text.casefold())


def _summary(keyring: Any, row: tuple[Any, ...]) -> RecordSummary:
    (
        record_id,
        username,
        created_at,
        meta_token,
        file_size,
        legacy_name,
        legacy_data,
        legacy_type,
        legacy_has_file,
        legacy_size,
    ) = row
    if meta_token is None:  # written by the original service
        data = (
            keyring.decrypt_text_token(legacy_data, what=f"record {record_id}").decode("utf-8")
            if legacy_data is not None
            else None
        )
        return RecordSummary(
            record_id,
            username,
            legacy_name,
            data,
            bool(legacy_has_file),
            legacy_type if legacy_has_file or legacy_type else None,
            None,
            legacy_size,
            created_at,
        )
    meta = recordformat.open_meta(keyring, meta_token, record_id, username)
    return RecordSummary(
        record_id,
        username,
        meta.record_name,
        meta.record_data,
        file_size is not None,
        meta.mime_type,
        meta.file_name,
        file_size,
        created_at,
    )

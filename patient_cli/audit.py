"""The tamper-evident audit trail: append events, read them, verify the chain.

Each event's hash is HMAC-SHA256, under a secret kept encrypted in app_secrets,
over its content and the previous event's hash; appends are serialized by a
transaction-scoped advisory lock so the chain stays linear under concurrency.
Events hold usernames, record ids, counts and outcomes; never record contents.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from psycopg.types.json import Jsonb

from patient_cli import sql
from patient_cli.app_secrets import AUDIT_KEY
from patient_cli.crypto import keyed_digest
from patient_cli.errors import PatientRecordsError
from patient_cli.session import Session

GENESIS_HASH = bytes(32)


@dataclass
class AuditEvent:
    """One thing a command did, filled in as the command runs."""

    action: str
    usernames: set[str] = field(default_factory=set)
    record_ids: list[int] = field(default_factory=list)
    details: dict[str, int | str] = field(default_factory=dict)
    outcome: str = "ok"


def event_hash(key: bytes, row: Mapping[str, Any]) -> bytes:
    """The chain hash of an audit row (as stored, or about to be)."""
    at = row["at"]
    assert isinstance(at, datetime)
    content = [
        row["id"],
        at.astimezone(UTC).isoformat(timespec="microseconds"),
        row["action"],
        row["outcome"],
        row["os_user"],
        row["db_role"],
        row["actor"],
        sorted(row["usernames"]),
        list(row["record_ids"]),
        row["details"],
    ]
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return keyed_digest(key, bytes(row["prev_hash"]), canonical.encode("ascii"))


def append_event(session: Session, event: AuditEvent) -> int:
    """Append `event` inside the caller's transaction; returns its id.

    The advisory lock is held until that transaction ends, so call this last,
    just before commit, to keep the serialized section short.
    """
    key = session.secret(AUDIT_KEY)
    with session.conn.cursor() as cur:
        cur.execute(sql.LOCK_AUDIT_CHAIN, (sql.AUDIT_LOCK_ID,))
        cur.execute(sql.SELECT_AUDIT_TAIL)
        tail = cur.fetchone()
        assert tail is not None
        prev_hash, event_id, at = tail
        row: dict[str, Any] = {
            "id": event_id,
            "at": at,
            "action": event.action,
            "outcome": event.outcome,
            "os_user": session.actor.os_user,
            "db_role": session.actor.db_role,
            "actor": session.actor.name,
            "usernames": sorted(event.usernames),
            "record_ids": list(event.record_ids),
            "details": dict(event.details),
            "prev_hash": bytes(prev_hash) if prev_hash is not None else GENESIS_HASH,
        }
        row["hash"] = event_hash(key, row)
        cur.execute(sql.INSERT_AUDIT_EVENT, {**row, "details": Jsonb(row["details"])})
    return int(event_id)


@contextmanager
def audited(session: Session, event: AuditEvent) -> Iterator[AuditEvent]:
    """Record a failure event when the block raises; success events are the caller's
    to append inside its own transaction (fail closed for reads, atomic for writes)."""
    try:
        yield event
    except (PatientRecordsError, KeyboardInterrupt) as exc:
        code = exc.exit_code if isinstance(exc, PatientRecordsError) else 130
        record_failure(session, event, code)
        raise


def record_failure(session: Session, event: AuditEvent, exit_code: int) -> None:
    """Best effort: note a failed command in the trail without masking its error."""
    if exit_code in (5, 6) or session.conn.closed:
        return  # no key or no database: nothing can be written
    try:
        session.conn.rollback()
        event.outcome = f"error:{exit_code}"
        with session.conn.transaction():
            append_event(session, event)
    except Exception:  # noqa: S110 - the original error is what the user must see
        pass


def append_and_commit(session: Session, event: AuditEvent, extra: Sequence[int] = ()) -> None:
    """Append a success event and commit the surrounding work with it."""
    event.record_ids.extend(extra)
    append_event(session, event)
    session.conn.commit()

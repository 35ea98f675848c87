"""The tamper-evident audit trail: append events, read them, verify the chain.

Each event's hash is HMAC-SHA256, under a secret kept encrypted in app_secrets,
over its content and the previous event's hash; appends are serialized by a
transaction-scoped advisory lock so the chain stays linear under concurrency.
Events hold usernames, record ids, counts and outcomes; never record contents.
"""

from __future__ import annotations

import hmac
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
from patient_cli.db import translate_db_errors
from patient_cli.errors import PatientRecordsError, UsageError
from patient_cli.inputs import check_text, check_username
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
        # Pipelined: the tail is read by a statement that starts only after the lock
        # statement has finished, so it sees every event committed before us.
        with session.conn.pipeline():
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
        params = {**row, "details": Jsonb(row["details"])}
        # An import's event lists thousands of ids: psycopg adapts a list of
        # ints element by element (9 ms for 5,000 here), the server parses
        # this literal in 2.
        params["record_ids"] = "{" + ",".join(map(str, map(int, row["record_ids"]))) + "}"
        cur.execute(sql.INSERT_AUDIT_EVENT, params)
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


# -- reading the trail (issue 4) ---------------------------------------------------

AUDIT_LIMIT_MAX = 1_000_000
CHAIN_PAGE_ROWS = 1000


@dataclass(frozen=True)
class StoredEvent:
    """An audit row as stored, hashes included."""

    id: int
    at: datetime
    action: str
    outcome: str
    os_user: str
    db_role: str
    actor: str | None
    usernames: list[str]
    record_ids: list[int]
    details: dict[str, Any]
    prev_hash: bytes
    hash: bytes

    def as_row(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class AuditQuery:
    username: str | None = None
    action: str | None = None
    since: datetime | None = None
    limit: int | None = None


@dataclass(frozen=True)
class ChainReport:
    """The result of `audit --verify`: where the chain first breaks, if it does."""

    checked: int
    first_broken_id: int | None
    reason: str | None
    last_id: int | None
    last_hash: bytes | None

    @property
    def ok(self) -> bool:
        return self.first_broken_id is None


def list_events(session: Session, query: AuditQuery) -> list[StoredEvent]:
    """Events newest first. Reading the trail is itself audited (action "audit"):
    who looked at whose access history is worth knowing too."""
    if query.username is not None:
        check_username(query.username)
    if query.limit is not None and not 0 < query.limit <= AUDIT_LIMIT_MAX:
        raise UsageError(f"--limit must be between 1 and {AUDIT_LIMIT_MAX}")
    check_text(query.action, "--action")
    event = AuditEvent("audit")
    if query.username is not None:
        event.usernames.add(query.username)
    with translate_db_errors(), audited(session, event):
        session.load_secrets()
        with session.conn.cursor() as cur:
            cur.execute(
                sql.SELECT_AUDIT_EVENTS,
                {
                    "username": query.username,
                    "action": query.action,
                    "since": query.since,
                    "limit": query.limit,
                },
            )
            events = [_stored_event(row) for row in cur.fetchall()]
        event.details["count"] = len(events)
        append_event(session, event)
        session.conn.commit()
    return events


def verify_chain(session: Session) -> ChainReport:
    """Recompute every event's hash in id order and check each links to the one
    before; stops at the first broken link. Audited as "audit-verify"."""
    event = AuditEvent("audit-verify")
    checked = 0
    broken: tuple[int, str] | None = None
    last: StoredEvent | None = None
    with translate_db_errors(), audited(session, event):
        session.load_secrets()
        key = session.secret(AUDIT_KEY)
        expected_prev = GENESIS_HASH
        after = 0
        while broken is None:
            with session.conn.cursor() as cur:
                cur.execute(sql.SELECT_AUDIT_CHAIN_PAGE, (after, CHAIN_PAGE_ROWS))
                page = [_stored_event(row) for row in cur.fetchall()]
            session.conn.rollback()
            if not page:
                break
            for stored in page:
                if not hmac.compare_digest(stored.prev_hash, expected_prev):
                    broken = (stored.id, "it does not link to the event before it")
                    break
                if not hmac.compare_digest(event_hash(key, stored.as_row()), stored.hash):
                    broken = (stored.id, "its content does not match its hash")
                    break
                checked += 1
                expected_prev = stored.hash
                last = stored
            after = page[-1].id
        event.details["checked"] = checked
        if broken is not None:
            event.outcome = "error:7"
            event.details["first_broken_id"] = broken[0]
        append_event(session, event)
        session.conn.commit()
    return ChainReport(
        checked=checked,
        first_broken_id=broken[0] if broken else None,
        reason=broken[1] if broken else None,
        last_id=last.id if last else None,
        last_hash=last.hash if last else None,
    )


def _stored_event(row: Sequence[Any]) -> StoredEvent:
    (id_, at, action, outcome, os_user, db_role, actor, usernames, record_ids, details, prev, h) = (
        row
    )
    return StoredEvent(
        id=int(id_),
        at=at,
        action=action,
        outcome=outcome,
        os_user=os_user,
        db_role=db_role,
        actor=actor,
        usernames=list(usernames),
        record_ids=[int(r) for r in record_ids],
        details=dict(details),
        prev_hash=bytes(prev),
        hash=bytes(h),
    )

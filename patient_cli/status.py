"""The service behind `status`: the configuration in effect, without secrets,
and how much data each Fernet key still protects.

Keys are shown by their public id (crypto.key_id), never themselves. A key id
found in the database but not configured means data this configuration cannot
read; `rotate-key` refuses to run until that key is configured again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from patient_cli import sql
from patient_cli.db import Connection, translate_db_errors
from patient_cli.schema import latest_version
from patient_cli.session import Session


@dataclass
class KeyUsage:
    """What one key id protects: rows and bytes per table."""

    key_id: str
    secrets: int = 0
    records: int = 0
    record_bytes: int = 0
    chunks: int = 0
    chunk_bytes: int = 0

    @property
    def items(self) -> int:
        return self.secrets + self.records + self.chunks


@dataclass
class Usage:
    """Key usage across the database, plus the rows still in the legacy format."""

    by_key: dict[str, KeyUsage] = field(default_factory=dict)
    legacy_rows: int = 0
    legacy_bytes: int = 0

    def key(self, key_id: str) -> KeyUsage:
        return self.by_key.setdefault(key_id, KeyUsage(key_id))

    def not_under(self, key_id: str) -> KeyUsage:
        """The total protected by every key but `key_id` (what rotation must redo)."""
        total = KeyUsage("*")
        for kid, usage in self.by_key.items():
            if kid != key_id:
                total.secrets += usage.secrets
                total.records += usage.records
                total.record_bytes += usage.record_bytes
                total.chunks += usage.chunks
                total.chunk_bytes += usage.chunk_bytes
        return total


def key_usage(conn: Connection) -> Usage:
    """Count rows per key id (scans the tables but never reads a token's content)."""
    usage = Usage()
    with conn.cursor() as cur:
        for statement, kind in (
            (sql.KEY_USAGE_SECRETS, "secrets"),
            (sql.KEY_USAGE_RECORDS, "records"),
            (sql.KEY_USAGE_CHUNKS, "chunks"),
        ):
            cur.execute(statement)
            for kid, count, size in cur.fetchall():
                entry = usage.key(str(kid))
                if kind == "secrets":
                    entry.secrets = int(count)
                elif kind == "records":
                    entry.records, entry.record_bytes = int(count), int(size)
                else:
                    entry.chunks, entry.chunk_bytes = int(count), int(size)
        cur.execute(sql.LEGACY_USAGE)
        row = cur.fetchone()
        assert row is not None
        usage.legacy_rows, usage.legacy_bytes = int(row[0]), int(row[1])
    return usage


@dataclass(frozen=True)
class KeyStatus:
    key_id: str
    role: str  # "primary" (encrypts), "older" (decrypts only) or "not configured"
    secrets: int
    records: int
    chunks: int
    chunk_bytes: int


@dataclass(frozen=True)
class StatusReport:
    database: str
    embedded: bool
    server_version: str
    schema_version: int
    schema_latest: int
    key_source: str
    keys: list[KeyStatus]
    legacy_rows: int

    @property
    def rotation_needed(self) -> bool:
        return self.legacy_rows > 0 or any(
            k.role != "primary" and (k.secrets or k.records or k.chunks) for k in self.keys
        )


def status(session: Session) -> StatusReport:
    """Describe the configuration and key usage. Reads no patient data, so it is not
    audited; it needs the key(s) only to name them."""
    settings = session.settings
    keyring = session.keyring  # a missing or failing key source is reported (exit 5)
    with translate_db_errors():
        conn = session.conn
        version = _schema_version(conn)
        usage = key_usage(conn) if version >= latest_version() else Usage()
        conn.rollback()
    keys = []
    for number, kid in enumerate(keyring.key_ids):
        found = usage.by_key.get(kid, KeyUsage(kid))
        keys.append(_key_status(found, "primary" if number == 0 else "older"))
    for kid in sorted(set(usage.by_key) - set(keyring.key_ids)):
        keys.append(_key_status(usage.by_key[kid], "not configured"))
    return StatusReport(
        database=settings.display_database,
        embedded=settings.embedded,
        server_version=_server_version(conn.info.server_version),
        schema_version=version,
        schema_latest=latest_version(),
        key_source=settings.key_source.describe(),
        keys=keys,
        legacy_rows=usage.legacy_rows,
    )


def _key_status(usage: KeyUsage, role: str) -> KeyStatus:
    return KeyStatus(
        usage.key_id, role, usage.secrets, usage.records, usage.chunks, usage.chunk_bytes
    )


def _schema_version(conn: Connection) -> int:
    with conn.cursor() as cur:
        cur.execute(sql.TABLE_EXISTS, ("schema_migrations",))
        if not _one(cur.fetchone()):
            return 0
        cur.execute(sql.SCHEMA_VERSION)
        return int(_one(cur.fetchone()))


def _server_version(number: int) -> str:
    # libpq's integer form: 150020 is 15.20 (10 and later), 90624 is 9.6.24.
    if number >= 100000:
        return f"{number // 10000}.{number % 10000}"
    return f"{number // 10000}.{number // 100 % 100}.{number % 100}"


def _one(row: tuple[Any, ...] | None) -> Any:
    assert row is not None
    return row[0]

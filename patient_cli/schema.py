"""Versioned schema migrations, shipped as `migrations/NNNN_name.sql` files.

`migrate` applies every missing migration in one transaction under an advisory
lock, so concurrent `init-db` runs cannot race and a failed upgrade changes
nothing. A seed-era database (the original service's table, no migrations
table) is upgraded in place, keeping every row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from patient_cli import sql
from patient_cli.db import Connection


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    text: str


@dataclass(frozen=True)
class MigrationReport:
    """What `init-db` did."""

    applied: list[str] = field(default_factory=list)
    schema_version: int = 0
    upgraded_seed_table: bool = False
    legacy_rows: int = 0


def available_migrations() -> list[Migration]:
    folder = resources.files("patient_cli") / "migrations"
    found = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            number, _, rest = entry.name.partition("_")
            found.append(
                Migration(int(number), rest.removesuffix(".sql"), entry.read_text("utf-8"))
            )
    return sorted(found, key=lambda m: m.version)


def latest_version() -> int:
    return available_migrations()[-1].version


def migrate(conn: Connection) -> MigrationReport:
    """Bring the schema up to date; idempotent. Commits on success."""
    with conn.transaction(), conn.cursor() as cur:
        cur.execute(sql.LOCK_MIGRATIONS, (sql.MIGRATION_LOCK_ID,))
        cur.execute(sql.TABLE_EXISTS, ("schema_migrations",))
        had_migrations = bool(_one(cur.fetchone()))
        cur.execute(sql.TABLE_EXISTS, ("patient_records",))
        seed_table = not had_migrations and bool(_one(cur.fetchone()))
        cur.execute(sql.CREATE_MIGRATIONS_TABLE)
        cur.execute(sql.SELECT_APPLIED_MIGRATIONS)
        done = {int(row[0]) for row in cur.fetchall()}
        applied = []
        for migration in available_migrations():
            if migration.version in done:
                continue
            cur.execute(migration.text.encode("utf-8"))
            cur.execute(sql.INSERT_MIGRATION, (migration.version, migration.name))
            applied.append(f"{migration.version:04d}_{migration.name}")
        cur.execute(sql.COUNT_LEGACY_ROWS)
        legacy = int(_one(cur.fetchone()))
        cur.execute(sql.SCHEMA_VERSION)
        version = int(_one(cur.fetchone()))
    return MigrationReport(applied, version, seed_table, legacy)


def _one(row: tuple[Any, ...] | None) -> Any:
    assert row is not None
    return row[0]

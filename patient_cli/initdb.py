"""The service behind `init-db`: key bootstrap (embedded mode only), schema
migrations, and the audit event for it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from patient_cli.audit import AuditEvent, append_event
from patient_cli.db import translate_db_errors
from patient_cli.errors import ConfigError
from patient_cli.schema import MigrationReport, migrate
from patient_cli.session import Session


@dataclass(frozen=True)
class InitResult:
    report: MigrationReport
    generated_key_file: Path | None
    audited: bool


def init_db(session: Session) -> InitResult:
    """Create or upgrade the schema. In embedded mode with no key configured,
    first generate a key into a 0600 file (never with an explicit database)."""
    generated: Path | None = None
    source = session.settings.key_source
    with translate_db_errors():
        report = migrate(session.conn)
        # Only once the database works, so a refused or failed start leaves no key.
        if source.kind == "default-file" and source.path is not None and not source.path.exists():
            from patient_cli.errors import TargetExists
            from patient_cli.keysource import write_key_file

            try:
                write_key_file(source.path)
                generated = source.path
            except TargetExists:
                pass  # a concurrent init-db created it first: use that one
        audited = _audit(session, report)
    return InitResult(report, generated, audited)


def _audit(session: Session, report: MigrationReport) -> bool:
    """Audit when a key is configured; the upgrade itself needs none."""
    try:
        session.keyring  # noqa: B018 - loads the key or raises
    except ConfigError:
        return False
    session.load_secrets()
    event = AuditEvent("init-db")
    event.details.update({"applied": len(report.applied), "schema_version": report.schema_version})
    append_event(session, event)
    session.conn.commit()
    return True

"""`rotate-key`, `verify`, `audit` and `status`: parse options, call the service,
render the result (progress bars only on a terminal)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

from patient_cli.cli_app import (
    ActorOption,
    FormatOption,
    QuietOption,
    UsernameOption,
    app,
    open_session,
    run_command,
)
from patient_cli.errors import BatchIncomplete, DecryptionFailed, IntegrityFailed, UsageError
from patient_cli.output import (
    Format,
    Messages,
    human_size,
    print_json,
    print_listing,
    print_pairs,
    print_table,
)

if TYPE_CHECKING:
    from patient_cli.rotation import RotationResult


class _Bar:
    """A Rich progress bar on stderr, counting bytes."""

    def __init__(self, progress: Any, description: str) -> None:
        self._progress = progress
        self._description = description
        self._task: Any = None

    def start(self, total: int) -> None:
        self._task = self._progress.add_task(self._description, total=max(total, 1))

    def advance(self, amount: int) -> None:
        if self._task is not None:
            self._progress.update(self._task, advance=amount)


@contextmanager
def _progress(messages: Messages, description: str) -> Iterator[_Bar | None]:
    """A progress bar when stderr is a terminal and -q was not given; else None."""
    if messages.quiet or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        yield _Bar(progress, description)


# -- rotate-key ----------------------------------------------------------------


@app.command("rotate-key")
def rotate_key(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only count what would be re-encrypted.")
    ] = False,
    batch_mib: Annotated[
        int,
        typer.Option(
            "--batch-mib",
            min=1,
            max=1024,
            help="About this many MiB of tokens per transaction (smaller: shorter locks).",
        ),
    ] = 16,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs", "-j", min=1, max=16, help="File chunks are rewritten by this many threads."
        ),
    ] = 2,
    fmt: FormatOption = None,
    quiet: QuietOption = False,
    actor: ActorOption = None,
) -> None:
    """Re-encrypt everything under the first key in ENCRYPTION_KEY="NEW,OLD" and
    encrypt rows left in the original plaintext format. Online and resumable."""

    def body(messages: Messages, out: Format) -> None:
        from patient_cli.rotation import RotationOptions
        from patient_cli.rotation import rotate_key as run_rotation

        options = RotationOptions(dry_run=dry_run, batch_bytes=batch_mib << 20, jobs=jobs)
        with open_session(actor) as session, _progress(messages, "re-encrypting") as bar:
            result = run_rotation(session, options, bar)
        summary = _rotation_summary(result)
        if out is Format.table:
            messages.info(summary["message"])
            if result.changed or result.failures:
                print_pairs({k: v for k, v in summary.items() if k not in ("message", "failures")})
            _print_failures(summary["failures"])
        else:
            print_json(summary)
        if result.failures:
            raise DecryptionFailed(
                f"{len(result.failures)} item(s) could not be re-encrypted or converted; "
                "they are listed in the report"
            )
        if result.remaining and not result.dry_run:
            raise BatchIncomplete(
                f"{result.remaining} item(s) are still under an older key or in the original "
                "format (busy or written meanwhile): run rotate-key again"
            )

    run_command(fmt, quiet, body)


def _rotation_summary(result: RotationResult) -> dict[str, Any]:
    if result.dry_run:
        message = (
            f"dry run: {result.changed} item(s) would be re-encrypted or converted"
            if result.changed
            else "nothing to do: everything is encrypted under the first key"
        )
    elif result.changed:
        message = f"re-encrypted {result.changed} item(s) under key {result.primary_key_id}"
    else:
        message = "nothing to do: everything is encrypted under the first key"
    return {
        "message": message,
        "dry_run": result.dry_run,
        "key_id": result.primary_key_id,
        "secrets_reencrypted": result.secrets,
        "records_reencrypted": result.records,
        "chunks_reencrypted": result.chunks,
        "bytes_reencrypted": result.chunk_bytes,
        "legacy_rows_converted": result.legacy_rows,
        "failed": len(result.failures),
        "failures": [
            {"id": f.record_id, "username": f.username, "error": f.error} for f in result.failures
        ],
        "remaining": result.remaining,
        "not_configured_key_ids": result.not_configured,
        "seconds": round(result.seconds, 3),
    }


def _print_failures(failures: list[dict[str, Any]]) -> None:
    if failures:
        print_table(
            ["id", "username", "what failed"],
            [[f["id"], f["username"], f["error"]] for f in failures],
            caption=f"{len(failures)} failure(s)",
        )


# -- verify --------------------------------------------------------------------


@app.command("verify")
def verify(
    username: UsernameOption = None,
    record: Annotated[
        int | None, typer.Option("--record", "-r", help="Check only this record id.")
    ] = None,
    metadata_only: Annotated[
        bool, typer.Option("--metadata-only", help="Decrypt metadata only; skip file contents.")
    ] = False,
    fmt: FormatOption = None,
    quiet: QuietOption = False,
    actor: ActorOption = None,
) -> None:
    """Decrypt every record and stream every file, checking size, hash and chunk order.
    Exits 7 if anything failed."""

    def body(messages: Messages, out: Format) -> None:
        from patient_cli.verify import VerifyRequest, report_json
        from patient_cli.verify import verify as run_verify

        request = VerifyRequest(username, record, metadata_only)
        with open_session(actor) as session, _progress(messages, "verifying") as bar:
            report = run_verify(session, request, bar)
        payload = report_json(report)
        if out is Format.table:
            _print_failures(payload["failures"])
            scope = "metadata of " if report.metadata_only else ""
            messages.info(
                f"checked {scope}{report.checked} record(s), {report.files} file(s), "
                f"{human_size(report.bytes) or '0 B'}: "
                + ("all OK" if report.ok else f"{len(report.failures)} failed")
            )
        else:
            print_json(payload)
        if not report.ok:
            raise IntegrityFailed(
                f"{len(report.failures)} of {report.checked} record(s) failed verification"
            )

    run_command(fmt, quiet, body)


# -- audit ---------------------------------------------------------------------


@app.command("audit")
def audit(
    username: UsernameOption = None,
    action: Annotated[
        str | None, typer.Option("--action", "-a", help="Only this action (e.g. export-file).")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Events on/after (ISO date or date-time).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", "-l", help="At most this many (newest first).")
    ] = None,
    check: Annotated[
        bool,
        typer.Option("--verify", help="Check the whole hash chain; exit 7 at a broken link."),
    ] = False,
    fmt: FormatOption = None,
    quiet: QuietOption = False,
    actor: ActorOption = None,
) -> None:
    """List audit events, newest first, or check the chain with --verify."""

    def body(messages: Messages, out: Format) -> None:
        if check:
            if username is not None or action is not None or since is not None or limit:
                raise UsageError("--verify checks the whole chain and takes no filters")
            _verify_chain(messages, out, actor)
            return
        from patient_cli.audit import AuditQuery, list_events
        from patient_cli.commands.records import parse_when

        query = AuditQuery(username, action, parse_when(since, "--since"), limit)
        with open_session(actor) as session:
            events = list_events(session, query)
        rows = [_event_json(e) for e in events]
        print_listing(
            out,
            "events",
            rows,
            ["id", "at", "action", "outcome", "who", "patients", "records", "details"],
            (
                [
                    e.id,
                    e.at,
                    e.action,
                    e.outcome,
                    _who(e.os_user, e.db_role, e.actor),
                    ", ".join(e.usernames),
                    _short_ids(e.record_ids),
                    ", ".join(f"{k}={v}" for k, v in sorted(e.details.items())),
                ]
                for e in events
            ),
            caption=f"{len(events)} event(s)",
        )

    run_command(fmt, quiet, body)


def _verify_chain(messages: Messages, out: Format, actor: str | None) -> None:
    from patient_cli.audit import verify_chain

    with open_session(actor) as session:
        report = verify_chain(session)
    payload = {
        "ok": report.ok,
        "checked": report.checked,
        "first_broken_id": report.first_broken_id,
        "reason": report.reason,
        "last_id": report.last_id,
        "last_hash": report.last_hash,
    }
    if out is Format.table:
        if report.ok:
            messages.info(
                f"audit chain OK: {report.checked} event(s); last event {report.last_id}, "
                f"hash {report.last_hash.hex() if report.last_hash else '-'}"
            )
    else:
        print_json(payload)
    if not report.ok:
        raise IntegrityFailed(
            f"audit chain broken at event {report.first_broken_id}: {report.reason}"
        )


def _event_json(event: Any) -> dict[str, Any]:
    row: dict[str, Any] = event.as_row()
    row["prev_hash"] = event.prev_hash.hex()
    row["hash"] = event.hash.hex()
    return row


def _who(os_user: str, db_role: str, actor: str | None) -> str:
    who = f"{os_user} (db {db_role})"
    return f"{actor} via {who}" if actor else who


def _short_ids(ids: list[int], shown: int = 10) -> str:
    text = ", ".join(str(i) for i in ids[:shown])
    return text + (f" … (+{len(ids) - shown})" if len(ids) > shown else "")


# -- status --------------------------------------------------------------------


@app.command("status")
def status(fmt: FormatOption = None, quiet: QuietOption = False) -> None:
    """Show the configuration in effect (no secrets) and what each key still protects."""

    def body(messages: Messages, out: Format) -> None:
        from patient_cli.status import status as run_status

        with open_session() as session:
            report = run_status(session)
        keys = [
            {
                "key_id": k.key_id,
                "role": k.role,
                "secrets": k.secrets,
                "records": k.records,
                "chunks": k.chunks,
                "chunk_bytes": k.chunk_bytes,
            }
            for k in report.keys
        ]
        payload = {
            "database": report.database,
            "embedded": report.embedded,
            "server_version": report.server_version,
            "schema_version": report.schema_version,
            "schema_latest": report.schema_latest,
            "key_source": report.key_source,
            "keys": keys,
            "legacy_rows": report.legacy_rows,
            "rotation_needed": report.rotation_needed,
        }
        if out is not Format.table:
            print_json(payload)
            return
        print_pairs(
            {
                "database": report.database,
                "mode": "embedded" if report.embedded else "external",
                "server version": report.server_version,
                "schema version": f"{report.schema_version} (latest {report.schema_latest})",
                "key source": report.key_source,
                "legacy rows": report.legacy_rows,
                "rotation needed": report.rotation_needed,
            },
            title="patient-records",
        )
        print_table(
            ["key id", "role", "secrets", "records", "chunks", "chunk bytes"],
            [
                [k.key_id, k.role, k.secrets, k.records, k.chunks, human_size(k.chunk_bytes)]
                for k in report.keys
            ],
        )
        if report.schema_version < report.schema_latest:
            messages.info("The schema is not current: run `patient-records init-db`.")
        if any(k.role == "not configured" for k in report.keys):
            messages.info(
                "Some data is under a key that is not configured and cannot be read: "
                "add that key to ENCRYPTION_KEY."
            )
        elif report.rotation_needed:
            messages.info("Run `patient-records rotate-key` to re-encrypt under the first key.")

    run_command(fmt, quiet, body)

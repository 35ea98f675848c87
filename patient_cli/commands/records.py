"""`add`, `list` and `export-file`: parse options, call the service, render."""

from __future__ import annotations

import sys
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Annotated

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
from patient_cli.errors import UsageError
from patient_cli.output import Format, Messages, human_size, print_json, print_listing, print_table


def _read_text_input(data: str | None, data_file: Path | None) -> str | None:
    from patient_cli.inputs import decode_utf8

    if data is not None and data_file is not None:
        raise UsageError("give either --data or --data-file, not both")
    if data == "-" or (data_file is not None and str(data_file) == "-"):
        return decode_utf8(sys.stdin.buffer.read(), "record data from stdin")
    if data_file is not None:
        try:
            raw = data_file.read_bytes()
        except FileNotFoundError:
            raise UsageError(f"file not found: {data_file}") from None
        except OSError as exc:
            raise UsageError(f"cannot read {data_file}: {exc.strerror}") from None
        return decode_utf8(raw, "--data-file")
    return data


@app.command("add")
def add(
    username: UsernameOption = None,
    name: Annotated[
        str | None, typer.Option("--name", "-n", "--record-name", help="Record name.")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option("--data", "-d", "--record-data", help="Record text; '-' reads stdin."),
    ] = None,
    data_file: Annotated[
        Path | None,
        typer.Option("--data-file", help="Read the record text from a file ('-': stdin)."),
    ] = None,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Attach this file.")] = None,
    mime_type: Annotated[
        str | None, typer.Option("--mime-type", help="MIME type of the file (default: detected).")
    ] = None,
    fmt: FormatOption = None,
    quiet: QuietOption = False,
    actor: ActorOption = None,
) -> None:
    """Add an encrypted record, optionally with a file."""

    def body(messages: Messages, out: Format) -> None:
        from patient_cli.records import AddRequest, add_record

        text = _read_text_input(data, data_file)
        with open_session(actor) as session:
            result = add_record(
                session,
                AddRequest(username or "", name or "", text, file, mime_type),
            )
        payload = {
            "message": "Record added successfully",
            "record_id": result.record_id,
            "username": result.username,
            "created_at": result.created_at,
            "has_file": result.file_size is not None,
            "file_type": result.file_type,
            "file_size": result.file_size,
        }
        if out is Format.table:
            messages.info(f"Record added successfully: id {result.record_id}")
            print_table(
                ["id", "username", "file type", "size", "created"],
                [
                    [
                        result.record_id,
                        result.username,
                        result.file_type,
                        human_size(result.file_size),
                        result.created_at,
                    ]
                ],
            )
        else:
            print_json(payload)

    run_command(fmt, quiet, body)


def parse_when(text: str | None, option: str, end_of_day: bool = False) -> datetime | None:
    """ISO date or date-time; naive values are UTC. A bare date given to --until
    includes that whole day."""
    if text is None:
        return None
    try:
        try:
            day = date.fromisoformat(text)  # any ISO date form: 2026-01-31, 20260131
        except ValueError:
            moment = datetime.fromisoformat(text)
        else:
            if end_of_day and day == date.max:
                return None  # the whole last representable day: no upper bound
            moment = datetime.combine(day, time(), tzinfo=UTC)
            return moment + timedelta(days=1) if end_of_day else moment
    except ValueError:
        raise UsageError(
            f"{option} must be an ISO date like 2026-01-31 or 2026-01-31T08:00"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@app.command("list")
def list_(
    username: UsernameOption = None,
    all_users: Annotated[
        bool, typer.Option("--all", help="Every patient's records (admins).")
    ] = False,
    limit: Annotated[int | None, typer.Option("--limit", "-l", help="At most this many.")] = None,
    since: Annotated[
        str | None, typer.Option("--since", help="Created on/after (ISO date).")
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(
            "--until", help="Created before this time; a bare date (2026-01-31) includes that day."
        ),
    ] = None,
    name_contains: Annotated[
        str | None, typer.Option("--name-contains", help="Record name contains (case-insensitive).")
    ] = None,
    fmt: FormatOption = None,
    quiet: QuietOption = False,
    actor: ActorOption = None,
) -> None:
    """List records, newest first (decrypted; file contents are not read)."""

    def body(messages: Messages, out: Format) -> None:
        from patient_cli.records import RecordQuery, list_records

        if all_users and username is not None:
            raise UsageError("give either --username or --all, not both")
        if not all_users and username is None:
            raise UsageError("username must not be empty (or use --all)")
        query = RecordQuery(
            username=None if all_users else username,
            limit=limit,
            since=parse_when(since, "--since"),
            until=parse_when(until, "--until", end_of_day=True),
            name_contains=name_contains,
        )
        with open_session(actor) as session:
            found = list_records(session, query)
        rows = [
            {
                "id": r.id,
                "username": r.username,
                "record_name": r.record_name,
                "record_data": r.record_data,
                "has_file": r.has_file,
                "file_type": r.file_type,
                "file_name": r.file_name,
                "file_size": r.file_size,
                "created_at": r.created_at,
            }
            for r in found
        ]
        print_listing(
            out,
            "records",
            rows,
            ["id", "username", "name", "data", "file", "type", "size", "created"],
            (
                [
                    r.id,
                    r.username,
                    r.record_name,
                    _short(r.record_data),
                    r.file_name,
                    r.file_type,
                    human_size(r.file_size),
                    r.created_at,
                ]
                for r in found
            ),
            caption=f"{len(found)} record(s)",
        )

    run_command(fmt, quiet, body)


def _short(text: str | None, width: int = 60) -> str | None:
    if text is None or len(text) <= width:
        return text
    return text[: width - 1] + "…"


@app.command("export-file")
def export_file(
    record_id: Annotated[int, typer.Argument(help="The record's id.")],
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="Write here ('-': stdout); default: original name."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
    fmt: FormatOption = None,
    quiet: QuietOption = False,
    actor: ActorOption = None,
) -> None:
    """Decrypt a record's file, verified against its stored size and hash."""

    def body(messages: Messages, out: Format) -> None:
        from patient_cli import export

        with open_session(actor) as session:
            result = export.export_file(session, record_id, output, force, stdout=sys.stdout.buffer)
        if result.path == export.STDOUT:
            messages.info(f"exported record {result.record_id} ({human_size(result.file_size)})")
            return
        payload = {
            "message": "File exported successfully",
            "record_id": result.record_id,
            "path": result.path,
            "file_size": result.file_size,
            "file_type": result.file_type,
        }
        if out is Format.table:
            messages.info(f"Exported record {result.record_id} to {result.path}")
        else:
            print_json(payload)

    run_command(fmt, quiet, body)

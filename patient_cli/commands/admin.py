"""`init-db`, `keygen` and `server`: setting up and looking after the tool."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from patient_cli.cli_app import (
    ActorOption,
    FormatOption,
    QuietOption,
    app,
    open_session,
    run_command,
)
from patient_cli.errors import ConfigError
from patient_cli.output import Format, Messages, print_json, print_pairs


@app.command("init-db")
def init_db(
    fmt: FormatOption = None, quiet: QuietOption = False, actor: ActorOption = None
) -> None:
    """Create or upgrade the database schema (idempotent)."""

    def body(messages: Messages, out: Format) -> None:
        from patient_cli.initdb import init_db as run_init

        with open_session(actor) as session:
            result = run_init(session)
        report = result.report
        if result.generated_key_file is not None:
            messages.info(
                f"Generated a new encryption key in {result.generated_key_file} (mode 0600). "
                "Back it up: without it the records cannot be decrypted."
            )
        if report.upgraded_seed_table:
            messages.info("Upgraded the original service's patient_records table in place.")
        if report.legacy_rows:
            messages.info(
                f"{report.legacy_rows} record(s) are still in the original plaintext format: "
                "run `patient-records rotate-key` to encrypt them."
            )
        if not result.audited:
            messages.info("No encryption key configured: this init-db was not audited.")
        summary = {
            "message": "Schema is up to date" if not report.applied else "Schema upgraded",
            "applied": report.applied,
            "schema_version": report.schema_version,
            "upgraded_seed_table": report.upgraded_seed_table,
            "legacy_rows": report.legacy_rows,
            "generated_key_file": result.generated_key_file,
        }
        if out is Format.table:
            done = ", ".join(report.applied) if report.applied else "nothing (already current)"
            messages.info(f"Applied: {done}; schema version {report.schema_version}.")
        else:
            print_json(summary)

    run_command(fmt, quiet, body)


@app.command("keygen")
def keygen(
    write: Annotated[
        Path | None, typer.Option("--write", help="Create this key file (mode 0600) instead.")
    ] = None,
    quiet: QuietOption = False,
) -> None:
    """Print a new Fernet key (or write it to a new 0600 file)."""

    def body(messages: Messages, out: Format) -> None:
        if write is not None:
            from patient_cli.keysource import write_key_file

            write_key_file(write)
            messages.info(f"Wrote a new key to {write} (mode 0600). Back it up.")
            return
        from cryptography.fernet import Fernet

        typer.echo(Fernet.generate_key().decode("ascii"))

    run_command(None, quiet, body)


server_app = typer.Typer(
    help="The embedded PostgreSQL server (used when no database is set).",
    rich_markup_mode=None,  # plain help, as the main app (see cli_app)
)
app.add_typer(server_app, name="server")


def _home() -> Path:
    from patient_cli.config import load_settings

    settings = load_settings()
    if not settings.embedded or settings.home is None:
        raise ConfigError("a database is configured; the embedded server is not in use")
    return settings.home


@server_app.command("status")
def server_status(fmt: FormatOption = None, quiet: QuietOption = False) -> None:
    """Show whether the embedded server is running, and where its data lives."""

    def body(messages: Messages, out: Format) -> None:
        from patient_cli.embedded import server_status as status

        info = status(_home())
        payload = {
            "running": info.running,
            "pid": info.pid,
            "initialized": info.initialized,
            "data_dir": info.data_dir,
            "socket_dir": info.socket_dir,
            "log_file": info.log_file,
        }
        if out is Format.table:
            print_pairs(payload, title="embedded PostgreSQL")
        else:
            print_json(payload)

    run_command(fmt, quiet, body)


@server_app.command("start")
def server_start(quiet: QuietOption = False) -> None:
    """Start the embedded server (commands also start it when needed)."""

    def body(messages: Messages, out: Format) -> None:
        from patient_cli.embedded import ensure_server

        ensure_server(_home())
        messages.info("embedded PostgreSQL is running")

    run_command(None, quiet, body)


@server_app.command("stop")
def server_stop(quiet: QuietOption = False) -> None:
    """Stop the embedded server; the next command starts it again."""

    def body(messages: Messages, out: Format) -> None:
        from patient_cli.embedded import stop_server

        stopped = stop_server(_home())
        messages.info(
            "stopped embedded PostgreSQL" if stopped else "embedded PostgreSQL was not running"
        )

    run_command(None, quiet, body)

"""Entry point of the `patient-records` command.

Only Typer is imported at start-up; psycopg, cryptography and Rich are imported
by the commands that use them, so `--help` and `--version` stay fast.
"""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from patient_cli import __version__
from patient_cli.cli_app import GLOBAL, Terminated, app
from patient_cli.commands import admin, importer, records, security  # noqa: F401  (registers commands)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"patient-records {__version__}")
        raise typer.Exit(0)


@app.callback()
def global_options(
    env_file: Annotated[
        Path | None,
        typer.Option("--env-file", help="Read settings from this file instead of ./.env."),
    ] = None,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show a traceback on errors (may show data).")
    ] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """Keep patient records in PostgreSQL, encrypted at rest."""
    GLOBAL.env_file = env_file
    GLOBAL.debug = debug


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    app(prog_name="patient-records")

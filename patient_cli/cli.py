"""Entry point of the `patient-records` command.

Only Typer is imported at start-up; psycopg, cryptography and Rich are imported
by the commands that use them, so `--help` and `--version` stay fast.
"""

from __future__ import annotations

import copy
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from patient_cli import __version__
from patient_cli.argv import error_line
from patient_cli.cli_app import GLOBAL, Terminated, app
from patient_cli.commands import admin, importer, records, security  # noqa: F401  (registers commands)

__all__ = ["app", "main", "run"]


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


def main(argv: list[str] | None = None) -> None:
    """Run the CLI. Command-line mistakes (unknown option, bad value) are reported
    as one line, like every other error, instead of Click's usage block."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    args = sys.argv[1:] if argv is None else argv
    try:
        command = typer.main.get_command(_app_for(args))
        code = command.main(args=args, prog_name="patient-records", standalone_mode=False)
    except typer.TyperException as exc:  # Click's UsageError and friends
        exit_code = int(getattr(exc, "exit_code", 2))
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare command: show its help
            sys.stderr.write(str(getattr(exc, "format_message", lambda: "")()) + "\n")
            sys.exit(exit_code)
        line = error_line(args, _usage_message(exc), exit_code, "usage_error")
        sys.stderr.write(line + "\n")
        sys.exit(exit_code)
    except KeyboardInterrupt:  # (Terminated too) while the command line is read
        sys.stderr.write(error_line(args, "interrupted", 130, "interrupted") + "\n")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def run() -> None:
    """The `patient-records` console script: `main`, then a quick exit.

    Tearing the interpreter down (freeing every module of psycopg, cryptography,
    Typer and Rich, one object at a time) took about 50 ms here, a sixth of a
    small command's run, and does nothing for us: by the time `main` returns or
    exits, the database connection is closed and every file is written. So the
    output streams are flushed and the process ends with os._exit, as mypy does.
    Bugs (uncaught exceptions) and leftover threads take the normal way out.
    """
    try:
        main()
        code: object = 0
    except SystemExit as stop:
        code = stop.code
    if threading.active_count() > 1:
        sys.exit(code)  # type: ignore[arg-type]
    if code is None:
        code = 0
    elif not isinstance(code, int):
        sys.stderr.write(f"{code}\n")
        code = 1
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with it closed (`>&-`)
            continue
        try:
            stream.flush()
        except BrokenPipeError:  # the reader went away (`| head`): not an error
            pass
        except OSError:  # output lost (a full disk): fail as Python's own exit does
            code = code or 120
    os._exit(code)


def _app_for(args: list[str]) -> typer.Typer:
    """The app with only the command being run, when there is one: Typer inspects
    the signature of every command it builds, about 30 ms for all of them."""
    name = _command_name(args)
    commands = [c for c in app.registered_commands if c.name == name]
    groups = [g for g in app.registered_groups if g.name == name]
    if not commands and not groups:
        return app  # no command, or an unknown one: the full app says so
    only = copy.copy(app)
    only.registered_commands = commands
    only.registered_groups = groups
    return only


def _command_name(args: list[str]) -> str | None:
    """The first argument that is not a global option (or its value); None when
    help is asked for before it (`--help add` lists every command)."""
    values = iter(args)
    for arg in values:
        if arg in ("-h", "--help"):
            return None
        if arg == "--env-file":
            next(values, None)
        elif not arg.startswith("-"):
            return arg
    return None


def _usage_message(exc: Exception) -> str:
    format_message = getattr(exc, "format_message", None)
    message = format_message() if callable(format_message) else str(exc)
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", "patient-records")
    return f"{message} (see '{path} --help')"

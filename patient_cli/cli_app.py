"""The Typer application, its shared options, and the one place errors become
messages and exit codes.

Commands live in `patient_cli.commands.*`; each parses its options, calls the
service layer inside `run_command`, and renders the result with `output`.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from patient_cli.errors import EXIT_INTERRUPTED, PatientRecordsError
from patient_cli.output import Format, Messages, resolve_format

if TYPE_CHECKING:
    from patient_cli.session import Session

T = TypeVar("T")

app = typer.Typer(
    name="patient-records",
    help="Keep patient records in PostgreSQL, encrypted at rest.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # never show locals (they may hold keys)
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    # Plain (Click) help and usage errors: Typer's Rich formatter imports Rich's
    # markdown and syntax modules (~70 ms), which would make --help slower than
    # the commands themselves.
    rich_markup_mode=None,
)

FormatOption = Annotated[
    Format | None,
    typer.Option(
        "--format",
        "-F",
        help="Output format; default: table on a terminal, json otherwise.",
        case_sensitive=False,
    ),
]
QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="No messages or progress on stderr.")
]
UsernameOption = Annotated[
    str | None, typer.Option("--username", "-u", help="The patient's username.")
]
ActorOption = Annotated[
    str | None,
    typer.Option(
        "--actor",
        envvar="PATIENT_RECORDS_ACTOR",
        help="Name of the person this command acts for (recorded in the audit trail).",
    ),
]


@dataclass
class GlobalOptions:
    env_file: Path | None = None
    debug: bool = False


GLOBAL = GlobalOptions()


def open_session(actor: str | None = None) -> Session:
    """A service-layer session for the configuration in effect (connects lazily)."""
    from patient_cli.config import load_settings
    from patient_cli.inputs import check_text
    from patient_cli.session import Session

    settings = load_settings()
    check_text(actor, "--actor")
    check_text(settings.actor, "PATIENT_RECORDS_ACTOR")
    return Session(settings, actor_name=actor)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: unwind like Ctrl-C so transactions roll back and temp files go.

    A KeyboardInterrupt, so that everything that handles Ctrl-C handles it too:
    psycopg cancels the statement running on the server (an interrupted wait
    otherwise left the connection busy, and SIGTERM during an import ended
    with "lost the database connection", exit 6), and the audit trail records
    the interruption (error:130)."""


def run_command(fmt: Format | None, quiet: bool, body: Callable[[Messages, Format], T]) -> T:
    """Load configuration, run `body`, and turn every failure into one line on
    stderr and the documented exit code."""
    messages = Messages(quiet)
    chosen = resolve_format(fmt)
    try:
        from patient_cli.config import load_env_file

        for line in load_env_file(GLOBAL.env_file):
            where = GLOBAL.env_file or ".env"
            messages.warn(f"line {line} of {where} could not be parsed; it was ignored")
        return body(messages, chosen)
    except PatientRecordsError as exc:
        _debug_traceback()
        messages.error(exc.message, exc.exit_code, chosen, exc.code)
        raise typer.Exit(exc.exit_code) from None
    except (KeyboardInterrupt, Terminated):
        _debug_traceback()
        messages.error(
            "interrupted; nothing was half-written", EXIT_INTERRUPTED, chosen, "interrupted"
        )
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error worth a message.
        _silence_stdout()
        raise typer.Exit(0) from None
    except typer.Exit:
        raise
    except Exception as exc:
        _debug_traceback()
        hint = "" if GLOBAL.debug else " (run with --debug for details)"
        messages.error(f"internal error: {type(exc).__name__}{hint}", 1, chosen, "internal_error")
        raise typer.Exit(1) from None


def _debug_traceback() -> None:
    if GLOBAL.debug:
        traceback.print_exc(file=sys.stderr)


def _silence_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())

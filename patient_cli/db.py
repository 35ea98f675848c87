"""Connecting to PostgreSQL and turning its failures into our exit codes.

`connect` starts the embedded server when no database is configured.
`translate_db_errors` maps psycopg exceptions raised mid-command to
DatabaseUnavailable / ConfigError with a message free of secrets.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pgerrors

from patient_cli.config import Settings
from patient_cli.errors import ConfigError, DatabaseUnavailable, UsageError

Connection = psycopg.Connection[Any]

# psycopg logs follow-on failures as warnings (e.g. "error ignored terminating
# <psycopg.Copy>" after the connection dropped); with no handler Python would
# print them on stderr beside the one error line the CLI reports.
logging.getLogger("psycopg").addHandler(logging.NullHandler())

# Connection failures that retrying will not fix: the settings are wrong.
_SETTINGS_PROBLEMS = (
    "password authentication failed",
    "no password supplied",
    "does not exist",
    "no pg_hba.conf entry",
    "invalid connection option",
    "invalid sslmode",
    "peer authentication failed",
    "role",
)


def connect(settings: Settings) -> Connection:
    conninfo = settings.conninfo
    if settings.embedded:
        from patient_cli.embedded import ensure_server

        assert settings.home is not None
        conninfo = ensure_server(settings.home)
    try:
        # Text in UTF-8 whatever the database's encoding (the server converts):
        # import's rows are made as such (copyformat).
        return psycopg.connect(conninfo, autocommit=False, client_encoding="UTF8")
    except psycopg.OperationalError as exc:
        reason = _first_line(exc)
        if any(marker in reason for marker in _SETTINGS_PROBLEMS):
            raise ConfigError(f"bad database settings: {reason}") from None
        raise DatabaseUnavailable(
            f"cannot connect to the database ({settings.display_database}): {reason}"
        ) from None
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"bad database settings: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    # A server error's text goes on with DETAIL and CONTEXT lines, which may quote
    # row values ("Failing row contains (...)", "Key (...)=(...)"): only its
    # primary message is shown.
    primary = exc.diag.message_primary if isinstance(exc, psycopg.Error) else None
    if primary:
        return primary.strip().splitlines()[0]
    text = str(exc).strip()
    # libpq puts the most specific reason last ("connection to server ... failed: X");
    # tab-indented lines only continue or explain the line above them.
    lines = [line.strip() for line in text.splitlines() if line.strip() and line[0] != "\t"]
    return lines[-1] if lines else type(exc).__name__


@contextmanager
def translate_db_errors() -> Iterator[None]:
    """Map database failures raised inside the block to our error classes."""
    try:
        yield
    except (pgerrors.UndefinedTable, pgerrors.UndefinedColumn, pgerrors.UndefinedFunction):
        raise ConfigError(
            "the database schema is missing or out of date: run `patient-records init-db`"
        ) from None
    except (pgerrors.UntranslatableCharacter, pgerrors.CharacterNotInRepertoire):
        # The server's message quotes the character's bytes: not repeated here.
        raise UsageError(
            "the database's character encoding cannot store some of this command's "
            "text (a username, say): such text needs a database created with UTF8 encoding"
        ) from None
    except pgerrors.InsufficientPrivilege as exc:
        raise ConfigError(f"the database refused the operation: {_first_line(exc)}") from None
    except pgerrors.ReadOnlySqlTransaction as exc:
        # A standby (e.g. right after a failover) or a server in read-only mode:
        # every command writes at least its audit event.
        raise DatabaseUnavailable(
            f"the database accepts no writes (a standby, or read-only mode): {_first_line(exc)}"
        ) from None
    except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
        sqlstate = getattr(exc, "sqlstate", None) or ""
        if sqlstate and not sqlstate.startswith(("08", "57P")):
            # The server is there but could not finish: disk full, a timeout, a deadlock.
            raise DatabaseUnavailable(
                f"the database could not complete the command: {_first_line(exc)}"
            ) from None
        raise DatabaseUnavailable(f"lost the database connection: {_first_line(exc)}") from None

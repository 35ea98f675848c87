"""Rendering results: Rich tables on a terminal, JSON or NDJSON otherwise.

Results go to stdout and nothing else does; messages, warnings and errors go
to stderr (silenced by -q, except errors). Rich is imported only when a table
is drawn, keeping start-up fast for scripts.
"""

from __future__ import annotations

import enum
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, is_dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any, TextIO

from patient_cli.lines import BIDI, error_line, one_line, visible


class Format(enum.StrEnum):
    table = "table"
    json = "json"
    ndjson = "ndjson"


def resolve_format(chosen: Format | None) -> Format:
    """The default is a table on a terminal and JSON in a pipe (as gh does)."""
    if chosen is not None:
        return chosen
    return Format.table if sys.stdout.isatty() else Format.json


def _default(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bytes | memoryview):
        return bytes(value).hex()
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    raise TypeError(f"cannot serialize {type(value).__name__}")


def to_json(value: Any) -> str:
    return json.dumps(value, default=_default, ensure_ascii=False)


def print_json(value: Any, stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    out.write(to_json(value) + "\n")
    out.flush()


def print_ndjson(items: Iterable[Any], stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    for item in items:
        out.write(to_json(item) + "\n")
    out.flush()


def print_table(
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
    title: str | None = None,
    caption: str | None = None,
) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption, show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if cell is None else _cell(cell) for cell in row))
    Console().print(table)


def print_listing(
    out: Format,
    key: str,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    table_rows: Iterable[Sequence[Any]],
    caption: str | None = None,
) -> None:
    """A list of items: `{key: rows}` as JSON, one row per line as NDJSON, or a
    table of `table_rows` (built only when a table is printed, if a generator)."""
    if out is Format.json:
        print_json({key: list(rows)})
    elif out is Format.ndjson:
        print_ndjson(rows)
    else:
        print_table(columns, table_rows, caption=caption)


def print_pairs(pairs: Mapping[str, Any], title: str | None = None) -> None:
    print_table(["", ""], [(k, v) for k, v in pairs.items()], title=title)


def _cell(value: Any) -> str:
    from rich.markup import escape

    if isinstance(value, datetime):
        # Local time, short enough not to wrap; JSON carries full ISO 8601 with offset.
        return value.astimezone().strftime("%Y-%m-%d %H:%M")
    if isinstance(value, bool):
        return "yes" if value else "no"
    return escape(_CONTROL_CHARACTERS.sub(visible, str(value)))


# Stored text may hold terminal escape sequences (a record name that clears the
# screen or retitles the window) or bidirectional overrides: show them as \xNN
# or \uNNNN instead of sending them. (Tab, newline and carriage return are left
# to Rich, which lays them out or drops them.)
_CONTROL_CHARACTERS = re.compile(f"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f{BIDI}]")


def human_size(size: int | None) -> str:
    if size is None:
        return ""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


class Messages:
    """stderr chatter, silenced by -q; errors are never silenced."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def info(self, message: str) -> None:
        if not self.quiet:
            sys.stderr.write(message + "\n")
            sys.stderr.flush()

    def warn(self, message: str) -> None:
        """One line, like errors (a path the user typed may hold anything), unless -q."""
        if not self.quiet:
            sys.stderr.write(f"Warning: {one_line(message)}\n")
            sys.stderr.flush()

    def error(self, message: str, code: int, fmt: Format | None, kind: str) -> None:
        as_json = fmt in (Format.json, Format.ndjson)
        sys.stderr.write(error_line(message, code, kind, as_json) + "\n")
        sys.stderr.flush()

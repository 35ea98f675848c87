"""What the raw command line asks for, read before (or without) Typer: for the
errors reported before the command line is parsed, or when parsing it fails."""

from __future__ import annotations

import sys

from patient_cli import lines


def wants_json(args: list[str]) -> bool:
    """Whether output (and so an error line) is JSON: `--format json` or
    `--format ndjson` (`-F`), or no `--format` and stdout not a terminal, the
    default (output.resolve_format)."""
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--format=") else None
        if value is None and arg in ("--format", "-F") and i + 1 < len(args):
            value = args[i + 1]
        if value is not None:
            return value.lower() in ("json", "ndjson")
    return not sys.stdout.isatty()


def error_line(args: list[str], message: str, code: int, kind: str) -> str:
    """One error line, as JSON when the command line asks for JSON."""
    return lines.error_line(message, code, kind, wants_json(args))

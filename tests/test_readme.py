"""The README is the user's manual: check the parts that can drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

from patient_cli.cli import app
from patient_cli.errors import ALL_ERRORS, EXIT_INTERRUPTED, EXIT_OK

README = Path(__file__).resolve().parent.parent / "README.md"


def _section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def test_exit_code_table_matches_the_code() -> None:
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", _section("Exit codes"), re.M)}
    used = {cls.exit_code for cls in ALL_ERRORS} | {EXIT_OK, EXIT_INTERRUPTED}
    assert documented == used


def test_every_command_is_documented_with_an_example() -> None:
    section = _section("Commands")
    names = []
    for command in app.registered_commands:
        assert command.callback is not None
        names.append(command.name or command.callback.__name__.replace("_", "-"))
    names += [group.name for group in app.registered_groups if group.name]
    for name in names:
        assert f"### `{name}`" in section, f"README lacks a section for `{name}`"
        assert f"patient-records {name}" in section, f"README lacks an example of `{name}`"


def test_configuration_table_lists_every_variable() -> None:
    from patient_cli.config import DB_VARIABLES, KEY_VARIABLES

    table = _section("Configuration")
    for name in (
        *DB_VARIABLES,
        *KEY_VARIABLES,
        "DATABASE_URL",
        "DB_SSLMODE",
        "PATIENT_RECORDS_HOME",
        "PATIENT_RECORDS_ACTOR",
    ):
        assert f"`{name}`" in table, name

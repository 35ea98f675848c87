"""Output: JSON when stdout is not a terminal and a Rich table when it is,
NO_COLOR, -q, results on stdout only, and --help/--version everywhere."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
import typer

from conftest import Cli
from patient_cli import __version__
from patient_cli.output import Format, human_size, resolve_format, to_json


def test_default_format_is_json_when_not_a_terminal(ready: Cli) -> None:
    added = ready("add", "-u", "amy", "-n", "Scan", "-d", "fine")
    assert added.exit_code == 0
    assert json.loads(added.stdout)["message"] == "Record added successfully"
    assert added.stderr == ""
    listed = ready("list", "-u", "amy")
    assert [r["record_name"] for r in json.loads(listed.stdout)["records"]] == ["Scan"]


def test_resolve_format_keeps_an_explicit_choice() -> None:
    assert resolve_format(Format.ndjson) is Format.ndjson
    assert resolve_format(Format.table) is Format.table


def run_on_a_terminal(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    """Run the CLI with stdout on a pseudo-terminal; return (status, stdout, stderr)."""
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "patient_cli", *args],
            stdout=terminal,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
        )
    finally:
        os.close(terminal)
    chunks = []
    while True:
        try:
            data = os.read(controller, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(controller)
    _, stderr = process.communicate(timeout=60)
    return process.returncode, b"".join(chunks).decode(), stderr.decode()


@pytest.mark.slow
def test_table_on_a_terminal(ready: Cli, env: dict[str, str], tmp_path: Path) -> None:
    ready("add", "-u", "amy", "-n", "Chest X-ray", "-d", "clear")
    base = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    base.update(env, TERM="xterm-256color", COLUMNS="120")
    status, stdout, stderr = run_on_a_terminal(["list", "-u", "amy"], base, tmp_path)
    assert (status, stderr) == (0, "")
    assert "Chest X-ray" in stdout and "1 record(s)" in stdout
    assert "┃" in stdout or "│" in stdout
    assert not stdout.lstrip().startswith("{")
    # Only bold and dim are used: no colour for NO_COLOR to strip.
    status, plain, _ = run_on_a_terminal(["list", "-u", "amy"], {**base, "NO_COLOR": "1"}, tmp_path)
    assert status == 0 and "Chest X-ray" in plain


def test_ndjson_and_json_are_parseable_and_stdout_only(ready: Cli) -> None:
    ready("add", "-u", "amy", "-n", "a")
    result = ready("init-db", "--format", "json")
    assert json.loads(result.stdout)["schema_version"] >= 3
    result = ready("list", "-u", "amy", "--format", "ndjson")
    assert [json.loads(line)["record_name"] for line in result.stdout.splitlines()] == ["a"]


def test_table_format_puts_messages_on_stderr_and_quiet_silences_them(
    ready: Cli, tmp_path: Path
) -> None:
    result = ready("add", "-u", "amy", "-n", "a", "--format", "table")
    assert result.exit_code == 0
    record_id = int(result.stderr.strip().rsplit(" ", 1)[-1])
    assert result.stderr == f"Record added successfully: id {record_id}\n"
    assert "amy" in result.stdout
    quiet = ready("add", "-u", "amy", "-n", "b", "--format", "table", "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == ""
    (tmp_path / "f.txt").write_text("x")
    with_file = ready.json("add", "-u", "amy", "-n", "c", "-f", "f.txt")
    exported = ready("export-file", str(with_file["record_id"]), "-o", "g.txt", "-F", "table")
    assert exported.stdout == ""
    assert exported.stderr == f"Exported record {with_file['record_id']} to g.txt\n"
    exported = ready("export-file", str(with_file["record_id"]), "-o", "-", "-q")
    assert (exported.stdout, exported.stderr) == ("x", "")


def test_format_is_case_insensitive(ready: Cli) -> None:
    result = ready("list", "-u", "amy", "--format", "JSON")
    assert result.exit_code == 0 and json.loads(result.stdout) == {"records": []}


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (None, ""),
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KB"),
        (5 * 1024**2, "5.0 MB"),
        (3 * 1024**4, "3072.0 GB"),
    ],
)
def test_human_size(size: int | None, text: str) -> None:
    assert human_size(size) == text


def test_to_json_handles_our_types() -> None:
    moment = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert json.loads(to_json({"t": moment, "p": Path("/x"), "b": b"\x01", "s": "é"})) == {
        "t": "2024-01-02T03:04:05+00:00",
        "p": "/x",
        "b": "01",
        "s": "é",
    }
    assert "é" in to_json("é")  # not \u-escaped: readable in a terminal


# -- --version and --help -----------------------------------------------------------


def command_paths() -> list[list[str]]:
    import patient_cli.cli  # noqa: F401  (registers the commands)
    from patient_cli.cli_app import app

    root = typer.main.get_command(app)
    paths: list[list[str]] = []

    def walk(command: object, prefix: list[str]) -> None:
        paths.append(prefix)
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, [*prefix, name])

    walk(root, [])
    return paths


def test_version(cli: Cli) -> None:
    result = cli("--version")
    assert (result.exit_code, result.stdout) == (0, f"patient-records {__version__}\n")


def test_every_core_command_is_there() -> None:
    names = {" ".join(p) for p in command_paths()}
    assert {"add", "list", "export-file", "init-db", "keygen"} <= names


@pytest.mark.parametrize("path", command_paths(), ids=lambda p: " ".join(p) or "patient-records")
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_everywhere(cli: Cli, path: list[str], flag: str) -> None:
    result = cli(*path, flag)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("Usage: patient-records")
    assert result.stderr == ""


def test_no_arguments_shows_help(cli: Cli) -> None:
    result = cli()
    assert result.exit_code in (0, 2)
    assert "Usage: patient-records" in result.stdout + result.stderr


def test_tables_never_send_terminal_escape_sequences(ready: Cli) -> None:
    name = "Name\x1b]0;retitled\x07\x1b[2J"
    data = "first line\nsecond\x1b[31m red \x9b2J"
    ready.json("add", "-u", "amy", "-n", name, "-d", data)
    result = ready("list", "-u", "amy", "--format", "table")
    assert result.exit_code == 0
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "\x9b" not in result.stdout
    wide = ready("list", "-u", "amy", "--format", "table", COLUMNS="400")
    assert "Name\\x1b]0;retitled\\x07\\x1b[2J" in wide.stdout  # shown, not sent
    # JSON keeps the exact text (escaped by the JSON encoder).
    assert ready.json("list", "-u", "amy")["records"][0]["record_name"] == name


def test_tables_show_bidirectional_overrides_instead_of_obeying_them(ready: Cli) -> None:
    # U+202E would show "scan\u202efdp.exe" as "scanexe.pdf" on a terminal.
    name = "scan\u202efdp.exe \u2066isolated\u2069 \u200f"
    ready.json("add", "-u", "amy", "-n", name)
    wide = ready("list", "-u", "amy", "--format", "table", COLUMNS="400")
    assert wide.exit_code == 0
    assert not set("\u202e\u2066\u2069\u200f") & set(wide.stdout)
    assert "scan\\u202efdp.exe \\u2066isolated\\u2069 \\u200f" in wide.stdout
    assert ready.json("list", "-u", "amy")["records"][0]["record_name"] == name

"""The real entry point: command-line mistakes are one line and exit 2, like
every other error, in plain text or JSON."""

from __future__ import annotations

import json

import pytest

from patient_cli.cli import main


def run_main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stopped:
        main(args)
    out, err = capsys.readouterr()
    return int(stopped.value.code or 0), out, err


def test_bad_argument_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    message = (
        "Invalid value for 'record_id': 'abc' is not a valid int. "
        "(see 'patient-records export-file --help')"
    )
    code, out, err = run_main(["export-file", "abc", "-F", "table"], capsys)
    assert (code, out, err.splitlines()) == (2, "", [f"Error: {message}"])
    # Not on a terminal (as here) the default format is JSON: so is the error.
    code, out, err = run_main(["export-file", "abc"], capsys)
    assert (code, out) == (2, "")
    assert json.loads(err) == {"error": message, "code": 2, "type": "usage_error"}


def test_unknown_option_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = run_main(["list", "--bogus", "--format", "json"], capsys)
    assert code == 2
    assert json.loads(err) == {
        "error": "No such option: --bogus (see 'patient-records list --help')",
        "code": 2,
        "type": "usage_error",
    }


def test_a_usage_error_shows_what_the_user_typed_escaped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Like every other error line: a bidirectional override in a typed option
    is shown as \\u202e, not obeyed by the terminal."""
    code, _out, err = run_main(["list", "--x\u202egpj", "-F", "table"], capsys)
    assert (code, err) == (
        2,
        "Error: No such option: --x\\u202egpj (see 'patient-records list --help')\n",
    )


def test_version_and_help_exit_zero(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["--version"], capsys)
    assert (code, out.strip()) == (0, "patient-records 0.1.0")
    code, out, _ = run_main(["add", "--help"], capsys)
    assert code == 0
    assert "--record-name" in out and "--data-file" in out


def test_bare_command_shows_help_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main([], capsys)
    assert code == 2
    assert out == ""
    assert err.startswith("Usage: patient-records")


def test_every_command_is_registered_by_name() -> None:
    # main() builds only the command being run, found by its registered name.
    from patient_cli.cli_app import app

    names = [c.name for c in app.registered_commands] + [g.name for g in app.registered_groups]
    named = [name for name in names if name is not None]
    assert named == names  # every one has a name
    assert sorted(named) == sorted(set(named))


def test_only_the_command_being_run_is_built() -> None:
    from patient_cli.cli import _app_for, _command_name

    assert _command_name(["--env-file", "add", "--debug", "list", "-u", "x"]) == "list"
    assert _command_name(["--debug"]) is None
    only = _app_for(["--debug", "server", "status"])
    assert [g.name for g in only.registered_groups] == ["server"]
    assert only.registered_commands == []


def test_unknown_command_is_still_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_main(["nosuch", "-F", "table"], capsys)
    assert (code, out) == (2, "")
    assert err.splitlines() == ["Error: No such command 'nosuch'. (see 'patient-records --help')"]


def test_a_command_help_shows_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["import", "--help"], capsys)
    assert code == 0
    assert out.startswith("Usage: patient-records import [OPTIONS] {DIR}")
    assert "--username-from-dir" in out


def test_help_before_the_command_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["--help", "add"], capsys)
    assert code == 0
    for command in ("add", "list", "import", "export-file", "server"):
        assert f"  {command} " in out


def test_console_script_exits_with_the_code_and_all_output(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # `run` (the console script) ends the process with os._exit after main():
    # the exit code and every line written must survive the shortcut.
    import subprocess
    import sys

    argv = [sys.executable, "-m", "patient_cli"]
    done = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "patient-records 0.1.0\n", "")
    done = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60)
    _, in_process, _ = run_main(["--help"], capsys)
    assert (done.returncode, done.stdout) == (0, in_process)
    done = subprocess.run(
        [*argv, "list", "--bogus", "-F", "table"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert done.stderr == "Error: No such option: --bogus (see 'patient-records list --help')\n"


def test_ctrl_c_while_starting_up_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Interrupted while the entry point imports the CLI (Typer, ...): no
    # traceback, and the command does not start.
    import os
    import signal
    import sys

    from patient_cli import entry

    class Loading:
        def __getattr__(self, name: str) -> object:
            os.kill(os.getpid(), signal.SIGINT)

            def must_not_run() -> None:
                raise AssertionError("the command ran after Ctrl-C")

            return must_not_run

    monkeypatch.setitem(sys.modules, "patient_cli.cli", Loading())
    before = signal.getsignal(signal.SIGINT)
    for argv, line in (
        (["patient-records", "list", "-F", "table"], "Error: interrupted"),
        (
            ["patient-records", "list", "-F", "json"],
            '{"error": "interrupted", "code": 130, "type": "interrupted"}',
        ),
    ):
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as stop:
            entry.run()
        assert stop.value.code == 130
        assert capsys.readouterr().err == line + "\n"
        assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_while_the_command_is_built_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import typer

    def interrupted(app: object) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(typer.main, "get_command", interrupted)
    try:
        code, out, err = run_main(["list", "-F", "table"], capsys)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped main() as a traceback")
    assert (code, out, err) == (130, "", "Error: interrupted\n")

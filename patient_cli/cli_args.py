"""What the command line asks for, read before Typer is imported.

The console script's entry point uses it to fork `import`'s service process
(import_service) before anything heavy is imported; `cli` uses it to build only
the command being run.
"""

from __future__ import annotations


def command_name(args: list[str]) -> str | None:
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


def asks_for_help(args: list[str]) -> bool:
    """Whether `-h` or `--help` is among the arguments (the command then only
    prints its help)."""
    return any(arg in ("-h", "--help") for arg in args)

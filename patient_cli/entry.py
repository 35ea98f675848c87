"""The console script's entry point (`patient-records`, `python -m patient_cli`).

Apart from `cli` so that what it sets up holds while `cli` and what it uses
(Typer, cryptography, psycopg) are imported.
"""

from __future__ import annotations

import sys

from patient_cli import interrupts
from patient_cli.memory import collect_rarely_from_now


def run() -> None:
    collect_rarely_from_now()
    # Ctrl-C while Typer and the rest load takes effect once they are loaded:
    # raised in the middle of an import it could surface as a traceback (even
    # one that Python prints and then carries on from).
    try:
        with interrupts.held():
            from patient_cli.cli import run as run_cli
    except KeyboardInterrupt:
        from patient_cli.argv import error_line

        sys.stderr.write(error_line(sys.argv[1:], "interrupted", 130, "interrupted") + "\n")
        sys.exit(130)
    run_cli()

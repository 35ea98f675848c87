"""The console script's entry point (`patient-records`, `python -m patient_cli`).

Apart from `cli` so that what it sets up holds while `cli` and what it uses
(Typer, cryptography, psycopg) are imported.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

from patient_cli.memory import collect_rarely_from_now


def run() -> None:
    collect_rarely_from_now()
    # Ctrl-C while Typer and the rest load is noted and acted on once they are
    # loaded: raised in the middle of an import it could surface as a traceback
    # (even one that Python prints and then carries on from).
    interrupted: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        interrupted.append(signum)

    previous = signal.signal(signal.SIGINT, note)
    from patient_cli.cli import run as run_cli

    signal.signal(signal.SIGINT, previous)
    if interrupted:
        from patient_cli.argv import error_line

        sys.stderr.write(error_line(sys.argv[1:], "interrupted", 130, "interrupted") + "\n")
        sys.exit(130)
    run_cli()

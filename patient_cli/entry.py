"""The console script's entry point (`patient-records`, `python -m patient_cli`).

Apart from `cli` so that what it sets up holds while `cli` and what it uses
(Typer, cryptography, psycopg) are imported.
"""

from __future__ import annotations

from patient_cli.memory import collect_rarely_from_now


def run() -> None:
    collect_rarely_from_now()
    from patient_cli.cli import run as run_cli

    run_cli()

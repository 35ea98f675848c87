"""The console script's entry point (`patient-records`, `python -m patient_cli`).

Apart from `cli` so that what it sets up holds while `cli` and what it uses
(Typer, cryptography, psycopg) are imported, and so that `import` can fork its
service process (import_service) before any of them is imported.
"""

from __future__ import annotations

import sys

from patient_cli.memory import collect_rarely_from_now


def run() -> None:
    collect_rarely_from_now()
    from patient_cli import import_service

    try:
        import_service.start_for(sys.argv[1:])
        from patient_cli.cli import run as run_cli
    except KeyboardInterrupt:  # Ctrl-C while starting up: one line, no traceback
        import_service.discard()
        sys.stderr.write("Error: interrupted\n")
        sys.exit(130)
    run_cli()

"""Allow `python -m patient_cli`."""

from __future__ import annotations

from patient_cli.cli import run

run()

"""Allow `python -m patient_cli`."""

from __future__ import annotations

from patient_cli.entry import run

run()

"""patient-records: keep patient records in PostgreSQL, encrypted at rest.

The CLI (`patient_cli.cli`) is a thin layer over the service modules
(`records`, `files`, `audit`, ...), which callers may use directly.
"""

from __future__ import annotations

__version__ = "0.1.0"

"""Helpers the benchmark scripts share: a database of their own for one run, and
the configuration variables to clear so a measured process sees only what the
benchmark sets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from patient_cli.config import CONFIG_VARIABLES

__all__ = ["CONFIG_VARIABLES", "bench_database"]


@contextmanager
def bench_database(admin_dsn: str, prefix: str) -> Iterator[str]:
    """Create a fresh database on the server of `admin_dsn`, yield its DSN, drop it."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = f"{prefix}_{os.getpid()}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(admin_dsn)
    params["dbname"] = name
    try:
        yield make_conninfo("", **{k: str(v) for k, v in params.items() if v is not None})
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

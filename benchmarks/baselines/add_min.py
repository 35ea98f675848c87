"""Minimal `add`: connect, encrypt one small record, one INSERT, commit.

The baseline `patient-records add` is compared against (benchmarks/bench_cli.py).
Usage: add_min.py USERNAME NAME TEXT, with DATABASE_URL and ENCRYPTION_KEY set.
"""

from __future__ import annotations

import json
import os
import sys

import psycopg
from cryptography.fernet import Fernet


def main() -> None:
    username, name, text = sys.argv[1:4]
    fernet = Fernet(os.environ["ENCRYPTION_KEY"])
    meta = fernet.encrypt(json.dumps({"v": 1, "name": name, "data": text}).encode())
    with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
        row = conn.execute(
            "INSERT INTO patient_records (username, meta, key_id) VALUES (%s, %s, %s) RETURNING id",
            (username, meta, "baseline"),
        ).fetchone()
        conn.commit()
    assert row is not None
    print(json.dumps({"message": "Record added successfully", "record_id": row[0]}))


if __name__ == "__main__":
    main()

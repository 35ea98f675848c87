"""Minimal `list`: select one patient's rows, decrypt their metadata, print JSON.

The baseline `patient-records list` is compared against (benchmarks/bench_cli.py).
Usage: list_min.py USERNAME, with DATABASE_URL and ENCRYPTION_KEY set (tokens: _tokens.py).
"""

from __future__ import annotations

import json
import os
import sys

import psycopg
from _tokens import token_opener


def main() -> None:
    username = sys.argv[1]
    open_token = token_opener(os.environ["ENCRYPTION_KEY"])
    records = []
    with psycopg.connect(os.environ["DATABASE_URL"]) as conn:
        rows = conn.execute(
            "SELECT id, created_at, meta, file_size FROM patient_records"
            " WHERE username = %s ORDER BY created_at DESC, id DESC",
            (username,),
            binary=True,
        )
        for record_id, created_at, meta, file_size in rows:
            plain = json.loads(open_token(meta))
            records.append(
                {
                    "id": record_id,
                    "record_name": plain["name"],
                    "record_data": plain.get("data"),
                    "has_file": file_size is not None,
                    "file_type": plain.get("mime"),
                    "created_at": created_at.isoformat(),
                    "file_name": plain.get("file_name"),
                    "file_size": file_size,
                }
            )
    sys.stdout.write(json.dumps({"records": records}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()

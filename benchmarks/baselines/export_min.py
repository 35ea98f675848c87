"""Minimal `export-file`: read a record's chunks in order, decrypt, write a file.

The baseline `patient-records export-file` is compared against
(benchmarks/bench_cli.py). Each chunk's plaintext starts with a 12-byte header
(record id, sequence number), which is skipped; tokens are opened by _tokens.py.
Usage: export_min.py USERNAME RECORD_ID OUTPUT, with DATABASE_URL and ENCRYPTION_KEY set.
"""

from __future__ import annotations

import os
import sys

import psycopg
from _tokens import token_opener

CHUNK_HEADER_SIZE = 12


def main() -> None:
    username, record_id, output = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    open_token = token_opener(os.environ["ENCRYPTION_KEY"])
    with psycopg.connect(os.environ["DATABASE_URL"]) as conn, open(output, "wb") as out:
        # binary results: bytea arrives as is, not hex-encoded text twice its size
        rows = conn.execute(
            "SELECT token FROM record_chunks WHERE username = %s AND record_id = %s ORDER BY seq",
            (username, record_id),
            binary=True,
        )
        for (token,) in rows:
            out.write(open_token(token)[CHUNK_HEADER_SIZE:])


if __name__ == "__main__":
    main()

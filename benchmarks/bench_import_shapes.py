"""Where `import`'s time goes on many small files: the same files stored in simpler
shapes, each timed against bench_import.py's baseline in the same run.

Shapes, from the simplest encrypting ingest to `import` itself:

- baseline:   bench_import.py's raw ingest (file bytes into bytea by binary COPY);
- one-table:  one Fernet token per file, streamed by binary COPY into one table;
- two-tables: the same token as a chunk row under a record row, as issue 2
              stores files: `(username, id)` records, then their chunks streamed
              into a table keyed `(username, record_id, seq)` with the composite
              foreign key;
- schema:     everything `import` stores per file, into the real tables, in one
              process: each record's metadata token (name, MIME type, size,
              SHA-256), its keyed fingerprint and dedupe key, every index of the
              schema; all record rows by one COPY, then all chunk rows by a
              second (each file read twice, from the page cache). No workers,
              no commits along the way, no audit event, no duplicate check;
- service:    `importer.import_folder` called directly: `import` without the CLI
              (worker processes, batched COPY from a thread, a commit about once
              a second, the duplicate check, the audit event);
- ours:       `patient-records import`, as bench_import.py runs it.

Run by hand, not a test:

    python benchmarks/bench_import_shapes.py [--set tiny] [--rounds 9] [--dsn DSN]

Each shape runs as its own process (wall time, medians of alternating rounds
after one unmeasured warm-up round, tables emptied and checkpointed before
every run, every file checked stored), in a database the script creates and
drops.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from bench_import import (
    BASELINE_TABLE,
    DATA_SETS,
    DEFAULT_DATA_DIR,
    DEFAULT_DSN,
    child_env,
    compile_package,
    generate,
    ours_command,
    run_process,
    set_files,
)

from _common import bench_database

SHAPE_TABLES = """
    CREATE TABLE shape_one (
        id bigserial PRIMARY KEY,
        path text NOT NULL,
        token bytea NOT NULL
    );
    ALTER TABLE shape_one ALTER COLUMN token SET STORAGE EXTERNAL;
    CREATE TABLE shape_records (
        username varchar(80) NOT NULL,
        id bigint NOT NULL,
        PRIMARY KEY (username, id)
    );
    CREATE TABLE shape_chunks (
        username varchar(80) NOT NULL,
        record_id bigint NOT NULL,
        seq integer NOT NULL,
        token bytea NOT NULL,
        PRIMARY KEY (username, record_id, seq),
        FOREIGN KEY (username, record_id) REFERENCES shape_records ON DELETE CASCADE
    );
    ALTER TABLE shape_chunks ALTER COLUMN token SET STORAGE EXTERNAL;
    ALTER TABLE shape_chunks SET (toast_tuple_target = 8160)"""
TABLES = "bench_files, shape_one, shape_chunks, shape_records, record_chunks, patient_records"
SHAPES = ("baseline", "one-table", "two-tables", "schema", "service", "ours")


def one_table_ingest(root: str, dsn: str) -> None:
    import psycopg

    from patient_cli.crypto import Keyring

    keyring = Keyring([os.environ["ENCRYPTION_KEY"].encode("ascii")])
    with psycopg.connect(dsn) as conn:
        with (
            conn.cursor() as cur,
            cur.copy("COPY shape_one (path, token) FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.set_types(["text", "bytea"])
            for path in set_files(root):
                with open(path, "rb") as source:
                    copy.write_row((path, keyring.encrypt(source.read())))
        conn.commit()
        _report(conn, "shape_one")


def two_tables_ingest(root: str, dsn: str) -> None:
    import psycopg

    from patient_cli.crypto import Keyring

    keyring = Keyring([os.environ["ENCRYPTION_KEY"].encode("ascii")])
    paths = list(set_files(root))
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        with cur.copy("COPY shape_records (username, id) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["text", "int8"])
            for number in range(len(paths)):
                copy.write_row(("bench", number))
        with cur.copy(
            "COPY shape_chunks (username, record_id, seq, token) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["text", "int8", "int4", "bytea"])
            for number, path in enumerate(paths):
                with open(path, "rb") as source:
                    copy.write_row(("bench", number, 0, keyring.encrypt(source.read())))
        conn.commit()
        _report(conn, "shape_chunks")


def schema_ingest(root: str, dsn: str) -> None:
    import hashlib

    import psycopg

    from patient_cli import copyformat, recordformat, sql, store
    from patient_cli.crypto import Keyring
    from patient_cli.mime import detect_mime_type

    keyring = Keyring([os.environ["ENCRYPTION_KEY"].encode("ascii")])
    key_id = keyring.primary_id
    fingerprint_key = os.urandom(32)  # stands in for the one kept in app_secrets
    paths = list(set_files(root))
    with psycopg.connect(dsn) as conn:
        ids = store.reserve_ids(conn, len(paths))
        with conn.cursor() as cur:
            with cur.copy(sql.COPY_RECORDS) as copy:
                copy.write(copyformat.SIGNATURE)
                for record_id, path in zip(ids, paths, strict=True):
                    with open(path, "rb") as source:
                        data = source.read()
                    digest = hashlib.sha256(data).digest()
                    fingerprint = recordformat.file_fingerprint(fingerprint_key, digest)
                    name = os.path.basename(path)
                    content = recordformat.RecordContent(
                        "bench", name.rsplit(".", 1)[0], None, name, detect_mime_type(name, data)
                    )
                    meta = recordformat.seal_meta(
                        keyring, content, record_id, len(data), digest.hex()
                    )
                    copy.write(
                        copyformat.record_row(
                            record_id, "bench", meta, key_id, len(data), 1, fingerprint, fingerprint
                        )
                    )
                copy.write(copyformat.TRAILER)
            with cur.copy(sql.COPY_CHUNKS) as copy:
                copy.write(copyformat.SIGNATURE)
                for record_id, path in zip(ids, paths, strict=True):
                    with open(path, "rb") as source:
                        token = recordformat.seal_chunk(keyring, record_id, 0, source.read())
                    for row in copyformat.chunk_rows("bench", record_id, key_id, (token,)):
                        copy.write(row)
                copy.write(copyformat.TRAILER)
        conn.commit()
        _report(conn, "record_chunks")


def service_ingest(root: str) -> None:
    from patient_cli.config import load_settings
    from patient_cli.import_request import ImportRequest
    from patient_cli.importer import import_folder
    from patient_cli.session import Session

    with Session(load_settings()) as session:
        summary = import_folder(session, ImportRequest(root=Path(root), username="bench"))
    print(json.dumps({"stored": summary.imported, "failed": summary.failed}))


def _report(conn: Any, table: str) -> None:
    """Print how many rows the shape stored (the parent checks it)."""
    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    print(json.dumps({"stored": row[0], "failed": 0}))


def _check_stored(shape: str, stdout: bytes, files: int) -> None:
    """Every shape must have stored every file (a fast run that stored less
    would be no figure)."""
    report = json.loads(stdout)
    stored = report.get("stored", report.get("imported", report.get("ingested")))
    if stored != files or report.get("failed", 0):
        raise RuntimeError(f"{shape} stored {stored} of {files} files: {report}")


def reset(dsn: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {TABLES}")
        conn.execute("CHECKPOINT")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="tiny", choices=sorted(DATA_SETS))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="server to create the database on")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--ingest", nargs=2, metavar=("SHAPE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ingest:
        shape, root = args.ingest
        if shape == "one-table":
            one_table_ingest(root, args.dsn)
        elif shape == "two-tables":
            two_tables_ingest(root, args.dsn)
        elif shape == "schema":
            schema_ingest(root, args.dsn)
        else:
            service_ingest(root)
            # As the CLI ends (cli.run): no interpreter teardown, which is not
            # the import's work.
            sys.stdout.flush()
            os._exit(0)
        return

    import psycopg
    from cryptography.fernet import Fernet

    compile_package()
    key = Fernet.generate_key().decode("ascii")
    print(f"generating {args.set} ...", file=sys.stderr)
    folder, files, size = generate(DATA_SETS[args.set], args.data_dir)
    here = Path(__file__).with_name("bench_import.py")
    with bench_database(args.dsn, "prbench_shapes") as dsn:
        env = child_env(dsn, key)
        run_process([*ours_command(), "init-db", "-q", "--format", "json"], env)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(BASELINE_TABLE)
            conn.execute(SHAPE_TABLES)
        root = str(folder)
        commands = {
            "baseline": [sys.executable, str(here), "--baseline-ingest", root, "--dsn", dsn],
            "ours": [*ours_command(), "import", root, "-u", "bench", "-q", "--format", "json"],
        }
        for shape in ("one-table", "two-tables", "schema", "service"):
            commands[shape] = [sys.executable, __file__, "--dsn", dsn, "--ingest", shape, root]
        walls: dict[str, list[float]] = {shape: [] for shape in SHAPES}
        for number in range(args.rounds + 1):  # round 0: warm-up, not counted
            order = SHAPES if number % 2 == 0 else SHAPES[::-1]
            for shape in order:
                reset(dsn)
                sample = run_process(commands[shape], env)
                _check_stored(shape, sample.stdout, files)
                if number:
                    walls[shape].append(sample.wall)
            if number:
                print(
                    f"  round {number}: "
                    + ", ".join(f"{shape} {walls[shape][-1]:.3f} s" for shape in SHAPES),
                    file=sys.stderr,
                )
    medians = {shape: statistics.median(walls[shape]) for shape in SHAPES}
    print(
        f"\n{args.set}: {files} files, {size / 1e6:.1f} MB; "
        f"median of {args.rounds} alternating rounds; ratio = baseline / shape"
    )
    print(f"{'shape':<11} {'seconds':>8} {'ratio':>7}")
    for shape in SHAPES:
        print(f"{shape:<11} {medians[shape]:>8.3f} {medians['baseline'] / medians[shape]:>6.2f}x")


if __name__ == "__main__":
    main()

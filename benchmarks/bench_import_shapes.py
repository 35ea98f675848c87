"""Where `import`'s time goes on many small files: the same files stored in simpler
shapes, each timed against bench_import.py's baseline in the same run.

Issue 3's tiny-file target (0.7x) was set from a prototype that stored one token
per file in one table. This script times that shape and the steps from it to
what `import` stores, so the cost of each requirement can be read off:

- baseline:   bench_import.py's raw ingest (file bytes into bytea by binary COPY);
- one-table:  one Fernet token per file, streamed by binary COPY into one table
              (the prototype's shape);
- two-tables: the same token as a chunk row under a record row, as issue 2
              stores files: `(username, id)` records, then their chunks streamed
              into a table keyed `(username, record_id, seq)` with the composite
              foreign key;
- service:    `importer.import_folder` called directly (everything `import`
              stores: the metadata token with name, MIME type, size and SHA-256,
              the keyed fingerprint and its unique constraint, the list indexes,
              the audit event), without the CLI;
- ours:       `patient-records import`, as bench_import.py runs it.

Run by hand, not a test:

    python benchmarks/bench_import_shapes.py [--set tiny] [--rounds 9] [--dsn DSN]

Each shape runs as its own process (wall time, medians of alternating rounds,
tables emptied and checkpointed before every run), in a database the script
creates and drops.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path

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
SHAPES = ("baseline", "one-table", "two-tables", "service", "ours")


def _files(root: str) -> Iterator[str]:
    """The set's files in a stable order (the generator's hidden marker left out)."""
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield os.path.join(folder, name)


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
            for path in _files(root):
                with open(path, "rb") as source:
                    copy.write_row((path, keyring.encrypt(source.read())))
        conn.commit()


def two_tables_ingest(root: str, dsn: str) -> None:
    import psycopg

    from patient_cli.crypto import Keyring

    keyring = Keyring([os.environ["ENCRYPTION_KEY"].encode("ascii")])
    paths = list(_files(root))
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


def service_ingest(root: str) -> None:
    from patient_cli.config import load_settings
    from patient_cli.import_request import ImportRequest
    from patient_cli.importer import import_folder
    from patient_cli.session import Session

    with Session(load_settings()) as session:
        import_folder(session, ImportRequest(root=Path(root), username="bench"))


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
        for shape in ("one-table", "two-tables", "service"):
            commands[shape] = [sys.executable, __file__, "--dsn", dsn, "--ingest", shape, root]
        walls: dict[str, list[float]] = {shape: [] for shape in SHAPES}
        for number in range(args.rounds):
            order = SHAPES if number % 2 == 0 else SHAPES[::-1]
            for shape in order:
                reset(dsn)
                walls[shape].append(run_process(commands[shape], env).wall)
            print(
                f"  round {number + 1}: "
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

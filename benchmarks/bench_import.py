"""Benchmark of `patient-records import` against raw ingest (issue 3, "Speed and memory").

For each data set, the baseline is a separate Python process that reads the same
files and writes their bytes into a bytea table with psycopg 3 binary COPY (no
encryption, one connection, default column storage: what a naive script does).
Ours is `patient-records import DIR -u bench -q --format json` as a process. The
two alternate round by round (tables emptied before every run); each figure is
the ratio of medians baseline/ours (higher is better), with the peak RSS of the
importing process from os.wait4. Run by hand, not a test:

    python benchmarks/bench_import.py [--sets mixed,tiny,large,many] [--rounds 3]
                                      [--dsn DSN] [--floor]

The "many" set (100,000 files of 0.5-2 KB) has no speed target: it shows that
the peak RSS does not grow with the number of files.

With --floor, a third series stores the same bytes with no encryption at all,
in 1 MiB pieces by pipelined INSERTs as `import` does: baseline/floor is the
best ratio any encrypting import could reach on this machine.

Data sets are generated deterministically (seeded) under --data-dir (default
/tmp/patient-records-bench) and reused when already there. The script creates and
drops a database of its own on DSN.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from _common import CONFIG_VARIABLES, bench_database

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_DATA_DIR = Path(tempfile.gettempdir()) / "patient-records-bench"
KB, MB = 1000, 1_000_000
MIB = 1 << 20
SEED = 20_260_303
BASELINE_TABLE = """
    CREATE TABLE IF NOT EXISTS bench_files (
        id bigserial PRIMARY KEY,
        path text NOT NULL,
        data bytea NOT NULL
    )"""
# The floor's table: 1 MiB pieces, stored uncompressed, as ours are.
FLOOR_TABLE = """
    CREATE TABLE IF NOT EXISTS bench_floor (
        file integer NOT NULL,
        seq integer NOT NULL,
        data bytea NOT NULL
    );
    ALTER TABLE bench_floor ALTER COLUMN data SET STORAGE EXTERNAL"""


# -- data sets ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSet:
    name: str
    target: float  # baseline_time / our_time must reach this
    sizes: Callable[[random.Random], list[int]]
    folders: int  # files are spread over this many subfolders


def _mixed_sizes(rng: random.Random) -> list[int]:
    """200 files, 100 MB: mostly 20-200 KB, some 1-5 MB, two of 20-50 MB."""
    small = [rng.randint(20 * KB, 200 * KB) for _ in range(188)]
    medium = [rng.randint(1 * MB, 5 * MB) for _ in range(10)]
    rest = 100 * MB - sum(small) - sum(medium)
    first = max(20 * MB, min(50 * MB, rest // 2 + rng.randint(-5 * MB, 5 * MB)))
    second = max(20 * MB, min(50 * MB, rest - first))
    return small + medium + [first, second]


def _tiny_sizes(rng: random.Random) -> list[int]:
    """5,000 files of 1-8 KB."""
    return [rng.randint(1 * KB, 8 * KB) for _ in range(5000)]


def _large_sizes(rng: random.Random) -> list[int]:
    """A dozen files of 50-200 MB, about 1 GB in all."""
    sizes = [rng.randint(50 * MB, 120 * MB) for _ in range(11)]
    sizes.append(max(50 * MB, min(200 * MB, 1000 * MB - sum(sizes))))
    return sizes


def _many_sizes(rng: random.Random) -> list[int]:
    """100,000 files of 0.5-2 KB: memory must not grow with the number of files."""
    return [rng.randint(500, 2 * KB) for _ in range(100_000)]


DATA_SETS = {
    "mixed": DataSet("mixed", 1.0, _mixed_sizes, 10),
    "tiny": DataSet("tiny", 0.7, _tiny_sizes, 50),
    "large": DataSet("large", 1.3, _large_sizes, 1),
    # No speed target: it is here for the peak RSS (under 120 MB, flat).
    "many": DataSet("many", 0.0, _many_sizes, 100),
}


def generate(data_set: DataSet, base: Path) -> tuple[Path, int, int]:
    """Write the set's files (random content) unless an identical set is there;
    returns its folder, file count and total bytes."""
    rng = random.Random(f"{SEED}-{data_set.name}")
    sizes = data_set.sizes(rng)
    folder = base / data_set.name
    marker = folder / ".complete"
    spec = json.dumps({"seed": SEED, "sizes": sizes})
    if marker.is_file() and marker.read_text() == spec:
        return folder, len(sizes), sum(sizes)
    if folder.exists():
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    for number, size in enumerate(sizes):
        sub = folder / f"batch-{number % data_set.folders:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        content = random.Random(f"{SEED}-{data_set.name}-{number}")
        with open(sub / f"file-{number:05d}.bin", "wb") as out:
            left = size
            while left:
                piece = min(left, 8 * MIB)
                out.write(content.randbytes(piece))
                left -= piece
    marker.write_text(spec)  # hidden: neither side imports it
    return folder, len(sizes), sum(sizes)


# -- the baseline (this script, run as a child with --baseline-ingest) -------------------


def set_files(root: str) -> Iterator[str]:
    """A set's files in a stable order (the generator's hidden marker left out)."""
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield os.path.join(folder, name)


def baseline_ingest(root: str, dsn: str) -> None:
    """Raw ingest: every file's bytes into a bytea table by binary COPY."""
    import psycopg

    count = 0
    with psycopg.connect(dsn) as conn:
        with (
            conn.cursor() as cur,
            cur.copy("COPY bench_files (path, data) FROM STDIN (FORMAT BINARY)") as copy,
        ):
            copy.set_types(["text", "bytea"])
            for path in set_files(root):
                with open(path, "rb") as source:
                    copy.write_row((os.path.relpath(path, root), source.read()))
                count += 1
        conn.commit()
    print(json.dumps({"ingested": count}))


def floor_ingest(root: str, dsn: str) -> None:
    """What `import` would take with no encryption at all: the same files in
    1 MiB pieces by pipelined INSERTs, as `import` sends a large file's chunks.
    The ratio baseline/floor is the most any encrypting import could reach."""
    import psycopg

    def pieces() -> Iterator[tuple[int, int, bytes]]:
        for number, path in enumerate(set_files(root)):
            with open(path, "rb", buffering=0) as source:
                seq = 0
                while piece := source.read(MIB):
                    yield number, seq, piece
                    seq += 1

    with psycopg.connect(dsn) as conn:
        conn.cursor().executemany("INSERT INTO bench_floor VALUES (%s, %s, %b)", pieces())
        conn.commit()
    print(json.dumps({"ingested": True}))


# -- measuring ---------------------------------------------------------------------------


@dataclass
class Sample:
    wall: float
    max_rss_kb: int
    stdout: bytes


def run_process(argv: Sequence[str], env: dict[str, str]) -> Sample:
    """Wall time and peak RSS (os.wait4) of one child process."""
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(argv), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err
        )
        assert proc.stdout is not None
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.stdout.close()
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            err.seek(0)
            raise RuntimeError(f"{argv[:3]} exited {code}: {err.read().decode(errors='replace')}")
    return Sample(wall, usage.ru_maxrss, out)


@dataclass
class Series:
    walls: list[float] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)

    def add(self, sample: Sample) -> None:
        self.walls.append(sample.wall)
        self.rss_kb.append(sample.max_rss_kb)

    @property
    def median(self) -> float:
        return statistics.median(self.walls)


def reset_tables(dsn: str) -> None:
    """Empty both sides' tables and checkpoint, so no run pays for another's writes."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE bench_files, bench_floor, record_chunks, patient_records")
        conn.execute("CHECKPOINT")


def ours_command() -> list[str]:
    script = Path(sys.executable).parent / "patient-records"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "patient_cli"]


def compile_package() -> None:
    """Write patient_cli's bytecode, as `pip install` does for an installed tool.

    An editable install never compiles it, and with PYTHONDONTWRITEBYTECODE set
    (as in some shells here) every run compiled our ~25 modules again, about
    60 ms, while the baseline's psycopg was compiled when it was installed.
    """
    import compileall

    import patient_cli

    compileall.compile_dir(Path(patient_cli.__file__).parent, quiet=1)


def child_env(dsn: str, key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARIABLES}
    env.update({"DATABASE_URL": dsn, "ENCRYPTION_KEY": key})
    return env


@dataclass
class Figure:
    name: str
    files: int
    size: int
    baseline_s: float
    ours_s: float
    ratio: float
    target: float
    ours_peak_rss_mb: float
    baseline_peak_rss_mb: float
    samples: dict[str, list[float]]
    floor_ratio: float | None = None  # baseline / no-encryption floor, with --floor

    @property
    def ok(self) -> bool:
        return self.ratio >= self.target


def measure(
    data_set: DataSet,
    folder: Path,
    files: int,
    size: int,
    dsn: str,
    key: str,
    rounds: int,
    with_floor: bool = False,
) -> Figure:
    env = child_env(dsn, key)
    base_argv = [sys.executable, __file__, "--baseline-ingest", str(folder), "--dsn", dsn]
    floor_argv = [sys.executable, __file__, "--floor-ingest", str(folder), "--dsn", dsn]
    ours_argv = [*ours_command(), "import", str(folder), "-u", "bench", "-q", "--format", "json"]
    base, ours, floor = Series(), Series(), Series()

    def run_base() -> Sample:
        reset_tables(dsn)
        sample = run_process(base_argv, env)
        assert json.loads(sample.stdout)["ingested"] == files
        return sample

    def run_ours() -> Sample:
        reset_tables(dsn)
        sample = run_process(ours_argv, env)
        summary = json.loads(sample.stdout)
        assert summary["imported"] == files and summary["failed"] == 0, summary
        return sample

    def run_floor() -> Sample:
        reset_tables(dsn)
        return run_process(floor_argv, env)

    run_base()  # warm-up: page cache, catalog, first-run costs
    run_ours()
    for number in range(rounds):
        order = [(base, run_base), (ours, run_ours)]
        if with_floor:
            order.append((floor, run_floor))
        if number % 2:
            order.reverse()
        for series, run in order:
            series.add(run())
            print(
                f"  {data_set.name} round {number + 1}: {series.walls[-1]:.3f} s", file=sys.stderr
            )
    return Figure(
        data_set.name,
        files,
        size,
        base.median,
        ours.median,
        base.median / ours.median,
        data_set.target,
        max(ours.rss_kb) / 1024,
        max(base.rss_kb) / 1024,
        {"baseline_s": base.walls, "ours_s": ours.walls, "floor_s": floor.walls},
        base.median / floor.median if with_floor else None,
    )


def prepare_schema(dsn: str, key: str) -> None:
    import psycopg

    subprocess.run(
        [*ours_command(), "init-db", "-q", "--format", "json"],
        env=child_env(dsn, key),
        check=True,
        stdout=subprocess.DEVNULL,
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(BASELINE_TABLE)
        conn.execute(FLOOR_TABLE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="mixed,tiny,large", help="comma-separated data sets")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="server to create the database on")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also time the same bytes without encryption (the best ratio reachable)",
    )
    parser.add_argument("--baseline-ingest", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--floor-ingest", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_ingest:
        baseline_ingest(args.baseline_ingest, args.dsn)
        return
    if args.floor_ingest:
        floor_ingest(args.floor_ingest, args.dsn)
        return
    chosen = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in DATA_SETS]
    if unknown:
        parser.error(f"unknown data set(s): {', '.join(unknown)}")
    from cryptography.fernet import Fernet

    compile_package()
    key = Fernet.generate_key().decode("ascii")
    figures = []
    with bench_database(args.dsn, "prbench_import") as dsn:
        prepare_schema(dsn, key)
        for name in chosen:
            data_set = DATA_SETS[name]
            print(f"generating {name} ...", file=sys.stderr)
            folder, files, size = generate(data_set, args.data_dir)
            figures.append(
                measure(data_set, folder, files, size, dsn, key, args.rounds, args.floor)
            )
    print(f"\nimport vs raw COPY ingest, median of {args.rounds} alternating rounds")
    print(
        f"{'set':<7} {'files':>6} {'MB':>7} {'baseline s':>11} {'ours s':>8} "
        f"{'ratio':>7} {'target':>7} {'ok':>4} {'peak RSS MB':>12} {'floor ratio':>12}"
    )
    for f in figures:
        print(
            f"{f.name:<7} {f.files:>6} {f.size / MB:>7.1f} {f.baseline_s:>11.3f} "
            f"{f.ours_s:>8.3f} {f.ratio:>6.2f}x {f.target:>6.2f}x {'yes' if f.ok else 'NO':>4} "
            f"{f.ours_peak_rss_mb:>12.1f} "
            + (f"{f.floor_ratio:>11.2f}x" if f.floor_ratio is not None else f"{'-':>12}")
        )
    if args.json:
        print(json.dumps([{**f.__dict__, "ok": f.ok} for f in figures], indent=2))


if __name__ == "__main__":
    main()

"""Benchmark of the `patient-records` CLI against minimal baselines (issue 2, "Speed").

Each figure is a ratio of medians against a baseline measured in the same run, the
two alternating round by round; every timed thing is a whole process started the way
a user starts it (wall time, peak RSS from os.wait4). Run by hand, not a test:

    python benchmarks/bench_cli.py [--dsn DSN] [--rounds N] [--only startup,add,list,export]

It creates (and drops) a database of its own on DSN and generates its data
deterministically. The embedded-server figures need a non-root user: as root, the
`embedded` part re-runs this script as `--embedded-user` (default prbench) via runuser.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from _common import CONFIG_VARIABLES, bench_database

HERE = Path(__file__).resolve().parent
BASELINES = HERE / "baselines"

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
PARTS = ("startup", "add", "list", "export", "embedded")
MIB = 1 << 20
SEED = 20_260_101


# -- measuring processes ---------------------------------------------------------------


@dataclass
class Sample:
    wall: float  # seconds
    cpu: float  # user + system seconds of the child
    max_rss_kb: int
    stdout_bytes: int


# The measured processes are started by this small helper, never by the benchmark
# itself: Linux folds the parent's peak RSS into a child's ru_maxrss across fork and
# exec, so a child of this (large, data-seeding) process would report at least its size.
SPAWNER_SOURCE = r"""
import json, os, subprocess, sys, tempfile, time
for line in sys.stdin:
    job = json.loads(line)
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(job["argv"], env=job["env"], cwd=job["cwd"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
        size = 0
        while piece := proc.stdout.read(65536):
            size += len(piece)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.stdout.close()
        err.seek(0)
        message = err.read().decode(errors="replace") if proc.returncode else ""
    print(json.dumps({"wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
                      "max_rss_kb": usage.ru_maxrss, "stdout_bytes": size,
                      "returncode": proc.returncode, "stderr": message}), flush=True)
"""


class Spawner:
    """A bare interpreter (-S: no site, ~10 MB) that runs commands for us and reports
    wall time, CPU time and peak RSS of each (os.wait4)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-S", "-c", SPAWNER_SOURCE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self, argv: Sequence[str], env: dict[str, str], cwd: Path) -> Sample:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        job = {"argv": list(argv), "env": env, "cwd": str(cwd)}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        done = json.loads(self.proc.stdout.readline())
        if done["returncode"] != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done['returncode']}: {done['stderr']}")
        return Sample(done["wall"], done["cpu"], done["max_rss_kb"], done["stdout_bytes"])

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()


SPAWNER: list[Spawner] = []


def run_process(argv: Sequence[str], env: dict[str, str], cwd: Path) -> Sample:
    """Run one process with stdout to a pipe (read and counted)."""
    return SPAWNER[0].run(argv, env, cwd)


def output_of(argv: Sequence[str], env: dict[str, str], cwd: Path) -> str:
    done = subprocess.run(list(argv), env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr}")
    return done.stdout


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- results ---------------------------------------------------------------------------


@dataclass
class Series:
    label: str
    argv: list[str]
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)

    def add(self, sample: Sample) -> None:
        self.walls.append(sample.wall)
        self.cpus.append(sample.cpu)
        self.rss_kb.append(sample.max_rss_kb)

    @property
    def median(self) -> float:
        return median(self.walls)


@dataclass
class Result:
    """One line of the report: ours against a baseline, or a plain figure."""

    name: str
    ours: float  # median seconds (or the figure itself when unit is not "s")
    baseline: float | None = None
    ratio: float | None = None  # ours/baseline for times, baseline/ours for speeds
    target: str = ""  # e.g. "<= 1.50x"
    ok: bool | None = None
    # CPU time (user + system) ratio, same direction as `ratio`: a cross-check that
    # other load on a shared machine disturbs less than wall time
    cpu_ratio: float | None = None
    unit: str = "s"
    note: str = ""
    samples: dict[str, Any] = field(default_factory=dict)


def compare(
    name: str,
    ours: Series,
    base: Series,
    limit: float,
    speed: bool = False,
    note: str = "",
) -> Result:
    """ratio = ours/baseline (time, at most `limit`) or baseline/ours (speed, at least)."""
    ours_cpu, base_cpu = median(ours.cpus), median(base.cpus)
    if speed:
        ratio, cpu_ratio = base.median / ours.median, base_cpu / ours_cpu
        ok, target = ratio >= limit, f">= {limit:.2f}x speed"
    else:
        ratio, cpu_ratio = ours.median / base.median, ours_cpu / base_cpu
        ok, target = ratio <= limit, f"<= {limit:.2f}x"
    return Result(
        name,
        ours.median,
        base.median,
        ratio,
        target,
        ok,
        cpu_ratio=cpu_ratio,
        note=note,
        samples={
            side: {
                "argv": series.argv,
                "wall_s": series.walls,
                "cpu_s": series.cpus,
                "max_rss_kb": series.rss_kb,
            }
            for side, series in (("ours", ours), ("baseline", base))
        },
    )


def alternate(
    rounds: int, pairs: Sequence[tuple[Series, Callable[[], Sample]]], warmup: bool = True
) -> None:
    """Run each measurement once per round, reversing the order every other round so
    that drift on a shared machine does not favour either side."""
    if warmup:
        for _series, run in pairs:
            run()
    for number in range(rounds):
        order = pairs if number % 2 == 0 else list(reversed(pairs))
        for series, run in order:
            series.add(run())


# -- the environment under test ---------------------------------------------------------


def ours_command() -> tuple[list[str], str]:
    """The console script users run, next to this interpreter (else `-m patient_cli`)."""
    script = Path(sys.executable).parent / "patient-records"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)], f"entry point {script}"
    return [sys.executable, "-m", "patient_cli"], f"{sys.executable} -m patient_cli"


# Compiled bytecode for every measured process, as an installed package has (pip
# compiles it at install time); the warm-up run of each command fills this cache.
PYCACHE = {"dir": ""}


def base_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARIABLES}
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if PYCACHE["dir"]:
        env["PYTHONPYCACHEPREFIX"] = PYCACHE["dir"]
    env.update(extra)
    return env


class PatternFile:
    """A deterministic, incompressible byte stream of a given size (a file stand-in)."""

    def __init__(self, size: int, seed: int) -> None:
        self.remaining = size
        self.rng = random.Random(seed)

    def read(self, size: int = -1) -> bytes:
        size = self.remaining if size < 0 else min(size, self.remaining)
        self.remaining -= size
        return self.rng.randbytes(size)


def write_pattern_file(path: Path, size: int, seed: int) -> None:
    source = PatternFile(size, seed)
    with open(path, "wb") as out:
        while piece := source.read(8 * MIB):
            out.write(piece)


def note_text(rng: random.Random, number: int) -> str:
    words = ("blood", "pressure", "stable", "follow-up", "dose", "mg", "allergy", "none", "x-ray")
    body = " ".join(rng.choice(words) for _ in range(30))
    return f"Visit {number}: {body} — ok ✓"


class Seeder:
    """Writes test records through the service layer, in-process (much faster than
    one CLI call per record, and the same code path as `add` and `import`)."""

    def __init__(self) -> None:
        from patient_cli.app_secrets import FINGERPRINT_KEY
        from patient_cli.config import load_settings
        from patient_cli.session import Session

        self.session = Session(load_settings(), actor_name="benchmark")
        self.session.load_secrets()
        self.fingerprint_key = self.session.secret(FINGERPRINT_KEY)

    def small(self, username: str, count: int, file_every: int, file_size: int) -> None:
        from patient_cli import recordformat, store

        rng = random.Random(f"{SEED}-{username}")
        conn, keyring = self.session.conn, self.session.keyring
        done = 0
        while done < count:
            ids = store.reserve_ids(conn, min(500, count - done))
            batch = []
            for offset, record_id in enumerate(ids):
                number = done + offset
                has_file = file_every > 0 and number % file_every == 0
                content = recordformat.RecordContent(
                    username,
                    f"Visit note {number:05d}",
                    note_text(rng, number),
                    f"scan-{number:05d}.bin" if has_file else None,
                    "application/octet-stream" if has_file else None,
                )
                data = rng.randbytes(file_size) if has_file else None
                batch.append(
                    recordformat.prepare_small(
                        keyring, self.fingerprint_key, record_id, content, data
                    )
                )
            store.insert_prepared(conn, batch)
            conn.commit()
            done += len(ids)

    def big(self, username: str, count: int, size: int) -> None:
        from patient_cli import recordformat, store

        for number in range(count):
            content = recordformat.RecordContent(
                username, f"Scan {number}", None, f"scan-{number}.bin", "application/octet-stream"
            )
            store.store_streamed(
                self.session.conn,
                self.session.keyring,
                self.fingerprint_key,
                content,
                PatternFile(size, SEED + number),  # type: ignore[arg-type]
            )
            self.session.conn.commit()

    def close(self) -> None:
        self.session.close()


# -- the parts ---------------------------------------------------------------------------


@dataclass
class Context:
    ours: list[str]
    env: dict[str, str]
    work: Path
    rounds: int
    export_rounds: int


def run_startup(ctx: Context) -> list[Result]:
    py = sys.executable
    base = Series("import typer", [py, "-c", "import typer"])
    version = Series("--version", [*ctx.ours, "--version"])
    help_ = Series("--help", [*ctx.ours, "--help"])
    add_help = Series("add --help", [*ctx.ours, "add", "--help"])
    env = base_env({"PATIENT_RECORDS_HOME": str(ctx.work / "home")})

    def runner(series: Series) -> Callable[[], Sample]:
        return lambda: run_process(series.argv, env, ctx.work)

    alternate(ctx.rounds, [(s, runner(s)) for s in (base, version, help_, add_help)])
    return [
        compare("startup: --version", version, base, 1.5),
        compare("startup: --help", help_, base, 1.5),
        compare("startup: add --help (info)", add_help, base, 1.5, note="no target in issue 2"),
    ]


def run_add(ctx: Context) -> list[Result]:
    base = Series(
        "minimal add",
        [sys.executable, str(BASELINES / "add_min.py"), "bench-add-base", "note", "hello"],
    )
    ours = Series(
        "patient-records add",
        [*ctx.ours, "add", "-u", "bench-add", "-n", "note", "-d", "hello", "--format", "json"],
    )
    alternate(
        ctx.rounds,
        [
            (base, lambda: run_process(base.argv, ctx.env, ctx.work)),
            (ours, lambda: run_process(ours.argv, ctx.env, ctx.work)),
        ],
    )
    return [compare("add: small text record", ours, base, 1.3)]


def run_list(ctx: Context, big_total_mb: int) -> list[Result]:
    results: list[Result] = []
    seeder = Seeder()
    try:
        started = time.perf_counter()
        seeder.small("p10k", 10_000, file_every=10, file_size=2048)
        seed_small = time.perf_counter() - started
        seeder.small("tiny10", 10, file_every=1, file_size=100)
        started = time.perf_counter()
        seeder.big("big10", 10, big_total_mb * MIB // 10)
        seed_big = time.perf_counter() - started
    finally:
        seeder.close()
    settle(os.environ["DATABASE_URL"])

    base = Series("minimal list", [sys.executable, str(BASELINES / "list_min.py"), "p10k"])
    ours = Series("patient-records list", [*ctx.ours, "list", "-u", "p10k", "--format", "json"])
    check = json.loads(output_of(ours.argv, ctx.env, ctx.work))
    assert len(check["records"]) == 10_000, len(check["records"])
    alternate(
        ctx.rounds,
        [
            (base, lambda: run_process(base.argv, ctx.env, ctx.work)),
            (ours, lambda: run_process(ours.argv, ctx.env, ctx.work)),
        ],
    )
    results.append(
        compare(
            "list: 10,000 records, JSON to a pipe",
            ours,
            base,
            2.0,
            note=f"seeded in-process in {seed_small:.1f} s",
        )
    )

    chunk_reads = chunk_table_reads(os.environ["DATABASE_URL"])
    tiny = Series("list tiny10", [*ctx.ours, "list", "-u", "tiny10", "--format", "json"])
    big = Series("list big10", [*ctx.ours, "list", "-u", "big10", "--format", "json"])
    alternate(
        2 * ctx.rounds,  # cheap, and the two differ by little: more rounds against noise
        [
            (tiny, lambda: run_process(tiny.argv, ctx.env, ctx.work)),
            (big, lambda: run_process(big.argv, ctx.env, ctx.work)),
        ],
    )
    results.append(
        compare(
            f"list: 10 records, files {big_total_mb} MB vs 1 KB in total",
            big,
            tiny,
            1.15,
            note=f"big files seeded in {seed_big:.1f} s; 'same cost' read as within 15%;"
            f" record_chunks blocks and scans during these {4 * ctx.rounds + 2} lists:"
            f" {chunk_table_reads(os.environ['DATABASE_URL']) - chunk_reads}",
        )
    )
    return results


def chunk_table_reads(dsn: str) -> int:
    """Blocks of record_chunks (heap, indexes, TOAST) read or found in cache, plus
    scans started on it, so far: `list` must not touch that table at all."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(io.heap_blks_read, 0) + coalesce(io.heap_blks_hit, 0)"
            " + coalesce(io.idx_blks_read, 0) + coalesce(io.idx_blks_hit, 0)"
            " + coalesce(io.toast_blks_read, 0) + coalesce(io.toast_blks_hit, 0)"
            " + coalesce(st.seq_scan, 0) + coalesce(st.idx_scan, 0)"
            " FROM pg_statio_user_tables io JOIN pg_stat_user_tables st USING (relid)"
            " WHERE io.relname = 'record_chunks'"
        ).fetchone()
    return int(row[0]) if row else 0


def settle(dsn: str) -> None:
    """Flush the seeded gigabyte and refresh statistics, as autovacuum and the
    checkpointer would, so that background writes do not land in one side's rounds."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
        # not a superuser: the checkpointer gets there on its own
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
            conn.execute("CHECKPOINT")


def run_export(ctx: Context, size_mb: int) -> list[Result]:
    source = ctx.work / "scan.bin"
    write_pattern_file(source, size_mb * MIB, SEED)
    add = Series(
        "add file",
        [*ctx.ours, "add", "-u", "exporter", "-n", "scan", "-f", str(source), "--format", "json"],
    )
    # unmeasured warm-up of the same code path (and of the bytecode cache)
    output_of([*ctx.ours, "add", "-u", "warm-up", "-n", "note", "-d", "text"], ctx.env, ctx.work)
    for _ in range(ctx.export_rounds):
        add.add(run_process(add.argv, ctx.env, ctx.work))
    listed = json.loads(output_of([*ctx.ours, "list", "-u", "exporter"], ctx.env, ctx.work))
    record_id = listed["records"][-1]["id"]  # the first one added

    base_out, ours_out = ctx.work / "export-base.bin", ctx.work / "export-ours.bin"
    base = Series(
        "minimal export",
        [
            sys.executable,
            str(BASELINES / "export_min.py"),
            "exporter",
            str(record_id),
            str(base_out),
        ],
    )
    ours = Series(
        "patient-records export-file",
        [*ctx.ours, "export-file", str(record_id), "-o", str(ours_out), "--format", "json"],
    )

    def fresh(series: Series, target: Path) -> Callable[[], Sample]:
        def run() -> Sample:
            target.unlink(missing_ok=True)
            sample = run_process(series.argv, ctx.env, ctx.work)
            assert target.stat().st_size == size_mb * MIB, target
            return sample

        return run

    alternate(ctx.export_rounds, [(base, fresh(base, base_out)), (ours, fresh(ours, ours_out))])
    same = _same_file(source, ours_out)
    for path in (source, base_out, ours_out):
        path.unlink(missing_ok=True)
    speed = compare(
        f"export-file: {size_mb} MB file to a file",
        ours,
        base,
        0.8,
        speed=True,
        note=f"ours {size_mb / ours.median:.0f} MB/s, baseline {size_mb / base.median:.0f} MB/s;"
        f" exported file identical: {same}",
    )
    export_rss = max(ours.rss_kb) / 1024
    add_rss = max(add.rss_kb) / 1024
    return [
        speed,
        Result(
            f"export-file: {size_mb} MB, peak RSS",
            export_rss,
            max(base.rss_kb) / 1024,
            target="< 100 MB",
            ok=export_rss < 100,
            unit="MB",
            note="baseline column: the minimal script's peak RSS (no target)",
        ),
        Result(
            f"add: {size_mb} MB file, peak RSS",
            add_rss,
            target="< 100 MB",
            ok=add_rss < 100,
            unit="MB",
            note=f"add took {add.median:.2f} s median ({size_mb / add.median:.0f} MB/s)",
            samples={"wall_s": add.walls, "max_rss_kb": add.rss_kb},
        ),
    ]


def _same_file(a: Path, b: Path) -> bool:
    import hashlib

    def digest(path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as handle:
            while piece := handle.read(8 * MIB):
                h.update(piece)
        return h.hexdigest()

    return digest(a) == digest(b)


# -- the embedded server (as a normal user) -----------------------------------------------


def run_embedded(ctx: Context) -> list[Result]:
    from patient_cli.embedded import ensure_server, stop_server

    root = Path(tempfile.mkdtemp(prefix="prbench-emb-"))
    home = root / "home"
    env = base_env({"PATIENT_RECORDS_HOME": str(home)})

    def timed(action: Callable[[], object]) -> float:
        started = time.perf_counter()
        action()
        return time.perf_counter() - started

    try:
        first = timed(lambda: ensure_server(home))
        stops = [timed(lambda: stop_server(home))]
        warm: list[float] = []
        for _ in range(ctx.rounds):
            warm.append(timed(lambda: ensure_server(home)))
            stops.append(timed(lambda: stop_server(home)))

        output_of([*ctx.ours, "init-db", "-q"], env, root)  # generates the key file
        command = [*ctx.ours, "list", "-u", "nobody", "--format", "json"]
        up = Series("server stays up", command)
        cold = Series("server started by the command", command)
        cold_plus_stop: list[float] = []

        def while_up() -> Sample:
            ensure_server(home)
            return run_process(command, env, root)

        def start_and_stop() -> Sample:
            stop_server(home)
            sample = run_process(command, env, root)
            cold_plus_stop.append(sample.wall + timed(lambda: stop_server(home)))
            return sample

        alternate(ctx.rounds, [(up, while_up), (cold, start_and_stop)])
        cold_plus_stop = cold_plus_stop[-ctx.rounds :]  # drop the warm-up
    finally:
        stop_server(home)
        shutil.rmtree(root, ignore_errors=True)

    per_command = median(cold_plus_stop)
    return [
        Result("embedded: first initdb + start", first),
        Result("embedded: warm start", median(warm), samples={"wall_s": warm}),
        Result("embedded: stop", median(stops), samples={"wall_s": stops}),
        Result(
            "embedded: `list` while the server stays up",
            up.median,
            samples={"wall_s": up.walls},
        ),
        Result(
            "embedded: `list` + stop, server started per command",
            per_command,
            up.median,
            per_command / up.median,
            note=f"adds {1000 * (per_command - up.median):.0f} ms per command"
            " (baseline column: server stays up)",
            samples={"command_wall_s": cold.walls, "command_plus_stop_s": cold_plus_stop},
        ),
    ]


def embedded_as_user(args: argparse.Namespace) -> list[Result]:
    """As root, re-run the embedded part as a normal user (the server refuses root)."""
    user = args.embedded_user
    import pwd

    try:
        pwd.getpwnam(user)
    except KeyError:
        print(
            f"skipping embedded: running as root and user {user!r} does not exist"
            f" (create it: useradd -m {user})",
            file=sys.stderr,
        )
        return []
    argv = [
        "runuser",
        "-u",
        user,
        "--",
        sys.executable,
        str(Path(__file__).resolve()),
        "--embedded-only",
        "--rounds",
        str(args.rounds),
        "--json",
        "-",
    ]
    done = subprocess.run(argv, cwd="/tmp", capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"embedded benchmark as {user} failed: {done.stderr}")
    return [Result(**item) for item in json.loads(done.stdout)["results"]]


# -- report -----------------------------------------------------------------------------


def report(results: Sequence[Result], out: Any) -> None:
    header = (
        f"{'benchmark':<52} {'ours':>9} {'baseline':>9} {'ratio':>7} {'cpu':>6}  {'target':<17} ok"
    )
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in results:
        ours = f"{r.ours:.3f}s" if r.unit == "s" else f"{r.ours:.0f} {r.unit}"
        base = ""
        if r.baseline is not None:
            base = f"{r.baseline:.3f}s" if r.unit == "s" else f"{r.baseline:.0f} {r.unit}"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        cpu = f"{r.cpu_ratio:.2f}x" if r.cpu_ratio is not None else ""
        ok = "" if r.ok is None else ("yes" if r.ok else "NO")
        print(
            f"{r.name:<52} {ours:>9} {base:>9} {ratio:>7} {cpu:>6}  {r.target:<17} {ok}", file=out
        )
        if r.note:
            print(f"    {r.note}", file=out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="server to create a database on")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the cheap benchmarks")
    parser.add_argument("--export-rounds", type=int, default=3, help="rounds of the 200 MB ones")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma list of {PARTS}")
    parser.add_argument("--export-mb", type=int, default=200, help="size of the exported file")
    parser.add_argument(
        "--big-total-mb", type=int, default=1000, help="total file size of the 10 big records"
    )
    parser.add_argument("--json", metavar="PATH", help="write results as JSON ('-': stdout)")
    parser.add_argument("--embedded-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--embedded-user", default="prbench", help="user for the embedded part")
    args = parser.parse_args(argv)
    args.parts = ("embedded",) if args.embedded_only else tuple(args.only.split(","))
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    SPAWNER.append(Spawner())  # first, while this process is still small
    ours, how = ours_command()
    out = sys.stderr if args.json == "-" else sys.stdout
    results: list[Result] = []
    from cryptography.fernet import Fernet

    key = Fernet.generate_key().decode("ascii")
    with tempfile.TemporaryDirectory(prefix="prbench-") as tmp:
        work = Path(tmp)
        PYCACHE["dir"] = str(work / "pycache")
        ctx = Context(ours, {}, work, args.rounds, args.export_rounds)
        if "startup" in args.parts:
            results += run_startup(ctx)
        if {"add", "list", "export"} & set(args.parts):
            with bench_database(args.dsn, "prbench_cli") as dsn:
                ctx.env = base_env(
                    {
                        "DATABASE_URL": dsn,
                        "ENCRYPTION_KEY": key,
                        "PATIENT_RECORDS_HOME": str(work / "home"),
                    }
                )
                os.environ.update({"DATABASE_URL": dsn, "ENCRYPTION_KEY": key})
                output_of([*ours, "init-db", "-q"], ctx.env, work)
                if "add" in args.parts:
                    results += run_add(ctx)
                if "list" in args.parts:
                    results += run_list(ctx, args.big_total_mb)
                if "export" in args.parts:
                    results += run_export(ctx, args.export_mb)
        if "embedded" in args.parts:
            results += embedded_as_user(args) if os.geteuid() == 0 else run_embedded(ctx)
    SPAWNER[0].close()

    import typer

    print(
        f"\n{len(results)} figures; ours = {how}; medians of {args.rounds} rounds "
        f"({args.export_rounds} for {args.export_mb} MB files); python {platform.python_version()},"
        f" typer {typer.__version__}, {os.cpu_count()} CPUs\n",
        file=out,
    )
    report(results, out)
    if args.json:
        payload = {
            "ours": how,
            "rounds": args.rounds,
            "export_rounds": args.export_rounds,
            "python": platform.python_version(),
            "typer": typer.__version__,
            "cpus": os.cpu_count(),
            "results": [asdict(r) for r in results],
        }
        text = json.dumps(payload, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

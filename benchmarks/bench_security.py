"""Benchmark of `rotate-key`, `verify` and the audit trail (issue 4). Run by hand,
not a test:

    python benchmarks/bench_security.py [--dsn DSN] [--rounds N] [--files 4] [--mib 50]
                                        [--only throughput,audit] [--json PATH]

Throughput: `rotate-key` and `verify` over the whole database, against `export-file`
of every file, on the same data in the same run, alternating round by round; each is
a whole CLI process (or, for export, one process per file, as a user runs it), and
each figure is file bytes / median wall time. rotate-key flips the data between two
keys each round ("B,A" then "A,B"), so every round re-encrypts everything.

Audit cost: the service functions behind `add` and `list` run in-process, each call on
a fresh Session (a new connection, as each CLI process has), alternately with the
real audit and with it switched off (append_event and the HMAC-secret fetch replaced
by no-ops in this script only); the cost is the difference of medians relative to the
unaudited median. The same append's cost is also shown against the CLI process's
wall time, which is what a user waits for.
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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet

from _common import CONFIG_VARIABLES, bench_database

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
MB = 1_000_000
SEED = 20_260_404


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    baseline: float | None = None
    ratio: float | None = None
    target: str = ""
    ok: bool | None = None
    samples: dict[str, list[float]] = field(default_factory=dict)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def cli_env(dsn: str, key: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CONFIG_VARIABLES}
    env.update({"DATABASE_URL": dsn, "ENCRYPTION_KEY": key, "PATIENT_RECORDS_HOME": str(home)})
    return env


def run(args: Sequence[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    """One CLI process: wall seconds and stdout; any failure stops the benchmark."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "patient_cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
    return wall, done.stdout


# -- throughput --------------------------------------------------------------------------


def throughput(dsn: str, work: Path, rounds: int, files: int, mib: int) -> list[Figure]:
    key_a, key_b = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    env = cli_env(dsn, key_a, work / "home")
    run(["init-db", "-F", "json"], env, work)
    rng = random.Random(SEED)
    ids = []
    for number in range(files):
        path = work / f"scan{number}.bin"
        path.write_bytes(rng.randbytes(mib << 20))
        _, out = run(
            ["add", "-u", f"p{number}", "-n", "scan", "-f", str(path), "-F", "json"], env, work
        )
        ids.append(json.loads(out)["record_id"])
        path.unlink()
    total = files * (mib << 20)
    print(f"stored {files} file(s) of {mib} MiB", file=sys.stderr)

    flip = {"keys": f"{key_b},{key_a}"}  # the first rotation moves everything to B

    def export_all() -> float:
        wall = 0.0
        for record_id in ids:
            target = work / "out.bin"
            elapsed, _ = run(
                ["export-file", str(record_id), "-o", str(target), "--force", "-F", "json"],
                {**env, "ENCRYPTION_KEY": flip["keys"]},
                work,
            )
            wall += elapsed
        (work / "out.bin").unlink()
        return wall

    def rotate() -> float:
        elapsed, out = run(
            ["rotate-key", "-F", "json"], {**env, "ENCRYPTION_KEY": flip["keys"]}, work
        )
        summary = json.loads(out)
        assert summary["chunks_reencrypted"] >= files * mib, summary
        first, second = flip["keys"].split(",")
        flip["keys"] = f"{second},{first}"  # next round rotates back
        return elapsed

    def verify() -> float:
        elapsed, out = run(["verify", "-F", "json"], {**env, "ENCRYPTION_KEY": flip["keys"]}, work)
        assert json.loads(out)["bytes"] == total
        return elapsed

    steps: dict[str, Callable[[], float]] = {
        "export-file": export_all,
        "rotate-key": rotate,
        "verify": verify,
    }
    walls: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():  # warm-up (caches, first rotation)
        step()
    for number in range(rounds):
        order = list(steps.items())
        if number % 2:
            order.reverse()
        for name, step in order:
            walls[name].append(step())
            print(f"round {number + 1}: {name} {walls[name][-1]:.2f} s", file=sys.stderr)

    speed = {name: total / MB / median(values) for name, values in walls.items()}
    figures = [Figure("export-file throughput", speed["export-file"], "MB/s", samples=walls)]
    for name in ("rotate-key", "verify"):
        ratio = speed[name] / speed["export-file"]
        figures.append(
            Figure(
                f"{name} throughput",
                speed[name],
                "MB/s",
                baseline=speed["export-file"],
                ratio=ratio,
                target=">= 0.80x export-file",
                ok=ratio >= 0.8,
                samples={name: walls[name], "export-file": walls["export-file"]},
            )
        )
        # The same ratio taken round by round (each pair ran back to back), which a
        # drifting load on a shared machine disturbs less than the ratio of medians.
        paired = [e / o for e, o in zip(walls["export-file"], walls[name], strict=True)]
        figures.append(
            Figure(f"{name} / export-file, per-round ratio", median(paired), "x", samples={})
        )
    return figures


# -- audit cost ----------------------------------------------------------------------------


def audit_cost(dsn: str, work: Path, rounds: int) -> list[Figure]:
    key = Fernet.generate_key().decode()
    env = cli_env(dsn, key, work / "home")
    os.environ.update(env)
    for name in CONFIG_VARIABLES:
        if name not in env:
            os.environ.pop(name, None)
    from patient_cli import records
    from patient_cli.config import load_settings
    from patient_cli.session import Session

    run(["init-db", "-F", "json"], env, work)
    sample = work / "visit.txt"
    sample.write_bytes(b"blood pressure 120/80\n" * 200)
    settings = load_settings()
    for number in range(100):  # the patient whose records `list` shows
        with Session(settings) as session:
            records.add_record(session, records.AddRequest("listed", f"visit {number}", "note"))

    # The service's own reference to the audit call, replaced while timing.
    service: Any = records
    real_append = service.append_event

    def add() -> None:
        with Session(settings) as session:
            records.add_record(session, records.AddRequest("ann", "visit", "note", sample))

    def list_() -> None:
        with Session(settings) as session:
            found = records.list_records(session, records.RecordQuery(username="listed"))
            assert len(found) == 100

    def timed(step: Callable[[], None], audit: bool) -> float:
        # Without the audit: no append, and no fetch of the audit HMAC secret
        # (load_secrets); add still fetches the fingerprint secret it needs.
        service.append_event = real_append if audit else (lambda session, event: 0)
        original = Session.load_secrets
        if not audit:
            Session.load_secrets = lambda self: None  # type: ignore[method-assign]
        try:
            started = time.perf_counter()
            step()
            return time.perf_counter() - started
        finally:
            Session.load_secrets = original  # type: ignore[method-assign]
            service.append_event = real_append

    figures = []
    for name, step, argv in (
        (
            "add",
            add,
            ["add", "-u", "ann", "-n", "visit", "-d", "note", "-f", str(sample), "-F", "json"],
        ),
        ("list", list_, ["list", "-u", "listed", "-F", "json"]),
    ):
        walls: dict[str, list[float]] = {"audited": [], "unaudited": []}
        for _ in range(3):
            timed(step, True), timed(step, False)
        for number in range(rounds * 10):
            order = [True, False] if number % 2 == 0 else [False, True]
            for audit in order:
                walls["audited" if audit else "unaudited"].append(timed(step, audit))
        audited, unaudited = median(walls["audited"]), median(walls["unaudited"])
        cost = (audited - unaudited) / unaudited
        process = [run(argv, env, work)[0] for _ in range(rounds)]
        figures.append(
            Figure(
                f"audit cost: {name} (in-process)",
                cost * 100,
                "%",
                baseline=unaudited * 1000,
                ratio=audited / unaudited,
                target="< 10%",
                ok=cost < 0.10,
                samples={k: [round(v * 1000, 3) for v in vs] for k, vs in walls.items()},
            )
        )
        share = (audited - unaudited) / median(process)
        figures.append(
            Figure(
                f"audit cost: {name} (of the CLI process's wall time)",
                share * 100,
                "%",
                baseline=median(process) * 1000,
                target="< 10%",
                ok=share < 0.10,
                samples={"process_ms": [round(v * 1000, 1) for v in process]},
            )
        )
    return figures


def report(figures: Sequence[Figure]) -> None:
    for f in figures:
        line = f"{f.name:52s} {f.value:9.2f} {f.unit}"
        if f.ratio is not None and f.unit == "MB/s":
            line += f"  ({f.ratio:.2f}x of {f.baseline:.1f} MB/s)"
        elif f.unit == "x":
            line += "  (median of rounds)"
        elif f.baseline is not None:
            line += f"  (baseline {f.baseline:.1f} ms)"
        if f.target:
            line += f"  target {f.target}: {'OK' if f.ok else 'MISSED'}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("PATIENT_RECORDS_BENCH_DSN", DEFAULT_DSN))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--mib", type=int, default=50, help="size of each file")
    parser.add_argument("--only", default="throughput,audit")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="pr-bench-security-") as tmp:
        work = Path(tmp)
        if "throughput" in parts:
            with bench_database(args.dsn, "pr_bench_security") as dsn:
                figures += throughput(dsn, work, args.rounds, args.files, args.mib)
        if "audit" in parts:
            with bench_database(args.dsn, "pr_bench_security") as dsn:
                figures += audit_cost(dsn, work, args.rounds)
    report(figures)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(f) for f in figures], indent=2))


if __name__ == "__main__":
    main()

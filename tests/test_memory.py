"""glibc malloc tuning for imports: applied where glibc is, a no-op elsewhere."""

from __future__ import annotations

import gc
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import Cli
from patient_cli.memory import RARE_GC_THRESHOLD, collect_rarely


def test_keep_freed_memory_applies_on_glibc_only() -> None:
    # In a child process: the setting lasts for the life of the process.
    script = "from patient_cli.memory import keep_freed_memory; print(keep_freed_memory())"
    argv = [sys.executable, "-c", script]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert done.stdout.strip() == str(on_glibc)


def test_collect_rarely_raises_the_first_threshold_for_the_block_only() -> None:
    before = gc.get_threshold()
    with pytest.raises(KeyError), collect_rarely():
        assert gc.get_threshold() == (RARE_GC_THRESHOLD, *before[1:])
        raise KeyError("the block failed")
    assert gc.get_threshold() == before


def test_an_import_runs_with_few_collections(
    ready: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "in"
    root.mkdir()
    for n in range(300):
        (root / f"f{n}.txt").write_bytes(b"letter %d" % n)
    seen: list[tuple[int, int, int]] = []
    from patient_cli import import_job

    run_import = import_job.run_import

    def noting(*args: Any, **kwargs: Any) -> Any:
        seen.append(gc.get_threshold())
        return run_import(*args, **kwargs)

    monkeypatch.setattr(import_job, "run_import", noting)
    before = gc.get_threshold()
    assert ready("import", str(root), "-u", "ann", "-q").exit_code == 0
    assert seen == [(RARE_GC_THRESHOLD, *before[1:])]
    assert gc.get_threshold() == before


def test_the_console_script_collects_rarely(monkeypatch: pytest.MonkeyPatch) -> None:
    from patient_cli import cli, entry

    seen: list[tuple[int, int, int]] = []
    before = gc.get_threshold()
    monkeypatch.setattr(cli, "run", lambda: seen.append(gc.get_threshold()))
    try:
        entry.run()
    finally:
        gc.set_threshold(*before)
    assert seen == [(RARE_GC_THRESHOLD, *before[1:])]

"""glibc malloc tuning for imports: applied where glibc is, a no-op elsewhere."""

from __future__ import annotations

import platform
import subprocess
import sys


def test_keep_freed_memory_applies_on_glibc_only() -> None:
    # In a child process: the setting lasts for the life of the process.
    script = "from patient_cli.memory import keep_freed_memory; print(keep_freed_memory())"
    argv = [sys.executable, "-c", script]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert done.stdout.strip() == str(on_glibc)

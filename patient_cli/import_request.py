"""What an import is asked to do and what it reports: the request, per-file
outcomes and the summary, and the checks made before any key or database work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from patient_cli import scan
from patient_cli.errors import UsageError
from patient_cli.inputs import check_record_data, check_username

MAX_WORKERS = 16

NameFrom = Literal["stem", "name", "relpath"]
Status = Literal["imported", "would_import", "skipped", "failed"]


@dataclass(frozen=True)
class ImportRequest:
    root: Path
    username: str | None = None
    username_from_dir: bool = False
    recursive: bool = True
    include_hidden: bool = False
    globs: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    name_from: NameFrom = "stem"
    record_data: str | None = None
    allow_duplicates: bool = False
    dry_run: bool = False
    # Processes that read and encrypt small files; None: one per core, at most
    # 3 (import_pool.default_workers); 0 does it all in this process.
    workers: int | None = None

    @property
    def scan_options(self) -> scan.ScanOptions:
        return scan.ScanOptions(
            self.root,
            self.recursive,
            self.include_hidden,
            self.globs,
            self.excludes,
            self.username_from_dir,
        )


@dataclass
class FileOutcome:
    """What became of one file; reported only once it is committed."""

    path: str
    status: Status
    username: str | None
    size: int | None = None
    record_id: int | None = None
    error: str | None = None
    code: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": self.path,
            "status": self.status,
            "username": self.username,
            "size": self.size,
            "record_id": self.record_id,
        }
        if self.status == "failed":
            out["error"] = self.error
            out["code"] = self.code
        return out


# Called with each file's outcome once it is committed, and with the bytes read.
OutcomeCallback = Callable[[FileOutcome], None]
BytesCallback = Callable[[int], None]


@dataclass(frozen=True)
class Failure:
    path: str
    error: str
    code: str


@dataclass
class ImportSummary:
    """Counts and timing of a whole run; only failures are kept per file."""

    imported: int = 0
    would_import: int = 0
    skipped: int = 0
    failed: int = 0
    bytes: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    failures: list[Failure] = field(default_factory=list)

    @property
    def files(self) -> int:
        return self.imported + self.would_import + self.skipped + self.failed

    @property
    def files_per_second(self) -> float:
        return round(self.files / self.seconds, 1) if self.seconds > 0 else 0.0

    @property
    def mb_per_second(self) -> float:
        return round(self.bytes / 1e6 / self.seconds, 2) if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "imported": self.imported,
            "skipped": self.skipped,
            "failed": self.failed,
            "bytes": self.bytes,
            "seconds": round(self.seconds, 3),
            "files_per_second": self.files_per_second,
            "mb_per_second": self.mb_per_second,
            "failures": [{"path": f.path, "error": f.error, "code": f.code} for f in self.failures],
            "dry_run": self.dry_run,
        }
        if self.dry_run:
            out["would_import"] = self.would_import
        return out


def check_request(request: ImportRequest) -> None:
    """Input errors (exit 2) before any key or database work."""
    if request.username_from_dir:
        if request.username is not None:
            raise UsageError("give either --username or --username-from-dir, not both")
    elif request.username is None:
        raise UsageError("username must not be empty (or use --username-from-dir)")
    else:
        check_username(request.username)
    check_record_data(request.record_data)
    if request.workers is not None and not 0 <= request.workers <= MAX_WORKERS:
        raise UsageError(f"--workers must be between 0 and {MAX_WORKERS}")
    scan.check_root(request.root)


def count_planned(request: ImportRequest) -> tuple[int, int]:
    """Files an import would look at and their total size (for a progress bar)."""
    return scan.count_files(request.scan_options)

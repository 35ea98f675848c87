"""The service behind `import`: every file of a folder becomes one record, fast,
idempotently, and safely when two imports run at once.

`import_folder` forks the worker processes and gives them the first files
before psycopg is imported: the main process's start-up (importing psycopg,
connecting, reading the keys; about 0.3 s) then overlaps with the workers'
reading and encryption instead of preceding it. The database side is
`import_job`, imported only once the workers are under way.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from patient_cli.import_feed import WorkerFeed
from patient_cli.import_pool import SmallFilePreparer, default_workers
from patient_cli.import_request import (
    BytesCallback,
    Failure,
    FileOutcome,
    ImportRequest,
    ImportSummary,
    NameFrom,
    OutcomeCallback,
    Status,
    check_request,
    count_planned,
)
from patient_cli.memory import collect_rarely, keep_freed_memory
from patient_cli.session import Session

__all__ = [
    "Failure",
    "FileOutcome",
    "ImportRequest",
    "ImportSummary",
    "NameFrom",
    "Status",
    "check_request",
    "count_planned",
    "import_folder",
]


def import_folder(
    session: Session,
    request: ImportRequest,
    on_outcome: OutcomeCallback | None = None,
    on_bytes: BytesCallback | None = None,
    on_force_quit: Callable[[], None] | None = None,
) -> ImportSummary:
    """Import every file under `request.root`; see the module docstring and import_job.

    `on_force_quit` is called at the third interruption while a batch is being
    sent to a server that does not answer (a CLI exits then; see import_job)."""
    started = time.monotonic()
    check_request(request)
    with collect_rarely():  # (the workers inherit it)
        summary = _import(session, request, on_outcome, on_bytes, on_force_quit)
    summary.seconds = time.monotonic() - started
    return summary


def _import(
    session: Session,
    request: ImportRequest,
    on_outcome: OutcomeCallback | None,
    on_bytes: BytesCallback | None,
    on_force_quit: Callable[[], None] | None,
) -> ImportSummary:
    workers = request.workers if request.workers is not None else default_workers()
    feed: WorkerFeed | None = None
    if workers and not request.dry_run:  # a dry run reads only files that may be stored
        keep_freed_memory()  # before the fork: the workers inherit it
        preparer = SmallFilePreparer(
            session.keyring, request.record_data, dedupe=not request.allow_duplicates
        )
        # Forked before any thread of this run starts, and before psycopg is imported.
        feed = WorkerFeed.start(workers, preparer, request)
    try:
        from patient_cli.import_job import run_import  # psycopg: while the workers work

        return run_import(session, request, feed, on_outcome, on_bytes, on_force_quit)
    finally:
        if feed is not None:
            feed.close()

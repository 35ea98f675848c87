"""`import`: store every file of a folder as a record (parse options, show
progress on a terminal, render the summary); the work is in patient_cli.importer."""

from __future__ import annotations

import contextlib
import enum
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from patient_cli.cli_app import (
    ActorOption,
    FormatOption,
    QuietOption,
    UsernameOption,
    app,
    open_session,
    run_command,
)
from patient_cli.errors import EXIT_INTERRUPTED, BatchIncomplete
from patient_cli.output import Format, Messages, print_json, print_pairs, print_table

if TYPE_CHECKING:
    from patient_cli.import_request import FileOutcome, ImportRequest, ImportSummary


class NameFrom(enum.StrEnum):
    stem = "stem"
    name = "name"
    relpath = "relpath"


@app.command("import")
def import_(
    folder: Annotated[
        Path, typer.Argument(metavar="DIR", help="The folder whose files to import.")
    ],
    username: UsernameOption = None,
    username_from_dir: Annotated[
        bool,
        typer.Option(
            "--username-from-dir",
            help="Each first-level subfolder is a username (DIR/turtle/a.pdf is turtle's).",
        ),
    ] = False,
    recursive: Annotated[
        bool, typer.Option("--recursive/--no-recursive", help="Include subfolders.")
    ] = True,
    include_hidden: Annotated[
        bool, typer.Option("--include-hidden", help="Also import dot-files and dot-folders.")
    ] = False,
    glob: Annotated[
        list[str] | None,
        typer.Option("--glob", help="Only files whose name or relative path matches (repeatable)."),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            "--exclude", help="Skip files and folders whose name or path matches (repeatable)."
        ),
    ] = None,
    name_from: Annotated[
        NameFrom,
        typer.Option(
            "--name-from",
            case_sensitive=False,
            help="Record name: file name without extension, file name, or relative path.",
        ),
    ] = NameFrom.stem,
    data: Annotated[
        str | None, typer.Option("--data", "-d", help="Attach this note to every record.")
    ] = None,
    allow_duplicates: Annotated[
        bool,
        typer.Option(
            "--allow-duplicates", help="Store files whose content is already stored for the user."
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Report what would be imported or skipped; store nothing."),
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            metavar="N",
            help="Processes that read and encrypt small files "
            "[default: one per core, up to 3; 0: none].",
            show_default=False,
        ),
    ] = None,
    fmt: FormatOption = None,
    quiet: QuietOption = False,
    actor: ActorOption = None,
) -> None:
    """Import every file of a folder, one record per file (skips content already stored)."""

    def body(messages: Messages, out: Format) -> None:
        from patient_cli.importer import ImportRequest, check_request, import_folder

        request = ImportRequest(
            root=folder,
            username=username,
            username_from_dir=username_from_dir,
            recursive=recursive,
            include_hidden=include_hidden,
            globs=tuple(glob or ()),
            excludes=tuple(exclude or ()),
            name_from=name_from.value,
            record_data=data,
            allow_duplicates=allow_duplicates,
            dry_run=dry_run,
            workers=workers,
        )
        check_request(request)
        progress = _Progress.start(request) if not quiet and sys.stderr.isatty() else None
        on_outcome = _outcome_printer(out, progress, dry_run)
        try:
            with open_session(actor) as session:
                summary = import_folder(
                    session,
                    request,
                    on_outcome=on_outcome,
                    on_bytes=progress.advance if progress is not None else None,
                    on_force_quit=lambda: _force_quit(messages, out),
                )
        finally:
            if progress is not None:
                progress.stop()
        _render(summary, out)
        if summary.failed:
            raise BatchIncomplete(f"{summary.failed} of {summary.files} files failed")

    run_command(fmt, quiet, body)


def _force_quit(messages: Messages, out: Format) -> NoReturn:
    """The third Ctrl-C while a batch is stuck on a server that does not answer:
    stop now (the server rolls back what was not committed when the connection
    goes), after the one error line and whatever output was already written."""
    messages.error(
        "interrupted; stopped without waiting for the database, "
        "which rolls back what was not committed",
        EXIT_INTERRUPTED,
        out,
        "interrupted",
    )
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(EXIT_INTERRUPTED)


def _outcome_printer(
    out: Format, progress: _Progress | None, dry_run: bool
) -> Callable[[FileOutcome], None] | None:
    """Per-file lines (ndjson, or a dry run's list on a terminal) and the progress
    bar's file count, as each file's outcome is settled."""
    listing = out is Format.table and dry_run
    if out is not Format.ndjson and progress is None and not listing:
        return None

    def on_outcome(outcome: FileOutcome) -> None:
        if out is Format.ndjson:
            print_json(outcome.as_dict())
        elif listing:
            label = _DRY_RUN_LABELS[outcome.status]
            sys.stdout.write(f"{label:<14} {_printable(outcome.path)}\n")
        if progress is not None:
            progress.file_done()

    return on_outcome


_DRY_RUN_LABELS = {
    "would_import": "would import",
    "skipped": "already stored",
    "failed": "cannot import",
    "imported": "imported",
}


def _printable(text: str) -> str:
    # A file name may hold control characters (even a newline): never let it
    # break or restyle the terminal's lines.
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _render(summary: ImportSummary, out: Format) -> None:
    payload = summary.as_dict()
    if out is not Format.table:
        print_json(payload)
        return
    pairs: dict[str, Any] = {
        "would import" if summary.dry_run else "imported": (
            summary.would_import if summary.dry_run else summary.imported
        ),
        "skipped (already stored)": summary.skipped,
        "failed": summary.failed,
        "stored": f"{summary.bytes / 1e6:.1f} MB",
        "seconds": payload["seconds"],
        "files/s": payload["files_per_second"],
        "MB/s": payload["mb_per_second"],
    }
    print_pairs(pairs, title="import (dry run)" if summary.dry_run else "import")
    if summary.failures:
        print_table(
            ["path", "error", "code"],
            [[f.path, f.error, f.code] for f in summary.failures],
            title="failures",
        )


class _Progress:
    """A Rich progress bar on stderr: files and bytes done, rate and ETA.

    Redrawn from this thread as work is reported (at most 10 times a second),
    not by Rich's refresh thread: the import forks worker processes, and a fork
    must not happen while another thread may hold a lock (stderr's, say).
    """

    REDRAW_SECONDS = 0.1

    def __init__(self, files: int, size: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.progress = Progress(
            TextColumn("importing"),
            BarColumn(),
            TextColumn("{task.fields[files]}/{task.fields[total_files]} files"),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
            auto_refresh=False,
        )
        self.files = 0
        self.drawn = 0.0
        self.task = self.progress.add_task("import", total=size, files=0, total_files=files)
        self.progress.start()

    @classmethod
    def start(cls, request: ImportRequest) -> _Progress:
        from patient_cli.import_request import count_planned

        files, size = count_planned(request)
        return cls(files, size)

    def advance(self, size: int) -> None:
        self.progress.advance(self.task, size)
        self._redraw()

    def file_done(self) -> None:
        self.files += 1
        self.progress.update(self.task, files=self.files)
        self._redraw()

    def _redraw(self) -> None:
        now = time.monotonic()
        if now - self.drawn >= self.REDRAW_SECONDS:
            self.drawn = now
            self.progress.refresh()

    def stop(self) -> None:
        self.progress.stop()

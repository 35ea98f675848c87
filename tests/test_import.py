"""`import` end to end against real PostgreSQL: which files are taken, both
username modes, idempotent reruns, dry runs, special files that must not hang,
a run killed mid-way and finished by rerunning, and two runs at once; plus the
scanner on its own."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import Cli, stderr_line, wait_for_other_sessions_to_end
from patient_cli import scan
from patient_cli.errors import UsageError
from patient_cli.recordformat import CHUNK_SIZE

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(64))


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def run_import(cli: Cli, *args: str) -> tuple[int, dict[str, Any], Any]:
    result = cli("import", *args, "--format", "json")
    return result.exit_code, json.loads(result.stdout), result


def records(cli: Cli, username: str) -> list[dict[str, Any]]:
    return list(cli.json("list", "-u", username)["records"])


def names(cli: Cli, username: str) -> list[str]:
    return sorted(r["record_name"] for r in records(cli, username))


def exported(cli: Cli, record_id: int, folder: Path) -> bytes:
    target = folder / f"export-{record_id}"
    cli.json("export-file", str(record_id), "-o", str(target))
    return target.read_bytes()


def failures(summary: dict[str, Any]) -> list[tuple[str, str]]:
    return [(Path(f["path"]).name, f["code"]) for f in summary["failures"]]


def count_rows(db_url: str, query: str, *params: Any) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return int(row[0])


def subprocess_env() -> dict[str, str]:
    """The test's environment (the `env` fixture set it) for a child process."""
    return dict(os.environ)


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "patient_cli", *args]


@pytest.fixture(params=["0", "2"], ids=["in-process", "2-workers"])
def workers(request: pytest.FixtureRequest) -> str:
    """--workers for tests that must hold with and without worker processes."""
    return str(request.param)


# -- which files, which names ------------------------------------------------------


def test_imports_nested_folders_with_names_types_and_identical_exports(
    ready: Cli, tmp_path: Path, workers: str
) -> None:
    big = os.urandom(CHUNK_SIZE * 2 + 123)  # streamed in three chunks
    files = {
        "a/letter.txt": b"Dear colleague,\n",
        "a/b/c/scan.png": PNG,
        "top.tar.gz.bin": os.urandom(5000),
        "big/mri.dat": big,
        "empty.txt": b"",
    }
    root = make_tree(tmp_path / "inbox", files)

    code, summary, _ = run_import(
        ready, str(root), "-u", "turtle", "--data", "from the scanner", "--workers", workers
    )

    assert code == 0
    assert summary["imported"] == 5 and summary["skipped"] == 0 and summary["failed"] == 0
    assert summary["failures"] == [] and summary["dry_run"] is False
    assert summary["bytes"] == sum(len(c) for c in files.values())
    assert {"seconds", "files_per_second", "mb_per_second"} <= summary.keys()
    stored = {r["file_name"]: r for r in records(ready, "turtle")}
    assert sorted(stored) == ["empty.txt", "letter.txt", "mri.dat", "scan.png", "top.tar.gz.bin"]
    assert stored["scan.png"]["record_name"] == "scan"
    assert stored["scan.png"]["file_type"] == "image/png"
    assert stored["top.tar.gz.bin"]["record_name"] == "top.tar.gz"
    assert {r["record_data"] for r in stored.values()} == {"from the scanner"}
    by_name = {Path(rel).name: content for rel, content in files.items()}
    for name, record in stored.items():
        assert record["file_size"] == len(by_name[name])
        if by_name[name]:
            assert exported(ready, record["id"], tmp_path) == by_name[name]
    # Workers read mri.dat whole and seal its chunks; in-process it is streamed:
    # either way every chunk and checksum holds.
    assert ready.json("verify")["ok"] is True


def test_hidden_files_and_folders_are_skipped_unless_asked(ready: Cli, tmp_path: Path) -> None:
    root = make_tree(
        tmp_path / "in",
        {"seen.txt": b"1", ".secret.txt": b"2", ".cache/inner.txt": b"3", "d/.x.txt": b"4"},
    )

    code, summary, _ = run_import(ready, str(root), "-u", "ann")
    assert (code, summary["imported"]) == (0, 1)
    assert names(ready, "ann") == ["seen"]

    code, summary, _ = run_import(ready, str(root), "-u", "ann", "--include-hidden")
    assert (code, summary["imported"], summary["skipped"]) == (0, 3, 1)
    assert names(ready, "ann") == [".secret", ".x", "inner", "seen"]


def test_globs_and_excludes_match_names_and_relative_paths(ready: Cli, tmp_path: Path) -> None:
    root = make_tree(
        tmp_path / "in",
        {
            "a.pdf": b"a",
            "b.txt": b"b",
            "keep/c.pdf": b"c",
            "drafts/d.pdf": b"d",
            "keep/old-e.pdf": b"e",
        },
    )

    code, summary, _ = run_import(
        ready,
        str(root),
        "-u",
        "ann",
        "--glob",
        "*.pdf",
        "--exclude",
        "drafts",
        "--exclude",
        "keep/old-*",
    )

    assert (code, summary["imported"]) == (0, 2)
    assert names(ready, "ann") == ["a", "c"]


def test_no_recursive_and_name_from(ready: Cli, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "in", {"x.pdf": b"x", "sub/y.pdf": b"y"})

    code, summary, _ = run_import(ready, str(root), "-u", "ann", "--no-recursive")
    assert (code, summary["imported"]) == (0, 1)
    run_import(ready, str(root), "-u", "bob", "--name-from", "name")
    run_import(ready, str(root), "-u", "cat", "--name-from", "relpath")

    assert names(ready, "ann") == ["x"]
    assert names(ready, "bob") == ["x.pdf", "y.pdf"]
    assert names(ready, "cat") == ["sub/y.pdf", "x.pdf"]


def test_username_from_dir(ready: Cli, tmp_path: Path) -> None:
    root = make_tree(
        tmp_path / "in",
        {
            "turtle/scan.pdf": b"t1",
            "turtle/2024/lab.pdf": b"t2",
            "rabbit/letter.txt": b"r1",
            "loose.txt": b"nobody's",
        },
    )

    result = ready(
        "import", str(root), "--username-from-dir", "--name-from", "relpath", "-F", "json"
    )

    assert result.exit_code == 3
    assert json.loads(stderr_line(result)) == {
        "error": "1 of 4 files failed",
        "code": 3,
        "type": "batch_incomplete",
    }
    summary = json.loads(result.stdout)
    assert summary["imported"] == 3
    assert summary["failures"] == [
        {
            "path": str(root / "loose.txt"),
            "error": "file is not in a username folder",
            "code": "no_username_folder",
        }
    ]
    assert names(ready, "turtle") == ["2024/lab.pdf", "scan.pdf"]
    assert names(ready, "rabbit") == ["letter.txt"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "username must not be empty (or use --username-from-dir)"),
        (
            ("-u", "ann", "--username-from-dir"),
            "give either --username or --username-from-dir, not both",
        ),
        (("-u", " "), "username must not be empty"),
    ],
)
def test_username_options_are_checked(
    ready: Cli, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    result = ready("import", str(tmp_path), *args, "-F", "table")
    assert result.exit_code == 2
    assert stderr_line(result) == f"Error: {message}"


def test_missing_folder_or_a_file_is_a_usage_error(ready: Cli, tmp_path: Path) -> None:
    result = ready("import", str(tmp_path / "nope"), "-u", "ann", "-F", "table")
    assert (result.exit_code, stderr_line(result)) == (
        2,
        f"Error: folder not found: {tmp_path / 'nope'}",
    )
    (tmp_path / "f.txt").write_bytes(b"x")
    result = ready("import", str(tmp_path / "f.txt"), "-u", "ann", "-F", "table")
    assert (result.exit_code, stderr_line(result)) == (
        2,
        f"Error: not a folder: {tmp_path / 'f.txt'}",
    )


def test_no_key_stops_the_run_with_exit_5(cli: Cli, tmp_path: Path) -> None:
    assert cli("init-db").exit_code == 0
    root = make_tree(tmp_path / "in", {"a.txt": b"a"})
    result = cli("import", str(root), "-u", "ann", "-F", "table", ENCRYPTION_KEY="")
    assert result.exit_code == 5
    assert stderr_line(result).startswith("Error: no encryption key")


# -- duplicates, dry runs ------------------------------------------------------------


def test_rerun_skips_stored_content_and_duplicates_within_a_run(
    ready: Cli, tmp_path: Path, db_url: str, workers: str
) -> None:
    big = os.urandom(CHUNK_SIZE + 10)
    root = make_tree(
        tmp_path / "in",
        {"a.txt": b"same", "b.txt": b"same", "c.txt": b"other", "d.bin": big, "e.bin": big},
    )

    code, first, _ = run_import(ready, str(root), "-u", "ann", "--workers", workers)
    assert (code, first["imported"], first["skipped"]) == (0, 3, 2)
    code, second, _ = run_import(ready, str(root), "-u", "ann", "--workers", workers)
    assert (code, second["imported"], second["skipped"], second["bytes"]) == (0, 0, 5, 0)
    # The same content for another patient is that patient's own record.
    code, other, _ = run_import(ready, str(root), "-u", "bob")
    assert (code, other["imported"]) == (0, 3)

    assert names(ready, "ann") == ["a", "c", "d"]
    assert count_rows(db_url, "SELECT count(*) FROM patient_records") == 6


@pytest.mark.parametrize("start", ["sealed-early", "sent-after-connecting"])
def test_a_rerun_hashes_files_of_stored_sizes_and_reads_changed_ones_again(
    ready: Cli,
    tmp_path: Path,
    db_url: str,
    workers: str,
    start: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On a rerun the workers only hash files of a size already stored (once the
    # database has told them the sizes: files they sealed before that are
    # checked by the main process); one that turns out new (same size, other
    # content) is read again and stored.
    from patient_cli import import_feed, import_job

    if start == "sent-after-connecting":
        monkeypatch.setattr(import_feed, "START_FILES", 0)
    root = make_tree(tmp_path / "in", {"a.txt": b"aaaa", "m.bin": os.urandom(3 << 20)})
    code, first, _ = run_import(ready, str(root), "-u", "ann", "--workers", workers)
    assert (code, first["imported"]) == (0, 2)
    make_tree(root, {"b.txt": b"bbbb", "c.txt": b"a new size", "n.bin": os.urandom(3 << 20)})
    read_again: list[str] = []
    read_whole = import_job._ImportJob._read_whole

    def note_rereads(job: Any, item: Any, *args: Any) -> None:
        if args[-1] == job._take_small:  # a file a worker only hashed, read here
            read_again.append(item.name)
        read_whole(job, item, *args)

    monkeypatch.setattr(import_job._ImportJob, "_read_whole", note_rereads)

    result = ready("import", str(root), "-u", "ann", "--workers", workers, "--format", "ndjson")

    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(Path(line["path"]).name, line["status"]) for line in lines[:-1]] == [
        ("a.txt", "skipped"),
        ("b.txt", "imported"),
        ("c.txt", "imported"),
        ("m.bin", "skipped"),
        ("n.bin", "imported"),
    ]
    hashed_only = workers != "0" and start == "sent-after-connecting"
    assert read_again == (["b.txt", "n.bin"] if hashed_only else [])
    stored = {r["file_name"]: r["id"] for r in records(ready, "ann")}
    assert exported(ready, stored["b.txt"], tmp_path) == b"bbbb"
    assert exported(ready, stored["n.bin"], tmp_path) == (root / "n.bin").read_bytes()
    assert count_rows(db_url, "SELECT count(*) FROM patient_records") == 5


def test_a_rerun_over_stored_files_takes_ids_only_for_the_files_ahead(
    ready: Cli, tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Files sent to the workers carry a record id; one that comes back
    # unsealed (only hashed: stored already) gives it back for the next file.
    from patient_cli import import_feed, import_job

    monkeypatch.setattr(import_feed, "START_FILES", 0)
    monkeypatch.setattr(import_feed, "AHEAD_FILES", 64)
    monkeypatch.setattr(import_job, "ID_BLOCK", 16)
    root = make_tree(tmp_path / "in", {f"f{n:03}.txt": b"x" * n for n in range(1, 301)})
    code, first, _ = run_import(ready, str(root), "-u", "ann", "--workers", "2")
    assert (code, first["imported"]) == (0, 300)

    def last_id() -> int:
        return count_rows(db_url, "SELECT last_value FROM patient_records_id_seq")

    before = last_id()
    code, again, _ = run_import(ready, str(root), "-u", "ann", "--workers", "2")
    assert (code, again["imported"], again["skipped"]) == (0, 0, 300)
    # At most the files in flight and the blocks reserved for them, not 300.
    assert last_id() - before <= 64 + 3 * 16


def test_record_ids_follow_scan_order_past_the_head_start(
    ready: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first files are sealed by the main process once it has connected,
    # the later ones by the workers with ids their tasks carry: all in order.
    from patient_cli import import_feed

    monkeypatch.setattr(import_feed, "START_FILES", 64)
    root = make_tree(tmp_path / "in", {f"f{n:03}.txt": b"letter %d" % n for n in range(300)})
    code, summary, _ = run_import(ready, str(root), "-u", "ann", "--workers", "2")
    assert (code, summary["imported"]) == (0, 300)
    ids = [r["id"] for r in sorted(records(ready, "ann"), key=lambda r: r["record_name"])]
    assert ids == sorted(ids)


def test_a_small_import_reserves_few_ids(ready: Cli, tmp_path: Path, db_url: str) -> None:
    from patient_cli import import_job

    def last_id() -> int:
        return count_rows(db_url, "SELECT last_value FROM patient_records_id_seq")

    ready.json("add", "-u", "ann", "-n", "first")  # (a fresh sequence counts from 1)
    before = last_id()
    make_tree(tmp_path / "one", {"a.txt": b"one file"})
    assert run_import(ready, str(tmp_path / "one"), "-u", "ann")[0] == 0
    assert last_id() - before == 1  # what the files the workers had before connecting need
    # A few more files than the workers start with (2,048): their ids, then
    # blocks of FIRST_ID_BLOCK (64) growing while ids are taken, not blocks of
    # ID_BLOCK (2,048) at every batch sent.
    files = {f"f{n:04}.txt": b"letter %d" % n for n in range(2100)}
    before = last_id()
    assert run_import(ready, str(make_tree(tmp_path / "many", files)), "-u", "ann")[0] == 0
    assert last_id() - before < 2048 + 512 and import_job.FIRST_ID_BLOCK == 64


def test_allow_duplicates_stores_again(ready: Cli, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "in", {"a.txt": b"same", "b.txt": b"same"})
    run_import(ready, str(root), "-u", "ann")

    code, summary, _ = run_import(ready, str(root), "-u", "ann", "--allow-duplicates")

    assert (code, summary["imported"], summary["skipped"]) == (0, 2, 0)
    assert names(ready, "ann") == ["a", "a", "b"]
    # Records stored with --allow-duplicates still count for later de-duplication.
    code, summary, _ = run_import(ready, str(root), "-u", "ann")
    assert (summary["imported"], summary["skipped"]) == (0, 2)


def test_dry_run_stores_nothing(ready: Cli, tmp_path: Path, db_url: str) -> None:
    root = make_tree(
        tmp_path / "in", {"a.txt": b"a", "b.txt": b"b", "big.bin": os.urandom(CHUNK_SIZE + 1)}
    )
    (root / "pipe").parent.mkdir(exist_ok=True)
    os.mkfifo(root / "pipe")

    result = ready("import", str(root), "-u", "ann", "--dry-run", "-F", "ndjson")

    assert result.exit_code == 3
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(Path(x["path"]).name, x["status"]) for x in lines[:-1]] == [
        ("a.txt", "would_import"),
        ("b.txt", "would_import"),
        ("big.bin", "would_import"),
        ("pipe", "failed"),
    ]
    assert lines[-1]["dry_run"] is True
    assert (lines[-1]["would_import"], lines[-1]["imported"], lines[-1]["failed"]) == (3, 0, 1)
    assert count_rows(db_url, "SELECT count(*) FROM patient_records") == 0
    os.unlink(root / "pipe")

    run_import(ready, str(root), "-u", "ann")
    (root / "c.txt").write_bytes(b"new")
    code, summary, _ = run_import(ready, str(root), "-u", "ann", "--dry-run")
    assert (code, summary["would_import"], summary["skipped"]) == (0, 1, 3)
    assert count_rows(db_url, "SELECT count(*) FROM patient_records") == 3
    assert (
        count_rows(
            db_url, "SELECT count(*) FROM audit_log WHERE action = 'import' AND details ? 'dry_run'"
        )
        == 2
    )


def test_ndjson_reports_each_file_then_the_summary(ready: Cli, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "in", {"a.txt": b"a", "b.txt": b"a", "c.txt": b"c"})

    result = ready("import", str(root), "-u", "ann", "-F", "ndjson")

    assert result.exit_code == 0
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(Path(x["path"]).name, x["status"]) for x in lines[:-1]] == [
        ("a.txt", "imported"),
        ("b.txt", "skipped"),
        ("c.txt", "imported"),
    ]
    assert isinstance(lines[0]["record_id"], int) and lines[1]["record_id"] is None
    assert lines[-1]["imported"] == 2 and lines[-1]["skipped"] == 1


def test_rerun_with_new_files_among_stored_ones_keeps_scan_order(
    ready: Cli, tmp_path: Path
) -> None:
    root = make_tree(
        tmp_path / "in", {"a.txt": b"1", "c.txt": b"3", "e.bin": b"5" * CHUNK_SIZE * 2}
    )
    run_import(ready, str(root), "-u", "ann")
    make_tree(root, {"b.txt": b"2", "d.txt": b"4", "f.txt": b"3"})  # f: c's content
    os.mkfifo(root / "c2")

    result = ready("import", str(root), "-u", "ann", "-F", "ndjson")

    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(Path(x["path"]).name, x["status"]) for x in lines[:-1]] == [
        ("a.txt", "skipped"),
        ("b.txt", "imported"),
        ("c.txt", "skipped"),
        ("c2", "failed"),
        ("d.txt", "imported"),
        ("e.bin", "skipped"),
        ("f.txt", "skipped"),
    ]
    assert names(ready, "ann") == ["a", "b", "c", "d", "e"]


def test_table_output(ready: Cli, tmp_path: Path) -> None:
    root = make_tree(tmp_path / "in", {"a.txt": b"a"})
    os.mkfifo(root / "pipe")

    result = ready("import", str(root), "-u", "ann", "-F", "table")

    assert result.exit_code == 3
    assert "imported" in result.stdout and "failures" in result.stdout
    assert stderr_line(result) == "Error: 1 of 2 files failed"

    (root / "b\nc.txt").write_bytes(b"b")
    result = ready("import", str(root), "-u", "ann", "-F", "table", "--dry-run")
    assert result.stdout.splitlines()[:3] == [
        f"already stored {root / 'a.txt'}",
        f"would import   {root / 'b'}\\nc.txt",
        f"cannot import  {root / 'pipe'}",
    ]


def test_each_commit_is_audited_with_the_stored_ids(
    ready: Cli, tmp_path: Path, db_url: str
) -> None:
    root = make_tree(tmp_path / "in", {"a.txt": b"a", "b.txt": b"b", "c.txt": b"a"})
    code, _, _ = run_import(ready, str(root), "-u", "ann")
    assert code == 0

    with psycopg.connect(db_url) as conn:
        rows = conn.execute(
            "SELECT usernames, record_ids, details, outcome FROM audit_log WHERE action = 'import'"
        ).fetchall()
    ids = sorted(r["id"] for r in records(ready, "ann"))
    assert rows == [(["ann"], ids, {"imported": 2, "skipped": 1, "failed": 0}, "ok")]


def test_many_small_files_with_duplicates_across_batches(
    ready: Cli, tmp_path: Path, db_url: str, workers: str
) -> None:
    from patient_cli.import_job import BATCH_FILES

    count = BATCH_FILES * 2 + 50
    files = {f"f{n:05d}.txt": f"note {n}".encode() for n in range(count)}
    for n in range(0, count, 100):
        files[f"f{n:05d}.txt"] = b"the same letter"  # one stored, the rest skipped
    root = make_tree(tmp_path / "in", files)

    code, summary, _ = run_import(ready, str(root), "-u", "ann", "--workers", workers)

    duplicates = len(range(0, count, 100)) - 1
    assert (code, summary["imported"], summary["skipped"]) == (0, count - duplicates, duplicates)
    assert count_rows(db_url, "SELECT count(*) FROM patient_records") == count - duplicates
    assert count_rows(db_url, "SELECT count(*) FROM record_chunks") == count - duplicates
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT array_agg(x ORDER BY x) FROM audit_log, unnest(record_ids) x "
            "WHERE action = 'import'"
        ).fetchone()
    assert row is not None
    assert row[0] == sorted(r["id"] for r in records(ready, "ann"))


# -- files that cannot be imported -------------------------------------------------------


def test_special_files_are_reported_without_hanging(
    tmp_path: Path, env: dict[str, str], ready: Cli, workers: str
) -> None:
    root = make_tree(tmp_path / "in", {"real.txt": b"real", "folder/inner.txt": b"inner"})
    os.mkfifo(root / "fifo")
    os.symlink(root / "missing", root / "dangling")
    os.symlink(root / "loop-b", root / "loop-a")
    os.symlink(root / "loop-a", root / "loop-b")
    os.symlink(root / "real.txt", root / "link-to-file")  # followed
    os.symlink(root / "folder", root / "link-to-folder")  # not followed
    bad = os.fsencode(root) + b"/bad-\xff.txt"
    with open(bad, "wb") as out:
        out.write(b"bad name")

    done = subprocess.run(
        cli_argv("import", str(root), "-u", "ann", "--format", "json", "--workers", workers),
        env=subprocess_env(),
        capture_output=True,
        timeout=120,
    )

    assert done.returncode == 3, done.stderr
    assert json.loads(done.stderr) == {
        "error": "5 of 8 files failed",
        "code": 3,
        "type": "batch_incomplete",
    }
    summary = json.loads(done.stdout)
    assert sorted(failures(summary)) == [
        ("bad-\\xff.txt", "invalid_name"),
        ("dangling", "dangling_symlink"),
        ("fifo", "not_regular_file"),
        ("loop-a", "symlink_loop"),
        ("loop-b", "symlink_loop"),
    ]
    # The symlinked file has real.txt's content: imported under its own name
    # (it comes first), then real.txt is skipped as already stored.
    assert (summary["imported"], summary["skipped"]) == (2, 1)
    assert names(ready, "ann") == ["inner", "link-to-file"]


def test_a_file_that_vanishes_before_it_is_read_is_a_failure(ready: Cli, tmp_path: Path) -> None:
    from patient_cli.config import load_settings
    from patient_cli.importer import Failure, ImportRequest, import_folder
    from patient_cli.session import Session

    root = make_tree(tmp_path / "in", {"a.txt": b"a", "b.txt": b"b"})

    def remove_b(size: int) -> None:  # runs once a.txt is read, after the folder was listed
        (root / "b.txt").unlink(missing_ok=True)

    with Session(load_settings()) as session:
        request = ImportRequest(root, username="ann", workers=0)  # read here, in order
        summary = import_folder(session, request, on_bytes=remove_b)

    assert (summary.imported, summary.failed) == (1, 1)
    assert summary.failures == [
        Failure(str(root / "b.txt"), f"file not found: {root / 'b.txt'}", "vanished")
    ]


def interrupted_import(
    root: Path, monkeypatch: pytest.MonkeyPatch, stall: Any, interrupts: tuple[float, ...]
) -> tuple[float, list[float]]:
    """Run an in-process import whose first background batch calls `stall`
    first, with Ctrl-C at each of `interrupts` seconds after that; how long it
    took to stop, and when `on_force_quit` was called."""
    from patient_cli import store
    from patient_cli.config import load_settings
    from patient_cli.importer import ImportRequest, import_folder
    from patient_cli.session import Session

    copy = store.copy_rows
    signals: list[threading.Timer] = []

    def stalled_copy(conn: Any, batch: Any) -> Any:
        if not signals:
            for delay in interrupts:
                signals.append(threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT)))
                signals[-1].start()
            stall(conn)
        return copy(conn, batch)

    monkeypatch.setattr(store, "copy_rows", stalled_copy)
    started = time.monotonic()
    quits: list[float] = []
    with Session(load_settings()) as session:
        with pytest.raises(KeyboardInterrupt):
            import_folder(
                session,
                ImportRequest(root, username="ann", workers=0),
                on_force_quit=lambda: quits.append(time.monotonic() - started),
            )
        assert not [t for t in threading.enumerate() if t.name == "import-flush"]
    for timer in signals:
        timer.join()
    return time.monotonic() - started, quits


def test_ctrl_c_while_a_batch_is_being_sent_cancels_it(
    ready: Cli, tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C while the background thread waits on the server: the import
    # cancels that statement and waits for the thread before it rolls back
    # (ending the transaction under it gave "internal error:
    # OutOfOrderTransactionNesting"), then stops, well before the statement
    # would have ended.
    root = make_tree(tmp_path / "in", {f"f{n:04d}.txt": b"n %d" % n for n in range(1200)})
    took, quits = interrupted_import(
        root, monkeypatch, lambda conn: conn.execute("SELECT pg_sleep(30)"), (0.2,)
    )
    assert took < 15 and quits == []
    assert count_rows(db_url, "SELECT count(*) FROM patient_records") == 0


def test_ctrl_c_three_times_while_a_batch_is_stuck_calls_force_quit(
    ready: Cli, tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batch that cannot be cancelled (here, stuck before its statement): the
    # third Ctrl-C calls on_force_quit (the CLI exits there); the service
    # itself still waits for the thread before it rolls back.
    root = make_tree(tmp_path / "in", {f"f{n:04d}.txt": b"n %d" % n for n in range(1200)})
    took, quits = interrupted_import(
        root, monkeypatch, lambda conn: time.sleep(2.0), (0.2, 0.5, 0.8)
    )
    assert len(quits) == 1 and 0.7 < quits[0] < took
    assert count_rows(db_url, "SELECT count(*) FROM patient_records") == 0


def test_force_quit_is_one_line_and_exit_130() -> None:
    script = (
        "import sys\n"
        "from patient_cli.commands.importer import _force_quit\n"
        "from patient_cli.output import Format, Messages\n"
        "print('committed line')\n"
        "_force_quit(Messages(False), Format.json)\n"
        "print('never')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == 130
    assert done.stdout == b"committed line\n"  # flushed before the exit
    (line,) = done.stderr.decode().splitlines()
    assert json.loads(line)["type"] == "interrupted"


def test_a_file_that_vanishes_before_a_worker_reads_it_is_a_failure(
    ready: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from patient_cli import import_feed
    from patient_cli.config import load_settings
    from patient_cli.importer import Failure, ImportRequest, import_folder
    from patient_cli.session import Session

    # Workers get files a few batches ahead of the one being taken in, so the
    # last of 600 is still unread when the first file's outcome is reported
    # (with none sent before connecting, and 64 in flight).
    monkeypatch.setattr(import_feed, "START_FILES", 0)
    monkeypatch.setattr(import_feed, "AHEAD_FILES", 64)
    root = make_tree(tmp_path / "in", {f"f{n:03d}.txt": b"%d" % n for n in range(600)})
    last = root / "f599.txt"

    def remove_last(size: int) -> None:
        last.unlink(missing_ok=True)

    with Session(load_settings()) as session:
        request = ImportRequest(root, username="ann", workers=2)
        summary = import_folder(session, request, on_bytes=remove_last)

    assert (summary.imported, summary.failed) == (599, 1)
    assert summary.failures == [Failure(str(last), f"file not found: {last}", "vanished")]


# -- interruption and concurrency ----------------------------------------------------------


def _sha(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


@pytest.mark.slow
def test_a_killed_import_is_finished_by_rerunning(ready: Cli, tmp_path: Path, db_url: str) -> None:
    # Small files, then files big enough to force a commit each (32 MB), so the
    # first result line arrives while later files are still being stored.
    files: dict[str, bytes] = {f"a/a{n:03d}.bin": os.urandom(20_000 + n) for n in range(60)}
    files["m/first.bin"] = os.urandom(33 << 20)
    files["m/second.bin"] = os.urandom(33 << 20)
    files.update({f"z/z{n:03d}.bin": os.urandom(30_000 + n) for n in range(60)})
    root = make_tree(tmp_path / "in", files)

    proc = subprocess.Popen(
        cli_argv("import", str(root), "-u", "ann", "-q", "--format", "ndjson"),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    first_line = proc.stdout.readline()  # printed only after a commit
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    assert proc.stderr is not None
    proc.stderr.close()
    assert json.loads(first_line)["status"] == "imported"
    wait_for_other_sessions_to_end(db_url)
    kept = count_rows(db_url, "SELECT count(*) FROM patient_records")
    assert 0 < kept < len(files)

    done = subprocess.run(
        cli_argv("import", str(root), "-u", "ann", "--format", "json"),
        env=subprocess_env(),
        capture_output=True,
        timeout=300,
    )

    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["imported"], summary["skipped"]) == (len(files) - kept, kept)
    stored = records(ready, "ann")
    assert sorted(r["record_name"] for r in stored) == sorted(Path(p).stem for p in files)
    by_name = {Path(rel).stem: content for rel, content in files.items()}
    for record in stored:
        assert _sha(exported(ready, record["id"], tmp_path)) == _sha(by_name[record["record_name"]])
    assert (
        count_rows(
            db_url,
            "SELECT count(*) FROM record_chunks c WHERE NOT EXISTS "
            "(SELECT 1 FROM patient_records r WHERE r.id = c.record_id)",
        )
        == 0
    )


@pytest.mark.slow
def test_two_imports_of_one_folder_at_once_store_each_file_once(
    ready: Cli, tmp_path: Path, db_url: str
) -> None:
    # More small files than one batch (so batches are sent in the background),
    # and two big ones streamed in chunks.
    files = {f"d{n % 7}/{n:04d}.bin": os.urandom(1_000 + n * 3) for n in range(1_100)}
    files["big/one.bin"] = os.urandom(3 * CHUNK_SIZE + 5)
    files["big/two.bin"] = os.urandom(2 * CHUNK_SIZE + 7)
    root = make_tree(tmp_path / "in", files)
    argv = cli_argv("import", str(root), "-u", "ann", "-q", "--format", "json")

    procs = [
        subprocess.Popen(argv, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]

    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    summaries = [json.loads(out) for out, _ in outputs]
    assert sum(s["imported"] for s in summaries) == len(files)
    assert all(s["imported"] + s["skipped"] == len(files) for s in summaries)
    assert count_rows(db_url, "SELECT count(*) FROM patient_records") == len(files)
    assert count_rows(db_url, "SELECT count(DISTINCT fingerprint) FROM patient_records") == len(
        files
    )
    stored = {r["record_name"]: r for r in records(ready, "ann")}
    assert len(stored) == len(files)
    for name in ("one", "two"):
        content = files[f"big/{name}.bin"]
        assert _sha(exported(ready, stored[name]["id"], tmp_path)) == _sha(content)


def test_a_deadlock_between_two_imports_is_retried(ready: Cli, tmp_path: Path, db_url: str) -> None:
    # Two folders holding the same two files in opposite order: each run holds
    # the key of its first file, then waits for the other's. PostgreSQL aborts
    # one; its unit must be redone, ending with each content stored once.
    from patient_cli.config import load_settings
    from patient_cli.importer import ImportRequest, ImportSummary, import_folder
    from patient_cli.session import Session

    one, two = os.urandom(CHUNK_SIZE + 100), os.urandom(CHUNK_SIZE + 200)
    folders = [
        make_tree(tmp_path / "x", {"1.bin": one, "2.bin": two}),
        make_tree(tmp_path / "y", {"1.bin": two, "2.bin": one}),
    ]
    both_hold_their_first = threading.Barrier(2, timeout=60)
    summaries: list[ImportSummary] = []
    errors: list[BaseException] = []

    def run(root: Path, first_size: int) -> None:
        read = 0

        def on_bytes(size: int) -> None:
            nonlocal read
            read += size
            if read - size == first_size:  # the second file begins; the first is stored
                both_hold_their_first.wait()

        try:
            with Session(load_settings()) as session:
                summaries.append(
                    import_folder(session, ImportRequest(root, username="ann"), on_bytes=on_bytes)
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(folders[0], len(one))),
        threading.Thread(target=run, args=(folders[1], len(two))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    assert sorted((s.imported, s.skipped) for s in summaries) == [(0, 2), (2, 0)]
    assert count_rows(db_url, "SELECT count(*) FROM patient_records") == 2
    assert ready.json("verify")["ok"] is True  # each metadata names its record's final id


def test_a_deadlock_met_while_giving_files_to_workers_loses_none(
    ready: Cli, tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Record ids are reserved while files are taken in (and by the background
    # COPY thread); a deadlock there rolls the unit back while the workers hold
    # files taken from the scan but not yet taken in. All must be redone.
    from patient_cli import import_job, store
    from patient_cli.config import load_settings
    from patient_cli.importer import ImportRequest, import_folder
    from patient_cli.session import Session

    count = import_job.ID_BLOCK * 3
    root = make_tree(tmp_path / "in", {f"f{n:05d}.txt": b"letter %d" % n for n in range(count)})
    reserve = store.reserve_ids
    calls = 0

    def reserve_or_deadlock(conn: Any, wanted: int) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise psycopg.errors.DeadlockDetected("deadlock detected (injected)")
        return reserve(conn, wanted)

    monkeypatch.setattr(store, "reserve_ids", reserve_or_deadlock)
    outcomes: list[str] = []
    with Session(load_settings()) as session:
        summary = import_folder(
            session,
            ImportRequest(root, username="ann", workers=2),
            on_outcome=lambda outcome: outcomes.append(Path(outcome.path).name),
        )

    assert calls > 3  # the deadlock happened, and the run went on
    assert (summary.imported, summary.skipped, summary.failed) == (count, 0, 0)
    assert outcomes == sorted(f"f{n:05d}.txt" for n in range(count))
    assert count_rows(db_url, "SELECT count(DISTINCT id) FROM patient_records") == count
    assert ready.json("verify")["ok"] is True  # re-sealed with the ids of the redo


@pytest.mark.parametrize(
    ("setting", "code"),
    [
        ({"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/nowhere"}, 6),
        ({"DATABASE_URL": "this is = not a = dsn"}, 5),
    ],
    ids=["unreachable", "malformed"],
)
def test_a_database_error_after_the_workers_started_is_one_line(
    ready: Cli, tmp_path: Path, db_url: str, setting: dict[str, str], code: int
) -> None:
    # The workers start on the files before the main process connects; when it
    # then cannot, it stops them with their answers unread (their socket is
    # reset): one line and the usual exit code, no traceback, no worker left.
    files = {f"f{n:03d}.bin": os.urandom(50_000) for n in range(300)}
    root = make_tree(tmp_path / "in", files)
    done = subprocess.run(
        cli_argv("import", str(root), "-u", "ann", "--workers", "2"),
        env={**subprocess_env(), **setting},
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == code
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["code"] == code, lines[:5]
    assert count_rows(db_url, "SELECT count(*) FROM patient_records") == 0
    # The workers are forks with the same command line: none outlives it.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and processes_running(str(root)):
        time.sleep(0.05)
    assert not processes_running(str(root))


def processes_running(marker: str) -> bool:
    """Whether any process's command line contains `marker` (Linux /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def test_a_failing_worker_stops_the_import_with_one_line(
    ready: Cli, tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug or crash in a worker is an internal error (exit 1), never a silent
    # success; what was committed stays, and a rerun finishes the job.
    from patient_cli.import_pool import SmallFilePreparer, Task

    files = {f"f{n:04d}.txt": b"note %d" % n for n in range(400)}
    root = make_tree(tmp_path / "in", files)
    prepare = SmallFilePreparer.__call__

    def fail_on_one(self: SmallFilePreparer, task: Task) -> Any:
        if task[0].endswith("f0300.txt"):
            raise ValueError("a bug (with content that must not be shown)")
        return prepare(self, task)

    monkeypatch.setattr(SmallFilePreparer, "__call__", fail_on_one)  # the forks inherit it
    failed = ready("import", str(root), "-u", "ann", "--workers", "2")

    assert failed.exit_code == 1
    assert json.loads(failed.stderr) == {  # one line: JSON, as stderr is not a terminal
        "error": "an import worker failed (ValueError)",
        "code": 1,
        "type": "internal_error",
    }
    monkeypatch.setattr(SmallFilePreparer, "__call__", prepare)
    code, summary, _ = run_import(ready, str(root), "-u", "ann")
    assert code == 0 and summary["imported"] + summary["skipped"] == len(files)
    assert count_rows(db_url, "SELECT count(*) FROM patient_records") == len(files)


# -- the scanner on its own -------------------------------------------------------------


def scanned(root: Path, **options: Any) -> list[tuple[str, str | None, str | None]]:
    return [
        (item.rel, item.username, item.problem.code if item.problem else None)
        for item in scan.scan(scan.ScanOptions(root, **options))
    ]


def test_scan_is_sorted_depth_first_and_skips_hidden(tmp_path: Path) -> None:
    make_tree(
        tmp_path,
        {"b.txt": b"", "a/z.txt": b"", "a/b/y.txt": b"", "c.txt": b"", ".h/x.txt": b"", ".d": b""},
    )
    assert scanned(tmp_path) == [
        ("a/b/y.txt", None, None),
        ("a/z.txt", None, None),
        ("b.txt", None, None),
        ("c.txt", None, None),
    ]
    assert [rel for rel, _, _ in scanned(tmp_path, include_hidden=True)] == [
        ".d",
        ".h/x.txt",
        "a/b/y.txt",
        "a/z.txt",
        "b.txt",
        "c.txt",
    ]
    assert [rel for rel, _, _ in scanned(tmp_path, recursive=False)] == ["b.txt", "c.txt"]


def test_scan_excludes_prune_folders_and_globs_pick_files(tmp_path: Path) -> None:
    make_tree(tmp_path, {"keep/a.pdf": b"", "keep/b.txt": b"", "tmp/c.pdf": b"", "d.pdf": b""})
    assert [r for r, _, _ in scanned(tmp_path, globs=("*.pdf",), excludes=("tmp",))] == [
        "d.pdf",
        "keep/a.pdf",
    ]
    assert [r for r, _, _ in scanned(tmp_path, globs=("keep/*",))] == ["keep/a.pdf", "keep/b.txt"]


def test_scan_with_username_folders(tmp_path: Path) -> None:
    make_tree(tmp_path, {"ann/a.txt": b"", "ann/x/b.txt": b"", "loose.txt": b"", "bob/c.txt": b""})
    (tmp_path / ("u" * 81)).mkdir()
    (tmp_path / ("u" * 81) / "d.txt").write_bytes(b"")
    items = list(scan.scan(scan.ScanOptions(tmp_path, username_from_dir=True)))
    assert [
        (i.rel, i.user_rel, i.username, i.problem.code if i.problem else None) for i in items
    ] == [
        ("ann/a.txt", "a.txt", "ann", None),
        ("ann/x/b.txt", "x/b.txt", "ann", None),
        ("bob/c.txt", "c.txt", "bob", None),
        ("loose.txt", "loose.txt", None, "no_username_folder"),
        ("u" * 81 + "/d.txt", "d.txt", "u" * 81, "invalid_username"),
    ]
    shallow = scan.scan(scan.ScanOptions(tmp_path, username_from_dir=True, recursive=False))
    assert "ann/x/b.txt" not in [i.rel for i in shallow]


def test_scan_marks_special_files_and_does_not_follow_folder_links(tmp_path: Path) -> None:
    make_tree(tmp_path, {"dir/f.txt": b"", "g.txt": b""})
    os.mkfifo(tmp_path / "fifo")
    os.symlink(tmp_path / "dir", tmp_path / "dirlink")
    os.symlink(tmp_path / "g.txt", tmp_path / "filelink")
    os.symlink(tmp_path / "nothing", tmp_path / "broken")
    os.symlink("self", tmp_path / "self")
    with open(os.fsencode(tmp_path) + b"/n\xe9.txt", "wb"):
        pass
    found = scanned(tmp_path)
    assert found == [
        ("broken", None, "dangling_symlink"),
        ("dir/f.txt", None, None),
        ("fifo", None, "not_regular_file"),
        ("filelink", None, None),
        ("g.txt", None, None),
        ("n\udce9.txt", None, "invalid_name"),
        ("self", None, "symlink_loop"),
    ]
    bad = next(scan.scan(scan.ScanOptions(tmp_path, globs=("n*",))))
    assert bad.shown.endswith("n\\xe9.txt")


def test_scan_root_must_be_a_folder(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="folder not found"):
        list(scan.scan(scan.ScanOptions(tmp_path / "missing")))
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(UsageError, match="not a folder"):
        list(scan.scan(scan.ScanOptions(tmp_path / "file")))


def test_count_files_for_the_progress_bar(tmp_path: Path) -> None:
    make_tree(tmp_path, {"a": b"12345", "b/c": b"123"})
    os.mkfifo(tmp_path / "p")
    assert scan.count_files(scan.ScanOptions(tmp_path)) == (3, 8)


def test_scan_memory_does_not_hold_finished_folders(tmp_path: Path) -> None:
    # The walk keeps one sorted listing per open folder level, never past items.
    make_tree(tmp_path, {f"d{n}/f{m}": b"" for n in range(3) for m in range(3)})
    walk = scan.scan(scan.ScanOptions(tmp_path))
    seen = [next(walk).rel for _ in range(4)]
    assert seen == ["d0/f0", "d0/f1", "d0/f2", "d1/f0"]
    assert isinstance(walk, types.GeneratorType)
    frame = walk.gi_frame
    assert frame is not None
    assert len(frame.f_locals["stack"]) == 2  # the root and d1 only


def test_files_committed_before_ctrl_c_are_all_reported(
    ready: Cli, tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ctrl-C while a committed unit's outcomes are being reported (printed, with
    # -F ndjson) takes effect after the last of them: what was committed is
    # what was reported.
    from patient_cli import import_job
    from patient_cli.config import load_settings
    from patient_cli.importer import ImportRequest, import_folder
    from patient_cli.session import Session

    monkeypatch.setattr(import_job, "COMMIT_BYTES", 50 * 100)  # about 50 files a unit
    root = make_tree(tmp_path / "in", {f"f{n:03}.txt": b"%100d" % n for n in range(300)})
    reported: list[Any] = []

    def report(outcome: Any) -> None:
        if not reported:
            os.kill(os.getpid(), signal.SIGINT)
        reported.append(outcome)

    with Session(load_settings()) as session, pytest.raises(KeyboardInterrupt):
        import_folder(session, ImportRequest(root, username="ann"), on_outcome=report)

    stored = count_rows(db_url, "SELECT count(*) FROM patient_records")
    assert 1 < len(reported) == stored < 300
    assert {o.status for o in reported} == {"imported"}


def test_the_audit_trail_counts_every_failure_and_only_valid_users(
    ready: Cli, tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One unit per stored file; the last unit stores nothing and only fails
    # (a FIFO): its failure is in the trail too. The files of a folder that is
    # not a valid username fail, and that name is not recorded as a user's.
    from patient_cli import import_job

    monkeypatch.setattr(import_job, "COMMIT_BYTES", 1)
    root = make_tree(tmp_path / "in", {"ann/a.txt": b"alpha", "ann/b.txt": b"beta"})
    make_tree(root, {"   /c.txt": b"gamma"})
    os.mkfifo(root / "ann" / "z.fifo")

    code, summary, _ = run_import(ready, str(root), "--username-from-dir")

    assert (code, summary["imported"], summary["failed"]) == (3, 2, 2)
    with psycopg.connect(db_url) as conn:
        events = conn.execute(
            "SELECT usernames, details FROM audit_log WHERE action = 'import' ORDER BY id"
        ).fetchall()
    assert sum(details["imported"] for _, details in events) == 2
    assert sum(details["failed"] for _, details in events) == 2
    assert {name for usernames, _ in events for name in usernames} == {"ann"}


def test_an_import_stopped_by_sigterm_is_audited_as_interrupted(
    ready: Cli, tmp_path: Path, db_url: str
) -> None:
    from patient_cli.cli_app import Terminated
    from patient_cli.config import load_settings
    from patient_cli.importer import ImportRequest, import_folder
    from patient_cli.session import Session

    root = make_tree(tmp_path / "in", {"a.txt": b"alpha"})

    def terminated(outcome: Any) -> None:
        raise Terminated

    with Session(load_settings()) as session, pytest.raises(Terminated):
        import_folder(session, ImportRequest(root, username="ann"), on_outcome=terminated)

    with psycopg.connect(db_url) as conn:
        outcomes = [row[0] for row in conn.execute("SELECT outcome FROM audit_log")]
    assert "error:130" in outcomes

"""import's service process (patient_cli.import_service): forked at start-up for
`import` only, it runs the import for the CLI process and answers with each
file's outcome, the bytes read, and the summary or the error; a signal to the
CLI process reaches it, and it never outlives the CLI process.

The tests fork it from the test process as the console script does, then ask
it for an import; the last ones run the console script itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_import import cli_argv, count_rows, exported, make_tree, records, subprocess_env

from conftest import Cli
from patient_cli import import_job, import_service, importer
from patient_cli.errors import PatientRecordsError
from patient_cli.import_request import FileOutcome, ImportRequest
from patient_cli.recordformat import CHUNK_SIZE


@pytest.fixture(autouse=True)
def _no_service_left() -> Iterator[None]:
    yield
    import_service.discard()  # one a failed test left would serve the next import


def start(root: Path) -> import_service.Service:
    import_service.start_for(["import", str(root), "-u", "ann"])
    service = import_service.take()
    assert service is not None
    return service


def job(root: Path, **options: object) -> import_service.Job:
    settings: dict[str, object] = {
        "actor": None,
        "env_file": None,
        "outcomes": False,
        "progress": False,
        "debug": False,
    }
    settings.update(options)
    return import_service.Job(ImportRequest(root, username="ann"), **settings)  # type: ignore[arg-type]


def reaped(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def test_only_an_import_forks_it() -> None:
    for args in (["add", "-u", "ann"], ["import", "--help"], ["--help", "import"], []):
        import_service.start_for(args)
        assert import_service.take() is None, args


def test_it_imports_and_sends_outcomes_and_bytes_read(ready: Cli, tmp_path: Path) -> None:
    files = {f"d/{n:02}.txt": b"note %d" % n for n in range(40)}
    files["big.bin"] = os.urandom(2 * CHUNK_SIZE + 1)  # streamed in chunks
    root = make_tree(tmp_path / "in", files)
    service = start(root)
    outcomes: list[FileOutcome] = []
    read: list[int] = []

    summary = service.run(job(root, outcomes=True, progress=True), outcomes.append, read.append)

    total = sum(map(len, files.values()))
    assert (summary.imported, summary.failed, summary.bytes) == (41, 0, total)
    assert sorted(Path(o.path).name for o in outcomes) == sorted(Path(p).name for p in files)
    assert {o.status for o in outcomes} == {"imported"}
    assert sum(read) == summary.bytes
    stored = {r["file_name"]: r["id"] for r in records(ready, "ann")}
    assert exported(ready, stored["big.bin"], tmp_path) == files["big.bin"]
    assert exported(ready, stored["07.txt"], tmp_path) == b"note 7"
    assert reaped(service.pid)


def test_it_reads_the_settings_itself_from_the_env_file(
    ready: Cli, tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Forked before the CLI read its .env: the job names the file, and the
    # service process reads it (the keys never cross the socket).
    env_file = tmp_path / "clinic.env"
    env_file.write_text(
        f"DATABASE_URL={env['DATABASE_URL']}\nENCRYPTION_KEY={env['ENCRYPTION_KEY']}\n"
    )
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.delenv("ENCRYPTION_KEY")
    root = make_tree(tmp_path / "in", {"a.txt": b"alpha"})
    service = start(root)

    summary = service.run(job(root, env_file=env_file))

    assert summary.imported == 1
    monkeypatch.setenv("DATABASE_URL", env["DATABASE_URL"])
    monkeypatch.setenv("ENCRYPTION_KEY", env["ENCRYPTION_KEY"])
    assert [r["record_name"] for r in records(ready, "ann")] == ["a"]


def test_its_errors_come_back_with_their_exit_code(
    ready: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ENCRYPTION_KEY")
    root = make_tree(tmp_path / "in", {"a.txt": b"alpha"})
    service = start(root)

    with pytest.raises(PatientRecordsError) as raised:
        service.run(job(root))

    assert (raised.value.exit_code, raised.value.code) == (5, "config_error")
    assert "no encryption key" in raised.value.message
    assert reaped(service.pid)


def test_a_failure_there_is_an_internal_error_here(
    env: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("a bug")

    monkeypatch.setattr(importer, "import_folder", broken)  # (the fork inherits it)
    root = make_tree(tmp_path / "in", {"a.txt": b"alpha"})

    for debug in (False, True):
        with pytest.raises(Exception) as raised:
            start(root).run(job(root, debug=debug))
        assert type(raised.value).__name__ == "ValueError"  # "internal error: ValueError"
        trace = capsys.readouterr().err
        assert ("Traceback" in trace and "a bug" in trace) is debug


def test_a_service_process_that_dies_is_reported(tmp_path: Path) -> None:
    service = start(tmp_path)
    os.kill(service.pid, signal.SIGKILL)
    with pytest.raises(import_service.ServiceStopped):
        service.run(job(tmp_path))
    assert reaped(service.pid)


def test_an_unused_one_is_stopped_and_reaped(tmp_path: Path) -> None:
    import_service.start_for(["import", str(tmp_path)])
    service = import_service._started
    assert service is not None
    import_service.discard()
    assert import_service.take() is None
    assert reaped(service.pid)


def test_ctrl_c_here_interrupts_it_there_and_a_rerun_finishes(
    ready: Cli, tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One file per transaction, so that the first outcome (sent after the
    # first commit) arrives while the rest are still to be stored.
    monkeypatch.setattr(import_job, "COMMIT_BYTES", 1)  # (the fork inherits it)
    files = {f"{n:03}.txt": b"letter %d" % n for n in range(300)}
    root = make_tree(tmp_path / "in", files)
    service = start(root)

    def press_ctrl_c_once(outcome: FileOutcome) -> None:
        if not pressed:
            pressed.append(outcome)
            os.kill(os.getpid(), signal.SIGINT)  # the handler passes it on

    pressed: list[FileOutcome] = []
    with pytest.raises(KeyboardInterrupt):
        service.run(job(root, outcomes=True), press_ctrl_c_once)

    assert reaped(service.pid)
    kept = count_rows(db_url, "SELECT count(*) FROM patient_records")
    assert 0 < kept < len(files)
    code, again = _import_in_a_process(tmp_path, root)
    assert (code, again["imported"], again["skipped"]) == (0, len(files) - kept, kept)
    assert count_rows(db_url, "SELECT count(*) FROM patient_records") == len(files)


def _import_in_a_process(tmp_path: Path, root: Path) -> tuple[int, dict[str, int]]:
    done = subprocess.run(
        cli_argv("import", str(root), "-u", "ann", "-q", "--format", "json"),
        env=subprocess_env(),
        capture_output=True,
        timeout=120,
        cwd=tmp_path,
    )
    return done.returncode, json.loads(done.stdout or b"{}")


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _gone(pid: int) -> bool:
    try:
        return _state(pid) in ("Z", "X")  # dead, waiting for init to reap it
    except OSError:
        return True


def _start_long_import(tmp_path: Path) -> tuple[Path, dict[str, bytes], subprocess.Popen[bytes]]:
    """The console script importing a folder whose first file is big enough to
    end the first transaction (32 MB): its result line is printed while the
    files after it are still being stored."""
    files = {"a/first.bin": os.urandom(33 << 20)}
    files.update({f"b/{n:03}.bin": os.urandom(20_000 + n) for n in range(200)})
    files["c/last.bin"] = os.urandom(33 << 20)
    root = make_tree(tmp_path / "in", files)
    proc = subprocess.Popen(
        cli_argv("import", str(root), "-u", "ann", "--format", "ndjson"),
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        process_group=0,  # its own job, as a shell starts it (not an orphaned group)
    )
    return root, files, proc


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"]
)
def test_the_command_interrupted_mid_import_stops_its_service_process(
    ready: Cli, tmp_path: Path, db_url: str, signum: signal.Signals
) -> None:
    root, files, proc = _start_long_import(tmp_path)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        first = json.loads(proc.stdout.readline())
        service = _children(proc.pid)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()  # (a no-op once it has ended)
        proc.wait()

    assert first["status"] == "imported" and service, "no service process was forked"
    if signum == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 130
        assert err.decode().splitlines() == [
            '{"error": "interrupted; nothing was half-written", "code": 130, "type": "interrupted"}'
        ]
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in service) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_gone(pid) for pid in service)
    kept = count_rows(db_url, "SELECT count(*) FROM patient_records")
    assert 0 < kept < len(files)  # stopped mid-way, not left to finish
    code, again = _import_in_a_process(tmp_path, root)
    assert (code, again["imported"], again["skipped"]) == (0, len(files) - kept, kept)
    stored = {r["file_name"]: r["id"] for r in records(ready, "ann")}
    assert len(stored) == len(files)
    assert exported(ready, stored["last.bin"], tmp_path) == files["c/last.bin"]


@pytest.mark.slow
def test_ctrl_z_stops_both_processes_and_fg_continues_both(
    ready: Cli, tmp_path: Path, db_url: str
) -> None:
    _, files, proc = _start_long_import(tmp_path)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # the first commit is done
        (service,) = _children(proc.pid)
        proc.send_signal(signal.SIGTSTP)
        deadline = time.monotonic() + 10
        while (_state(proc.pid), _state(service)) != ("T", "T") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert (_state(proc.pid), _state(service)) == ("T", "T")
        stored = count_rows(db_url, "SELECT count(*) FROM patient_records")
        time.sleep(0.5)
        assert count_rows(db_url, "SELECT count(*) FROM patient_records") == stored

        proc.send_signal(signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()  # (a no-op once it has ended)
        proc.wait()

    assert proc.returncode == 0, err
    summary = json.loads(out.decode().splitlines()[-1])
    assert summary["imported"] == len(files)

"""The import's worker processes: answers in order, the same records as in
this process, failures as results, and no worker outliving the importer."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from patient_cli import recordformat
from patient_cli.crypto import Keyring
from patient_cli.import_pool import (
    MESSAGE_BYTES,
    WHOLE_FILE_BYTES,
    Prepare,
    Result,
    SmallFilePreparer,
    Task,
    WorkerFailed,
    WorkerPool,
    WorkerSettings,
)


def number(task: Task) -> int:
    """The test task's number (the last part of its path)."""
    return int(task[0].rsplit("/", 1)[1])


def echo(task: Task) -> tuple[str, int, int]:
    return ("ok-test", number(task), os.getpid())


def answers(pool: WorkerPool) -> list[Result]:
    """Every result of the oldest batch, whatever the parts it comes in."""
    results: list[Result] = []
    complete = False
    while not complete:
        part, complete = pool.receive()
        results += part
    return results


def tasks(first: int, count: int) -> list[Task]:
    return [
        (f"/nowhere/{n}", "ann", f"r{n}", f"{n}.txt", None) for n in range(first, first + count)
    ]


def test_batches_are_answered_in_the_order_sent_by_all_workers() -> None:
    with WorkerPool(3, echo) as pool:
        for batch in range(9):
            pool.send(tasks(batch * 10, 10))
        assert pool.in_flight == 9
        got = [answers(pool) for _ in range(9)]
    ids = [answer[1] for batch in got for answer in batch]
    assert ids == list(range(90))
    assert len({answer[2] for batch in got for answer in batch}) == 3  # three processes
    assert os.getpid() not in {answer[2] for batch in got for answer in batch}


@dataclass(frozen=True)
class Sized:
    file_size: int


def big_result(task: Task) -> tuple[str, Sized]:
    return ("ok", Sized(MESSAGE_BYTES // 2 + number(task)))


def big_rows(task: Task) -> tuple[str, Sized]:
    return ("rows", Sized(MESSAGE_BYTES // 2 + number(task)))


@pytest.mark.parametrize("prepare", [big_result, big_rows])
def test_a_batch_of_large_results_comes_in_parts(prepare: Prepare) -> None:
    with WorkerPool(1, prepare) as pool:
        pool.send(tasks(0, 5))
        parts = []
        complete = False
        while not complete:
            part, complete = pool.receive()
            parts.append([result[1].file_size - MESSAGE_BYTES // 2 for result in part])
    # A message is sent once it holds MESSAGE_BYTES (two results), and the rest at the end.
    assert parts == [[0, 1], [2, 3], [4]]


def test_close_reaps_every_worker() -> None:
    pool = WorkerPool(2, echo)
    pids = [worker.pid for worker in pool._workers]
    pool.close()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # already reaped


def padded(task: Task) -> tuple[str, int, bytes]:
    return ("ok-test", number(task), b"r" * 20_000)


def test_sending_while_a_worker_waits_to_answer_does_not_deadlock() -> None:
    # Batches bigger than the socket buffers both ways: the main process is
    # still sending the second batch while the worker is sending the first's
    # results. The worker reads its tasks in a thread of its own, so neither
    # side waits for the other for ever.
    pool = WorkerPool(1, padded)
    mine = pool._workers[0].sock
    mine.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    mine.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    long_path = "/" + "d" * 4000
    done: list[int] = []

    def exchange() -> None:
        for first in range(0, 256, 64):
            pool.send(
                [(f"{long_path}/{n}", "ann", "r", "n.txt", None) for n in range(first, first + 64)]
            )
        for _ in range(4):
            done.extend(answer[1] for answer in answers(pool))

    talking = threading.Thread(target=exchange, daemon=True)
    talking.start()
    talking.join(timeout=60)
    hung = talking.is_alive()
    if hung:  # unblock both sides before closing, so the test fails instead of hanging
        os.kill(pool._workers[0].pid, signal.SIGKILL)
        talking.join(timeout=10)
    pool.close()
    assert not hung, "the main process and the worker waited for each other"
    assert done == list(range(256))


def test_a_failing_prepare_is_reported_not_hung() -> None:
    def fail(task: Task) -> Result:
        raise KeyError("a message that may hold patient content")

    with WorkerPool(1, fail) as pool:
        pool.send(tasks(0, 2))
        with pytest.raises(WorkerFailed, match=r"^an import worker failed \(KeyError\)$"):
            pool.receive()


def test_a_worker_killed_mid_import_is_an_error() -> None:
    with WorkerPool(1, echo) as pool:
        os.kill(pool._workers[0].pid, signal.SIGKILL)
        os.waitpid(pool._workers[0].pid, 0)
        with pytest.raises(WorkerFailed, match=r"^an import worker stopped"):
            pool.send(tasks(0, 2))
            pool.receive()


def test_a_pool_closes_while_a_later_pool_is_open() -> None:
    # The later pool's workers were forked while the first pool's sockets were
    # open: they must not keep them, or the first pool's workers never exit.
    first = WorkerPool(2, echo)
    second = WorkerPool(2, echo)
    try:
        closing = threading.Thread(target=first.close, daemon=True)
        closing.start()
        closing.join(timeout=20)
        assert not closing.is_alive(), "the first pool's workers did not exit"
    finally:
        second.close()


def test_a_worker_prepares_what_this_process_would(tmp_path: Path) -> None:
    keyring = Keyring([Fernet.generate_key()])
    preparer = SmallFilePreparer(keyring, "a note", dedupe=True, fingerprint_key=b"k" * 32)
    (tmp_path / "a.txt").write_bytes(b"hello")
    medium = os.urandom(recordformat.CHUNK_SIZE * 2 + 5)
    (tmp_path / "medium.bin").write_bytes(medium)
    (tmp_path / "big.bin").write_bytes(b"x" * (WHOLE_FILE_BYTES + 1))
    os.mkfifo(tmp_path / "fifo")
    batch: list[Task] = [
        (str(tmp_path / "a.txt"), "ann", "a", "a.txt", None),
        (str(tmp_path / "big.bin"), "ann", "big", "big.bin", None),
        (str(tmp_path / "fifo"), "ann", "fifo", "fifo", None),
        (str(tmp_path / "gone.txt"), "ann", "gone", "gone.txt", None),
        (str(tmp_path / "medium.bin"), "ann", "medium", "medium.bin", None),
    ]
    with WorkerPool(1, preparer) as pool:
        pool.send(batch)
        ok, large, fifo, gone, whole = answers(pool)

    assert ok[0] == "ok"
    prepared = ok[1]
    assert (prepared.params["id"], prepared.file_size) == (None, 5)  # ids come later
    assert prepared.fingerprint == recordformat.file_fingerprint(
        b"k" * 32, bytes.fromhex(prepared.sha256)
    )
    assert prepared.params["meta"] is None  # it names the record: sealed with the id
    recordformat.assign_id(prepared, keyring, 1)
    token = prepared.params["meta"]
    assert isinstance(token, bytes)
    meta = recordformat.open_meta(keyring, token, 1, "ann")
    assert (meta.record_name, meta.record_data, meta.file_name) == ("a", "a note", "a.txt")
    binding = meta.chunk_binding(1)
    assert recordformat.open_chunk(keyring, prepared.chunks[0], 1, 0, binding) == b"hello"
    assert large == ("large",)
    assert fifo[:2] == ("failed", "not_regular_file")
    assert gone == ("failed", "vanished", f"file not found: {tmp_path / 'gone.txt'}")
    # A file of a few chunks is read whole and sealed chunk by chunk, as streamed.
    assert whole[0] == "ok"
    chunks = whole[1].chunks
    assert (len(chunks), whole[1].params["chunk_count"]) == (3, 3)
    recordformat.assign_id(whole[1], keyring, 5)
    binding = recordformat.open_meta(keyring, whole[1].params["meta"], 5, "ann").chunk_binding(5)
    opened = b"".join(
        recordformat.open_chunk(keyring, token, 5, seq, binding) for seq, token in enumerate(chunks)
    )
    assert opened == medium


def test_a_task_with_an_id_comes_back_sealed_as_rows(tmp_path: Path) -> None:
    keyring = Keyring([Fernet.generate_key()])
    preparer = SmallFilePreparer(keyring, None, dedupe=True, fingerprint_key=b"k" * 32)
    medium = os.urandom(recordformat.CHUNK_SIZE + 7)
    (tmp_path / "a.txt").write_bytes(b"hello")
    (tmp_path / "medium.bin").write_bytes(medium)
    batch: list[Task] = [
        (str(tmp_path / "a.txt"), "ann", "a", "a.txt", 41),
        (str(tmp_path / "medium.bin"), "ann", "medium", "medium.bin", 42),
    ]
    with WorkerPool(1, preparer) as pool:
        pool.send(batch)
        small, whole = answers(pool)

    for (kind, sealed), record_id, content in ((small, 41, b"hello"), (whole, 42, medium)):
        assert kind == "rows"
        assert isinstance(sealed, recordformat.SealedRows)
        params = sealed.params  # decoded from the COPY rows
        assert (params["id"], params["username"], params["file_size"]) == (
            record_id,
            "ann",
            len(content),
        )
        assert params["fingerprint"] == params["dedupe_key"] == sealed.fingerprint
        assert sealed.fingerprint == recordformat.file_fingerprint(
            b"k" * 32, hashlib.sha256(content).digest()
        )
        meta_token = params["meta"]
        assert isinstance(meta_token, bytes)
        meta = recordformat.open_meta(keyring, meta_token, record_id, "ann")
        binding = meta.chunk_binding(record_id)
        opened = b"".join(
            recordformat.open_chunk(keyring, token, record_id, seq, binding)
            for seq, token in enumerate(sealed.chunks)
        )
        assert opened == content
    assert len(whole[1].chunks) == params["chunk_count"] == 2


def test_workers_ignore_ctrl_c() -> None:
    with WorkerPool(1, echo) as pool:
        os.kill(pool._workers[0].pid, signal.SIGINT)
        pool.send(tasks(0, 3))
        assert [answer[1] for answer in answers(pool)] == [0, 1, 2]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_workers_exit_when_the_importer_is_killed() -> None:
    # A child process forks a pool, prints the workers' pids, and is killed
    # with SIGKILL: its workers see their socket close and exit on their own.
    script = (
        "import os, sys, time\n"
        "from patient_cli.import_pool import WorkerPool\n"
        "pool = WorkerPool(2, lambda task: ('ok',))\n"
        "print(' '.join(str(w.pid) for w in pool._workers), flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    pids = [int(pid) for pid in child.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(pid) for pid in pids)
    child.kill()
    child.wait(timeout=10)
    child.stdout.close()
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs CPU affinity")
def test_no_workers_on_one_core() -> None:
    # On one core a worker would only add copying: the import runs in-process.
    script = (
        "import os\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "from patient_cli.import_pool import default_workers\n"
        "print(default_workers())\n"
    )
    argv = [sys.executable, "-c", script]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "0"


def stamped(task: Task) -> tuple[str, int, float, bytes]:
    """An answer of about 100 KB, with the time it was made."""
    return ("ok-test", number(task), time.monotonic(), b"s" * 100_000)


def test_workers_work_ahead_while_the_main_process_is_not_reading() -> None:
    # The main process starts the workers before it has connected: they must
    # not stop at what the socket buffers hold (a few answers of this size).
    with WorkerPool(1, stamped) as pool:
        for n in range(60):  # 60 messages, 6 MB of answers: under AHEAD_BYTES
            pool.send(tasks(n, 1))
        time.sleep(1.5)
        reading = time.monotonic()
        made = [answer[2] for _ in range(60) for answer in answers(pool)]
    assert len(made) == 60
    assert max(made) < reading


def test_working_ahead_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from patient_cli import import_pool

    monkeypatch.setattr(import_pool, "AHEAD_BYTES", 1_000_000)  # the fork inherits it
    with WorkerPool(1, stamped) as pool:
        for n in range(60):  # each batch is answered in one message
            pool.send(tasks(n, 1))
        time.sleep(1.5)
        reading = time.monotonic()
        made = [answer[2] for _ in range(60) for answer in answers(pool)]
    # About 10 answers (1 MB) plus what the socket buffers hold were made
    # before anyone read; the rest waited.
    assert len(made) == 60
    assert sum(1 for at in made if at < reading) < 40
    assert max(made) > reading


def test_settings_reach_the_workers_for_the_files_sent_after(tmp_path: Path) -> None:
    keyring = Keyring([Fernet.generate_key()])
    (tmp_path / "a.txt").write_bytes(b"hello")
    (tmp_path / "b.txt").write_bytes(b"other content")
    task_a: Task = (str(tmp_path / "a.txt"), "ann", "a", "a.txt", None)
    task_b: Task = (str(tmp_path / "b.txt"), "ann", "b", "b.txt", None)
    key = b"f" * 32
    with WorkerPool(1, SmallFilePreparer(keyring, None, dedupe=True)) as pool:
        pool.send([task_a])
        (before,) = answers(pool)
        pool.send_settings(WorkerSettings(key, frozenset({5})))
        pool.send([task_a, task_b])
        maybe_stored, new = answers(pool)
    # Before: sealed without a fingerprint (the main process adds it).
    assert before[0] == "ok" and before[1].fingerprint is None
    completed = recordformat.with_fingerprint(before[1], key, dedupe=True)
    fingerprint = recordformat.file_fingerprint(key, hashlib.sha256(b"hello").digest())
    assert completed.fingerprint == completed.params["dedupe_key"] == fingerprint
    # After: a file of a stored size is only hashed; another is sealed with it.
    assert maybe_stored == ("check", 5, fingerprint)
    assert new[0] == "ok" and new[1].fingerprint == recordformat.file_fingerprint(
        key, hashlib.sha256(b"other content").digest()
    )


def test_starting_an_import_does_not_import_psycopg() -> None:
    # `import` forks its workers before psycopg is imported (about 0.2 s), so
    # that they work while the main process imports it and connects.
    script = (
        "import sys\n"
        "from patient_cli.config import load_settings\n"
        "from patient_cli.importer import import_folder\n"
        "from patient_cli.session import Session\n"
        "session = Session(load_settings())\n"
        "session.keyring\n"
        "print('psycopg' in sys.modules)\n"
    )
    env = {
        **os.environ,
        "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/nowhere",
        "ENCRYPTION_KEY": Fernet.generate_key().decode(),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env
    )
    assert done.stdout.strip() == "False"


def test_the_start_is_bounded_by_files_and_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before the main process connects, the workers get a few files of at most
    # START_BYTES in all: a rerun over stored files seals no more than that.
    from patient_cli import import_feed
    from patient_cli.import_request import ImportRequest

    for n in range(10):
        (tmp_path / f"f{n}.bin").write_bytes(b"x" * 1000)
    monkeypatch.setattr(import_feed, "START_BYTES", 2500)
    feed = import_feed.WorkerFeed.start(1, echo_path, ImportRequest(tmp_path, username="ann"))
    try:
        # Counted file by file, inside a batch: 1000 + 1000 + 1000 reach 2500.
        assert [len(batch.entries) for batch in feed._sent] == [3]
        assert [feed.next_done() is not None for _ in range(10)] == [True] * 10
        assert feed.next_done() is None
    finally:
        feed.close()
    monkeypatch.setattr(import_feed, "START_BYTES", 10**9)
    monkeypatch.setattr(import_feed, "POOL_BATCH", 2)
    monkeypatch.setattr(import_feed, "START_FILES", 4)
    small = import_feed.WorkerFeed.start(1, echo_path, ImportRequest(tmp_path, username="ann"))
    try:
        assert [len(batch.entries) for batch in small._sent] == [2, 2]  # START_FILES
    finally:
        small.close()


def echo_path(task: Task) -> tuple[str, str]:
    return ("ok-test", task[0])

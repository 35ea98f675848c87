"""Reading and encrypting small files in worker processes, for `import`.

Each small file costs about 90 µs of Python in a worker (open, read, hash,
sniff, the chunk's and the metadata's tokens, its rows) besides the main
process's own bookkeeping, and one core cannot go faster; cryptography and
hashlib release the GIL but the rest does not. So `import` forks a few workers
that read and seal small files, while the main process decides what to skip
and sends the rows to PostgreSQL on its one connection, in one stream of
transactions and audit events. A worker only turns a file into a record (with
`recordformat.prepare_small`, the same function `add` uses), and that record
into its rows in binary COPY form (`recordformat.sealed_rows`), so the main
process only joins bytes; it never touches the database and needs no psycopg.

So the workers are forked before psycopg is even imported, and start on the
first files while the main process imports it and connects (about 0.3 s, a
third of a 5,000-file import's time). Those first files have no record id yet:
their chunks are bound to a tag, and the main process gives each an id and
seals its metadata. Every later task carries a record id (reserved from the
database's sequence), and comes back sealed whole. Workers hold up to
AHEAD_BYTES of answers each until the main process reads them; what needs the
database (the fingerprint key, the sizes already stored) reaches them in a
`WorkerSettings` message, and the main process completes what was sealed
before (recordformat.with_fingerprint).

Workers are plain forks with a socket pair each: they inherit the Fernet keys
(which never cross a pipe; the fingerprint key does, to the workers' own
socket pair), ignore Ctrl-C (the main process decides and stops them), and
exit when the main process goes away, even by `kill -9`, because theirs is the
only open end of their socket.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pickle
import queue
import signal
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from patient_cli import recordformat, scan
from patient_cli.crypto import Keyring
from patient_cli.errors import PatientRecordsError, UsageError
from patient_cli.inputs import FileChanged, read_regular_file
from patient_cli.mime import detect_mime_type

# One task: (path, username, record name, file name, record id). The id is
# None for the files sent before the main process has connected.
Task = tuple[str, str, str, str, int | None]
# One result, in task order: ("rows", SealedRows) for a file sealed with its
# task's record id; ("ok", PreparedRecord) for one that had none (the main
# process gives it one and seals its metadata); ("check", size,
# fingerprint) for a file whose content may be stored already (see
# SmallFilePreparer.stored_sizes); ("large",) for a file larger than
# WHOLE_FILE_BYTES (the main process streams it); or ("failed", code, message).
Result = tuple[Any, ...]
Prepare = Callable[[Task], Result]

# A worker answers in messages of about this many bytes of tokens (at most this
# plus one file's), so a batch of large-ish files never sits whole in memory.
MESSAGE_BYTES = 4 << 20
# Files up to this size are read whole and encrypted by a worker, chunk by
# chunk, and go to the server with the small ones by COPY; larger ones are
# streamed by the main process (store.store_streamed). Streaming a file of a
# few MiB cost 8-13 ms per MiB here (two round trips, a sealer thread started,
# the pipeline drained), a 20-50 MB one 5.6-6.5.
WHOLE_FILE_BYTES = 8 << 20
# A worker works ahead of the main process by up to this many bytes of answers
# not yet read (it then waits): all of a 5,000-file import of 1-8 KB files
# while the main process starts, and a bounded part of larger ones.
AHEAD_BYTES = 16 << 20
# Workers' scheduling priority, below the main process's (see _serve).
WORKER_NICE = 5
_LENGTH = struct.Struct(">Q")


def default_workers() -> int:
    """One worker per core, at most 3 (the main process and the server need CPU
    too); none on one core, where a worker would only add copying."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 0 if (cores or 1) < 2 else min(3, cores or 1)


@dataclass(eq=False)
class _Worker:
    pid: int
    sock: socket.socket
    reader: Any  # a buffered binary file over sock
    waiting: deque[int]  # results still to come for each batch sent, oldest first


# The main process's ends of every worker's socket, in every pool: a worker
# forked later must close them all, or the one it inherited would keep that
# worker from ever seeing the end of its input (two imports in threads of one
# process, as the tests run them, each waited for the other's workers).
_OPEN: list[_Worker] = []
_FORKING = threading.Lock()


class WorkerPool:
    """`size` forked workers running `prepare` over batches of tasks.

    Batches are answered in the order they were sent (`send`, then `receive`
    until it says the batch is complete), in parts of about MESSAGE_BYTES, so
    neither side ever holds a whole batch of large-ish files. Fork it before
    starting any thread: a fork copies only the calling thread.
    """

    def __init__(self, size: int, prepare: Prepare) -> None:
        self._workers: list[_Worker] = []
        self._next = 0
        self._order: deque[_Worker] = deque()
        try:
            for _ in range(size):
                self._workers.append(self._fork(prepare))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def in_flight(self) -> int:
        return len(self._order)

    def send(self, tasks: Sequence[Task]) -> None:
        """Give a batch to the next worker in turn."""
        worker = self._workers[self._next]
        self._next = (self._next + 1) % len(self._workers)
        _tell(worker, list(tasks))
        worker.waiting.append(len(tasks))
        self._order.append(worker)

    def send_settings(self, settings: WorkerSettings) -> None:
        """Give every worker what the database told: used for the tasks sent after."""
        for worker in self._workers:
            _tell(worker, settings)

    def receive(self) -> tuple[list[Result], bool]:
        """The next results of the oldest batch not yet complete, in task order,
        and whether they complete it."""
        worker = self._order[0]
        try:
            part = _read(worker.reader)
        except OSError as exc:
            raise WorkerFailed(f"an import worker stopped ({type(exc).__name__})") from None
        if part is None:
            raise WorkerFailed("an import worker stopped unexpectedly")
        if isinstance(part, _Failed):
            raise WorkerFailed(f"an import worker failed ({part.error})")
        worker.waiting[0] -= len(part)
        if worker.waiting[0] > 0:
            return part, False
        worker.waiting.popleft()
        self._order.popleft()
        return part, True

    def close(self) -> None:
        """Stop the workers (they exit on end of input) and reap them."""
        with _FORKING:
            for worker in self._workers:
                worker.reader.close()
                worker.sock.close()
                _OPEN.remove(worker)
        for worker in self._workers:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(worker.pid, 0)
        self._workers.clear()
        self._order.clear()

    def _fork(self, prepare: Prepare) -> _Worker:
        with _FORKING:
            mine, theirs = socket.socketpair()
            pid = os.fork()
            if pid == 0:  # the worker
                code = 1
                try:
                    mine.close()
                    # Only its own socket stays open. The others' descriptors
                    # are closed below Python: a reader another thread was
                    # using when this fork happened holds a lock nobody here
                    # will ever release, so its close() would hang.
                    for other in _OPEN:
                        os.close(other.sock.fileno())
                    _serve(theirs, prepare)
                    code = 0
                finally:
                    os._exit(code)
            theirs.close()
            worker = _Worker(pid, mine, mine.makefile("rb"), deque())
            _OPEN.append(worker)
            return worker


class WorkerFailed(PatientRecordsError):
    """A worker process died or failed: the import stops (exit 1); what was
    committed before stays, and a rerun finishes the job."""


def _tell(worker: _Worker, message: object) -> None:
    try:
        _write(worker.sock, message)
    except OSError as exc:  # not stdout's broken pipe: never let it pass for one
        raise _why_stopped(worker, exc) from None


def _why_stopped(worker: _Worker, exc: OSError) -> WorkerFailed:
    """The error for a worker found gone while giving it work: its last
    message says why if it failed (the answers before it no longer matter)."""
    with contextlib.suppress(OSError):
        while (message := _read(worker.reader)) is not None:
            if isinstance(message, _Failed):
                return WorkerFailed(f"an import worker failed ({message.error})")
    return WorkerFailed(f"an import worker stopped ({type(exc).__name__})")


@dataclass(frozen=True)
class _Failed:
    """A worker's last message when `prepare` raised: the exception's type only
    (its message might quote a file's content or a path)."""

    error: str


@dataclass(frozen=True)
class WorkerSettings:
    """What the main process learns from the database once connected."""

    fingerprint_key: bytes = field(repr=False)
    # Sizes of the files already stored for the import's one user (see
    # SmallFilePreparer.stored_sizes).
    stored_sizes: frozenset[int] = field(default=frozenset(), repr=False)


def _serve(sock: socket.socket, prepare: Prepare) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Below the main process and the server, which wait for no one: a worker
    # takes the CPU they leave (it works ahead), never what they need.
    os.nice(WORKER_NICE)
    # Tasks are read by a thread of their own, so the main process never waits
    # to send a batch while this worker waits to send it answers (each side
    # would wait for the other once both socket buffers were full). Answers
    # wait in the outbox while the main process is not reading (up to
    # AHEAD_BYTES), so this worker can work ahead while it starts up.
    tasks_in: queue.SimpleQueue[list[Task] | WorkerSettings | None] = queue.SimpleQueue()
    threading.Thread(target=_take_tasks, args=(sock, tasks_in), daemon=True).start()
    outbox = _Outbox(sock)
    while True:
        if tasks_in.empty():
            outbox.drain()  # nothing else to do: the main process may be waiting
        tasks = tasks_in.get()
        if tasks is None:
            return
        if isinstance(tasks, WorkerSettings):
            prepare = _configured(prepare, tasks)
            continue
        _prepare_batch(tasks, prepare, outbox)


def _configured(prepare: Prepare, settings: WorkerSettings) -> Prepare:
    if not isinstance(prepare, SmallFilePreparer):
        return prepare
    return dataclasses.replace(
        prepare, fingerprint_key=settings.fingerprint_key, stored_sizes=settings.stored_sizes
    )


def _prepare_batch(tasks: list[Task], prepare: Prepare, outbox: _Outbox) -> None:
    if not tasks:
        outbox.put([])
    part: list[Result] = []
    part_bytes = 0
    for number, task in enumerate(tasks, 1):
        try:
            result = prepare(task)
        except Exception as exc:
            outbox.put(_Failed(type(exc).__name__), wait=False)
            outbox.drain()
            raise
        part.append(result)
        if result[0] in ("ok", "rows"):
            part_bytes += result[1].file_size or 0
        if number == len(tasks) or part_bytes >= MESSAGE_BYTES:
            outbox.put(part)
            part, part_bytes = [], 0


class _Outbox:
    """Answers on their way to the main process, sent by the worker's own
    thread without waiting while the main process is not reading (it is still
    starting, or busy), up to about AHEAD_BYTES; then it waits.

    Not a sender thread: a thread waiting for the GIL gets it only every few
    milliseconds while another computes, which doubled the workers' time.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._unsent: deque[memoryview] = deque()
        self._bytes = 0

    def put(self, value: object, wait: bool = True) -> None:
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        self._unsent.append(memoryview(_LENGTH.pack(len(data))))
        self._unsent.append(memoryview(data))
        self._bytes += _LENGTH.size + len(data)
        self.send(until=AHEAD_BYTES if wait else None)

    def send(self, until: int | None = None) -> None:
        """Send what the socket takes now; then, with `until`, wait until at
        most that many bytes are left unsent."""
        while self._unsent:
            must_wait = until is not None and self._bytes > until
            view = self._unsent[0]
            try:
                sent = self._sock.send(view, 0 if must_wait else socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            self._bytes -= sent
            if sent == len(view):
                self._unsent.popleft()
            else:
                self._unsent[0] = view[sent:]

    def drain(self) -> None:
        """Wait until everything is sent."""
        self.send(until=0)


def _take_tasks(
    sock: socket.socket, tasks_in: queue.SimpleQueue[list[Task] | WorkerSettings | None]
) -> None:
    reader = sock.makefile("rb")
    try:
        while (tasks := _read(reader)) is not None:
            tasks_in.put(tasks)
    except OSError:
        # The main process went away without reading our last answers (it
        # stopped on an error, or was killed): its socket was reset. The end.
        pass
    finally:
        tasks_in.put(None)


def _write(sock: socket.socket, value: object) -> None:
    _send_message(sock, pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))


def _send_message(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_LENGTH.pack(len(data)))
    sock.sendall(data)


def _read(reader: Any) -> Any:
    """The next message, or None at end of input."""
    header = reader.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(header)
    data = reader.read(length)
    if len(data) < length:
        return None
    # Only ever from our own fork, over a socket pair no one else can open.
    return pickle.loads(data)  # noqa: S301


# -- the workers' job --------------------------------------------------------

# Failure codes besides those of `scan`.
VANISHED = "vanished"
CHANGED = "changed_while_reading"


@dataclass(frozen=True)
class SmallFilePreparer:
    """Turns one task into a result: what a worker does per file (and what the
    main process does itself when there are no workers)."""

    keyring: Keyring = field(repr=False)
    record_data: str | None = field(repr=False)
    dedupe: bool
    # None until the main process has read it from the database (WorkerSettings):
    # records sealed before then have no fingerprint yet.
    fingerprint_key: bytes | None = field(default=None, repr=False)
    max_size: int = WHOLE_FILE_BYTES
    # Sizes of the files already stored for the import's one user (when it has
    # one): a file of such a size may be stored already, so it is only hashed
    # here, and the main process asks the database (a rerun encrypts nothing).
    stored_sizes: frozenset[int] = field(default=frozenset(), repr=False)

    def __call__(self, task: Task) -> Result:
        path, username, record_name, file_name, record_id = task
        try:
            data, _ = read_regular_file(path, self.max_size)
        except FileChanged:
            return CHANGED_RESULT
        except UsageError as exc:
            return ("failed", failure_code(exc.message), exc.message)
        if data is None:
            return LARGE
        if self.fingerprint_key is not None and len(data) in self.stored_sizes:
            digest = hashlib.sha256(data).digest()
            fingerprint = recordformat.file_fingerprint(self.fingerprint_key, digest)
            return ("check", len(data), fingerprint)
        mime = detect_mime_type(file_name, data)
        content = recordformat.RecordContent(
            username, record_name, self.record_data, file_name, mime
        )
        if self.fingerprint_key is None:  # (then never an id either)
            record_id = None
        prepared = recordformat.prepare_small(
            self.keyring, self.fingerprint_key, record_id, content, data, self.dedupe
        )
        if record_id is None:
            return ("ok", prepared)
        return ("rows", recordformat.sealed_rows(prepared))


LARGE: Result = ("large",)
CHANGED_RESULT: Result = ("failed", CHANGED, "file changed while it was read")


def failure_code(message: str) -> str:
    """The failure code of a file's UsageError from opening or reading it."""
    if message.startswith("file not found"):
        return VANISHED
    if message.startswith("not a regular file"):
        return scan.NOT_REGULAR
    if "symbolic links" in message:
        return scan.SYMLINK_LOOP
    return scan.UNREADABLE

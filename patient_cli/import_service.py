"""`import` in a service process forked at start-up, so that the database side
is ready by the time the command line has been read.

Before an import can store a file, its process must import psycopg and the
import's own modules (about 0.14 s here) and connect; in one process the CLI's
start-up (Typer, the command line, the settings: about 0.07 s) came first, on
one core while the other waited. So the console script (`entry.run`) forks
this process first thing when the command is `import`. It imports what the
import needs while the CLI process imports Typer and reads the command line;
then it runs `importer.import_folder` for the CLI and sends back what the CLI
shows: each file's outcome (when asked for), the bytes read (for the progress
bar), and the summary or the error. Output, messages and exit codes stay the
CLI process's, exactly as without it.

Only from the console script, on Linux with at least two cores (on one, the
two start-ups would only take turns); tests and other callers run
`import_folder` in their own process, and so does the CLI when the fork fails.

The service process:
- dies with the CLI process (PR_SET_PDEATHSIG), so `kill -9` of the command
  stops the import at once, as it did in one process: the server rolls back
  what was not committed, and the workers end with their sockets;
- has a process group of its own, so that a Ctrl-C at the terminal reaches it
  once: the CLI process forwards it every SIGINT and SIGTERM it gets (from a
  terminal or from `kill`), and the import unwinds as in one process; Ctrl-Z
  stops both processes and `fg` continues both;
- never writes to stdout (its stdout is /dev/null): the CLI prints everything.

Messages go over a socket pair between the two forks (`framing`); the keys
never cross it (each process reads the settings itself).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import socket
    from collections.abc import Callable
    from types import FrameType

    from patient_cli.import_request import (
        BytesCallback,
        ImportRequest,
        ImportSummary,
        OutcomeCallback,
    )

# The progress bar's bytes are sent at most this often.
BYTES_EVERY = 0.1
_PR_SET_PDEATHSIG = 1  # from linux/prctl.h

_started: Service | None = None


@dataclass(frozen=True)
class Job:
    """What the CLI process asks the service process to run."""

    request: ImportRequest
    actor: str | None
    env_file: Path | None
    outcomes: bool  # send each file's outcome
    progress: bool  # send the bytes read
    debug: bool  # send a failure's traceback


class ServiceStopped(Exception):
    """The service process ended without an answer (it was killed): reported
    as an internal error, like any failure that is not the import's own."""


def start_for(args: list[str]) -> None:
    """Fork the service process if `args` run `import` (not just its help)."""
    global _started
    from patient_cli.cli_args import asks_for_help, command_name

    if command_name(args) != "import" or asks_for_help(args) or not _supported():
        return
    import socket

    parent = os.getpid()
    try:
        ours, theirs = socket.socketpair()
        pid = os.fork()
    except OSError:
        return  # the import runs in this process
    if pid == 0:  # the service process
        code = 1
        try:
            ours.close()
            code = _serve(theirs, parent)
        finally:
            os._exit(code)
    theirs.close()
    _started = Service(pid, ours)


def take() -> Service | None:
    """The service process forked at start-up, if any (to be used once)."""
    global _started
    service, _started = _started, None
    return service


def discard() -> None:
    """Stop the service process if it was never used (the command failed
    before it ran), and reap it."""
    service = take()
    if service is not None:
        service.close()


def _supported() -> bool:
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return False
    return len(os.sched_getaffinity(0)) >= 2


# -- the CLI process's side ------------------------------------------------------


class Service:
    """The CLI process's end of the service process."""

    def __init__(self, pid: int, sock: socket.socket) -> None:
        self.pid = pid
        self.sock = sock
        self._finished = False

    def run(
        self,
        job: Job,
        on_outcome: OutcomeCallback | None = None,
        on_bytes: BytesCallback | None = None,
        on_force_quit: Callable[[], None] | None = None,
    ) -> ImportSummary:
        """Run `job` there: its summary, or its error raised here (an interruption
        as KeyboardInterrupt or Terminated). Signals that arrive meanwhile are
        passed on; if this process stops waiting for any other reason, the
        service process is killed (what it did not commit is rolled back)."""
        from patient_cli import framing

        previous = {signum: signal.signal(signum, self._forward) for signum in _FORWARDED}
        previous[signal.SIGTSTP] = signal.signal(signal.SIGTSTP, self._suspend)
        try:
            reader = self.sock.makefile("rb")
            try:
                framing.send(self.sock, job)
                while True:
                    message = framing.receive(reader)
                    if message is None:
                        raise ServiceStopped("the import's process stopped unexpectedly")
                    kind = message[0]
                    if kind == "outcome" and on_outcome is not None:
                        on_outcome(message[1])
                    elif kind == "bytes" and on_bytes is not None:
                        on_bytes(message[1])
                    elif kind == "force_quit" and on_force_quit is not None:
                        on_force_quit()
                    elif kind not in ("outcome", "bytes", "force_quit"):
                        self._finished = True
                        return _answer(message)
            except OSError:
                raise ServiceStopped("the import's process stopped unexpectedly") from None
            finally:
                reader.close()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.close()

    def close(self) -> None:
        """Stop the service process unless it has answered, and reap it."""
        if not self._finished:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.sock.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)

    def _suspend(self, signum: int, frame: FrameType | None) -> None:
        """Ctrl-Z: stop the service process too, then this one; continued
        (`fg`, SIGCONT), continue it."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGSTOP)
        signal.signal(signal.SIGTSTP, signal.SIG_DFL)
        try:
            os.kill(os.getpid(), signal.SIGTSTP)  # stops here until continued
        finally:
            signal.signal(signal.SIGTSTP, self._suspend)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)


_FORWARDED = (signal.SIGINT, signal.SIGTERM)


def _answer(message: tuple[Any, ...]) -> ImportSummary:
    """The summary in the service process's last message, or its error raised."""
    from patient_cli.errors import PatientRecordsError, Terminated

    kind = message[0]
    if kind == "done":
        summary: ImportSummary = message[1]
        return summary
    if kind == "error":
        _, exit_code, code, text = message
        error = PatientRecordsError(text)
        error.exit_code, error.code = exit_code, code
        raise error
    if kind == "interrupted":
        raise Terminated() if message[1] == "SIGTERM" else KeyboardInterrupt()
    if kind == "crash":
        _, name, trace = message
        if trace:
            sys.stderr.write(trace)
        # The same "internal error: <type>" line as a failure in this process.
        raise type(name, (Exception,), {})()
    raise ServiceStopped(f"unexpected answer from the import's process: {kind!r}")


# -- the service process ----------------------------------------------------------


def _serve(sock: socket.socket, parent: int) -> int:
    if not _die_with_parent(parent):
        return 0
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Out of the terminal's foreground group, a line on stderr (a warning about
    # a malformed .env line) must not stop this process (with `stty tostop`).
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    from patient_cli import framing

    try:
        _preload()
        reader = sock.makefile("rb")
        job = framing.receive(reader)
    except BaseException:  # interrupted, or the CLI went away: no job
        return 0
    if job is None:  # the command was not an import after all, or it failed first
        return 0
    from patient_cli.import_pool import close_in_workers

    close_in_workers(sock.fileno())
    answer = _run(job, sock)
    with contextlib.suppress(OSError):
        framing.send(sock, answer)
    return 0


def _die_with_parent(parent: int) -> bool:
    """Be killed when the CLI process ends; False if it already has."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    return os.getppid() == parent


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    from patient_cli.errors import Terminated

    raise Terminated()


def _preload() -> None:
    """Import what an import needs (psycopg first of all) before it is asked for."""
    import patient_cli.app_secrets
    import patient_cli.db
    import patient_cli.import_job
    import patient_cli.importer
    import patient_cli.keysource  # noqa: F401


def _run(job: Job, sock: socket.socket) -> tuple[Any, ...]:
    """Run the import; the last message for the CLI process."""
    import traceback

    from patient_cli.config import load_env_file
    from patient_cli.errors import PatientRecordsError, Terminated
    from patient_cli.importer import import_folder
    from patient_cli.session import open_session

    sender = _Sender(sock)
    try:
        load_env_file(job.env_file)
        with open_session(job.actor) as session:
            summary = import_folder(
                session,
                job.request,
                on_outcome=sender.outcome if job.outcomes else None,
                on_bytes=sender.read if job.progress else None,
                on_force_quit=sender.force_quit,
                head_start=False,  # psycopg is imported (_preload): connect first
            )
        sender.send_bytes()
        return ("done", summary)
    except PatientRecordsError as exc:
        return ("error", exc.exit_code, exc.code, exc.message)
    except KeyboardInterrupt:
        return ("interrupted", "SIGINT")
    except Terminated:
        return ("interrupted", "SIGTERM")
    except Exception as exc:
        return ("crash", type(exc).__name__, traceback.format_exc() if job.debug else None)


class _Sender:
    """The service process's messages while the import runs."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.unsent_bytes = 0
        self.last_sent = 0.0

    def outcome(self, outcome: object) -> None:
        from patient_cli import framing

        framing.send(self.sock, ("outcome", outcome))

    def read(self, size: int) -> None:
        self.unsent_bytes += size
        if time.monotonic() - self.last_sent >= BYTES_EVERY:
            self.send_bytes()

    def send_bytes(self) -> None:
        from patient_cli import framing

        if self.unsent_bytes:
            framing.send(self.sock, ("bytes", self.unsent_bytes))
            self.unsent_bytes = 0
        self.last_sent = time.monotonic()

    def force_quit(self) -> None:
        """The third Ctrl-C while stuck on a server that does not answer (see
        import_job): the CLI process exits at once, and so does this one."""
        from patient_cli import framing
        from patient_cli.errors import EXIT_INTERRUPTED

        with contextlib.suppress(OSError):
            framing.send(self.sock, ("force_quit",))
        os._exit(EXIT_INTERRUPTED)

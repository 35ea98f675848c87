"""Exporting a record's file: decrypt, verify, and only then put it in place.

A file export goes to a 0600 temporary file beside the target, is checked
against the stored size and SHA-256, audited, and renamed into place, so a
failed or refused export never leaves a partial or changed file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from patient_cli import recordformat, sql, store
from patient_cli.audit import AuditEvent, append_event, audited
from patient_cli.db import translate_db_errors
from patient_cli.errors import IntegrityFailed, NotFound, TargetExists, UsageError
from patient_cli.session import Session

STDOUT = "-"


@dataclass(frozen=True)
class ExportResult:
    record_id: int
    username: str
    path: str  # "-" for stdout
    file_size: int
    file_type: str | None


@dataclass(frozen=True)
class FileRecord:
    """Where a record's file lives and what it must look like."""

    record_id: int
    username: str
    file_name: str | None
    mime_type: str | None
    file_size: int
    sha256: str | None
    chunk_count: int
    legacy: bool
    chunk_binding: int | None = None  # what the chunks are bound to (RecordMeta.chunk_binding)


def find_file_record(session: Session, record_id: int) -> FileRecord:
    if record_id <= 0:
        raise UsageError("record id must be a positive number")
    with session.conn.cursor() as cur:
        cur.execute(sql.SELECT_RECORD_FOR_EXPORT, (record_id,))
        row = cur.fetchone()
    if row is None:
        raise NotFound(f"record {record_id} not found")
    (
        rid,
        username,
        meta_token,
        file_size,
        chunk_count,
        _legacy_name,
        legacy_type,
        legacy_has_file,
    ) = row
    if meta_token is None:
        if not legacy_has_file:
            raise NotFound(f"record {record_id} has no file")
        return FileRecord(rid, username, None, legacy_type, -1, None, 0, legacy=True)
    meta = recordformat.open_meta(session.keyring, meta_token, rid, username)
    if file_size is None:
        raise NotFound(f"record {record_id} has no file")
    if meta.file_size != file_size:
        raise IntegrityFailed(f"record {record_id}: stored file size does not match its metadata")
    return FileRecord(
        rid,
        username,
        meta.file_name,
        meta.mime_type,
        file_size,
        meta.sha256,
        int(chunk_count or 0),
        legacy=False,
        chunk_binding=meta.chunk_binding(rid),
    )


def iter_file(session: Session, record: FileRecord) -> Iterator[bytes]:
    """The decrypted file, piece by piece; raises IntegrityFailed at the end if the
    size or hash differs from what was stored."""
    if record.legacy:
        with session.conn.cursor() as cur:
            cur.execute(sql.SELECT_LEGACY_FILE, (record.username, record.record_id))
            row = cur.fetchone()
        assert row is not None
        yield bytes(row[0])
        return
    hasher = hashlib.sha256()
    size = 0
    for piece in store.iter_chunks(
        session.conn,
        session.keyring,
        record.username,
        record.record_id,
        record.chunk_count,
        record.chunk_binding,
    ):
        hasher.update(piece)
        size += len(piece)
        yield piece
    if size != record.file_size or hasher.hexdigest() != record.sha256:
        raise IntegrityFailed(f"record {record.record_id}: file content fails its integrity check")


def safe_file_name(name: str | None, record_id: int) -> str:
    """A file name that cannot escape the current folder or hide itself."""
    if name:
        name = name.replace("\\", "/").rsplit("/", 1)[-1]
        name = re.sub(r"[\x00-\x1f\x7f]", "_", name).strip().lstrip(".")
    return name or f"record-{record_id}.bin"


def export_file(
    session: Session,
    record_id: int,
    output: str | None = None,
    force: bool = False,
    stdout: BinaryIO | None = None,
) -> ExportResult:
    event = AuditEvent("export-file", record_ids=[record_id])
    with translate_db_errors(), audited(session, event):
        session.load_secrets()
        record = find_file_record(session, record_id)
        event.usernames.add(record.username)
        if output == STDOUT:
            assert stdout is not None
            return _export_to_stream(session, record, event, stdout)
        target, label = _target(output, record)
        try:
            exists = target.exists()
            if exists and not force:
                raise TargetExists(f"{label} already exists (use --force to overwrite)")
            if exists and not target.is_file():
                # --force replaces files, never a device, FIFO or socket (e.g. /dev/null).
                raise UsageError(f"{label} is not a regular file; not replacing it")
            if not target.parent.is_dir():
                raise UsageError(f"folder does not exist: {target.parent}")
        except OSError as exc:  # a folder we may not enter, a name too long, ...
            raise UsageError(f"cannot write {label}: {exc.strerror}") from None
        size = _write_verified(session, record, target, force, event, label)
    return ExportResult(record.record_id, record.username, str(target), size, record.mime_type)


def _target(output: str | None, record: FileRecord) -> tuple[Path, str]:
    """Where the file goes, and how messages name it: the stored file name is
    patient content, so a path built from it is shown with a placeholder."""
    stored_name = safe_file_name(record.file_name, record.record_id)
    placeholder = f"<record {record.record_id}'s file name>"
    if not output:
        return Path.cwd() / stored_name, str(Path.cwd() / placeholder)
    target = Path(output)
    try:
        into_folder = target.is_dir()
    except OSError as exc:
        raise UsageError(f"cannot write {target}: {exc.strerror}") from None
    if into_folder:
        return target / stored_name, str(target / placeholder)
    return target, str(target)


def _export_to_stream(
    session: Session, record: FileRecord, event: AuditEvent, stdout: BinaryIO
) -> ExportResult:
    # Data leaves only after its audit event is committed (fail closed); a later
    # integrity failure is reported with exit 7 after what was already written.
    append_event(session, event)
    session.conn.commit()
    size = 0
    for piece in iter_file(session, record):
        stdout.write(piece)
        size += len(piece)
    stdout.flush()
    session.conn.commit()
    return ExportResult(record.record_id, record.username, STDOUT, size, record.mime_type)


def _write_verified(
    session: Session, record: FileRecord, target: Path, force: bool, event: AuditEvent, label: str
) -> int:
    try:
        fd, tmp_name = tempfile.mkstemp(
            dir=target.parent, prefix=".patient-records-", suffix=".part"
        )
    except OSError as exc:
        raise UsageError(f"cannot write to {target.parent}: {exc.strerror}") from None
    tmp = Path(tmp_name)
    try:
        size = 0
        with os.fdopen(fd, "wb") as out:
            for piece in iter_file(session, record):
                with _writing(label):
                    out.write(piece)
                size += len(piece)
            with _writing(label):
                out.flush()
                os.fsync(out.fileno())
        append_event(session, event)
        session.conn.commit()
        _place(tmp, target, force, label)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return size


@contextlib.contextmanager
def _writing(label: str) -> Iterator[None]:
    """A full disk, an I/O error or a refused rename becomes a one-line error."""
    try:
        yield
    except OSError as exc:
        raise UsageError(f"cannot write {label}: {exc.strerror}") from None


def _place(tmp: Path, target: Path, force: bool, label: str) -> None:
    if force:
        with _writing(label):  # e.g. another user's file in a sticky folder
            os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)  # atomic, and never overwrites a file created meanwhile
    except FileExistsError:
        raise TargetExists(f"{label} already exists (use --force to overwrite)") from None
    except OSError:
        # No hard links here (FAT USB sticks, some network shares): check, then rename.
        if os.path.lexists(target):
            raise TargetExists(f"{label} already exists (use --force to overwrite)") from None
        with _writing(label):
            os.rename(tmp, target)

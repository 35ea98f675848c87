"""The storage layer: files of every size around the chunk boundary round-trip
through the service, chunks carry their place and refuse to be moved, and the
batch and de-duplication paths behave."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import Cli
from patient_cli import export, recordformat, store
from patient_cli.config import load_settings
from patient_cli.crypto import Keyring
from patient_cli.errors import DecryptionFailed, IntegrityFailed, UsageError
from patient_cli.recordformat import CHUNK_SIZE, RecordContent
from patient_cli.records import AddRequest, add_record
from patient_cli.session import Session

BOUNDARY_SIZES = [0, 1, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 2 * CHUNK_SIZE + 5]
FEW = settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
KEYRING = Keyring([Fernet.generate_key()])


@pytest.fixture
def session(ready: Cli) -> Iterator[Session]:
    with Session(load_settings()) as opened:
        yield opened


def content_of(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


class TrickleReader(io.RawIOBase):
    """A source that hands out at most `step` bytes per read, as pipes do."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = memoryview(data)
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self._step, len(self._data))
        buffer[:n] = self._data[:n]
        self._data = self._data[n:]
        return n


def read_back(session: Session, record_id: int) -> bytes:
    found = export.find_file_record(session, record_id)
    data = b"".join(export.iter_file(session, found))
    session.conn.commit()
    return data


def every_boundary(test: Any) -> Any:
    """Always run each boundary size once, besides the few random examples."""
    for size in BOUNDARY_SIZES:
        test = example(size=size, seed=size)(test)
    return test


@FEW
@every_boundary
@given(size=st.sampled_from(BOUNDARY_SIZES), seed=st.integers(0, 2**32))
def test_add_record_round_trip_around_chunk_boundaries(
    session: Session, tmp_path: Path, size: int, seed: int
) -> None:
    data = content_of(size, seed)
    path = tmp_path / f"file-{size}-{seed}.bin"
    path.write_bytes(data)
    added = add_record(session, AddRequest("prop", "file", None, path))
    assert added.file_size == size
    assert read_back(session, added.record_id) == data
    with session.conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM record_chunks WHERE record_id = %s", (added.record_id,))
        row = cur.fetchone()
    session.conn.commit()
    assert row == (-(-size // CHUNK_SIZE),)


@FEW
@example(size=0, seed=0, step=1 << 16)
@example(size=CHUNK_SIZE, seed=1, step=CHUNK_SIZE - 3)
@example(size=CHUNK_SIZE + 1, seed=2, step=1 << 16)
@example(size=2 * CHUNK_SIZE + 5, seed=3, step=CHUNK_SIZE * 3)
@given(
    size=st.sampled_from(BOUNDARY_SIZES),
    seed=st.integers(0, 2**32),
    step=st.sampled_from([1 << 16, CHUNK_SIZE - 3, CHUNK_SIZE * 3]),
)
def test_store_streamed_round_trip_with_short_reads(
    session: Session, size: int, seed: int, step: int
) -> None:
    data = content_of(size, seed)
    source = TrickleReader(data, step)
    head = store.read_head(source)  # type: ignore[arg-type]
    assert head == data[: CHUNK_SIZE + 1]
    seen: list[int] = []
    stored = store.store_streamed(
        session.conn,
        KEYRING,
        None,
        RecordContent("prop", "streamed", file_name="s.bin", mime_type="x/y"),
        source,  # type: ignore[arg-type]
        head,
        on_bytes=seen.append,
    )
    session.conn.commit()
    assert stored is not None
    assert (stored.file_size, stored.sha256) == (size, hashlib.sha256(data).hexdigest())
    assert sum(seen) == size and all(n <= CHUNK_SIZE for n in seen)
    pieces = list(store.iter_chunks(session.conn, KEYRING, "prop", stored.record_id, len(seen)))
    session.conn.commit()
    assert b"".join(pieces) == data
    assert [len(p) for p in pieces] == seen


def test_pieces_are_full_chunks_but_the_last() -> None:
    data = bytes(2 * CHUNK_SIZE + 5)
    source = TrickleReader(data, 7000)
    head = store.read_head(source)  # type: ignore[arg-type]
    sizes = [len(p) for p in store._pieces(source, head)]  # type: ignore[arg-type]
    assert sizes == [CHUNK_SIZE, CHUNK_SIZE, 5]


def test_metadata_round_trip() -> None:
    content = RecordContent("u", "Name ✓", "data\x00", "f.pdf", "application/pdf")
    token = recordformat.seal_meta(KEYRING, content, 1, 12, "ab" * 32)
    assert recordformat.open_meta(KEYRING, token, 1, "u") == recordformat.RecordMeta(
        "Name ✓", "data\x00", "f.pdf", "application/pdf", 12, "ab" * 32
    )


@pytest.mark.parametrize(("record_id", "username"), [(2, "u"), (1, "v")])
def test_metadata_names_its_record(record_id: int, username: str) -> None:
    # A record's rows copied or moved to another id or user are detected.
    token = recordformat.seal_meta(KEYRING, RecordContent("u", "n"), 1, None, None)
    with pytest.raises(IntegrityFailed) as caught:
        recordformat.open_meta(KEYRING, token, record_id, username)
    assert caught.value.message == f"record {record_id}: its metadata belongs to another record"


def test_metadata_of_version_1_names_no_record() -> None:
    # As written before version 2 (and still read): no id, no user, no tag.
    old = {"v": 1, "name": "n", "data": None, "file_name": None, "mime": None}
    token = KEYRING.encrypt(json.dumps({**old, "size": None, "sha256": None}).encode())
    meta = recordformat.open_meta(KEYRING, token, 7, "anyone")
    assert (meta.record_name, meta.chunk_tag, meta.chunk_binding(7)) == ("n", None, 7)


def test_metadata_that_is_not_an_object_is_malformed() -> None:
    token = KEYRING.encrypt(b"[1, 2]")
    with pytest.raises(IntegrityFailed, match=r"^record 7: metadata is malformed$"):
        recordformat.open_meta(KEYRING, token, 7, "u")


def test_a_record_without_its_metadata_is_never_stored(session: Session) -> None:
    # A row without metadata would read as one of the original service's.
    prepared = recordformat.prepare_small(KEYRING, None, None, RecordContent("u", "n"), b"x")
    with pytest.raises(ValueError, match="without its id and metadata"):
        store.insert_prepared(session.conn, [prepared])
    with pytest.raises(ValueError, match="without its id and metadata"):
        recordformat.sealed_rows(prepared)  # what store.copy_rows takes


def test_metadata_of_a_newer_version_is_refused_as_such() -> None:
    token = KEYRING.encrypt(json.dumps({"v": 3, "name": "n"}).encode())
    with pytest.raises(DecryptionFailed) as caught:
        recordformat.open_meta(KEYRING, token, 7, "u")
    assert caught.value.message == (
        "record 7 was written by a newer patient-records (metadata version 3): upgrade to read it"
    )


# -- chunks know where they belong -----------------------------------------------


def test_open_chunk_returns_the_data() -> None:
    token = recordformat.seal_chunk(KEYRING, 41, 3, b"piece")
    assert recordformat.open_chunk(KEYRING, token, 41, 3) == b"piece"


@pytest.mark.parametrize(("record_id", "seq"), [(42, 3), (41, 4), (41, 0), (-41, 3)])
def test_open_chunk_refuses_a_chunk_from_elsewhere(record_id: int, seq: int) -> None:
    token = recordformat.seal_chunk(KEYRING, 41, 3, b"piece")
    with pytest.raises(IntegrityFailed) as caught:
        recordformat.open_chunk(KEYRING, token, record_id, seq)
    owner = "this record" if record_id == 41 else "another record"
    assert caught.value.message == (
        f"record {record_id}: chunk {seq} is out of place (it belongs to {owner}, position 3)"
    )


@pytest.mark.parametrize(("binding", "seq"), [(7, 1), (8, 0), (None, 1)])
def test_open_chunk_checks_a_tagged_chunk_against_its_tag(binding: int | None, seq: int) -> None:
    # A chunk sealed before its record had an id is bound to a tag from the
    # record's metadata: the record id means nothing to it.
    token = recordformat.seal_chunk(KEYRING, 8, 1, b"piece")
    with pytest.raises(IntegrityFailed):
        recordformat.open_chunk(KEYRING, token, 99, seq, binding)
    assert recordformat.open_chunk(KEYRING, token, 99, 1, 8) == b"piece"


def test_a_tagged_record_keeps_its_tag_in_the_metadata() -> None:
    content = RecordContent("ann", "scan", None, "a.bin", "application/octet-stream")
    prepared = recordformat.prepare_small(KEYRING, None, None, content, b"x" * 10)
    assert prepared.params["id"] is None and prepared.params["meta"] is None
    recordformat.assign_id(prepared, KEYRING, 5)
    meta = recordformat.open_meta(KEYRING, prepared.params["meta"], 5, "ann")  # type: ignore[arg-type]
    assert meta.chunk_tag is not None and meta.chunk_binding(5) == meta.chunk_tag
    assert recordformat.open_chunk(KEYRING, prepared.chunks[0], 5, 0, meta.chunk_tag) == b"x" * 10
    with pytest.raises(IntegrityFailed):
        recordformat.open_chunk(KEYRING, prepared.chunks[0], 5, 0)  # not bound to the id
    assert prepared.params["id"] == 5 and prepared.fingerprint is None
    assert recordformat.prepare_small(KEYRING, None, None, content, b"").chunks == ()


def test_open_chunk_refuses_a_chunk_without_header() -> None:
    token = KEYRING.encrypt(b"short")
    with pytest.raises(IntegrityFailed, match=r"^record 1: chunk 0 is malformed$"):
        recordformat.open_chunk(KEYRING, token, 1, 0)


def test_chunk_header_is_inside_the_ciphertext() -> None:
    token = recordformat.seal_chunk(KEYRING, 41, 3, b"")
    assert KEYRING.decrypt(token) == recordformat.CHUNK_HEADER.pack(41, 3)


# -- batches and de-duplication (the import paths) --------------------------------


def test_insert_prepared_batch_is_pipelined_and_complete(session: Session) -> None:
    contents = [b"", b"one", bytes(CHUNK_SIZE), None]
    ids = store.reserve_ids(session.conn, len(contents))
    batch = [
        recordformat.prepare_small(
            session.keyring, None, rid, RecordContent("batch", f"r{rid}"), data
        )
        for rid, data in zip(ids, contents, strict=True)
    ]
    stored = store.insert_prepared(session.conn, batch)
    session.conn.commit()
    assert [s.record_id for s in stored if s is not None] == ids
    for rid, data in zip(ids, contents, strict=True):
        if data is not None:
            assert read_back(session, rid) == data


def test_dedupe_skips_a_file_already_stored_for_that_user(session: Session) -> None:
    fingerprint_key = b"f" * 32

    def small(username: str, data: bytes) -> store.StoredRecord | None:
        rid = store.reserve_ids(session.conn, 1)[0]
        prepared = recordformat.prepare_small(
            KEYRING, fingerprint_key, rid, RecordContent(username, "x"), data, dedupe=True
        )
        result = store.insert_prepared(session.conn, [prepared])[0]
        session.conn.commit()
        return result

    def streamed(username: str, data: bytes) -> store.StoredRecord | None:
        with session.conn.transaction():
            result = store.store_streamed(
                session.conn,
                KEYRING,
                fingerprint_key,
                RecordContent(username, "x"),
                io.BytesIO(data),
                dedupe=True,
            )
        return result

    big = bytes(CHUNK_SIZE + 10)
    assert small("ann", b"same") is not None
    assert small("ann", b"same") is None
    assert small("bob", b"same") is not None  # another patient may hold the same file
    assert streamed("ann", big) is not None
    assert streamed("ann", big) is None
    with session.conn.cursor() as cur:
        cur.execute("SELECT username, count(*) FROM patient_records GROUP BY 1 ORDER BY 1")
        counts = cur.fetchall()
        cur.execute("SELECT count(*) FROM record_chunks")
        chunks = cur.fetchone()
    session.conn.commit()
    assert counts == [("ann", 2), ("bob", 1)]
    assert chunks == (1 + 1 + 2,)  # no chunk of a skipped duplicate remains


def test_failed_stream_leaves_nothing(session: Session, db_url: str) -> None:
    class Broken(io.RawIOBase):
        def __init__(self) -> None:
            self._chunks = itertools.chain([bytes(CHUNK_SIZE)] * 2)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
            piece = next(self._chunks, None)
            if piece is None:
                raise OSError(5, "Input/output error")
            n = min(len(buffer), len(piece))
            buffer[:n] = piece[:n]
            return n

    with (
        pytest.raises(UsageError, match=r"^cannot read file: Input/output error$"),
        session.conn.transaction(),
    ):
        store.store_streamed(
            session.conn,
            KEYRING,
            None,
            RecordContent("broken", "x"),
            Broken(),  # type: ignore[arg-type]
        )
    with psycopg.connect(db_url) as conn:
        assert conn.execute(
            "SELECT (SELECT count(*) FROM patient_records), (SELECT count(*) FROM record_chunks)"
        ).fetchone() == (0, 0)


@settings(max_examples=60, deadline=None)
@given(
    size=st.sampled_from([0, 1, 4000, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE]),
    hint_offset=st.sampled_from([-5000, -1, 0, 1, 5000, None]),
    step=st.sampled_from([7, 1 << 16, CHUNK_SIZE * 2]),
)
def test_read_head_is_right_whatever_the_size_hint(
    size: int, hint_offset: int | None, step: int
) -> None:
    # The hint is fstat's size; the file may have grown or shrunk since.
    data = content_of(size, size)
    hint = None if hint_offset is None else max(size + hint_offset, 0)
    head = store.read_head(TrickleReader(data, step), hint)  # type: ignore[arg-type]
    assert head == data[: CHUNK_SIZE + 1]


def test_read_head_of_a_small_file_asks_for_its_size_then_one_byte() -> None:
    asked: list[int] = []

    class Recording(TrickleReader):
        def read(self, size: int = -1) -> bytes:
            asked.append(size)
            return super().read(size) or b""

    assert store.read_head(Recording(b"x" * 4000, 1 << 20), 4000) == b"x" * 4000  # type: ignore[arg-type]
    assert asked == [4001, 1]


def test_pieces_of_a_source_that_only_has_read() -> None:
    class ReadOnly:
        def __init__(self, data: bytes) -> None:
            self._source = io.BytesIO(data)

        def read(self, size: int = -1) -> bytes:
            return self._source.read(min(size, 5000))

    data = content_of(2 * CHUNK_SIZE + 7, 9)
    source = ReadOnly(data)
    head = store.read_head(source)  # type: ignore[arg-type]
    pieces = [bytes(p) for p in store._pieces(source, head)]  # type: ignore[arg-type]
    assert [len(p) for p in pieces] == [CHUNK_SIZE, CHUNK_SIZE, 7]
    assert b"".join(pieces) == data

"""The binary COPY rows `import`'s workers make: the server reads them as the
rows psycopg would have written, in the columns sql's COPY statements name,
and they decode back to the same parameters."""

from __future__ import annotations

import re
from collections.abc import Iterator

import psycopg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import Cli
from patient_cli import copyformat, sql
from patient_cli.config import load_settings
from patient_cli.session import Session


def copy_columns(statement: str) -> tuple[str, ...]:
    listed = re.search(r"\(([^)]*)\)\s+FROM STDIN", statement)
    assert listed is not None
    return tuple(name.strip() for name in listed.group(1).split(","))


def test_the_columns_are_those_of_the_copy_statements() -> None:
    assert copy_columns(sql.COPY_RECORDS) == copyformat.RECORD_COLUMNS
    assert copy_columns(sql.COPY_CHUNKS) == copyformat.CHUNK_COLUMNS


@pytest.fixture
def session(ready: Cli) -> Iterator[Session]:
    with Session(load_settings()) as opened:
        yield opened


ROWS = [
    (7, "ann", b"\x80meta", "k1", 5, 1, b"f" * 32, b"f" * 32),
    (2**62, 'Zoë \u2028 "q"', b"", "k2", None, None, None, None),  # NULLs, non-ASCII
    (9, "b" * 80, b"\x00" * 9000, "k1", 0, 0, b"g" * 32, None),
]
TOKENS = [b"t" * 10, b"", b"\xff" * 70_000]


def test_the_server_reads_the_rows_as_psycopg_writes_them(session: Session) -> None:
    conn = session.conn
    with conn.transaction(force_rollback=True), conn.cursor() as cur:
        with cur.copy(sql.COPY_RECORDS) as copy:
            copy.write(copyformat.SIGNATURE)
            for row in ROWS:
                copy.write(copyformat.record_row(*row))
            copy.write(copyformat.TRAILER)
        with cur.copy(sql.COPY_CHUNKS) as copy:
            copy.write(copyformat.SIGNATURE)
            for part in copyformat.chunk_rows("ann", 7, "k1", TOKENS):
                copy.write(part)
            copy.write(copyformat.TRAILER)
        columns = ", ".join(copyformat.RECORD_COLUMNS)
        ids = [row[0] for row in ROWS]
        cur.execute(
            f"SELECT {columns} FROM patient_records WHERE id = ANY(%s) ORDER BY id",
            (ids,),
        )
        got = [tuple(bytes(v) if isinstance(v, memoryview) else v for v in r) for r in cur]
        assert got == sorted(ROWS)
        cur.execute(
            "SELECT username, record_id, seq, key_id, token FROM record_chunks"
            " WHERE record_id = 7 ORDER BY seq"
        )
        assert [(u, r, s, k, bytes(t)) for u, r, s, k, t in cur] == [
            ("ann", 7, seq, "k1", token) for seq, token in enumerate(TOKENS)
        ]


def test_the_rows_are_byte_for_byte_those_psycopg_writes() -> None:
    # psycopg's own binary COPY encoder (an internal module: skipped if it moves).
    formatting = pytest.importorskip("psycopg._copy_base")
    from psycopg.adapt import Transformer

    transformer = Transformer()
    types = ("int8", "varchar", "bytea", "text", "int8", "int4", "bytea", "bytea")
    oids = [psycopg.postgres.types[name].oid for name in types]
    transformer.set_dumper_types(oids, psycopg.pq.Format.BINARY)
    formatter = formatting.BinaryFormatter(transformer)
    theirs = b"".join(bytes(formatter.write_row(row)) for row in ROWS) + bytes(formatter.end())
    ours = b"".join(copyformat.record_row(*row) for row in ROWS)
    assert copyformat.SIGNATURE + ours + copyformat.TRAILER == theirs


@given(
    record_id=st.integers(-(2**63), 2**63 - 1),
    username=st.text(st.characters(exclude_categories=["Cs"]), max_size=80),
    meta=st.binary(max_size=300),
    size=st.none() | st.integers(0, 2**63 - 1),
    count=st.none() | st.integers(0, 2**31 - 1),
    fingerprint=st.none() | st.binary(min_size=32, max_size=32),
    dedupe=st.booleans(),
)
def test_a_record_row_decodes_to_its_parameters(
    record_id: int,
    username: str,
    meta: bytes,
    size: int | None,
    count: int | None,
    fingerprint: bytes | None,
    dedupe: bool,
) -> None:
    dedupe_key = fingerprint if dedupe else None
    row = copyformat.record_row(
        record_id, username, meta, "key", size, count, fingerprint, dedupe_key
    )
    assert copyformat.record_params(row) == {
        "id": record_id,
        "username": username,
        "meta": meta,
        "key_id": "key",
        "file_size": size,
        "chunk_count": count,
        "fingerprint": fingerprint,
        "dedupe_key": dedupe_key,
    }


def test_a_truncated_row_is_refused() -> None:
    row = copyformat.record_row(1, "u", b"m", "k", None, None, None, None)
    with pytest.raises(ValueError, match="not one row"):
        copyformat.parse_row(row + b"x")

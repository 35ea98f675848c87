"""Rows of our two tables in PostgreSQL's binary COPY format, made without psycopg.

`import`'s worker processes build each small file's rows themselves, so the
main process only joins bytes and hands them to COPY: encoding them there
(psycopg's write_row) and sealing each record's metadata took most of its time
per file, and it is the one process every file goes through.

The format (PostgreSQL's "COPY", "Binary Format"): a signature, then per row a
16-bit field count and, per field, a 32-bit length (-1 for NULL) and the value
in the type's binary form (big-endian integers, text as UTF-8, bytea as is),
then a 16-bit -1. The column lists must match sql.COPY_RECORDS and
sql.COPY_CHUNKS (a test checks it); text is UTF-8, as db.connect asks of every
connection.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)  # no flags, no extension
TRAILER = struct.pack(">h", -1)

RECORD_COLUMNS = (
    "id",
    "username",
    "meta",
    "key_id",
    "file_size",
    "chunk_count",
    "fingerprint",
    "dedupe_key",
)
CHUNK_COLUMNS = ("username", "record_id", "seq", "key_id", "token")

_LENGTH = struct.Struct(">i")
_NULL = _LENGTH.pack(-1)
_RECORD_START = struct.Struct(">hiq")  # field count, then the id (length 8, value)
_INT8 = struct.Struct(">iq")
_INT4 = struct.Struct(">ii")
_CHUNK_IDS = struct.Struct(">iqii")  # record_id (length 8, value), seq (length 4, value)


def record_row(
    record_id: int,
    username: str,
    meta: bytes,
    key_id: str,
    file_size: int | None,
    chunk_count: int | None,
    fingerprint: bytes | None,
    dedupe_key: bytes | None,
) -> bytes:
    """One patient_records row, in RECORD_COLUMNS order."""
    user = username.encode("utf-8")
    kid = key_id.encode("utf-8")
    return b"".join(
        (
            _RECORD_START.pack(len(RECORD_COLUMNS), 8, record_id),
            _LENGTH.pack(len(user)),
            user,
            _LENGTH.pack(len(meta)),
            meta,
            _LENGTH.pack(len(kid)),
            kid,
            _NULL if file_size is None else _INT8.pack(8, file_size),
            _NULL if chunk_count is None else _INT4.pack(4, chunk_count),
            _NULL if fingerprint is None else _LENGTH.pack(len(fingerprint)) + fingerprint,
            _NULL if dedupe_key is None else _LENGTH.pack(len(dedupe_key)) + dedupe_key,
        )
    )


def chunk_rows(
    username: str, record_id: int, key_id: str, tokens: Iterable[bytes]
) -> tuple[bytes, ...]:
    """A record's record_chunks rows, in CHUNK_COLUMNS order: each row's start
    and its token as separate parts (a token is never copied here)."""
    user = username.encode("utf-8")
    kid = key_id.encode("utf-8")
    head = struct.pack(">hi", len(CHUNK_COLUMNS), len(user)) + user
    key = _LENGTH.pack(len(kid)) + kid
    parts: list[bytes] = []
    for seq, token in enumerate(tokens):
        parts.append(head + _CHUNK_IDS.pack(8, record_id, 4, seq) + key + _LENGTH.pack(len(token)))
        parts.append(token)
    return tuple(parts)


def chunk_tokens(parts: tuple[bytes, ...]) -> tuple[bytes, ...]:
    """The tokens of rows made by chunk_rows."""
    return parts[1::2]


def parse_row(row: bytes) -> list[bytes | None]:
    """The fields of one row (as record_row makes it), undecoded."""
    (count,) = struct.unpack_from(">h", row)
    fields: list[bytes | None] = []
    at = 2
    for _ in range(count):
        (length,) = _LENGTH.unpack_from(row, at)
        at += 4
        if length < 0:
            fields.append(None)
            continue
        fields.append(row[at : at + length])
        at += length
    if at != len(row):
        raise ValueError("not one row of binary COPY data")
    return fields


def record_params(row: bytes) -> dict[str, object]:
    """A record row back as the parameters of sql.INSERT_RECORD."""
    fields = dict(zip(RECORD_COLUMNS, parse_row(row), strict=True))
    params: dict[str, object] = {}
    for name, value in fields.items():
        if value is None or name in ("meta", "fingerprint", "dedupe_key"):
            params[name] = value
        elif name in ("username", "key_id"):
            params[name] = value.decode("utf-8")
        else:
            params[name] = int.from_bytes(value, "big", signed=True)
    return params

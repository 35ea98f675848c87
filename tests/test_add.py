"""`add` end to end through the CLI: options and aliases, text from stdin and
files, attached files of every size, MIME types, unicode and hostile input, and
bad input that stores nothing."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import Cli, stderr_line
from patient_cli.recordformat import CHUNK_SIZE

DOCX_MIME = "application/vnd.openxmlformats-officedocument.wordprocessingml.document"


def rows(db_url: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(db_url) as conn:
        return conn.execute(query, params).fetchall()


def stored_counts(db_url: str) -> tuple[int, int]:
    (counts,) = rows(
        db_url,
        "SELECT (SELECT count(*) FROM patient_records), (SELECT count(*) FROM record_chunks)",
    )
    return int(counts[0]), int(counts[1])


def assert_error(result: Any, code: int, kind: str, message: str) -> None:
    """The command failed with `code` and printed exactly one JSON error line (stdout
    is not a terminal here, so errors come as JSON)."""
    assert result.exit_code == code, result.stderr
    assert json.loads(stderr_line(result)) == {"error": message, "code": code, "type": kind}
    assert result.stdout == ""


def only_record(cli: Cli, username: str) -> dict[str, Any]:
    records = cli.json("list", "-u", username)["records"]
    assert len(records) == 1, records
    return dict(records[0])


def minimal_docx(path: Path) -> Path:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(
            "[Content_Types].xml",
            '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/'
            'package/2006/content-types"/>',
        )
        archive.writestr(
            "word/document.xml",
            '<?xml version="1.0"?><w:document xmlns:w="http://schemas.openxmlformats.org/'
            'wordprocessingml/2006/main"><w:body/></w:document>',
        )
    path.write_bytes(buffer.getvalue())
    return path


def test_add_text_record_prints_the_original_services_fields(ready: Cli) -> None:
    out = ready.json("add", "-u", "alice", "-n", "Blood test", "-d", "Hb 13.5")
    assert out["message"] == "Record added successfully"
    assert isinstance(out["record_id"], int) and out["record_id"] > 0
    assert out["has_file"] is False
    record = only_record(ready, "alice")
    assert record["id"] == out["record_id"]
    assert record["record_name"] == "Blood test"
    assert record["record_data"] == "Hb 13.5"
    assert (record["has_file"], record["file_type"], record["file_size"]) == (False, None, None)


def test_record_name_and_record_data_aliases(ready: Cli) -> None:
    ready.json("add", "--username", "bob", "--record-name", "X-ray", "--record-data", "clear")
    record = only_record(ready, "bob")
    assert (record["record_name"], record["record_data"]) == ("X-ray", "clear")


def test_record_without_data_lists_null(ready: Cli) -> None:
    ready.json("add", "-u", "bob", "-n", "empty")
    assert only_record(ready, "bob")["record_data"] is None


def test_empty_data_is_kept_as_empty_text(ready: Cli) -> None:
    ready.json("add", "-u", "bob", "-n", "blank", "-d", "")
    assert only_record(ready, "bob")["record_data"] == ""


@pytest.mark.parametrize("option", [["--data", "-"], ["--data-file", "-"], ["-d", "-"]])
def test_data_from_stdin(ready: Cli, option: list[str]) -> None:
    text = "line one\nligne deux é\n\x00 after a NUL\n"
    ready.json("add", "-u", "carol", "-n", "notes", *option, input=text.encode("utf-8"))
    assert only_record(ready, "carol")["record_data"] == text


def test_invalid_utf8_on_stdin_is_a_usage_error_and_stores_nothing(ready: Cli, db_url: str) -> None:
    result = ready("add", "-u", "carol", "-n", "notes", "--data", "-", input=b"ok \xff\xfe bad")
    assert_error(result, 2, "usage_error", "record data from stdin is not valid UTF-8")
    assert stored_counts(db_url) == (0, 0)


def test_data_file(ready: Cli, tmp_path: Path) -> None:
    source = tmp_path / "notes.txt"
    source.write_text("from a file\n✓", encoding="utf-8")
    ready.json("add", "-u", "dave", "-n", "notes", "--data-file", str(source))
    assert only_record(ready, "dave")["record_data"] == "from a file\n✓"


def test_data_file_with_invalid_utf8(ready: Cli, tmp_path: Path, db_url: str) -> None:
    source = tmp_path / "latin1.txt"
    source.write_bytes("café".encode("latin-1"))
    result = ready("add", "-u", "dave", "-n", "notes", "--data-file", str(source))
    assert_error(result, 2, "usage_error", "--data-file is not valid UTF-8")
    assert stored_counts(db_url) == (0, 0)


def test_data_file_missing(ready: Cli) -> None:
    result = ready("add", "-u", "dave", "-n", "notes", "--data-file", "nope.txt")
    assert_error(result, 2, "usage_error", "file not found: nope.txt")


def test_data_and_data_file_together_are_refused(ready: Cli, tmp_path: Path) -> None:
    (tmp_path / "n.txt").write_text("x")
    result = ready("add", "-u", "dave", "-n", "notes", "-d", "x", "--data-file", "n.txt")
    assert_error(result, 2, "usage_error", "give either --data or --data-file, not both")


HOSTILE_USERNAMES = [
    "x'); DROP TABLE patient_records;--",
    "robert'; DELETE FROM record_chunks; --",
    '"; TRUNCATE audit_log; --',
    "%(username)s",
    "%s %s",
    "\\x00\\",
]


@pytest.mark.parametrize("username", HOSTILE_USERNAMES)
def test_hostile_username_is_just_a_name(ready: Cli, db_url: str, username: str) -> None:
    ready.json("add", "-u", "innocent", "-n", "keep me")
    added = ready.json("add", "-u", username, "-n", "Robert'); --", "-d", "' OR 1=1 --")
    record = only_record(ready, username)
    assert record["id"] == added["record_id"]
    assert record["username"] == username
    assert (record["record_name"], record["record_data"]) == ("Robert'); --", "' OR 1=1 --")
    assert only_record(ready, "innocent")["record_name"] == "keep me"
    assert stored_counts(db_url)[0] == 2


@pytest.mark.parametrize(
    ("username", "name", "data"),
    [
        ("émile", "Résumé 🩺🧬", "Température 38,5 °C 🤒"),
        ("مريض", "تقرير الأشعة", "النتيجة: سليم ‏(RTL)‏"),
        ("患者一", "血液検査", "正常"),
        ("zalgo", "Z̷̛a̸l̶g̵o̴", "\u202etxt.exe"),
    ],
)
def test_unicode_round_trip(ready: Cli, username: str, name: str, data: str) -> None:
    ready.json("add", "-u", username, "-n", name, "-d", data)
    record = only_record(ready, username)
    assert (record["username"], record["record_name"], record["record_data"]) == (
        username,
        name,
        data,
    )


def test_record_name_with_nul_is_refused(ready: Cli, db_url: str) -> None:
    result = ready("add", "-u", "eve", "-n", "bad\x00name")
    assert_error(result, 2, "usage_error", "record name must not contain NUL characters")
    assert stored_counts(db_url) == (0, 0)


def test_record_data_with_nul_round_trips(ready: Cli) -> None:
    ready.json("add", "-u", "eve", "-n", "nul", "-d", "before\x00after")
    assert only_record(ready, "eve")["record_data"] == "before\x00after"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-n", "name"], "username must not be empty"),
        (["-u", "", "-n", "name"], "username must not be empty"),
        (["-u", "   ", "-n", "name"], "username must not be empty"),
        (["-u", "a" * 81, "-n", "name"], "username is longer than 80 characters"),
        (["-u", "tab\tuser", "-n", "name"], "username must not contain control characters"),
        (["-u", "frank"], "record name must not be empty"),
        (["-u", "frank", "-n", " \t "], "record name must not be empty"),
        (["-u", "frank", "-n", "n" * 256], "record name is longer than 255 characters"),
        (["-u", "frank", "-n", "x", "--mime-type", "text/plain"], "--mime-type needs --file"),
        (["-u", "frank", "-n", "x", "-f", "missing.pdf"], "file not found: missing.pdf"),
    ],
)
def test_bad_input_is_a_usage_error_and_stores_nothing(
    ready: Cli, db_url: str, args: list[str], message: str
) -> None:
    result = ready("add", *args)
    assert_error(result, 2, "usage_error", f"{message}")
    assert stored_counts(db_url) == (0, 0)


def test_longest_allowed_username_and_name(ready: Cli) -> None:
    ready.json("add", "-u", "u" * 80, "-n", "n" * 255)
    assert only_record(ready, "u" * 80)["record_name"] == "n" * 255


def test_directory_and_fifo_are_not_regular_files(ready: Cli, tmp_path: Path, db_url: str) -> None:
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "pipe")  # must be refused, not block waiting for a writer
    for name in ("folder", "pipe"):
        result = ready("add", "-u", "gina", "-n", "x", "-f", name)
        assert_error(result, 2, "usage_error", f"not a regular file: {name}")
    assert stored_counts(db_url) == (0, 0)


def test_file_round_trip_with_binary_content(ready: Cli, tmp_path: Path) -> None:
    content = bytes(range(256)) * 4 + b"\x00\x00\xff"
    (tmp_path / "scan.bin").write_bytes(content)
    added = ready.json("add", "-u", "hank", "-n", "scan", "-f", "scan.bin")
    assert (added["has_file"], added["file_size"]) == (True, len(content))
    record = only_record(ready, "hank")
    assert (record["file_name"], record["file_size"]) == ("scan.bin", len(content))
    exported = ready.json("export-file", str(added["record_id"]), "-o", "back.bin")
    assert exported["file_size"] == len(content)
    assert (tmp_path / "back.bin").read_bytes() == content


def test_empty_file_round_trip(ready: Cli, tmp_path: Path, db_url: str) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    added = ready.json("add", "-u", "ivy", "-n", "empty file", "-f", "empty.txt")
    record = only_record(ready, "ivy")
    assert (record["has_file"], record["file_size"], record["file_name"]) == (
        True,
        0,
        "empty.txt",
    )
    assert stored_counts(db_url) == (1, 0)  # an empty file needs no chunk
    ready.json("export-file", str(added["record_id"]), "-o", "out.txt")
    assert (tmp_path / "out.txt").read_bytes() == b""


@pytest.mark.slow
def test_large_file_is_stored_in_chunks_and_round_trips(
    ready: Cli, tmp_path: Path, db_url: str
) -> None:
    size = 5 * 1000 * 1000 + 7
    content = os.urandom(size)
    (tmp_path / "big.dat").write_bytes(content)
    added = ready.json("add", "-u", "jack", "-n", "MRI", "-f", "big.dat")
    assert added["file_size"] == size
    expected_chunks = -(-size // CHUNK_SIZE)
    assert rows(
        db_url,
        "SELECT count(*), min(seq), max(seq) FROM record_chunks WHERE record_id = %s",
        added["record_id"],
    ) == [(expected_chunks, 0, expected_chunks - 1)]
    assert rows(
        db_url,
        "SELECT chunk_count, file_size FROM patient_records WHERE id = %s",
        added["record_id"],
    ) == [(expected_chunks, size)]
    ready.json("export-file", str(added["record_id"]), "-o", "big.out")
    exported = (tmp_path / "big.out").read_bytes()
    assert hashlib.sha256(exported).digest() == hashlib.sha256(content).digest()


def test_docx_gets_its_own_mime_type(ready: Cli, tmp_path: Path) -> None:
    minimal_docx(tmp_path / "letter.docx")
    added = ready.json("add", "-u", "kate", "-n", "letter", "-f", "letter.docx")
    assert added["file_type"] == DOCX_MIME
    assert only_record(ready, "kate")["file_type"] == DOCX_MIME


def test_mime_type_is_detected_from_content_not_name(ready: Cli, tmp_path: Path) -> None:
    (tmp_path / "report.txt").write_bytes(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n")
    ready.json("add", "-u", "liam", "-n", "report", "-f", "report.txt")
    assert only_record(ready, "liam")["file_type"] == "application/pdf"


def test_mime_type_override(ready: Cli, tmp_path: Path) -> None:
    minimal_docx(tmp_path / "letter.docx")
    long_type = "application/vnd.example.very-long-vendor-specific-type+xml; charset=utf-8"
    ready.json("add", "-u", "mia", "-n", "letter", "-f", "letter.docx", "--mime-type", long_type)
    assert only_record(ready, "mia")["file_type"] == long_type


@pytest.mark.parametrize(
    "mime_type",
    ["text/plain\nX-Injected: 1", "t" * 300 + "/plain", "text", "text/", "a b/c", "tëxt/plain"],
)
def test_a_malformed_mime_type_is_a_usage_error_and_stores_nothing(
    ready: Cli, db_url: str, tmp_path: Path, mime_type: str
) -> None:
    (tmp_path / "note.txt").write_bytes(b"hello")
    result = ready("add", "-u", "mia", "-n", "x", "-f", "note.txt", "--mime-type", mime_type)
    message = "--mime-type must be a MIME type such as application/pdf or text/plain; charset=utf-8"
    assert_error(result, 2, "usage_error", message)
    assert stored_counts(db_url) == (0, 0)


def test_unicode_file_name_is_kept(ready: Cli, tmp_path: Path) -> None:
    (tmp_path / "радиограмма 🦴.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    ready.json("add", "-u", "nina", "-n", "x", "-f", "радиограмма 🦴.png")
    record = only_record(ready, "nina")
    assert (record["file_name"], record["file_type"]) == ("радиограмма 🦴.png", "image/png")


def test_each_add_gets_a_new_increasing_id(ready: Cli) -> None:
    ids = [ready.json("add", "-u", "olga", "-n", f"r{i}")["record_id"] for i in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3


def test_add_before_init_db_says_to_run_it(cli: Cli) -> None:
    result = cli("add", "-u", "pat", "-n", "x")
    assert_error(
        result,
        5,
        "config_error",
        "the database schema is missing or out of date: run `patient-records init-db`",
    )


def test_file_name_that_is_not_utf8_is_refused(ready: Cli, tmp_path: Path, db_url: str) -> None:
    raw_name = b"scan-\xff.bin"
    (tmp_path / os.fsdecode(raw_name)).write_bytes(b"content")
    result = ready("add", "-u", "quinn", "-n", "x", "-f", os.fsdecode(raw_name))
    assert_error(result, 2, "usage_error", "file name is not valid UTF-8")
    assert stored_counts(db_url) == (0, 0)


@pytest.fixture
def latin1_url(
    server_url: str, cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Iterator[str]:
    """A database created as LATIN1 (as an old service's may have been), in use."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = f"pr_latin1_{os.getpid()}"
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')  # our own name
        conn.execute(
            f"CREATE DATABASE \"{name}\" ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' "
            "TEMPLATE template0"
        )
    params = {**conninfo_to_dict(server_url), "dbname": name}
    url = make_conninfo("", **{k: str(v) for k, v in params.items() if v is not None})
    monkeypatch.setenv("DATABASE_URL", url)
    try:
        yield url
    finally:
        with psycopg.connect(server_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_username_the_database_encoding_cannot_hold_is_a_usage_error(
    cli: Cli, latin1_url: str, tmp_path: Path
) -> None:
    assert cli("init-db", "--format", "json").exit_code == 0
    cli.json("add", "-u", "Zoë", "-n", "kept")  # LATIN1 has ë
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_bytes(b"a letter")
    for args in (["add", "-u", "Ωmega", "-n", "x"], ["import", "in", "-u", "Ωmega"]):
        result = cli(*args, "--format", "json")
        assert result.exit_code == 2, (args, result.stderr)
        assert json.loads(stderr_line(result))["error"] == (
            "the database's character encoding cannot store some of this command's text "
            "(a username, say): such text needs a database created with UTF8 encoding"
        )
    assert [r["record_name"] for r in cli.json("list", "--all")["records"]] == ["kept"]
    with psycopg.connect(latin1_url) as conn:
        assert conn.execute("SELECT count(*) FROM patient_records").fetchone() == (1,)

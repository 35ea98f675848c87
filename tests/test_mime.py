"""MIME detection: content first, then the file name, then a text/binary guess."""

from __future__ import annotations

import io
import zipfile

import pytest

from patient_cli.mime import SNIFF_BYTES, detect_mime_type

PNG = b"\x89PNG\r\n\x1a\n" + bytes(32)
PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(32)


def office_zip(*members: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for member in members:
            archive.writestr(member, "<x/>")
    return buffer.getvalue()


DOCX = office_zip("[Content_Types].xml", "word/document.xml")


@pytest.mark.parametrize(
    ("name", "head", "expected"),
    [
        ("scan.png", PNG, "image/png"),
        ("scan.pdf", PDF, "application/pdf"),
        ("photo.jpg", JPEG, "image/jpeg"),
        # Content wins over a misleading name.
        ("report.txt", PDF, "application/pdf"),
        ("image.pdf", PNG, "image/png"),
        ("noextension", PDF, "application/pdf"),
        # Office documents are zips: the name tells them apart.
        (
            "letter.docx",
            DOCX,
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        ),
        (
            "LETTER.DOCX",
            DOCX,
            "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        ),
        (
            "sheet.xlsx",
            office_zip("xl/workbook.xml"),
            ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet"),
        ),
        ("archive.zip", office_zip("a.txt"), "application/zip"),
        # Name-based fallback when the content says nothing.
        ("notes.md", b"# Title\n", "text/markdown"),
        ("data.csv", b"a,b\n1,2\n", "text/csv"),
        ("data.json", b'{"a": 1}', "application/json"),
        ("page.html", b"<p>hi</p>", "text/html"),
        ("image.dcm", bytes(16), "application/dicom"),
        # Neither: text or binary by looking at the bytes.
        ("README", "plain text ✓\n".encode(), "text/plain"),
        ("blob", b"\x00\x01\x02\xff", "application/octet-stream"),
        ("latin1", "café".encode("latin-1"), "application/octet-stream"),
        ("empty", b"", "application/octet-stream"),
        ("empty.txt", b"", "text/plain"),
    ],
)
def test_detect(name: str, head: bytes, expected: str) -> None:
    assert detect_mime_type(name, head) == expected


def test_multibyte_character_cut_at_the_sniff_boundary_is_still_text() -> None:
    text = ("a" * (SNIFF_BYTES - 1) + "é" + "rest").encode("utf-8")
    assert detect_mime_type("noext", text) == "text/plain"


def test_invalid_utf8_before_the_boundary_is_binary() -> None:
    text = b"a" * 100 + b"\xff" + b"a" * (SNIFF_BYTES * 2)
    assert detect_mime_type("noext", text) == "application/octet-stream"

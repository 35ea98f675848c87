"""MIME detection: content first, then the file name, then a text/binary guess."""

from __future__ import annotations

import io
import mimetypes
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


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"GIF89a" + bytes(10), "image/gif"),
        (b"II*\x00" + bytes(10), "image/tiff"),
        (bytes(128) + b"DICM" + bytes(10), "application/dicom"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image/webp"),
        (b"\x00\x00\x00\x18ftypheic" + bytes(8), "image/heic"),
        (b"\x00\x00\x00\x18ftypisom" + bytes(8), "video/mp4"),
        (b"\x1f\x8b\x08\x00" + bytes(8), "application/gzip"),
    ],
)
def test_magic_numbers_without_a_telling_name(head: bytes, expected: str) -> None:
    assert detect_mime_type("scan", head) == expected


def test_ole_container_is_named_by_its_suffix() -> None:
    ole = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(100)
    assert detect_mime_type("old.doc", ole) == "application/msword"
    assert detect_mime_type("old", ole) == "application/x-ole-storage"


@pytest.mark.parametrize(
    "name",
    [
        "a.pdf",
        "A.PDF",
        "x.tar.gz",
        "x.TGZ",
        "scan.final.png",
        "noext",
        "trail.",
        "a.b.c.docx",
        "lab.json.gz",
        "v.svgz",
        "weird.Z",
        "notes.MD",
    ],
)
def test_cached_name_guess_matches_a_direct_guess(name: str) -> None:
    from patient_cli.mime import _BY_SUFFIX, _by_name, _extensions

    suffix = "." + name.rsplit(".", 1)[-1].lower() if "." in name else ""
    direct = _BY_SUFFIX.get(suffix) or mimetypes.guess_type(name, strict=False)[0]
    assert _by_name(_extensions(name)) == direct


def test_extensions_split_as_splitext_twice() -> None:
    # _extensions is a faster spelling of two os.path.splitext calls.
    import itertools
    import os

    from patient_cli.mime import _extensions

    def by_splitext(name: str) -> str:
        root, last = os.path.splitext(name)
        return os.path.splitext(root)[1] + last

    names = ["x.tar.gz", "file-00001.bin", ".bashrc", "a.b.", "noext"]
    names += ["".join(p) for p in itertools.product(["", "a", ".", ".."], repeat=4)]
    assert [_extensions(n) for n in names] == [by_splitext(n) for n in names]

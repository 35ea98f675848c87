"""MIME type detection: from the file's content first, then from its name.

Content is recognised by the magic numbers of the formats clinics handle
(documents, images, archives, audio/video, DICOM); a small table checked in a
few microseconds, since `import` sniffs every file.
"""

from __future__ import annotations

import functools
import mimetypes

SNIFF_BYTES = 8192

# (offset, magic bytes, MIME type), checked in order.
_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"%PDF-", "application/pdf"),
    (0, b"\x89PNG\r\n\x1a\n", "image/png"),
    (0, b"\xff\xd8\xff", "image/jpeg"),
    (0, b"GIF87a", "image/gif"),
    (0, b"GIF89a", "image/gif"),
    (0, b"II*\x00", "image/tiff"),
    (0, b"MM\x00*", "image/tiff"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "image/jp2"),
    (128, b"DICM", "application/dicom"),
    (0, b"PK\x03\x04", "application/zip"),
    (0, b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/x-ole-storage"),
    (0, b"\x1f\x8b", "application/gzip"),
    (0, b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
    (0, b"Rar!\x1a\x07", "application/vnd.rar"),
    (0, b"{\\rtf", "application/rtf"),
    (0, b"%!PS", "application/postscript"),
    (0, b"SQLite format 3\x00", "application/vnd.sqlite3"),
    (0, b"ID3", "audio/mpeg"),
    (0, b"OggS", "audio/ogg"),
    (0, b"fLaC", "audio/flac"),
    (0, b"\x1a\x45\xdf\xa3", "video/webm"),
)
_RIFF = {b"WEBP": "image/webp", b"WAVE": "audio/wav", b"AVI ": "video/x-msvideo"}
_FTYP = {
    b"heic": "image/heic",
    b"heix": "image/heic",
    b"mif1": "image/heif",
    b"qt  ": "video/quicktime",
}
# Containers whose real type only the name tells (a .docx is a zip, a .doc an OLE file).
_CONTAINERS = {"application/zip", "application/x-ole-storage"}

# Types some systems' mime.types lack.
_BY_SUFFIX = {
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ".pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    ".odt": "application/vnd.oasis.opendocument.text",
    ".ods": "application/vnd.oasis.opendocument.spreadsheet",
    ".doc": "application/msword",
    ".xls": "application/vnd.ms-excel",
    ".dcm": "application/dicom",
    ".md": "text/markdown",
    ".csv": "text/csv",
    ".json": "application/json",
    ".txt": "text/plain",
}


# Offset-0 signatures by their first byte: one dict lookup instead of a scan.
_BY_FIRST_BYTE: dict[int, tuple[tuple[bytes, str], ...]] = {}
for _offset, _magic, _mime in _SIGNATURES:
    if _offset == 0:
        _BY_FIRST_BYTE[_magic[0]] = (*_BY_FIRST_BYTE.get(_magic[0], ()), (_magic, _mime))
_AT_OFFSET = tuple((o, m, t) for o, m, t in _SIGNATURES if o != 0)


def sniff(head: bytes) -> str | None:
    """The type the first bytes announce, if any."""
    if head:
        for magic, mime in _BY_FIRST_BYTE.get(head[0], ()):
            if head.startswith(magic):
                return mime
    for offset, magic, mime in _AT_OFFSET:
        if head.startswith(magic, offset):
            return mime
    if head[:4] == b"RIFF" and head[8:12] in _RIFF:
        return _RIFF[head[8:12]]
    if head[4:8] == b"ftyp":
        return _FTYP.get(head[8:12], "video/mp4")
    return None


def detect_mime_type(file_name: str, head: bytes) -> str:
    """Guess the MIME type of a file from its first bytes and its name."""
    sniffed = sniff(head)
    by_name = _by_name(_extensions(file_name))
    if sniffed is not None and not (sniffed in _CONTAINERS and by_name):
        return sniffed
    if by_name:
        return by_name
    if sniffed is not None:
        return sniffed
    if _looks_like_text(head):
        return "text/plain"
    return "application/octet-stream"


def _extensions(file_name: str) -> str:
    """The last two extensions of a name ("a.tar.gz" -> ".tar.gz"): all that
    the name-based guess looks at, so the guess can be cached by them."""
    # As two os.path.splitext calls would split it (dots leading the name do not
    # start an extension), in a quarter of the time.
    last = file_name.rfind(".")
    if last <= 0 or file_name[:last].lstrip(".") == "":
        return ""
    before = file_name.rfind(".", 0, last)
    if before <= 0 or file_name[:before].lstrip(".") == "":
        return file_name[last:]
    return file_name[before:]


@functools.lru_cache(maxsize=256)
def _by_name(extensions: str) -> str | None:
    suffix = extensions[extensions.rfind(".") :].lower() if extensions else ""
    return _BY_SUFFIX.get(suffix) or mimetypes.guess_type("x" + extensions, strict=False)[0]


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head[:SNIFF_BYTES]:
        return False
    try:
        head[:SNIFF_BYTES].decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut at the sniff boundary is still text; one cut
        # by the end of the file is not.
        return len(head) > SNIFF_BYTES and exc.reason == "unexpected end of data"
    return True

"""MIME type detection: from the file's content first, then from its name."""

from __future__ import annotations

import mimetypes

# Types that content sniffing cannot tell apart from a plain zip, and that some
# systems' mime.types lack.
_BY_SUFFIX = {
    ".docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    ".xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    ".pptx": "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    ".odt": "application/vnd.oasis.opendocument.text",
    ".ods": "application/vnd.oasis.opendocument.spreadsheet",
    ".dcm": "application/dicom",
    ".md": "text/markdown",
    ".csv": "text/csv",
    ".json": "application/json",
    ".txt": "text/plain",
}
SNIFF_BYTES = 8192


def detect_mime_type(file_name: str, head: bytes) -> str:
    """Guess the MIME type of a file from its first bytes and its name."""
    import filetype

    suffix = "." + file_name.rsplit(".", 1)[-1].lower() if "." in file_name else ""
    sniffed = filetype.guess_mime(head[:SNIFF_BYTES]) if head else None
    if sniffed and not (sniffed == "application/zip" and suffix in _BY_SUFFIX):
        return str(sniffed)
    if suffix in _BY_SUFFIX:
        return _BY_SUFFIX[suffix]
    guessed, _ = mimetypes.guess_type(file_name, strict=False)
    if guessed:
        return guessed
    if _looks_like_text(head):
        return "text/plain"
    return "application/octet-stream"


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

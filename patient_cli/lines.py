"""Error and warning lines for stderr: one line each, safe on a terminal.

Apart from `output` (which imports more) so that the errors reported before the
command line is parsed (argv) are written by the same code as all the others.
"""

from __future__ import annotations

import json
import re

# Bidirectional overrides: U+202E shows the rest of a line reversed, so
# "exe.txt" can pass for "txt.exe".
BIDI = "\u200e\u200f\u202a-\u202e\u2066-\u2069"
# In one line, every control character: a path the user typed may hold a
# newline or an escape sequence.
_LINE_CONTROLS = re.compile(f"[\x00-\x1f\x7f-\x9f{BIDI}]")


def visible(match: re.Match[str]) -> str:
    """A control character as \\xNN or \\uNNNN (for re.sub)."""
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def one_line(text: str) -> str:
    return _LINE_CONTROLS.sub(visible, text)


def error_line(message: str, code: int, kind: str, as_json: bool) -> str:
    """An error as JSON ({"error", "code", "type"}) or as `Error: message`."""
    if as_json:
        return json.dumps({"error": message, "code": code, "type": kind}, ensure_ascii=False)
    return f"Error: {one_line(message)}"

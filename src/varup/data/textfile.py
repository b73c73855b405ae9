"""Strict reading of the text files a user hands the pipeline (captions tables, dolly JSONL, the LM arm's corpus):
decoded as UTF-8 here, so an undecodable byte or a bad line is reported with its file and line and what to do, never
as a bare ``UnicodeDecodeError`` or ``JSONDecodeError``."""
from __future__ import annotations

import codecs
import json
import os
import re
from pathlib import Path

_NEWLINE = re.compile(r"\r\n|\r|\n")  # the line ends of a file opened in text mode (universal newlines)


def read_utf8(path: str | os.PathLike) -> str:
    """The text of ``path`` decoded as UTF-8 (a leading byte-order mark dropped). ValueError naming the file and the
    line and byte column of the first byte that is not UTF-8."""
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{path}, line {line}: byte {data[e.start:e.end]!r} at column {column} is not UTF-8 "
                         f"({e.reason}); save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def text_lines(text: str) -> list[str]:
    """``text`` split at its line ends (\\n, \\r\\n or \\r; not at the other characters ``str.splitlines`` takes, which a
    JSON string may hold as they are), line i + 1 at index i."""
    return _NEWLINE.split(text)


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = ()) -> list[dict]:
    """The JSON objects of a JSONL file, one a line (blank lines skipped), each with the keys ``required``.
    ValueError naming the file and 1-based line for bytes that are not UTF-8, a line that is not JSON (e.g. cut
    short), a value that is not an object or a missing key."""
    out = []
    for lineno, line in enumerate(text_lines(read_utf8(path)), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {lineno}: invalid JSON ({e}); a truncated file? Write it again") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(rec).__name__}")
        missing = [k for k in required if k not in rec]
        if missing:
            raise ValueError(f"{path}, line {lineno}: record has no key(s) {missing} (needs {', '.join(required)})")
        out.append(rec)
    return out


__all__ = ["read_utf8", "text_lines", "read_jsonl"]

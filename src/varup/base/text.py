"""Words of a caption, as the text encoders and the config checks both read them (standard library only)."""
from __future__ import annotations

import re

_WORD = re.compile(r"[a-z0-9\-]+")


def words_of(caption: str) -> list[str]:
    """Lower-case words of a caption (punctuation dropped)."""
    return _WORD.findall(caption.lower())

"""Paths typed by a user: refused when they hold control characters (a newline in a directory name breaks
every shell script, log line and Makefile that later names it)."""
from __future__ import annotations

from pathlib import Path

from mechscope.errors import BadInput


def user_path(text: str, what: str) -> Path:
    """`text` as a Path (~ expanded); BadInput if it is empty or holds a newline or another control character."""
    if not text or not text.strip():
        raise BadInput(f"{what} is empty; pass a path")
    bad = sorted({c for c in text if ord(c) < 32 or ord(c) == 127})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        raise BadInput(f"{what} {text!r} holds control characters ({shown}); use a path without them")
    return Path(text).expanduser()

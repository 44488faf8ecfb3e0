"""Progress bars for long work: tqdm on stderr, shown on a terminal, silent when stderr is a pipe or file."""
from __future__ import annotations

import os
import sys


def progress(iterable=None, total: int | None = None, desc: str = ""):
    """`tqdm(iterable)` on stderr; MECHSCOPE_PROGRESS=1 forces it on, =0 off."""
    from tqdm.auto import tqdm

    forced = os.environ.get("MECHSCOPE_PROGRESS")
    disable = (forced == "0") if forced in ("0", "1") else not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, disable=disable, leave=False)

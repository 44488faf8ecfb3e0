"""Run directories: every command writes into a new directory that no other run can overwrite.

    runs/<command>-<YYYYmmdd-HHMMSS>-<n>/
        result.json   the full result (written atomically: temp file + os.replace)
        meta.json     command, args, model, library versions, seed, device, wall time
        *.png *.html *.csv   plots and tables written by the command
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from mechscope.errors import BadInput

LIBRARIES = ("mechscope", "torch", "transformer-lens", "sae-lens", "nnsight", "transformers", "numpy")


def new_run_dir(out: str | Path, command: str) -> Path:
    """Create and return a fresh directory `out/<command>-<timestamp>[-n]`; never reuses one."""
    root = Path(out)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"cannot create output directory {root}: {e.strerror}; pass --out DIR") from None
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        path = root / (f"{command}-{stamp}" + (f"-{n}" if n else ""))
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise BadInput(f"too many runs named {command}-{stamp} in {root}")


def _default(obj):
    try:
        import torch
        if isinstance(obj, torch.Tensor):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def to_json(obj, indent: int | None = 2) -> str:
    """JSON text for results holding tensors, numpy values and paths."""
    return json.dumps(obj, indent=indent, default=_default)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see either nothing or the whole file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    write_atomic(path, to_json(obj) + "\n")


def write_csv(path: Path, rows: list[dict]) -> None:
    """A CSV table (header from the first row's keys), written atomically."""
    import csv
    import io

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, text.getvalue())


def library_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def metadata_for(command: str, args: dict, started: float, model_info: dict | None = None,
                 argv: list[str] | None = None) -> dict:
    """meta.json: what ran, on which model and library versions, when, and for how long (`started`: time.time())."""
    import time

    return {
        "command": command,
        "argv": ["mechscope", *argv] if argv is not None else sys.argv,
        "args": args,
        "model": model_info,
        "seed": args.get("seed"),
        "versions": library_versions(),
        "platform": platform.platform(),
        "started": _dt.datetime.fromtimestamp(started).astimezone().isoformat(timespec="seconds"),
        "wall_seconds": round(time.time() - started, 3),
    }

"""Run directories: every command writes into a new directory that no other run can overwrite.

    runs/<command>-<YYYYmmdd-HHMMSS>-<n>/
        meta.json     command, args, model, library versions, seed, device, wall time, and "status":
                      "running" while the command runs, then "complete", "failed" (an internal error,
                      with "error") or "interrupted" (Ctrl-C / SIGTERM, with "signal")
        result.json   the full result, written when the command finishes
        *.png *.html *.csv   plots and tables written by the command

The directory is created when the command first writes into it, so a refusal before that (bad input)
leaves nothing; a refusal after it removes the directory again (Run.discard). Every file is written
atomically (temp file + os.replace) with the permissions of an ordinary file (0644 under umask 022).
JSON is strict: NaN and infinities are written as null and listed (`sanitize`), never as bare NaN.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from mechscope.errors import BadInput

LIBRARIES = ("mechscope", "torch", "transformer-lens", "sae-lens", "nnsight", "transformers", "numpy")
STATUSES = ("running", "complete", "failed", "interrupted")


def check_out_dir(out: str | Path) -> list[Path]:
    """BadInput unless `out` is, or can be created as, a writable directory; creates nothing.
    -> the missing folders (deepest first) that creating `out` will add."""
    if str(out).strip() == "":
        raise BadInput("--out is empty; pass a directory for the run directories (default: runs)")
    root = Path(out).expanduser()
    missing, probe = [], root
    while not probe.exists():
        if probe.is_symlink():
            raise BadInput(f"--out {out}: {probe} is a dangling symbolic link; pass another --out DIR")
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise BadInput(f"--out {out}: {probe} is a file, not a directory; pass another --out DIR")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BadInput(f"--out {out}: {probe} is not writable; pass another --out DIR")
    return missing


def new_run_dir(out: str | Path, command: str) -> Path:
    """Create and return a fresh directory `out/<command>-<timestamp>[-n]`; never reuses one."""
    root = Path(out).expanduser()
    check_out_dir(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        for n in range(1000):
            path = root / (f"{command}-{stamp}" + (f"-{n}" if n else ""))
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as e:
        raise BadInput(f"cannot create a run directory in {root}: {e.strerror}; pass another --out DIR") from None
    raise BadInput(f"too many runs named {command}-{stamp} in {root}")


class Run:
    """One command's run directory, from the checks before it exists to its final meta.json status.

    `path` creates the directory on first use and writes meta.json with status "running"; `finish`
    writes result.json and status "complete"; `close(status)` records "failed" / "interrupted";
    `discard` removes the directory (and the --out folders it created) after a refusal."""

    def __init__(self, out: str | Path, command: str, args: dict, argv: list[str] | None = None):
        self.created = check_out_dir(out)
        self.out, self.command, self.args, self.argv = Path(out).expanduser(), command, args, argv
        self.started = time.time()
        self._path: Path | None = None
        self.model_info: dict | None = None

    @property
    def exists(self) -> bool:
        return self._path is not None

    @property
    def path(self) -> Path:
        if self._path is None:
            self._path = new_run_dir(self.out, self.command)
            self.write_meta("running")
        return self._path

    def write_meta(self, status: str, **extra) -> None:
        meta = metadata_for(self.command, self.args, self.started, self.model_info, self.argv)
        write_json(self.path / "meta.json", {"status": status, **meta, **extra})

    def finish(self, result: dict) -> None:
        write_json(self.path / "result.json", result)
        self.write_meta("complete")

    def close(self, status: str, **extra) -> None:
        """Record how a run that did not finish ended (only if its directory exists)."""
        if self._path is not None:
            try:
                self.write_meta(status, **extra)
            except OSError:  # the disk that failed the run may fail this too; the error line still goes out
                pass

    def discard(self) -> None:
        """Remove the run directory and the --out folders made for it: a refused run leaves nothing."""
        if self._path is not None:
            shutil.rmtree(self._path, ignore_errors=True)
            self._path = None
            for folder in self.created:  # deepest first; stops at one that is not empty
                try:
                    folder.rmdir()
                except OSError:
                    break


def sanitize(obj, where: str = "") -> tuple[object, list[tuple[str, int]]]:
    """(a copy of obj fit for strict JSON, [(path, n) of each place where n NaN / infinite values became None]).
    Tensors and numpy arrays become lists, numpy / torch scalars numbers, paths strings."""
    found: list[tuple[str, int]] = []

    def walk(x, path):
        if isinstance(x, float):
            if math.isfinite(x):
                return x
            found.append((path, 1))
            return None
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, dict):
            return {str(k): walk(v, f"{path}.{k}" if path else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, Path):
            return str(x)
        if hasattr(x, "tolist") and len(getattr(x, "shape", ())) > 0:  # a tensor or an array
            undefined = [0]
            values = _finite_or_none(x.tolist(), undefined)
            if undefined[0]:
                found.append((path, undefined[0]))
            return values
        if hasattr(x, "item"):
            return walk(x.item(), path)
        return str(x)

    return walk(obj, where), found


def _finite_or_none(values, undefined: list[int]):
    """Nested lists of numbers with each non-finite float replaced by None (counted in undefined[0])."""
    if isinstance(values, list):
        return [_finite_or_none(v, undefined) for v in values]
    if isinstance(values, float) and not math.isfinite(values):
        undefined[0] += 1
        return None
    return values


def null_note(found: list[tuple[str, int]], limit: int = 6) -> str | None:
    """One line saying where undefined (NaN) or infinite values were written as null, or None."""
    if not found:
        return None
    places: dict[str, int] = {}
    for path, n in found:  # list items under one key count as one place: top[0].value, top[1].value -> top[*].value
        key = re.sub(r"\[\d+\]", "[*]", path) or "(top)"
        places[key] = places.get(key, 0) + n
    listed = ", ".join(f"{p} ({n})" for p, n in list(places.items())[:limit])
    more = f" and {len(places) - limit} more" if len(places) > limit else ""
    return (f"{sum(places.values())} undefined (NaN) or infinite value(s) written as null, at {listed}{more}: "
            f"a value is undefined where its formula divides by zero (e.g. a recovery when clean = corrupted) "
            f"or has nothing to average")


def to_json(obj, indent: int | None = 2) -> str:
    """Strict JSON text for results holding tensors, numpy values and paths (non-finite floats -> null)."""
    return json.dumps(sanitize(obj)[0], indent=indent, allow_nan=False)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see either nothing or the whole file (mode 0666 & ~umask)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def share(path: Path) -> None:
    """Give `path` (a file, or a directory and everything under it) the mode of an ordinary file / folder
    (0666 / 0777 & ~umask): libraries that write through a private temp file (safetensors) leave 0600."""
    mask = _umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def write_json(path: Path, obj) -> None:
    write_atomic(path, to_json(obj) + "\n")


def write_csv(path: Path, rows, header: list[str] | None = None) -> None:
    """A CSV table, written atomically: rows of dicts (the header from the first row's keys), or with `header`
    rows of values in its order (any iterable of sequences)."""
    import csv
    import io

    text = io.StringIO()
    if header is None:
        writer = csv.DictWriter(text, fieldnames=list(rows[0]))
        writer.writeheader()
    else:
        writer = csv.writer(text)
        writer.writerow(header)
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

"""Render the research-repository scaffold in templates/research-repo/ (what `mechscope new` writes).

A `.j2` file is rendered with jinja2 and loses the suffix; any other file is copied; a leading `dot-`
in a name becomes `.`. The repository is written into a temporary sibling directory and renamed
into place, so a failed run never leaves half a repository behind.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from mechscope.errors import BadInput

SCAFFOLD = "research-repo"
DEFAULT_QUESTION = "Which components of the model implement the behaviour under study, and how?"
NAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")  # a valid Python distribution name


def templates_dir() -> Path:
    """templates/ as installed (package data under mechscope/templates) or in a source checkout / skill folder."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parents[1] / "templates"):
        if (candidate / SCAFFOLD).is_dir():
            return candidate
    raise FileNotFoundError(f"mechscope's templates/ folder is missing (looked in {here} and {here.parents[1]})")


def project_name(target: Path, name: str | None) -> str:
    """`name`, or one made from the target folder's name; must be a valid distribution name."""
    if name is None:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", target.resolve().name).strip("-._").lower()
    if not NAME_RE.fullmatch(name or ""):
        raise BadInput(f"{name!r} is not a valid project name: use letters, digits, '-', '_' or '.', "
                       f"starting and ending with a letter or digit (pass --name)")
    return name


def output_path(relative: Path) -> Path:
    parts = [("." + p[4:]) if p.startswith("dot-") else p for p in relative.parts]
    if parts[-1].endswith(".j2"):
        parts[-1] = parts[-1][:-3]
    return Path(*parts)


def render(target: str | Path, name: str | None = None, model: str = "mechscope-toy",
           question: str | None = None) -> list[str]:
    """Write a new research repository at `target` (which must not exist or be empty); return its files."""
    import jinja2

    from mechscope import __version__

    target = Path(target).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BadInput(f"{target} already exists and is not an empty directory; pick a new path")
    if not model or not model.strip():
        raise BadInput("--model is empty; pass a model name or directory (default: mechscope-toy)")
    name = project_name(target, name)
    variables = {"name": name, "model": model, "question": (question or DEFAULT_QUESTION).strip(),
                 "mechscope_version": __version__}
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["quote"] = lambda s: json.dumps(str(s))  # a string literal valid in Python and TOML

    source = templates_dir() / SCAFFOLD
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"cannot create {target.parent}: {e.strerror}; pick another path") from None
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        written = []
        for path in sorted(p for p in source.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            relative = path.relative_to(source)
            out = staging / output_path(relative)
            out.parent.mkdir(parents=True, exist_ok=True)
            if path.suffix == ".j2":
                out.write_text(env.from_string(path.read_text()).render(**variables))
            else:
                shutil.copyfile(path, out)
            written.append(str(output_path(relative)))
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp makes it private
        if target.exists():
            target.rmdir()  # empty (checked above)
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written

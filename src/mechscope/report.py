"""One self-contained HTML page for an investigation: its run directories, in the order given.

    from mechscope.report import write_report
    write_report(["runs/heads-...", "runs/patch-..."], "runs/report.html")

For each run: the command line, model, library versions, seed and wall time (meta.json), the summary
(result.json's "summary") as tables, every PNG embedded as base64, offline HTML pages (attention
viewers) embedded in a sandboxed iframe, and links to its CSVs and other files; a contents list on top.
The page loads nothing from the network: no CDN, no fonts, no scripts of its own. A directory that holds
run directories (such as `runs/`) stands for its runs, oldest first.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from mechscope.errors import BadInput
from mechscope.paths import user_path

GENERATOR = "mechscope report"          # <meta name="generator">: marks a page this module may overwrite
MAX_ROWS = 40                           # rows of a list shown in a summary table (the rest: result.json)
MAX_DEPTH = 3                           # nested tables; deeper values are shown as compact JSON
MAX_TEXT = 400                          # characters of one value
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # never valid in an HTML page
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:|//)|url\(\s*["']?\s*(?:https?:|//)|@import""",
                      re.IGNORECASE)


@dataclass
class Run:
    """One run directory: its meta.json and result.json (either may be missing, not both) and its files."""
    path: Path
    meta: dict = field(default_factory=dict)
    result: dict = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        """The run's own files: never a link that leads out of the run directory."""
        return sorted(p for p in self.path.iterdir()
                      if p.is_file() and not p.name.startswith(".") and inside(p, self.path))

    @property
    def title(self) -> str:
        return f"{self.meta.get('command') or self.path.name.rsplit('-', 2)[0]} — {self.path.name}"


def inside(path: Path, folder: Path) -> bool:
    """Whether `path`, links followed, is in `folder` (a link that leads out of a run directory is not embedded)."""
    return path.resolve().is_relative_to(folder.resolve())


def is_png(path: Path) -> bool:
    """A real PNG file (its signature), not any file named *.png."""
    with open(path, "rb") as f:
        return f.read(8) == PNG_SIGNATURE


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "meta.json").is_file() or (path / "result.json").is_file())


def _read_json(path: Path) -> dict:
    if not path.is_file() or not inside(path, path.parent):
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path} is not valid JSON ({e}); rerun the command that wrote it") from None
    return data if isinstance(data, dict) else {"value": data}


def find_runs(paths: list[str]) -> list[Run]:
    """The runs named by `paths` (run directories, or folders of them), in the order given; BadInput for
    a path that is neither."""
    runs = []
    for text in paths:
        path = user_path(text, "run directory")
        if not path.exists():
            raise BadInput(f"run directory {text} does not exist; pass directories written by mechscope commands")
        if not path.is_dir():
            raise BadInput(f"{text} is not a directory; pass run directories (each holds meta.json / result.json)")
        if is_run_dir(path):
            found = [path]
        else:
            found = [p for p in path.iterdir() if is_run_dir(p) and inside(p, path)]
            if not found:
                raise BadInput(f"{text} is not a run directory (no meta.json or result.json) and holds none; "
                               f"pass directories written by mechscope commands, e.g. runs/patch-...")
            found.sort(key=lambda p: (_read_json(p / "meta.json").get("started") or "", p.name))
        runs += [Run(p, _read_json(p / "meta.json"), _read_json(p / "result.json")) for p in found]
    return runs


# ------------------------------------------------------------------------------------------ values
def _number(x: float) -> str:
    if x != x or x in (float("inf"), float("-inf")):
        return str(x)
    if x == int(x) and abs(x) < 1e15:
        return str(int(x)) if isinstance(x, int) else f"{x:g}"
    return f"{x:.4g}"


def _scalar(v) -> str:
    if v is None:
        return "<i>null</i>"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return _number(v)
    text = str(v)
    if len(text) > MAX_TEXT:
        text = text[:MAX_TEXT] + " …"
    return html.escape(text)


def _is_scalar(v) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))


def _more(n_hidden: int) -> str:
    return f'<p class="more">… {n_hidden} more rows in result.json</p>' if n_hidden > 0 else ""


def value_html(v, depth: int = 0) -> str:
    """A JSON value as HTML: dicts as key / value tables, lists of dicts as tables with one column per key,
    lists of short lists as rows, lists of scalars inline. Bounded in rows, depth and text length."""
    if _is_scalar(v):
        return _scalar(v)
    if depth >= MAX_DEPTH:
        return f"<code>{_scalar(json.dumps(v, separators=(',', ':')))}</code>"
    if isinstance(v, dict):
        if not v:
            return "{}"
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{value_html(x, depth + 1)}</td></tr>" for k, x in v.items())
        return f'<table class="kv">{rows}</table>'
    items = list(v)
    if not items:
        return "[]"
    shown, hidden = items[:MAX_ROWS], len(items) - MAX_ROWS
    if all(_is_scalar(x) for x in items):
        return ", ".join(_scalar(x) for x in shown) + (f" … ({hidden} more)" if hidden > 0 else "")
    if all(isinstance(x, dict) for x in items):
        columns = list(dict.fromkeys(k for x in shown for k in x))
        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{value_html(x.get(c, ''), depth + 1)}</td>" for c in columns) + "</tr>"
                       for x in shown)
        return f'<table class="rows"><tr>{head}</tr>{body}</table>{_more(hidden)}'
    if all(isinstance(x, (list, tuple)) and all(_is_scalar(y) for y in x) for x in items):
        body = "".join("<tr>" + "".join(f"<td>{_scalar(y)}</td>" for y in x) + "</tr>" for x in shown)
        return f'<table class="rows">{body}</table>{_more(hidden)}'
    return "<br>".join(value_html(x, depth + 1) for x in shown) + _more(hidden)


# ------------------------------------------------------------------------------------------ a run
def _relative_link(target: Path, page_dir: Path) -> str:
    """A link from the page to `target`: relative where possible (the folder can be moved together), else file://."""
    try:
        return Path(os.path.relpath(target.resolve(), page_dir.resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return target.resolve().as_uri()


def _facts(run: Run) -> dict:
    meta, model = run.meta, run.meta.get("model") or {}
    argv = meta.get("argv")
    facts = {"command line": shlex.join(map(str, argv)) if isinstance(argv, list) else argv,
             "model": ", ".join(str(x) for x in (model.get("name"), model.get("engine") and f"engine {model['engine']}",
                                                   model.get("n_params") and f"{model['n_params']:,} parameters",
                                                   model.get("device"), model.get("dtype")) if x) or None,
             "seed": meta.get("seed"), "started": meta.get("started"),
             "wall time": f"{meta['wall_seconds']:.1f} s" if isinstance(meta.get("wall_seconds"), (int, float)) else None,
             "status": meta.get("status"),
             "versions": ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items() if v) or None,
             "directory": str(run.path.resolve())}
    return {k: v for k, v in facts.items() if v is not None}


def _embedded_page(path: Path) -> str:
    text = path.read_text(errors="replace")
    if EXTERNAL.search(text):  # it would load from the network: link it instead
        return ""
    return (f'<iframe title="{html.escape(path.name)}" sandbox="allow-scripts" '
            f'srcdoc="{html.escape(text, quote=True)}"></iframe>')


def run_html(run: Run, index: int, page_dir: Path) -> str:
    """The section of the page for one run."""
    facts = "".join(f"<tr><th>{k}</th><td>{f'<code>{html.escape(str(v))}</code>' if k == 'command line' else html.escape(str(v))}"
                    f"</td></tr>" for k, v in _facts(run).items())
    parts = [f'<section id="run-{index}"><h2>{index}. {html.escape(run.title)}</h2>',
             f'<table class="kv facts">{facts}</table>']
    summary = run.result.get("summary", run.result if run.result else None)
    if summary is not None:
        parts.append(f"<h3>Summary</h3>{value_html(summary)}")
    elif not run.result:
        parts.append('<p class="more">no result.json (the run did not finish, or wrote none)</p>')
    files = run.files
    pngs = [p for p in files if p.suffix.lower() == ".png" and is_png(p)]
    for png in pngs:
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(png.name)}">'
                     f"<figcaption>{html.escape(png.name)}</figcaption></figure>")
    for page in (p for p in files if p.suffix.lower() in (".html", ".htm")):
        link = f'<a href="{html.escape(_relative_link(page, page_dir))}">{html.escape(page.name)}</a>'
        frame = _embedded_page(page)
        parts.append(f"<figure>{frame}<figcaption>{link}"
                     f"{'' if frame else ' (not embedded: it loads resources from the network)'}</figcaption></figure>")
    others = [p for p in files if p not in pngs and p.suffix.lower() not in (".html", ".htm")]
    if others:
        links = "".join(f'<li><a href="{html.escape(_relative_link(p, page_dir))}">{html.escape(p.name)}</a> '
                        f"({p.stat().st_size:,} bytes)</li>" for p in others)
        parts.append(f"<h3>Files</h3><ul>{links}</ul>")
    return "".join(parts) + "</section>"


# ------------------------------------------------------------------------------------------ the page
STYLE = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:1em 1.5em;color:#222;line-height:1.4}
h1{font-size:1.5em}h2{font-size:1.2em;border-top:2px solid #ccc;padding-top:.8em;margin-top:2em}h3{font-size:1em}
table{border-collapse:collapse;margin:.3em 0;font-size:13px}th,td{border:1px solid #ddd;padding:2px 6px;
vertical-align:top;text-align:left}th{background:#f4f4f4;font-weight:600}table.kv>tbody>tr>th{width:11em}
table.facts td{word-break:break-all}code{font-size:12px}figure{margin:1em 0}img{max-width:100%;
border:1px solid #eee}iframe{width:100%;height:560px;border:1px solid #ddd}.more{color:#777;font-size:12px}
ol.toc li{margin:.1em 0}
"""


def report_html(runs: list[Run], page_dir: Path, title: str) -> str:
    from mechscope import __version__

    now = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    walls = [_facts(r).get("wall time") for r in runs]
    toc = "".join(f'<li><a href="#run-{i}">{html.escape(r.title)}</a>{f" ({wall})" if wall else ""}</li>'
                  for i, (r, wall) in enumerate(zip(runs, walls), 1))
    total = sum(r.meta.get("wall_seconds") or 0 for r in runs)
    body = "".join(run_html(r, i, page_dir) for i, r in enumerate(runs, 1))
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="generator" content="{GENERATOR} {__version__}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>{len(runs)} runs, {total:.1f} s of compute in all; written {now} by "
            f"mechscope {__version__}. Each section: the command line to rerun it, its summary, its plots; "
            f"full results in each run's result.json.</p>"
            f'<h2 id="contents">Contents</h2><ol class="toc">{toc}</ol>{body}</body></html>\n')
    return CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", page)  # a control character shows as \\xNN


def output_path(out: str | None, runs: list[Run]) -> Path:
    """--out, checked; default: report-<time>.html beside the first run directory."""
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = runs[0].path.parent / f"report-{stamp}.html"
        n = 1
        while path.exists():
            path, n = runs[0].path.parent / f"report-{stamp}-{n}.html", n + 1
        return path
    path = user_path(out, "--out")
    if path.is_dir():
        raise BadInput(f"--out {out} is a directory; pass a file name such as {Path(out) / 'report.html'}")
    if path.exists() and GENERATOR not in path.read_text(errors="replace")[:600]:
        raise BadInput(f"--out {out} exists and is not a mechscope report; pick a new file name")
    if path.parent.exists() and not path.parent.is_dir():
        raise BadInput(f"--out {out}: {path.parent} is not a directory")
    return path


def write_report(paths: list[str], out: str | None = None, title: str | None = None) -> tuple[Path, list[Run]]:
    """Write the page for the runs in `paths` (see the module docstring); return its path and the runs."""
    from mechscope.runs import write_atomic

    runs = find_runs([str(p) for p in paths])
    path = output_path(str(out) if out is not None else None, runs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, report_html(runs, path.parent, title or "mechscope report"))
    except OSError as e:
        raise BadInput(f"cannot write {path}: {e.strerror}; pass --out FILE in a writable directory") from None
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)  # mkstemp made it private; a page is for sharing
    return path, runs

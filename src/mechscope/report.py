"""One self-contained HTML page for an investigation that leads with its findings: the author's notes
(question, conclusions, caveats), then each run's headline, then each run's section, in the order given.

    from mechscope.report import write_report
    write_report(["runs/heads-...", "runs/patch-..."], "runs/report.html", notes="notes.md",
                 captions={"1": "which heads attend where"})

On top: the title, the notes (Markdown rendered by markdown-it-py with raw HTML and images off, so a notes
file can neither inject markup nor load anything) and the contents: per run its command, key arguments
(mode, component, task, n), caption and headline (result.json's summary "headline", written by the command).
Each run's section opens with its caption, headline and key figure (the first PNG its summary names); its
other figures, summary tables, command line / model / versions (meta.json), attention viewers (sandboxed
iframes) and files fold away in <details>. Links are relative to the page, so a folder copied with its page
still works; a print stylesheet prints the findings and key figures only. The page loads nothing from the
network: no CDN, no fonts, no scripts of its own. A directory that holds run directories (such as `runs/`)
stands for its runs, oldest first.
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


def _facts(run: Run, page_dir: Path | None = None) -> dict:
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
             "directory": _relative_link(run.path, page_dir) if page_dir is not None else str(run.path.resolve())}
    return {k: v for k, v in facts.items() if v is not None}


def _embedded_page(path: Path) -> str:
    text = path.read_text(errors="replace")
    if EXTERNAL.search(text):  # it would load from the network: link it instead
        return ""
    return (f'<iframe title="{html.escape(path.name)}" sandbox="allow-scripts" '
            f'srcdoc="{html.escape(text, quote=True)}"></iframe>')


KEY_ARGS = ("task", "mode", "component", "components", "method", "receivers", "circuit", "hook", "architecture",
            "features", "feature", "embedding")        # meta.json args shown beside a run's command
N_KEYS = ("n_pairs", "n_prompts", "n_sequences", "n_test", "n_tokens", "n")   # the summary's n, first found


def _summary(run: Run):
    return run.result.get("summary", run.result if run.result else None)


def key_arguments(run: Run) -> str:
    """'denoise · resid_pre,attn_out · ioi · n=32': the run's key arguments (meta.json) and n (its summary)."""
    args, summary = run.meta.get("args") or {}, _summary(run)
    summary = summary if isinstance(summary, dict) else {}
    parts = [str(args[k]) for k in KEY_ARGS if args.get(k) not in (None, False, "", [])]
    prompts = summary.get("prompts") or summary.get("prompt_set")
    if isinstance(prompts, str) and prompts not in parts + ["pair", "prompts"] and len(prompts) <= 40:
        parts.append(prompts)
    n = next((summary[k] for k in N_KEYS if isinstance(summary.get(k), int) and not isinstance(summary.get(k), bool)),
             None)
    if n is not None:
        parts.append(f"n={n}")
    return " · ".join(parts)


def headline(run: Run) -> str | None:
    summary = _summary(run)
    text = summary.get("headline") if isinstance(summary, dict) else None
    return text if isinstance(text, str) else None


def _named_pngs(value) -> list[str]:
    """File names ending in .png that a summary mentions, in order."""
    if isinstance(value, str):
        return [value] if value.lower().endswith(".png") else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [name for v in value for name in _named_pngs(v)]
    return []


def key_figure(run: Run, pngs: list[Path]) -> Path | None:
    """The run's key figure: the first of its PNGs its summary names, else its first PNG."""
    by_name = {p.name: p for p in pngs}
    named = [by_name[n] for n in _named_pngs(_summary(run)) if n in by_name]
    return (named or pngs or [None])[0]


def _figure(png: Path) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(png.name)}">'
            f"<figcaption>{html.escape(png.name)}</figcaption></figure>")


def run_html(run: Run, index: int, page_dir: Path, caption: str | None = None) -> str:
    """The section of the page for one run: caption, headline, key figure; the rest folded."""
    facts = "".join(f"<tr><th>{k}</th><td>{f'<code>{html.escape(str(v))}</code>' if k == 'command line' else html.escape(str(v))}"
                    f"</td></tr>" for k, v in _facts(run, page_dir).items())
    args = key_arguments(run)
    parts = [f'<section id="run-{index}"><h2>{index}. {html.escape(caption or run.title)}</h2>',
             f'<p class="cmd"><b>{html.escape(str(run.meta.get("command") or run.title))}</b>'
             f'{" · " + html.escape(args) if args else ""} · <span class="dir">{html.escape(run.path.name)}</span></p>']
    if headline(run):
        parts.append(f'<p class="headline">{html.escape(headline(run))}</p>')
    files = run.files
    pngs = [p for p in files if p.suffix.lower() == ".png" and is_png(p)]   # a fake PNG is linked, not embedded
    key = key_figure(run, pngs)
    if key is not None:
        parts.append(f'<div class="key">{_figure(key)}</div>')
    others = [p for p in pngs if p != key]
    if others:
        parts.append(f"<details><summary>{len(others)} more figure{'s' if len(others) > 1 else ''}</summary>"
                     + "".join(_figure(p) for p in others) + "</details>")
    summary = _summary(run)
    if summary is not None:
        table = value_html({k: v for k, v in summary.items() if k != "headline"} if isinstance(summary, dict) else summary)
        parts.append(f"<details><summary>Summary tables (result.json)</summary>{table}</details>")
    elif not run.result:
        parts.append('<p class="more">no result.json (the run did not finish, or wrote none)</p>')
    parts.append(f'<details><summary>Command line, model, versions</summary><table class="kv facts">{facts}</table></details>')
    for page in (p for p in files if p.suffix.lower() in (".html", ".htm")):
        link = f'<a href="{html.escape(_relative_link(page, page_dir))}">{html.escape(page.name)}</a>'
        frame = _embedded_page(page)
        parts.append(f"<details><summary>{html.escape(page.name)}</summary><figure>{frame}<figcaption>{link}"
                     f"{'' if frame else ' (not embedded: it loads resources from the network)'}</figcaption></figure></details>")
    rest = [p for p in files if p not in pngs and p.suffix.lower() not in (".html", ".htm")]
    if rest:
        links = "".join(f'<li><a href="{html.escape(_relative_link(p, page_dir))}">{html.escape(p.name)}</a> '
                        f"({p.stat().st_size:,} bytes)</li>" for p in rest)
        parts.append(f'<details class="files"><summary>Files ({len(rest)})</summary><ul>{links}</ul></details>')
    return "".join(parts) + "</section>"


# ------------------------------------------------------------------------------------------ the page
STYLE = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:1100px;padding:1em 1.5em;color:#222;line-height:1.4}
h1{font-size:1.5em;margin:.3em 0}h2{font-size:1.2em;border-top:2px solid #ccc;padding-top:.8em;margin-top:2em}
h3{font-size:1em}.intro{color:#555;font-size:13px;margin:.2em 0 1em}
.notes{border-left:4px solid #2a6ebb;background:#f5f8fc;padding:.2em 1em;margin:1em 0}.notes h1,.notes h2,
.notes h3{border:0;margin:.6em 0 .2em;padding:0;font-size:1.05em}.notes p,.notes ul,.notes ol{margin:.3em 0}
table{border-collapse:collapse;margin:.3em 0;font-size:13px}th,td{border:1px solid #ddd;padding:2px 6px;
vertical-align:top;text-align:left}th{background:#f4f4f4;font-weight:600}table.kv>tbody>tr>th{width:11em}
table.facts td{word-break:break-all}code{font-size:12px}figure{margin:.6em 0}img{max-width:100%;
border:1px solid #eee}.key img{max-height:520px}iframe{width:100%;height:560px;border:1px solid #ddd}
.more{color:#777;font-size:12px}ol.toc{padding-left:1.8em;margin:.4em 0}ol.toc li{margin:.25em 0}
.cmd{color:#555;font-size:13px;margin:.1em 0}.toc .cmd{display:inline;margin-left:.5em}.headline{font-size:14px;margin:.1em 0}
section .headline{background:#fff8e1;border-left:4px solid #e0a800;padding:.4em .8em;margin:.5em 0}
.dir{color:#999}details{margin:.4em 0}summary{cursor:pointer;color:#2a6ebb;font-size:14px}
@media (max-width:700px){body{padding:.5em .8em}table{font-size:11px}}
@media print{body{max-width:none;padding:0;font-size:11pt}h2{break-after:avoid;margin-top:1em}
details,iframe,.dir{display:none}figure{break-inside:avoid}.key img{max-height:9cm;border:0}
section .headline{break-inside:avoid}a{color:inherit;text-decoration:none}.toc a{color:inherit}}
"""


def notes_html(text: str) -> str:
    """Markdown notes as HTML: CommonMark with raw HTML off (escaped), images off (nothing is loaded) and
    markdown-it's link checks (no javascript: / vbscript: / file: / data: links)."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False, "linkify": False}).disable("image")
    return md.render(text)


def read_notes(path: str) -> str:
    """The notes file's text (UTF-8 Markdown); BadInput for a path that is missing, a directory or not text."""
    from mechscope.inputs import read_text

    return read_text(user_path(path, "--notes"), "--notes file")


def check_captions(captions: dict[str, str], runs: list[Run]) -> dict[int, str]:
    """{RUN: TEXT} -> {run index (1-based): TEXT}; RUN is a position (1, 2, ...) or a run directory's name."""
    out = {}
    names = {r.path.name: i for i, r in enumerate(runs, 1)}
    for key, text in captions.items():
        index = int(key) if key.isdigit() else names.get(key)
        if index is None or not 1 <= index <= len(runs):
            raise BadInput(f"--caption {key}=...: no such run (use its position 1..{len(runs)} or its directory name, "
                           f"e.g. {runs[0].path.name})")
        out[index] = " ".join(text.split())
    return out


def report_html(runs: list[Run], page_dir: Path, title: str, notes: str | None = None,
                captions: dict[int, str] | None = None) -> str:
    from mechscope import __version__

    captions = captions or {}
    now = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    toc = []
    for i, r in enumerate(runs, 1):
        args, line = key_arguments(r), headline(r)
        command = html.escape(str(r.meta.get("command") or r.title))
        caption = f" — {html.escape(captions[i])}" if i in captions else ""
        toc.append(f'<li><a href="#run-{i}"><b>{command}</b></a>'
                   f'{f"<span class=cmd>{html.escape(args)}</span>" if args else ""}{caption}'
                   f'{f"<div class=headline>{html.escape(line)}</div>" if line else ""}</li>')
    total = sum(r.meta.get("wall_seconds") or 0 for r in runs)
    body = "".join(run_html(r, i, page_dir, captions.get(i)) for i, r in enumerate(runs, 1))
    notes_part = f'<div class="notes">{notes_html(notes)}</div>' if notes and notes.strip() else ""
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="generator" content="{GENERATOR} {__version__}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{notes_part}"
            f'<h2 id="contents">Findings</h2><ol class="toc">{"".join(toc)}</ol>'
            f'<p class="intro">{len(runs)} runs, {total:.1f} s of compute in all; written {now} by mechscope '
            f"{__version__}. Each run: its headline (the finding, 95% interval, n) and key figure; its tables, "
            f"command line and files fold out below; full results in each run's result.json.</p>"
            f"{body}</body></html>\n")
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


def write_report(paths: list[str], out: str | None = None, title: str | None = None, notes: str | None = None,
                 captions: dict[str, str] | None = None) -> tuple[Path, list[Run]]:
    """Write the page for the runs in `paths` (see the module docstring), with the Markdown file `notes` on top
    and `captions` {position or run directory name: text}; return its path and the runs."""
    from mechscope.runs import write_atomic

    runs = find_runs([str(p) for p in paths])
    notes_text = read_notes(notes) if notes is not None else None
    by_index = check_captions(captions or {}, runs)
    path = output_path(str(out) if out is not None else None, runs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, report_html(runs, path.parent, title or "mechscope report", notes_text, by_index))
    except OSError as e:
        raise BadInput(f"cannot write {path}: {e.strerror}; pass --out FILE in a writable directory") from None
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)  # mkstemp made it private; a page is for sharing
    return path, runs

"""`mechscope report`: one self-contained offline HTML page for an investigation.

Known answers: the page holds exactly the runs given, in that order; each embedded image decodes to the
very bytes of the run's PNG; each run's command line, model, versions, wall time and summary numbers are
on it; every link resolves; no markup points outside the page. Then in a real browser (Debian's headless
Chromium; installed here when missing and possible, else skipped with the reason): every <img> decodes
(natural width > 0) and the page makes no network request (Chromium's own NetLog, page-initiated requests
only), with a control page that makes two requests to show the check can fail; a screenshot is written.
"""
import base64
import contextlib
import html.parser
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mechscope.cli import main
from mechscope.report import GENERATOR, value_html

ROOT = Path(__file__).resolve().parents[1]
LOUVRE = ["patch", "--clean", "The Louvre is in the city of", "--corrupted", "The Colosseum is in the city of",
          "--answer", "paris", "--wrong", "rome", "--component", "resid_pre"]


def run_command(argv, out) -> Path:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main([*argv, "--out", str(out), "--json"]) == 0
    return Path(json.loads(stdout.getvalue())["run_dir"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three real run directories: dla (PNGs + CSV), heads (PNGs, CSV, an offline attention page), patch."""
    out = tmp_path_factory.mktemp("investigation")
    return [run_command(argv, out) for argv in (["heads", "--n-sequences", "8"], ["dla"], LOUVRE)]


class Page(html.parser.HTMLParser):
    """The parts of a report page the tests read: sections, contents links, images, links, iframes, text."""
    def __init__(self, text):
        super().__init__()
        self.sections, self.toc, self.images, self.links, self.frames, self._in = [], [], [], [], [], None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append({"id": a["id"], "text": "", "images": [], "links": [], "frames": []})
        current = self.sections[-1] if self.sections else None
        if tag == "a" and a.get("href", "").startswith("#run-"):
            self.toc.append(a["href"][1:])
        elif tag == "a":
            self.links.append(a["href"])
            current and current["links"].append(a["href"])
        if tag == "img":
            self.images.append(a["src"])
            current and current["images"].append(a["src"])
        if tag == "iframe":
            self.frames.append(a)
            current and current["frames"].append(a)

    def handle_data(self, data):
        if self.sections:
            self.sections[-1]["text"] += data


def report(capsys, *argv):
    code = main(["report", *map(str, argv), "--json"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_page_holds_every_run_in_the_order_given(runs, tmp_path, capsys):
    order = [runs[2], runs[0], runs[1]]
    code, out, err = report(capsys, *order, "--out", tmp_path / "inv.html", "--title", "IOI <study>")
    assert code == 0, err
    summary = json.loads(out)["summary"]
    assert summary["runs"] == 3 and summary["report"] == str((tmp_path / "inv.html").resolve())
    text = (tmp_path / "inv.html").read_text()
    assert "<title>IOI &lt;study&gt;</title>" in text and f'<meta name="generator" content="{GENERATOR}' in text
    page = Page(text)
    assert [s["id"] for s in page.sections] == page.toc == ["run-1", "run-2", "run-3"]
    for section, run_dir in zip(page.sections, order):
        meta = json.loads((run_dir / "meta.json").read_text())
        assert run_dir.name in section["text"]
        assert shlex.join(meta["argv"]) in section["text"]                     # the command line to rerun it
        assert "mechscope-toy" in section["text"] and f"torch {meta['versions']['torch']}" in section["text"]
        assert f"{meta['wall_seconds']:.1f} s" in section["text"]
        # every PNG of the run, embedded byte for byte: the key figure (the first its summary names) first,
        # then the others in name order
        pngs = sorted(p for p in run_dir.iterdir() if p.suffix == ".png")
        summary = json.dumps(json.loads((run_dir / "result.json").read_text())["summary"])
        key = min((p for p in pngs if f'"{p.name}"' in summary), key=lambda p: summary.index(f'"{p.name}"'))
        assert [base64.b64decode(src.split(",", 1)[1]) for src in section["images"]] == \
            [p.read_bytes() for p in [key] + [p for p in pngs if p != key]]
        assert all(src.startswith("data:image/png;base64,") for src in section["images"])
        # links to its CSVs (and the other files), relative to the page, that resolve
        csvs = {p.name for p in run_dir.iterdir() if p.suffix == ".csv"}
        assert csvs and csvs <= {Path(h).name for h in section["links"]}
        for href in section["links"]:
            assert not re.match(r"[a-z]+:", href) and (tmp_path / href).resolve().is_file(), href


NOTES = """## Question
Which heads carry <b>IOI</b>?

## Conclusions
- **L2H1** copies the name.
- <script>alert(1)</script> [click](javascript:alert(1)) ![remote](http://example.invalid/a.png)
"""


def test_the_page_leads_with_notes_and_every_runs_headline(runs, tmp_path, capsys):
    notes = tmp_path / "notes.md"
    notes.write_text(NOTES)
    page_file = tmp_path / "r.html"
    code, _, err = report(capsys, *runs, "--out", page_file, "--notes", notes, "--caption", "2=direct attribution",
                          "--caption", f"{runs[2].name}=the Louvre pair")
    assert code == 0, err
    text = page_file.read_text()
    summaries = [json.loads((r / "result.json").read_text())["summary"] for r in runs]
    # the notes, rendered: Markdown structure kept, raw HTML shown as text, no script, no javascript: link,
    # no image (nothing loaded)
    notes_html = text[text.index('<div class="notes">'):text.index('<h2 id="contents">')]
    assert "<h2>Question</h2>" in notes_html and "<strong>L2H1</strong>" in notes_html
    assert "&lt;b&gt;IOI&lt;/b&gt;" in notes_html and "&lt;script&gt;" in notes_html
    assert "<script" not in notes_html and "javascript:" not in notes_html.replace("[click](javascript:", "")
    assert "<img" not in notes_html
    # then the contents: every run's command, key arguments, n, caption and headline, before any run section
    contents = text[text.index('<h2 id="contents">'):text.index('<section')]
    assert [h for h in Page(contents).toc] == ["run-1", "run-2", "run-3"]
    for summary in summaries:
        assert html_escape(summary["headline"]) in contents
    assert "patch</b></a><span class=cmd>denoise · resid_pre · n=1</span> — the Louvre pair" in contents
    assert "dla</b></a><span class=cmd>n=1</span> — direct attribution" in contents
    # each section: caption, command, headline, then the key figure, then the folded rest
    page = Page(text)
    for section, summary in zip(page.sections, summaries):
        assert section["text"].index(summary["headline"]) < section["text"].index(".png")
    louvre = text[text.index('<section id="run-3">'):]
    assert louvre.index("the Louvre pair") < louvre.index('class="headline"') < louvre.index("<img") \
        < louvre.index("<details>")
    assert louvre.index("<details><summary>Summary tables") < louvre.index("<table")      # tables fold away
    assert "@media print" in text


def html_escape(text):
    import html

    return html.escape(text)


@pytest.mark.parametrize("argv, message", [
    (["--notes", "missing.md"], "does not exist"),
    (["--caption", "9=nope"], "no such run"),
    (["--caption", "no equals sign"], "write RUN=TEXT"),
])
def test_bad_notes_and_captions_exit_2_before_writing(runs, tmp_path, capsys, argv, message):
    argv = [str(tmp_path / a) if a.endswith(".md") else a for a in argv]
    code, stdout, err = report(capsys, runs[1], "--out", tmp_path / "r.html", *argv)
    assert code == 2 and stdout == "" and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r.html").exists()


def test_summaries_become_tables_with_the_runs_numbers(runs, tmp_path, capsys):
    assert report(capsys, *runs, "--out", tmp_path / "r.html")[0] == 0
    page = Page((tmp_path / "r.html").read_text())
    heads, dla, patch = (s["text"] for s in page.sections)
    dla_summary = json.loads((runs[1] / "result.json").read_text())["summary"]
    assert f"{dla_summary['model_value']:.4g}" in dla and "sum_of_parts" in dla
    assert "L2H1" in heads and "induction" in heads
    assert "2 louvre" in patch and "recovery" in patch
    # the heads run's offline attention viewer is embedded, sandboxed, and linked
    (frame,) = page.sections[0]["frames"]
    assert frame["sandbox"] == "allow-scripts" and "attention of" in frame["srcdoc"]
    assert "attention.html" in {Path(h).name for h in page.sections[0]["links"]}


def test_nothing_on_the_page_points_outside_it(runs, tmp_path, capsys):
    assert report(capsys, *runs, "--out", tmp_path / "r.html")[0] == 0
    text = (tmp_path / "r.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", text, re.I)
    assert "<link" not in text and "<script src" not in text and "@import" not in text


def test_values_are_escaped_and_bounded():
    assert "&lt;script&gt;" in value_html({"x": "<script>alert(1)</script>"}) and "<script>" not in value_html("<script>")
    rows = value_html([{"head": f"L0H{i}", "score": i / 3} for i in range(100)])
    assert rows.count("<tr>") == 41 and "60 more rows in result.json" in rows and "0.3333" in rows
    assert value_html({"a": {"b": {"c": {"d": [1, 2]}}}}).count("<table") == 3      # deeper: compact JSON
    assert value_html([[1, 2.5], [3, None]]).count("<tr>") == 2 and value_html(True) == "true"


def test_a_folder_of_runs_stands_for_its_runs_oldest_first(runs, tmp_path, capsys):
    code, out, err = report(capsys, runs[0].parent, "--out", tmp_path / "all.html")
    assert code == 0, err
    sections = Page((tmp_path / "all.html").read_text()).sections
    started = sorted((json.loads((r / "meta.json").read_text())["started"], r.name) for r in runs)
    assert len(sections) == 3 and all(name in s["text"] for (_, name), s in zip(started, sections))


def test_rewriting_its_own_page_is_allowed_and_the_default_path_is_new(runs, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert report(capsys, runs[1], "--out", out)[0] == 0
    assert report(capsys, runs[2], "--out", out)[0] == 0
    assert runs[2].name in out.read_text() and runs[1].name not in out.read_text()
    code, stdout, _ = report(capsys, runs[1])
    default = Path(json.loads(stdout)["summary"]["report"])
    assert default.parent == runs[1].parent.resolve() and default.name.startswith("report-") and default.is_file()
    assert oct(default.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    default.unlink()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("file", "is not a directory"),
    ("empty", "is not a run directory"),
    ("bad-json", "is not valid JSON"),
    ("newline", "control characters"),
    ("out-dir", "is a directory"),
    ("out-under-file", "is not a directory"),
    ("out-foreign", "exists and is not a mechscope report"),
    ("out-control", "control characters"),
])
def test_bad_input_exits_2_with_one_line(runs, tmp_path, capsys, case, message):
    run, out = runs[1], tmp_path / "r.html"
    if case == "missing":
        run = tmp_path / "nope"
    elif case == "file":
        run = tmp_path / "a.txt"
        run.write_text("x")
    elif case == "empty":
        run = tmp_path / "empty"
        run.mkdir()
    elif case == "bad-json":
        run = tmp_path / "broken-run"
        run.mkdir()
        (run / "result.json").write_text("{not json")
    elif case == "newline":
        run = f"{runs[1]}\nx"
    elif case == "out-dir":
        out = tmp_path
    elif case == "out-under-file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "r.html"
    elif case == "out-foreign":
        out.write_text("<html>my own notes</html>")
    elif case == "out-control":
        out = f"{tmp_path}/r\x1b.html"
    code, stdout, err = report(capsys, run, "--out", out)
    assert code == 2 and stdout == ""
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    if case == "out-foreign":
        assert Path(out).read_text() == "<html>my own notes</html>"
    assert not (tmp_path / "r.html").exists() or case == "out-foreign"


# ------------------------------------------------------------------------------------ in a real browser
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-extensions", "--mute-audio"]
CHECKER = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images), out = document.createElement("pre");
  out.id = "mechscope-check";
  out.textContent = JSON.stringify({images: images.length,
    undecoded: images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.src.slice(0, 80); }),
    resources: performance.getEntriesByType("resource").map(function (e) { return e.name; }),
    // what the first screen shows: the notes' blocks and the contents' headlines wholly above the fold
    first_screen: Array.prototype.slice.call(document.querySelectorAll(".notes > *, .toc .headline"))
      .filter(function (e) { return e.getBoundingClientRect().bottom <= window.innerHeight; })
      .map(function (e) { return e.textContent; }), height: window.innerHeight});
  document.body.appendChild(out);
});
</script>"""


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium; installed with apt-get when missing and this runs as root, else the test skips."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None and shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        for argv in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            subprocess.run(argv, capture_output=True, timeout=900, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        path = shutil.which("chromium")
    if path is None:
        pytest.skip("no headless Chromium: `apt-get install chromium` (Debian) could not be run here")
    return path


def _chromium(chromium, tmp, *args):
    profile = tmp / "chromium-profile"
    shutil.rmtree(profile, ignore_errors=True)
    return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)


def page_requests(netlog: Path) -> list[str]:
    """URLs the page itself asked for: NetLog URL_REQUEST_START_JOB events whose initiator is the page
    (Chromium's own background requests say "not an origin")."""
    text = netlog.read_text().rstrip()
    log = json.loads(text if text.endswith("}") else text.rstrip(",") + "]}")   # a log cut at exit lacks its end
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = {}
    for event in log["events"]:
        if "url" in event.get("params", {}):
            urls.setdefault(event["source"]["id"], event["params"]["url"])
    return [urls.get(e["source"]["id"], "?") for e in log["events"] if e["type"] == start_job
            and e.get("params", {}).get("initiator", "not an origin") != "not an origin"]


def browser_check(chromium, page: Path, tmp: Path, window: str = "1280,800") -> dict:
    """Open `page` in headless Chromium from file://, offline, in a window of `window` pixels: what its <img>s
    and the network did, and which notes and headlines the first screen shows."""
    probe = page.with_name(page.stem + ".check.html")            # beside it: the same relative links
    text = page.read_text()
    probe.write_text(text.replace("</body>", CHECKER + "</body>") if "</body>" in text else text + CHECKER)
    netlog = tmp / "netlog.json"
    try:
        done = _chromium(chromium, tmp, f"--log-net-log={netlog}", "--virtual-time-budget=20000", "--dump-dom",
                         f"--window-size={window}", probe.as_uri())
    finally:
        probe.unlink()
    found = re.search(r'<pre id="mechscope-check">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the checker did not run (exit {done.returncode}): {done.stderr[-1500:]}"
    import html as html_module

    return json.loads(html_module.unescape(found.group(1))) | {"page_requests": page_requests(netlog)}


SIZES = {"desktop": "1280,800", "laptop": "1024,768", "phone": "390,844", "long": "1200,2400"}   # window sizes


def screenshot(chromium, page: Path, png: Path, tmp: Path, window: str = SIZES["long"]) -> None:
    done = _chromium(chromium, tmp, f"--screenshot={png}", f"--window-size={window}", page.as_uri())
    assert png.is_file() and png.stat().st_size > 10_000, done.stderr[-1500:]
    import matplotlib.image

    pixels = matplotlib.image.imread(str(png))
    assert pixels.std() > 0.05          # not a blank page


def assert_opens_offline(chromium, page: Path, tmp: Path, n_images: int) -> dict:
    seen = browser_check(chromium, page, tmp)
    assert seen["images"] == n_images and seen["undecoded"] == [], seen
    assert seen["resources"] == [] and seen["page_requests"] == [], seen
    return seen


def screenshots(chromium, page: Path, tmp: Path) -> list[Path]:
    """A screenshot per window size (SIZES), beside the page: <page>-<size>.png; printed for the test's output."""
    shots = []
    for name, window in SIZES.items():
        screenshot(chromium, page, page.with_name(f"{page.stem}-{name}.png"), tmp, window)
        shots.append(page.with_name(f"{page.stem}-{name}.png"))
    print("screenshots:", *shots)
    return shots


def printed_pages(chromium, page: Path, tmp: Path) -> int:
    """Pages of the page printed to PDF by Chromium (with the print stylesheet)."""
    pdf = tmp / f"{page.stem}.pdf"
    _chromium(chromium, tmp, f"--print-to-pdf={pdf}", "--no-pdf-header-footer", page.as_uri())
    return len(re.findall(rb"/Type\s*/Page\b(?!s)", pdf.read_bytes()))


def assert_first_screen_shows_the_findings(seen: dict, notes: str, headlines: list[str]) -> None:
    """The first screen (1280 x 800) shows the notes' question and conclusions and headlines with intervals."""
    shown = " ".join(seen["first_screen"])
    assert seen["height"] >= 600, seen["height"]
    for block in ("Question", "Conclusions"):
        assert block in seen["first_screen"], seen["first_screen"]
    first_conclusion = notes.split("## Conclusions")[1].split("\n")[1].lstrip("- ").replace("**", "")[:25]
    assert first_conclusion in shown, (first_conclusion, shown)
    visible = [h for h in headlines if h in seen["first_screen"]]
    assert len(visible) >= 2 and any(re.search(r"\[[-+]?\d+\.\d+, [-+]?\d+\.\d+\]", h) for h in visible), visible


def test_report_opens_offline_in_headless_chromium(chromium, runs, tmp_path, capsys):
    page, notes = tmp_path / "report.html", tmp_path / "notes.md"
    notes.write_text(NOTES)
    assert report(capsys, *runs, "--out", page, "--notes", notes)[0] == 0
    n_png = sum(1 for r in runs for p in r.iterdir() if p.suffix == ".png")
    seen = assert_opens_offline(chromium, page, tmp_path, n_png)
    headlines = [json.loads((r / "result.json").read_text())["summary"]["headline"] for r in runs]
    assert_first_screen_shows_the_findings(seen, NOTES, headlines)
    with capsys.disabled():
        screenshots(chromium, page, tmp_path)
    assert 1 <= printed_pages(chromium, page, tmp_path) <= 4          # findings and key figures; folds left out
    # the control: the same check sees a page that loads two images from the network
    control = tmp_path / "control.html"
    control.write_text('<html><body><img src="http://example.invalid/a.png"><img src="https://example.invalid/b.png">'
                       '<img src="data:image/gif;base64,R0lGODlhAQABAAAAACw=">')
    seen = browser_check(chromium, control, tmp_path)
    assert len(seen["undecoded"]) >= 2 and sorted(seen["page_requests"]) == ["http://example.invalid/a.png",
                                                                             "https://example.invalid/b.png"], seen


@pytest.mark.slow
def test_the_demo_ends_with_a_report_that_opens_offline(chromium, tmp_path):
    """`make demo` (python -m mechscope.demo): every technique, then one page; its last line is the page's path."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg", PYTHONPATH=str(ROOT / "src"))
    demo = subprocess.run([sys.executable, "-m", "mechscope.demo", "--out", str(tmp_path / "runs")], env=env,
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert demo.returncode == 0, demo.stderr[-3000:]
    last = demo.stdout.strip().splitlines()[-1]
    assert last.startswith("report: ")
    page = Path(last.removeprefix("report: "))
    assert page == (tmp_path / "runs" / "demo-report.html").resolve()
    run_dirs = [p for p in (tmp_path / "runs").iterdir() if (p / "meta.json").is_file()]
    assert len(Page(page.read_text()).sections) == len(run_dirs) >= 15
    seen = assert_opens_offline(chromium, page, tmp_path, sum(1 for r in run_dirs for p in r.glob("*.png")))
    from mechscope.demo import NOTES as DEMO_NOTES, STEPS

    headlines = [json.loads((r / "result.json").read_text())["summary"]["headline"] for r in run_dirs]
    assert_first_screen_shows_the_findings(seen, DEMO_NOTES, headlines)
    text = page.read_text()
    assert all(f"— {html_escape(title)}" in text for title, _ in STEPS)     # each step's caption
    screenshots(chromium, page, tmp_path)

"""One self-contained offline HTML page for an investigation that leads with what it found: your notes
(the question, the conclusions, the caveats), then every run's headline (the finding with its 95% interval
and n, written by the command) with its command and key arguments, then a section per run in the order
given: caption, headline, key figure; its other plots, summary tables, command line, model, versions and
links to its CSVs fold away (<details>).

    mechscope report runs/heads-20261201-083135 runs/patch-20261201-083143 --out study.html
    mechscope report runs --notes notes.md --caption 1="which heads attend where" --caption 2="IOI, 64 prompts"
    mechscope report runs                       # every run directory under runs/, oldest first

--notes FILE.md is Markdown (CommonMark; raw HTML is shown as text and images are not loaded). Opens offline
(no CDN, nothing fetched): PNGs are embedded as base64, offline HTML pages (attention viewers) in a
sandboxed iframe; CSVs and other files are linked relative to the page, so keep the page beside the run
directories or move them together. Prints as a few pages (findings and key figures; folded parts are left
out). Default --out: report-<time>.html beside the first run directory. Refuses to overwrite a file that is
not a mechscope report.
"""
HELP = "one self-contained offline HTML page from run directories"
USES_MODEL = False
WRITES_RUN = False


def add_arguments(parser):
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories written by mechscope commands (or folders of them), in page order")
    parser.add_argument("--out", help="the HTML file to write (default: report-<time>.html beside the first run)")
    parser.add_argument("--title", help="the page's title (default: mechscope report)")
    parser.add_argument("--notes", metavar="FILE.md",
                        help="Markdown shown on top: the question, the conclusions, the caveats")
    parser.add_argument("--caption", action="append", default=[], metavar="RUN=TEXT",
                        help="a caption for one run: RUN is its position (1, 2, ...) or its directory name; repeatable")


def run(ctx):
    from mechscope.report import write_report

    from mechscope.errors import BadInput

    captions = {}
    for item in ctx.args.caption:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or not text.strip():
            raise BadInput(f"--caption {item!r}: write RUN=TEXT, RUN the run's position (1, 2, ...) or directory name")
        captions[key.strip()] = text
    path, runs = write_report(ctx.args.run_dirs, ctx.args.out, ctx.args.title, ctx.args.notes, captions)
    size = path.stat().st_size
    summary = {"report": str(path.resolve()), "runs": len(runs), "bytes": size}
    return {"summary": summary, "text": f"report: {path.resolve()} ({len(runs)} runs, {size / 1e6:.1f} MB)"}


def headline(summary: dict) -> str:
    """The first line of the text output: the page and its size."""
    return f"report: {summary['report']} ({summary['runs']} runs, {summary['bytes'] / 1e6:.1f} MB)"

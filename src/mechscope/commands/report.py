"""One self-contained HTML page for an investigation: every run's command line, model, versions and wall
time, its summary as tables, its plots embedded, links to its CSVs - in the order given, with contents.

    mechscope report runs/heads-20261201-083135 runs/patch-20261201-083143 --out study.html
    mechscope report runs                       # every run directory under runs/, oldest first

Opens offline (no CDN, nothing fetched): PNGs are embedded as base64, offline HTML pages (attention
viewers) in a sandboxed iframe; CSVs and other files are linked relative to the page, so keep the page
beside the run directories or move them together. Default --out: report-<time>.html beside the first
run directory. Refuses to overwrite a file that is not a mechscope report.
"""
HELP = "one self-contained offline HTML page from run directories"
USES_MODEL = False
WRITES_RUN = False


def add_arguments(parser):
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run directories written by mechscope commands (or folders of them), in page order")
    parser.add_argument("--out", help="the HTML file to write (default: report-<time>.html beside the first run)")
    parser.add_argument("--title", help="the page's title (default: mechscope report)")


def run(ctx):
    from mechscope.report import write_report

    path, runs = write_report(ctx.args.run_dirs, ctx.args.out, ctx.args.title)
    size = path.stat().st_size
    summary = {"report": str(path.resolve()), "runs": len(runs), "bytes": size}
    return {"summary": summary, "text": f"report: {path.resolve()} ({len(runs)} runs, {size / 1e6:.1f} MB)"}


def headline(summary: dict) -> str:
    """The first line of the text output: the page and its size."""
    return f"report: {summary['report']} ({summary['runs']} runs, {summary['bytes'] / 1e6:.1f} MB)"

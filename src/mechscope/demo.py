"""`make demo`: every vetted technique once on the bundled model, offline, each into its own run directory,
then one HTML page with all of them (`mechscope report` with NOTES on top and each step's title as its
caption): <out>/demo-report.html.

    python -m mechscope.demo [--out runs]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

IOI = "When Mary and John went to the store, John gave a drink to"

STEPS = [
    ("what this machine can run", ["detect", "--model", "mechscope-toy"]),
    ("the bundled model's predictions", ["predict"]),
    ("the bundled model's measured circuits", ["model-card"]),
    ("attention heads: patterns and scores", ["heads"]),
    ("QK / OV circuits and composition", ["circuits", "--embedding", "effective"]),
    ("logit lens on IOI", ["logit-lens", "--prompt", IOI, "--target", "mary", "--target", "john"]),
    ("tuned lens vs logit lens", ["tuned-lens", "--steps", "50"]),
    ("direct logit attribution on IOI", ["dla"]),
    ("activation patching, IOI", ["patch"]),
    ("activation patching, Louvre / Colosseum", ["patch", "--clean", "The Louvre is in the city of",
                                                 "--corrupted", "The Colosseum is in the city of",
                                                 "--answer", "paris", "--wrong", "rome", "--component", "resid_pre"]),
    ("attribution patching vs exact", ["attribution-patch"]),
    ("path patching: prev-token -> induction (k)", ["path-patch", "--task", "induction", "--receivers", "2.1:k"]),
    ("ablation of every head", ["ablate", "--components", "heads", "--method", "zero,mean", "--n", "16"]),
    ("validating the induction circuit", ["validate-circuit", "--circuit", "0.1,1.2,2.1,2.2", "--n", "16"]),
    ("linear probes for sentiment", ["probe", "--task", "sentiment", "--n", "200"]),
    ("steering with love - hate", ["steer", "--strengths", "0,4"]),
]
# the page's order: the findings of the notes' conclusions first (induction, IOI, steering), the machine last
REPORT_ORDER = [
    "attention heads: patterns and scores", "path patching: prev-token -> induction (k)", "ablation of every head",
    "validating the induction circuit", "logit lens on IOI", "direct logit attribution on IOI",
    "activation patching, IOI", "activation patching, Louvre / Colosseum", "attribution patching vs exact",
    "steering with love - hate", "linear probes for sentiment", "QK / OV circuits and composition",
    "tuned lens vs logit lens", "the bundled model's measured circuits", "the bundled model's predictions",
    "what this machine can run"]
# the page's notes (demo-notes.md): claims only; every number is in the runs' headlines below them
NOTES = """## Question
What does each vetted technique find in `mechscope-toy`, the bundled 3-layer model, and do they agree?

## Conclusions
- **Induction** runs from previous-token heads (L0H1, L1H2) into induction heads (L2H1, L2H2): head scores,
  path patching, ablation and the circuit's validation agree.
- **IOI**: the answer becomes the residual stream's top token after layer 2's attention (logit lens), and
  layer 2's MLP writes most of the logit difference directly (DLA).
- **Steering** negative prompts along love - hate moves them toward positive, beyond every random direction
  of the same norm.

## Caveats
One small model trained for these tasks. Runs on the single IOI example (patching, DLA, logit lens) have no
interval. Each headline is written by its command from its own summary; this page only lays them out.
"""

def main(argv: list[str] | None = None) -> int:
    from mechscope.cli import _command_module, main as cli

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs")
    args = parser.parse_args(argv)
    start = time.time()
    rows = []
    for title, command in STEPS:
        t0 = time.time()
        buffer = StringIO()
        writes_run = getattr(_command_module(command[0]), "WRITES_RUN", True)
        with redirect_stdout(buffer):
            code = cli([*command, "--json"] + (["--out", args.out] if writes_run else []))
        if code != 0:
            print(f"demo step failed ({code}): mechscope {' '.join(command)}", file=sys.stderr)
            return code
        run_dir = json.loads(buffer.getvalue())["run_dir"]
        rows.append((title, "mechscope " + " ".join(command), run_dir, time.time() - t0))
        print(f"[{time.time() - start:5.1f}s] {title}: {run_dir or '(printed only)'}", file=sys.stderr)
    study = Path(args.out) / f"study-{time.strftime('%Y%m%d-%H%M%S')}"
    with redirect_stdout(StringIO()):
        code = cli(["new", str(study), "--json"])
    if code != 0:
        return code
    rows.append(("a new research repo (mechscope new)", f"mechscope new {study}", str(study), 0.0))
    report = Path(args.out) / "demo-report.html"
    notes = Path(args.out) / "demo-notes.md"
    notes.write_text(NOTES)
    shown = [(title, run_dir) for title, _, run_dir, _ in rows[:-1] if run_dir]
    order = {title: i for i, title in enumerate(REPORT_ORDER)}
    shown.sort(key=lambda item: order[item[0]])
    captions = [f"--caption={i}={title}" for i, (title, _) in enumerate(shown, 1)]
    with redirect_stdout(StringIO()):
        code = cli(["report", *(run_dir for _, run_dir in shown), "--out", str(report), "--notes", str(notes),
                    *captions, "--title", "mechscope demo: every technique on the bundled model"])
    if code != 0:
        return code
    print(f"\nmechscope demo: {len(rows)} runs in {time.time() - start:.0f} s. Results:")
    for title, command, run_dir, seconds in rows:
        print(f"  {title:<44} {run_dir or '-'}")
    print(f"Each run directory holds result.json, meta.json and plots; re-run one with the command in its meta.json.\n"
          f"Everything is under {Path(args.out).resolve()}. One page with every run (open it in a browser):\n"
          f"report: {report.resolve()}")
    return 0

if __name__ == "__main__":
    sys.exit(main())

"""Every run says what it found: each command's `headline(summary)` (beside its summary) states the finding in
one sentence with its number, 95% interval and n, read from the summary's own fields; the cli puts it first in
the summary, in --json and in the text output, and keeps --json under MAX_STDOUT_CHARS.

Known answers: the headline's numbers are the summary's (a summary edited by hand gives the edited numbers);
noise-mode patching names the cell farthest from 1 (no effect), not the largest value; every demo step's
headline carries its summary's n and, where it has one, an interval, and its --json is under 16 KB.
"""
import contextlib
import importlib
import io
import json
import re

import pytest

from mechscope import findings
from mechscope.cli import COMMANDS, MAX_STDOUT_CHARS, bounded, main
from mechscope.demo import STEPS


def test_every_command_defines_a_headline_beside_its_summary():
    missing = [name for name, (module, _) in COMMANDS.items()
               if not callable(getattr(importlib.import_module(f"mechscope.commands.{module}"), "headline", None))]
    assert missing == []


def test_numbers_are_formatted_without_negative_zero_and_intervals_only_where_there_is_one():
    assert findings.num(-0.0001) == "0.00" and findings.num(-0.004, 2, signed=True) == "0.00"
    assert findings.num(None) == "undefined" and findings.num(float("nan")) == "undefined"
    assert findings.num(2.4321, signed=True) == "+2.43" and findings.num(0.66, 3) == "0.660"
    assert findings.ci([0.63, 0.69]) == " [0.63, 0.69]" and findings.ci({"ci_low": -1, "ci_high": 2}) == " [-1.00, 2.00]"
    assert findings.ci([0.5, 0.5]) == "" and findings.ci([None, 1.0]) == "" and findings.ci(None) == ""
    assert findings.count(1, "prompt") == "1 prompt" and findings.count(50, "prompt") == "50 prompts"


def _patch_summary(mode, tops):
    components = {name: {"top": [{"row": row, "col": col, "value": v, "ci": ci}], "clean": 3.0, "corrupted": -2.0}
                  for name, (row, col, v, ci) in tops.items()}
    return {"mode": mode, "metric": "recovery", "n_pairs": 50, "prompts": "ioi", "components": components}


def test_patch_headline_reads_the_summary_and_ranks_by_effect_size_in_noise_mode():
    from mechscope.commands import patch

    denoise = _patch_summary("denoise", {"z": ("L0H2", "END", 0.66, [0.63, 0.69]),
                                         "resid_pre": ("L1", "3 john", 0.2, [0.1, 0.3])})
    assert patch.headline(denoise) == ("patching L0H2 at END (z) from clean into corrupted restores 0.66 [0.63, 0.69] "
                                       "of the logit difference (0 = corrupted, 1 = clean; 50 pairs, ioi)")
    # noise mode: 1 is no effect, so 0.12 (a strong effect) outranks 0.95 (almost none)
    noise = _patch_summary("noise", {"z": ("L0H2", "END", 0.95, [0.9, 1.0]),
                                     "attn_out": ("L2", "all positions", 0.12, [0.05, 0.2])})
    assert patch.headline(noise).startswith("patching L2 (attn_out) from corrupted into clean leaves 0.12 [0.05, 0.20]")
    assert patch.cell_name("L1", "14 to") == "L1 at position 14 ('to')" and patch.cell_name("L2", "H1") == "L2H1"


def test_steer_headline_says_how_it_compares_with_the_control_directions():
    """The headline names the control kind the strength is judged against (the wider-spread one), how many of
    them the vector beats, and the empirical p-value."""
    from mechscope.commands import steer

    effect = {"strength": 2.0, "logit_diff": {"mean": 2.43, "ci": [1.86, 3.03], "random_max": -3.69, "beats": 1.0,
                                              "p_value": 1 / 21, "control": "structured"},
              "lm_loss_increase": {"mean": 0.12, "ci": [0.1, 0.14]}}
    summary = {"effects": [dict(effect, strength=0.0), effect], "n_random": 10, "n_structured": 20, "n_prompts": 12,
               "hook": "blocks.1.hook_resid_pre"}
    assert steer.headline(summary) == ("steering at strength 2 moves the logit difference to +2.43 [+1.86, +3.03], "
                                       "beyond all 20 structured control directions (best -3.69, p = 0.048), at "
                                       "+0.12 [+0.10, +0.14] nats of loss (12 prompts, blocks.1.hook_resid_pre)")


def test_bounded_replaces_the_largest_parts_and_keeps_the_headline():
    summary = {"headline": "x 1 [0, 2] (5 prompts)", "n": 5, "grid": [[0.123456] * 100] * 100, "top": [1, 2, 3]}
    out = bounded(summary, 2000)
    assert len(json.dumps(out)) <= 2000 and out["headline"] == summary["headline"] and out["top"] == [1, 2, 3]
    assert out["grid"].startswith("too long for stdout") and "result.json" in out["grid"]
    # nested: the tables inside each section go, the sections and their small values stay (patch --component all)
    nested = {"headline": "h", "components": {f"c{i}": {"top": [i], "heatmap": [[0.5] * 30] * 10} for i in range(8)}}
    out = bounded(nested, 1500)
    assert len(json.dumps(out)) <= 1500 and set(out["components"]) == set(nested["components"])
    assert all(c["top"] == [int(name[1:])] for name, c in out["components"].items())
    assert "see components.c0.heatmap in result.json" in json.dumps(out)
    many = {"headline": "h", **{f"k{i}": "x" * 150 for i in range(20)}}     # every value replaced once, then stop
    assert all(v.startswith("too long") for k, v in bounded(many, 100).items() if k != "headline")


# the demo's runs: n (the summary field the headline must quote) and whether the run has an interval
N_FIELD = {"predict": "n_prompts", "model-card": None, "heads": "n_sequences", "circuits": None, "logit-lens": None,
           "tuned-lens": "held_out_tokens", "dla": "n_prompts", "patch": "n_pairs", "attribution-patch": "n_pairs",
           "path-patch": "n_prompts", "ablate": "n_prompts", "validate-circuit": "n_prompts", "probe": "n_test",
           "steer": "n_prompts", "detect": None}
WITH_INTERVAL = {"heads", "path-patch", "ablate", "validate-circuit", "probe", "steer"}


@pytest.mark.parametrize("title, argv", STEPS, ids=[title for title, _ in STEPS])
def test_every_demo_run_leads_with_a_headline_and_stays_under_16k(title, argv, tmp_path, capsys):
    assert main([*argv, "--json", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert len(text) < 16_000 <= MAX_STDOUT_CHARS
    out = json.loads(text)
    assert list(out)[0] == "headline" and list(out["summary"])[0] == "headline"
    line, summary = out["headline"], out["summary"]
    assert line == summary["headline"] and "\n" not in line and re.search(r"\d\.\d", line), line
    field = N_FIELD[argv[0]]
    if field:
        assert re.search(rf"\b{summary[field]}\b", line), (field, line)
    if argv[0] in ("model-card",):
        assert str(summary["ioi"]["n"]) in line
    if argv[0] in WITH_INTERVAL:
        assert re.search(r"\[[-+]?\d+\.\d+, [-+]?\d+\.\d+\]", line), line
    if argv[0] == "patch":  # the text output opens with it too
        assert main([*argv, "--out", str(tmp_path)]) == 0
        assert capsys.readouterr().out.splitlines()[0] == line


def test_the_headline_is_in_result_json(tmp_path):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["ablate", "--components", "heads", "--method", "zero", "--n", "8", "--json", "--out", str(tmp_path)]) == 0
    run_dir = json.loads(out.getvalue())["run_dir"]
    summary = json.loads((tmp_path / run_dir.split("/")[-1] / "result.json").read_text())["summary"]
    top = summary["top_effects"]["zero"][0]
    assert summary["headline"].startswith(f"zero-ablating {top['component']} changes the second-copy loss (nats) by "
                                          f"{top['effect']:+.2f} [{top['ci_low']:+.2f}, {top['ci_high']:+.2f}]")
    assert "(8 prompts)" in summary["headline"] or "; 8 prompts)" in summary["headline"]


def test_the_demo_page_orders_every_step_once():
    from mechscope.demo import REPORT_ORDER

    assert sorted(REPORT_ORDER) == sorted(title for title, _ in STEPS)


def test_a_failing_headline_is_a_note_and_the_run_is_kept(tmp_path, capsys, monkeypatch):
    from mechscope.commands import dla

    monkeypatch.setattr(dla, "headline", lambda summary: summary["no such field"])
    assert main(["dla", "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "headline" not in out and any(n.startswith("no headline: KeyError") for n in out["summary"]["notes"])
    meta = json.loads((tmp_path / out["run_dir"].split("/")[-1] / "meta.json").read_text())
    assert meta["status"] == "complete"

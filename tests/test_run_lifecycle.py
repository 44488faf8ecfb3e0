"""A run directory's life: created on the first output, removed again by a refusal, and closed with a meta.json
status on every exit path (complete / failed / interrupted, also under SIGTERM and SIGINT); its JSON is
strict (NaN -> null, with a note) and its files are as readable as the plots beside them."""
import json
import os
import signal
import stat
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from hostile import ROOT, reuse_engine, run_cli
from mechscope import cli
from mechscope.errors import BadInput
from mechscope.runs import sanitize, to_json

IOI = "When Mary and John went to the store, John gave a drink to"


def strict_loads(text: str):
    """json.loads that refuses NaN / Infinity (what a strict JSON reader does)."""
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def _fake_command(monkeypatch, run):
    """Register a command `fake` (no model) whose run(ctx) is `run`."""
    module = types.ModuleType("mechscope.commands.fake")
    module.HELP, module.USES_MODEL, module.add_arguments, module.run = "a test command", False, lambda p: None, run
    monkeypatch.setitem(sys.modules, "mechscope.commands.fake", module)
    monkeypatch.setitem(cli.COMMANDS, "fake", ("fake", "a test command"))


def _only_run_dir(out: Path) -> Path:
    dirs = list(out.iterdir())
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_a_finished_run_is_complete_and_its_files_are_readable(tmp_path, monkeypatch, toy_engine):
    reuse_engine(monkeypatch, toy_engine)
    old = os.umask(0o022)
    try:
        code, out, err = run_cli(["logit-lens", "--out", str(tmp_path), "--json"])
    finally:
        os.umask(old)
    assert code == 0, err
    run_dir = Path(strict_loads(out)["run_dir"])
    meta = strict_loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["model"]["name"] == "mechscope-toy"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run_dir.iterdir()}
    assert modes["result.json"] == modes["meta.json"] == modes["logit_lens.png"] == 0o644, modes


def test_files_follow_the_umask(tmp_path, monkeypatch):
    _fake_command(monkeypatch, lambda ctx: {"summary": {"ok": True}})
    old = os.umask(0o077)
    try:
        code, _, err = run_cli(["fake", "--out", str(tmp_path)])
    finally:
        os.umask(old)
    assert code == 0, err
    run_dir = _only_run_dir(tmp_path)
    assert {stat.S_IMODE(p.stat().st_mode) for p in run_dir.iterdir()} == {0o600}


def test_a_refusal_after_the_first_output_removes_the_run_and_the_out_folders_it_made(tmp_path, monkeypatch):
    def run(ctx):
        (ctx.run_dir / "partial.png").write_bytes(b"x")
        raise BadInput("the second prompt is empty; pass some text")
    _fake_command(monkeypatch, run)
    (tmp_path / "kept").mkdir()
    code, out, err = run_cli(["fake", "--out", str(tmp_path / "kept" / "new" / "deeper")])
    assert code == 2 and out == "" and err.strip().endswith("pass some text")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any((tmp_path / "kept").iterdir())


def test_an_internal_error_marks_the_run_failed(tmp_path, monkeypatch):
    def run(ctx):
        (ctx.run_dir / "partial.png").write_bytes(b"x")
        raise RuntimeError("boom\nsecond line")
    _fake_command(monkeypatch, run)
    monkeypatch.delenv("MECHSCOPE_DEBUG", raising=False)
    code, out, err = run_cli(["fake", "--out", str(tmp_path)])
    assert code == 1 and out == "" and len(err.strip().splitlines()) == 1 and "boom second line" in err
    run_dir = _only_run_dir(tmp_path)
    meta = strict_loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "failed" and meta["error"] == "RuntimeError: boom second line"
    assert not (run_dir / "result.json").exists()


def test_an_error_before_any_output_leaves_nothing(tmp_path, monkeypatch):
    def run(ctx):
        raise RuntimeError("boom")
    _fake_command(monkeypatch, run)
    monkeypatch.delenv("MECHSCOPE_DEBUG", raising=False)
    assert run_cli(["fake", "--out", str(tmp_path / "runs")])[0] == 1
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_in_process_marks_the_run_interrupted(tmp_path, monkeypatch):
    def run(ctx):
        (ctx.run_dir / "partial.png").write_bytes(b"x")
        raise KeyboardInterrupt
    _fake_command(monkeypatch, run)
    code, _, err = run_cli(["fake", "--out", str(tmp_path)])
    assert code == 130 and "interrupted (SIGINT)" in err and len(err.strip().splitlines()) == 1
    meta = strict_loads((_only_run_dir(tmp_path) / "meta.json").read_text())
    assert meta["status"] == "interrupted" and meta["signal"] == "SIGINT"


SLEEPER = """
import signal, sys, time, types
from mechscope import cli
# as in a foreground process: a job started in the background by a non-interactive shell ignores SIGINT
signal.signal(signal.SIGINT, signal.default_int_handler)
module = types.ModuleType("mechscope.commands.sleeper")
module.HELP, module.USES_MODEL, module.add_arguments = "sleeps", False, lambda p: None
def run(ctx):
    (ctx.run_dir / "partial.csv").write_text("x")
    print("ready", file=sys.stderr, flush=True)
    time.sleep(60)
module.run = run
sys.modules[module.__name__] = module
cli.COMMANDS["sleeper"] = ("sleeper", "sleeps")
sys.exit(cli.main(["sleeper", "--out", sys.argv[1]]))
"""


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_killed_process_leaves_an_interrupted_run(tmp_path, signum, code):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen([sys.executable, "-c", SLEEPER, str(tmp_path)], stderr=subprocess.PIPE, text=True,
                            stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stderr.readline().strip() == "ready"
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert len(err.strip().splitlines()) == 1 and "interrupted" in err and "Traceback" not in err
    run_dir = _only_run_dir(tmp_path)
    meta = strict_loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "interrupted" and meta["signal"] == signal.Signals(signum).name
    assert sorted(p.name for p in run_dir.iterdir()) == ["meta.json", "partial.csv"]


def test_a_real_command_killed_midway_leaves_nothing_or_an_interrupted_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "mechscope", "tuned-lens", "--steps", "100000", "--sentences", "30",
                             "--out", str(tmp_path / "runs")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        time.sleep(8)  # loading and training: killed long before 100000 steps
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("mechscope tuned-lens: interrupted")
    runs = tmp_path / "runs"
    for run_dir in runs.iterdir() if runs.exists() else []:
        assert strict_loads((run_dir / "meta.json").read_text())["status"] == "interrupted"
        assert not (run_dir / "result.json").exists()


def test_undefined_results_are_null_with_a_note(tmp_path, monkeypatch, toy_engine):
    """clean = corrupted: every recovery is 0/0 (or x/0). Today's main printed NaN / -Infinity and exit 0."""
    reuse_engine(monkeypatch, toy_engine)
    code, out, err = run_cli(["patch", "--clean", IOI, "--corrupted", IOI, "--answer", "mary", "--wrong", "john",
                              "--component", "resid_pre", "--out", str(tmp_path), "--json"])
    assert code == 0, err
    printed = strict_loads(out)
    summary = printed["summary"]
    assert all(t["value"] is None for t in summary["components"]["resid_pre"]["top"])
    assert any("recovery is undefined" in n for n in summary["notes"])
    assert any("written as null" in n and "results.resid_pre.values" in n for n in summary["notes"])
    result = strict_loads((Path(printed["run_dir"]) / "result.json").read_text())
    assert all(v is None for row in result["results"]["resid_pre"]["values"] for v in row)
    assert result["notes"] == summary["notes"]
    # the raw logit diffs stay numbers: only the undefined ratio is null
    assert result["results"]["resid_pre"]["raw_metric"][0][0] == pytest.approx(summary["components"]["resid_pre"]["clean"],
                                                                               abs=1e-3)


def test_sanitize_maps_non_finite_values_to_null_and_says_where():
    obj = {"a": float("nan"), "t": torch.tensor([[1.0, float("inf")], [float("-inf"), 2.0]]),
           "n": np.array([np.nan, 1.0]), "s": np.float32("nan"), "ok": [1, 2.5, "x", None, True],
           "half": torch.tensor([1.0, float("nan")], dtype=torch.bfloat16), "p": Path("/x")}
    clean, found = sanitize(obj)
    assert clean == {"a": None, "t": [[1.0, None], [None, 2.0]], "n": [None, 1.0], "s": None,
                     "ok": [1, 2.5, "x", None, True], "half": [1.0, None], "p": "/x"}
    assert dict(found) == {"a": 1, "t": 2, "n": 1, "s": 1, "half": 1}
    text = to_json(obj)
    assert "NaN" not in text and "Infinity" not in text and strict_loads(text) == clean

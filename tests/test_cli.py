"""CLI conventions every command follows: fast --help without torch, one-line errors with exit 2,
a new run directory with result.json + meta.json per run, bounded --json on stdout."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mechscope.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]


def _script(command: str) -> Path:
    return ROOT / "scripts" / (("detect_compute" if command == "detect" else command.replace("-", "_")) + ".py")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_a_script_and_fast_help_without_torch(command):
    script = _script(command)
    assert script.exists(), f"missing {script}"
    code = ("import sys, runpy; sys.argv = [%r, '--help']\n"
            "try:\n    runpy.run_path(%r, run_name='__main__')\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "assert 'torch' not in sys.modules, 'torch imported by --help'\n") % (str(script), str(script))
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout and "--json" in proc.stdout
    assert time.time() - start < 5  # well under a second in practice; generous for a loaded CI machine


def test_top_level_help_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def _run(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv, message", [
    (["predict", "--model", "gpt2-smal"], "unknown model"),
    (["predict", "--prompt", ""], "empty"),
    (["predict", "--prompt", "the " * 200], "context"),
    (["predict", "--top-k", "0"], "top-k"),
    (["predict", "--dtype", "float7"], "dtype"),
    (["predict", "--no-such-flag"], "unrecognized"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv, message):
    try:
        code, out, err = _run(capsys, argv + ["--out", str(tmp_path)])
    except SystemExit as e:  # argparse errors
        code, err = e.code, capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_run_directory_result_and_meta(capsys, tmp_path):
    code, out, err = _run(capsys, ["predict", "--out", str(tmp_path), "--json", "--prompt", "the capital of france is"])
    assert code == 0, err
    payload = json.loads(out)
    run_dir = Path(payload["run_dir"])
    assert run_dir.parent == tmp_path
    result = json.loads((run_dir / "result.json").read_text())
    assert result["predictions"][0]["top"][0][0] == "paris"
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["model"]["name"] == "mechscope-toy" and meta["seed"] == 0
    assert meta["versions"]["torch"] and meta["versions"]["transformer-lens"]
    # a second identical run gets its own directory; the first is untouched
    code, out2, _ = _run(capsys, ["predict", "--out", str(tmp_path), "--json", "--prompt", "the capital of france is"])
    assert code == 0 and json.loads(out2)["run_dir"] != str(run_dir)
    assert json.loads((run_dir / "result.json").read_text()) == result


def test_json_output_is_bounded(capsys, tmp_path):
    code, out, _ = _run(capsys, ["predict", "--out", str(tmp_path), "--json", "--top-k", "300"])
    assert code == 0 and len(out) <= 20_001


UNKNOWN_PROMPT = "the food was bad and the service was"   # 'food', 'was', 'service': not in the bundled vocabulary


@pytest.mark.parametrize("argv", [["predict", "--prompt", UNKNOWN_PROMPT],
                                  ["dla", "--prompt", UNKNOWN_PROMPT, "--answer", "wonderful", "--wrong", "terrible"]])
def test_unknown_tokens_are_warned_on_stderr_and_in_the_notes(capsys, tmp_path, argv):
    """A prompt with <unk> tokens was accepted silently (steer's interval widened to [-0.16, 4.61]); now every
    command warns once on stderr and in the summary's notes, naming the unknown words."""
    assert main([*argv, "--out", str(tmp_path), "--json"]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if "unknown token" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"mechscope {argv[0]}: warning: ")
    assert "4 unknown token(s) ('food', 'was', 'service')" in warnings[0]
    out = json.loads(captured.out)
    assert any("4 unknown token(s)" in n for n in out["summary"]["notes"])
    assert any("4 unknown token(s)" in n for n in json.loads((Path(out["run_dir"]) / "result.json").read_text())["notes"])
    # a prompt in the vocabulary: no warning
    assert main(["predict", "--prompt", "the capital of france is", "--out", str(tmp_path), "--json"]) == 0
    captured = capsys.readouterr()
    assert "unknown token" not in captured.err and "notes" not in json.loads(captured.out)["summary"]


def test_an_unknown_answer_or_named_position_is_refused(capsys, tmp_path):
    assert main(["dla", "--prompt", "the capital of france is", "--answer", "food", "--wrong", "rome",
                 "--out", str(tmp_path)]) == 2
    assert "not a single token" in capsys.readouterr().err
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"clean": "the food was bad and the", "corrupted": "the food was terrible and the",
                                 "answer": "bad", "wrong": "terrible", "positions": {"DISH": "food"}}) + "\n")
    out = tmp_path / "runs"
    assert main(["patch", "--pairs", str(pairs), "--component", "resid_pre", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "position DISH" in err and "unknown token (<unk>)" in err, err
    assert not out.exists() or not any(out.iterdir())

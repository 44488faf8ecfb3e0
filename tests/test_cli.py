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

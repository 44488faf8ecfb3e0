"""Helpers for hostile-input tests: a refusal is exit 2, one line on stderr, no traceback, nothing written.

    from hostile import assert_refused, reuse_engine

    def test_my_refusal(tmp_path, monkeypatch, toy_engine):
        reuse_engine(monkeypatch, toy_engine)              # optional: no model load per case
        assert_refused(["patch", "--component", "nope"], "unknown component", tmp_path)

`assert_refused` runs `mechscope.cli.main(argv)` in-process with `--out tmp_path/runs` (for commands that
write runs) and checks the exit code, that stderr is one line containing `message` (case-insensitive),
that stdout is empty, and that no run directory (nor the --out folder itself) was created.
`refused_by_subprocess` does the same through a real `python -m mechscope` process.
"""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def writes_run(command: str) -> bool:
    from mechscope import cli

    return command in cli.COMMANDS and getattr(cli._command_module(command), "WRITES_RUN", True)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of mechscope.cli.main(argv), in-process."""
    from mechscope.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()


def _with_out(argv: list[str], tmp_path: Path) -> tuple[list[str], Path | None]:
    if not argv or not writes_run(argv[0]) or "--out" in argv:
        return list(argv), None
    out = Path(tmp_path) / "runs"
    return [*argv, "--out", str(out)], out


def check_refusal(code: int, out: str, err: str, message: str, runs: Path | None, argv) -> str:
    lines = err.strip().splitlines()
    assert code == 2, f"{argv}: exit {code}, stderr: {err[-2000:]}"
    assert "Traceback" not in err, f"{argv}: traceback on stderr:\n{err[-3000:]}"
    assert len(lines) == 1, f"{argv}: stderr has {len(lines)} lines, want one:\n{err[-2000:]}"
    assert message.lower() in lines[0].lower(), f"{argv}: {message!r} not in {lines[0]!r}"
    assert out == "", f"{argv}: stdout not empty on a refusal: {out[:500]!r}"
    if runs is not None:
        assert not runs.exists() or not any(runs.iterdir()), \
            f"{argv}: a refusal left {sorted(p.name for p in runs.iterdir())} in {runs}"
        assert not runs.exists(), f"{argv}: a refusal created the --out folder {runs}"
    return lines[0]


def assert_refused(argv: list[str], message: str, tmp_path) -> str:
    """Run argv in-process and assert a clean refusal; returns the stderr line."""
    argv, runs = _with_out(argv, tmp_path)
    code, out, err = run_cli(argv)
    return check_refusal(code, out, err, message, runs, argv)


def run_subprocess(argv: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1")
    env.pop("MECHSCOPE_DEBUG", None)
    env.update(kwargs.pop("env", {}))
    return subprocess.run([sys.executable, "-m", "mechscope", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


def refused_by_subprocess(argv: list[str], message: str, tmp_path) -> str:
    """assert_refused through a real process: real exit code, and every library warning on stderr counts."""
    argv, runs = _with_out(argv, tmp_path)
    proc = run_subprocess(argv)
    return check_refusal(proc.returncode, proc.stdout, proc.stderr, message, runs, argv)


def reuse_engine(monkeypatch, engine) -> None:
    """Make the CLI reuse `engine` (the bundled model, tl, cpu) for every default load instead of loading it
    again; any other --model / --backend / --device / --dtype still goes through the real load_model."""
    import mechscope.models as models

    real = models.load_model

    def load_model(spec=models.BUNDLED, backend="auto", device="auto", dtype="auto", fold_ln=True,
                   device_map=None, max_memory=None, quantization=None, remote=False, offload_folder=None):
        default = (spec in (models.BUNDLED, "toy") and backend in ("auto", "tl") and device in ("auto", "cpu")
                   and dtype in ("auto", "float32") and fold_ln and device_map is None and max_memory is None
                   and quantization is None and not remote and offload_folder is None)
        if default:
            return engine
        return real(spec, backend=backend, device=device, dtype=dtype, fold_ln=fold_ln, device_map=device_map,
                    max_memory=max_memory, quantization=quantization, remote=remote, offload_folder=offload_folder)

    monkeypatch.setattr(models, "load_model", load_model)

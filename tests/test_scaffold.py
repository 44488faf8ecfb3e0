"""`mechscope new`: the scaffold renders, refuses to overwrite, and the generated repository's own
known-answer tests pass on the bundled model (run with pytest in a subprocess)."""
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mechscope.cli import main
from mechscope.scaffold import output_path, templates_dir

EXPECTED = ["README.md", "AGENTS.md", "pyproject.toml", "Makefile", ".gitignore", "notes/README.md",
            "experiments/01_first_look.py", "tests/test_known_answers.py"]


def new(capsys, *argv):
    code = main(["new", *map(str, argv), "--json"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_templates_are_found_from_the_package():
    # src/mechscope/templates links to the top-level templates/ (what setuptools packages as package data)
    assert (Path(__file__).resolve().parents[1] / "src/mechscope/templates/research-repo").is_dir()
    assert (templates_dir() / "research-repo" / "pyproject.toml.j2").exists()
    assert output_path(Path("dot-gitignore")) == Path(".gitignore")
    assert output_path(Path("experiments/01_first_look.py.j2")) == Path("experiments/01_first_look.py")


def test_new_renders_a_repository(tmp_path, capsys):
    target = tmp_path / "nested" / "My Study"
    code, out, err = new(capsys, target, "--question", 'Does "it" copy?', "--model", "gpt2-small")
    assert code == 0, err
    summary = json.loads(out)["summary"]
    assert sorted(summary["files"]) == sorted(EXPECTED)
    for rel in EXPECTED:
        assert (target / rel).is_file(), rel
    assert not any(p.suffix == ".j2" for p in target.rglob("*"))
    assert [p.name for p in tmp_path.joinpath("nested").iterdir()] == ["My Study"]  # no staging dir left
    meta = tomllib.loads((target / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "my-study" and meta["description"] == 'Does "it" copy?'
    assert meta["dependencies"][0].startswith("mechscope>=")
    readme = (target / "README.md").read_text()
    assert 'Does "it" copy?' in readme and "gpt2-small" in readme
    for script in ("experiments/01_first_look.py", "tests/test_known_answers.py"):
        source = (target / script).read_text()
        compile(source, script, "exec")
        assert 'MODEL = "gpt2-small"' in source
    assert "runs/" in (target / ".gitignore").read_text().split()
    assert oct(target.stat().st_mode & 0o777) != oct(0o700)  # not left private like the staging dir


def test_new_into_an_empty_directory_is_allowed(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, out, err = new(capsys, tmp_path / "empty", "--name", "study.v2")
    assert code == 0, err
    assert 'name = "study.v2"' in (tmp_path / "empty" / "pyproject.toml").read_text()


@pytest.mark.parametrize("setup, argv_tail, message", [
    ("nonempty", [], "already exists"),
    ("file", [], "already exists"),
    ("none", ["--name", "-bad name-"], "not a valid project name"),
    ("none", ["--model", " "], "--model is empty"),
])
def test_new_bad_input_exits_2_with_one_line(tmp_path, capsys, setup, argv_tail, message):
    target = tmp_path / "study"
    if setup == "nonempty":
        target.mkdir()
        (target / "keep.txt").write_text("mine")
    elif setup == "file":
        target.write_text("a file")
    code, out, err = new(capsys, target, *argv_tail)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    if setup == "nonempty":
        assert (target / "keep.txt").read_text() == "mine" and len(list(target.iterdir())) == 1
    assert [p.name for p in tmp_path.iterdir()] == ([] if setup == "none" else ["study"])


def test_new_has_no_force_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["new", "x", "--force"])
    assert exit_info.value.code == 2


def test_generated_repository_passes_its_own_tests(tmp_path, capsys):
    """Its known-answer tests (IOI answer, induction head + its ablation, the first experiment) pass."""
    target, basetemp = tmp_path / "study", tmp_path / "pytest-tmp"
    assert new(capsys, target)[0] == 0
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "--basetemp", str(basetemp)], cwd=target, env=env,
                           capture_output=True, text=True, timeout=300)
    assert tests.returncode == 0, tests.stdout[-3000:] + tests.stderr[-2000:]
    assert "3 passed" in tests.stdout and "skipped" not in tests.stdout
    # the experiment's run directory, written by test_first_look_on_your_model into its tmp_path
    run_dir = next(basetemp.rglob("result.json")).parent
    result = json.loads((run_dir / "result.json").read_text())
    meta = json.loads((run_dir / "meta.json").read_text())
    assert result["top1"] == "mary" and result["logit_diff"] > 5
    assert result["top_induction_heads"][0][2] > 0.6
    assert meta["seed"] == 0 and meta["model"]["name"] == "mechscope-toy"

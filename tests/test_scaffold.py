"""`mechscope new`: the repository fits the study (question, model, engine, techniques, task, tracking),
values are quoted, bad input is refused before anything is written, and the generated repository's own
`make test` passes offline on the bundled model.

Cost (2 cores): the renders and refusals take about a second each; the tl and nnsight variants' `make test`
(reusing this interpreter, about 30 s each) run in the default suite; the bridge, prompt-file (+ wandb) and
moved-study fresh-.venv variants are `slow` and run in .ci/run.
"""
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch

import mechscope
from mechscope import inputs, scaffold
from mechscope.cli import main
from mechscope.scaffold import TASKS, TECHNIQUES, output_path, task_prompts, templates_dir

ROOT = Path(__file__).resolve().parents[1]
FIXED = [".gitignore", "AGENTS.md", "CLAUDE.md", "Makefile", "README.md", "configs/study.json", "data/prompts.jsonl",
         "experiments/common.py", "notes/README.md", "pyproject.toml", "results/README.md", "tests/conftest.py",
         "tests/test_findings.py", "vendor/mechscope-0.1.0-py3-none-any.whl"]


def new(capsys, *argv):
    code = main(["new", *map(str, argv), "--json"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def study_files(techniques):
    names = [f"{i:02d}_{TECHNIQUES[t].module}.py" for i, t in enumerate(techniques, 1)]
    return sorted(FIXED + [f"experiments/{n}" for n in names] + [f"tests/test_{n}" for n in names])


def test_templates_are_found_from_the_package():
    # src/mechscope/templates links to the top-level templates/ (what setuptools packages as package data)
    assert (ROOT / "src/mechscope/templates/research-repo").is_dir()
    assert (templates_dir() / "research-repo" / "pyproject.toml.j2").exists()
    assert output_path(Path("dot-gitignore")) == Path(".gitignore")
    assert output_path(Path("experiments/common.py.j2")) == Path("experiments/common.py")
    for t in TECHNIQUES.values():  # every technique has an experiment and a known-answer test
        assert (templates_dir() / "techniques" / f"{t.module}.py.j2").is_file(), t.name
        assert (templates_dir() / "techniques" / f"test_{t.module}.py.j2").is_file(), t.name


@pytest.mark.parametrize("task", sorted(TASKS))
def test_bundled_task_pairs_differ_in_one_token_and_the_bundled_model_answers_them(toy_engine, task):
    """Known answer: the bundled model does every bundled task (MODEL_CARD.md), so the clean answer beats
    the wrong one, the corrupted twin flips it, and the pair differs at exactly one token position."""
    pairs = task_prompts(task)
    assert len(pairs) >= 30 and len({p["clean"] for p in pairs}) == len(pairs)
    flipped = 0
    for p in pairs:
        clean, corrupted = inputs.paired_tokens(toy_engine, p["clean"], p["corrupted"])
        assert int((clean != corrupted).sum()) == 1, p
        answer, wrong = inputs.single_token(toy_engine, p["answer"]), inputs.single_token(toy_engine, p["wrong"])
        with torch.no_grad():
            (c, _), (k, _) = toy_engine.run(clean), toy_engine.run(corrupted)
        flipped += (c[0, -1, answer] > c[0, -1, wrong]) and (k[0, -1, answer] < k[0, -1, wrong])
    assert flipped >= 0.95 * len(pairs)       # measured: every pair of every task


def test_new_writes_a_study_that_fits_the_question(tmp_path, capsys):
    target = tmp_path / "nested" / "Recall Study"
    techniques = ["logit-lens", "patch", "dla"]
    code, out, err = new(capsys, target, "--model", "EleutherAI/pythia-410m", "--backend", "nnsight",
                         "--task", "facts", "--technique", "logit-lens", "patch,dla",
                         "--question", "Where does pythia-410m retrieve capitals?")
    assert code == 0, err
    summary = json.loads(out)["summary"]
    assert summary["path"] == str(target.resolve()) and Path(summary["path"]).is_absolute()
    assert summary["files"] == study_files(techniques)
    assert [p.name for p in tmp_path.joinpath("nested").iterdir()] == ["Recall Study"]   # no staging dir left
    assert oct(target.stat().st_mode & 0o777) != oct(0o700)      # not left private like the staging dir

    study = json.loads((target / "configs/study.json").read_text())
    assert study | {"techniques": study["techniques"]} == {
        "name": "recall-study", "question": "Where does pythia-410m retrieve capitals?",
        "model": "EleutherAI/pythia-410m", "backend": "nnsight", "task": "facts", "prompts": "data/prompts.jsonl",
        "techniques": techniques, "tracking": "json", "device": "auto", "seed": 0, "limit": None}
    records = [json.loads(line) for line in (target / "data/prompts.jsonl").read_text().splitlines()]
    assert records == task_prompts("facts")

    readme = (target / "README.md").read_text()
    assert "Where does pythia-410m retrieve capitals?" in readme and TASKS["facts"].hypothesis in readme
    assert "Refuted if" in readme and TASKS["facts"].refutation in readme
    for guide in ("CLAUDE.md", "AGENTS.md"):
        text = (target / guide).read_text()
        assert "EleutherAI/pythia-410m" in text and "**nnsight** engine" in text and "Refuted if" in text
        for i, t in enumerate(techniques, 1):
            assert f"python experiments/{i:02d}_{TECHNIQUES[t].module}.py" in text
            assert TECHNIQUES[t].control in text and TECHNIQUES[t].caution in text
        assert "## Do not" in text and "## Controls to use" in text
    for name in summary["files"]:
        if name.endswith(".py"):
            compile((target / name).read_text(), name, "exec")
    assert "--backend nnsight" not in (target / "experiments/02_patch.py").read_text()   # the engine comes from the config
    meta = tomllib.loads((target / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "recall-study" and meta["dependencies"][0] == f"mechscope=={mechscope.__version__}"
    makefile = (target / "Makefile").read_text()
    # pinned and self-sufficient: the study carries this mechscope's wheel and installs it, never a checkout
    wheel = f"vendor/mechscope-{mechscope.__version__}-py3-none-any.whl"
    assert f"MECHSCOPE ?= {wheel}\n" in makefile and 'pip install --quiet "$(MECHSCOPE)"' in makefile
    assert str(ROOT) not in makefile and str(ROOT) not in (target / "README.md").read_text()
    with zipfile.ZipFile(target / wheel) as z:   # the wheel holds this checkout's package, templates and model
        names = set(z.namelist())
        assert z.read("mechscope/scaffold.py") == (ROOT / "src/mechscope/scaffold.py").read_bytes()
    for source in ("src/mechscope/toy/weights", "templates/research-repo", "src/mechscope/commands"):
        for path in (ROOT / source).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                relative = path.relative_to(ROOT / ("templates" if source.startswith("templates") else "src/mechscope"))
                assert f"mechscope/{'templates/' if source.startswith('templates') else ''}{relative}" in names
    assert "results/runs/" in (target / ".gitignore").read_text().split()
    if shutil.which("git"):
        log = subprocess.run(["git", "log", "--format=%s", "--name-only"], cwd=target, capture_output=True, text=True)
        assert log.stdout.splitlines()[0] == "Scaffold from mechscope new" and "data/prompts.jsonl" in log.stdout
        assert summary["git"] == "git repository initialised with a first commit"


def test_values_are_quoted_wherever_they_land(tmp_path, capsys):
    question = 'Does "it" copy? \'\'\' """ {{ x }} {% raw %} \\ ünïcode'
    model = 'weird/"model" \\ name'
    target = tmp_path / "q"
    code, out, err = new(capsys, target, "--question", question, "--model", model, "--technique", "dla")
    assert code == 0, err
    assert json.loads((target / "configs/study.json").read_text())["question"] == question
    assert json.loads((target / "configs/study.json").read_text())["model"] == model
    assert tomllib.loads((target / "pyproject.toml").read_text())["project"]["description"] == question
    for name in ("experiments/common.py", "experiments/01_dla.py", "tests/conftest.py", "tests/test_01_dla.py"):
        compile((target / name).read_text(), name, "exec")
    assert question in (target / "README.md").read_text()


def test_a_prompt_file_becomes_the_study_data_and_the_tests_use_a_bundled_task(tmp_path, capsys):
    prompts = tmp_path / "mine.jsonl"
    records = [{"clean": "The Eiffel Tower is in the city of", "answer": "Paris", "corrupted":
                "The Colosseum is in the city of", "wrong": "Rome", "note": "dropped"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, out, err = new(capsys, tmp_path / "s", "--task", prompts, "--technique", "patch")
    assert code == 0, err
    target = tmp_path / "s"
    assert json.loads((target / "data/prompts.jsonl").read_text()) == {k: records[0][k] for k in
                                                                        ("clean", "corrupted", "answer", "wrong")}
    toy = [json.loads(line) for line in (target / "tests/data/toy_prompts.jsonl").read_text().splitlines()]
    assert toy == task_prompts("ioi")
    assert "tests/data/toy_prompts.jsonl" in (target / "tests/conftest.py").read_text()
    assert "your file mine.jsonl" in (target / "README.md").read_text()


def test_a_named_source_replaces_the_vendored_wheel(tmp_path, capsys):
    code, out, err = new(capsys, tmp_path / "s", "--technique", "heads", "--mechscope-from",
                         "mechscope @ git+https://example.org/mechscope@v0.1.0")
    assert code == 0, err
    assert not (tmp_path / "s/vendor").exists() and not any(f.startswith("vendor/") for f in json.loads(out)["summary"]["files"])
    makefile = (tmp_path / "s/Makefile").read_text()
    assert "MECHSCOPE ?= mechscope @ git+https://example.org/mechscope@v0.1.0\n" in makefile
    assert "--mechscope-from" in makefile and "vendor/" not in (tmp_path / "s/README.md").read_text()


def test_git_missing_leaves_a_note(tmp_path, monkeypatch):
    monkeypatch.setattr(scaffold.shutil, "which", lambda name: None)
    created = scaffold.render(tmp_path / "s", techniques=["heads"])
    assert created.git.startswith("git is not installed") and not (tmp_path / "s" / ".git").exists()


def test_text_output_names_the_absolute_path(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["new", "rel-study", "--technique", "heads"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"created {tmp_path.resolve() / 'rel-study'} (")


def _bad_setup(tmp_path, case):
    """Create what `case` needs under tmp_path; return the path argument (or extra arguments)."""
    target = tmp_path / "study"
    if case == "nonempty":
        target.mkdir()
        (target / "keep.txt").write_text("mine")
    elif case == "file":
        target.write_text("a file")
    elif case == "symlink":
        (tmp_path / "real").mkdir()
        target.symlink_to(tmp_path / "real")
    elif case == "dangling":
        target.symlink_to(tmp_path / "nowhere")
    elif case == "parent-file":
        (tmp_path / "afile").write_text("x")
        return tmp_path / "afile" / "study"
    elif case == "cwd":
        return "."
    elif case.startswith("control"):
        return str(tmp_path / {"control-newline": "new\nline", "control-tab": "a\tb", "control-esc": "a\x1b[31m"}[case])
    return target


def _task_file(tmp_path, text):
    path = tmp_path / "prompts.jsonl"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("case, extra, message", [
    ("nonempty", [], "already exists"),
    ("file", [], "already exists"),
    ("symlink", [], "is a symbolic link"),
    ("dangling", [], "is a dangling symbolic link"),
    ("parent-file", [], "is not a directory"),
    ("cwd", [], "current directory"),
    ("control-newline", [], "control characters"),
    ("control-tab", [], "control characters"),
    ("control-esc", [], "control characters"),
    ("none", ["--name", "-bad name-"], "not a valid project name"),
    ("none", ["--model", " "], "--model is empty"),
    ("none", ["--technique", "patch,telepathy"], "unknown --technique 'telepathy'"),
    ("none", ["--technique", ","], "--technique is empty"),
    ("none", ["--task", "missing.jsonl"], "neither a bundled task"),
    ("none", ["--mechscope-from", " "], "--mechscope-from is empty"),
    ("none", ["--task", "BAD-JSON"], "is not JSON / JSONL"),
    ("none", ["--task", "EMPTY"], "holds no prompts"),
    ("none", ["--task", "NO-ANSWER", "--technique", "dla"], 'prompt 1 has no "answer"'),
    ("none", ["--task", "PROMPTS", "--technique", "patch"], "holds prompts, not pairs: patch patches"),
    ("none", ["--task", "HALF-PAIRS", "--technique", "dla"], "lacks corrupted, wrong"),
])
def test_new_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch, case, extra, message):
    monkeypatch.chdir(tmp_path)
    files = {"BAD-JSON": '{"clean": "x", \n', "EMPTY": "\n", "NO-ANSWER": '["just a string"]',
             "PROMPTS": '{"prompt": "The capital of France is", "answer": "Paris"}\n',
             "HALF-PAIRS": '{"clean": "The capital of France is", "answer": "Paris"}\n'}
    extra = [_task_file(tmp_path, files[x]) if x in files else x for x in extra]
    target = _bad_setup(tmp_path, case)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = new(capsys, target, *extra)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before           # nothing created, nothing staged
    if case == "nonempty":
        assert [p.name for p in (tmp_path / "study").iterdir()] == ["keep.txt"]


def test_a_file_without_pairs_is_enough_for_single_prompt_techniques(tmp_path, capsys):
    task = _task_file(tmp_path, '{"prompt": "The capital of France is", "answer": "Paris"}\n')
    code, out, err = new(capsys, tmp_path / "s", "--task", task, "--technique", "dla", "logit-lens")
    assert code == 0, err
    record = json.loads((tmp_path / "s/data/prompts.jsonl").read_text())
    assert record == {"prompt": "The capital of France is", "answer": "Paris"}
    # the experiments' command lines read prompt records (no wrong token) as well as pairs
    sys.path.insert(0, str(tmp_path / "s/experiments"))
    try:
        import argparse
        import runpy

        for name, expected in (("01_dla.py", ["dla", "--prompt", record["prompt"], "--answer", "Paris"]),
                               ("02_logit_lens.py", ["logit-lens", "--prompt", record["prompt"], "--target", "Paris"])):
            lines = runpy.run_path(str(tmp_path / "s/experiments" / name))["command_lines"](
                [record], argparse.Namespace(n_prompts=3), tmp_path / "results")
            assert lines == [expected]
    finally:
        sys.path.remove(str(tmp_path / "s/experiments"))
        sys.modules.pop("common", None)


def test_new_has_no_force_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["new", "x", "--force"])
    assert exit_info.value.code == 2


# ------------------------------------------------------------------------ the generated repository's make test
def _make_test(target, fresh=False, timeout=900):
    """`make test` in a generated repository, offline. Not fresh: with this interpreter (PY=), which has mechscope."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PYTHONPATH", None)
    if not fresh:  # this checkout's mechscope, as the test suite itself imports it
        env["PYTHONPATH"] = str(ROOT / "src")
    argv = ["make", "test"] + ([] if fresh else [f"PY={sys.executable}"])
    return subprocess.run(argv, cwd=target, env=env, capture_output=True, text=True, timeout=timeout)


def _passed(result, n_tests):
    tail = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, tail
    assert f"{n_tests} passed" in result.stdout and "skipped" not in result.stdout and "failed" not in result.stdout, tail


def _engine_missing(backend):
    import importlib.util

    module = {"tl": "mechscope.engines.hooked", "bridge": "mechscope.engines.bridge", "nnsight": "mechscope.engines.nnsight"}
    return importlib.util.find_spec(module[backend]) is None


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_tl_variant_passes_its_own_make_test_offline(tmp_path, capsys):
    """IOI on the tl engine: patching identity, DLA sum, the induction heads, the shipped SAE's capital_of
    feature, the premise (findings)."""
    target = tmp_path / "ioi"
    assert new(capsys, target, "--task", "ioi", "--technique", "patch", "dla", "heads", "sae-features")[0] == 0
    _passed(_make_test(target), 4 + 2)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("backend", ["nnsight", pytest.param("bridge", marks=pytest.mark.slow)])
def test_hf_engine_variant_passes_its_own_make_test_offline(tmp_path, capsys, backend):
    """facts on the nnsight / bridge engine (the bundled model through its Hugging Face export); on nnsight the
    shipped SAE (trained on transformer-lens's centred residual stream) is refused, on the bridge it fits."""
    if _engine_missing(backend):
        pytest.skip(f"mechscope.engines for {backend} is not in this checkout yet")
    target = tmp_path / "recall"
    assert new(capsys, target, "--task", "facts", "--backend", backend, "--technique", "logit-lens", "dla",
               "sae-features")[0] == 0
    _passed(_make_test(target), 3 + 2)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_prompt_file_variant_passes_its_own_make_test_offline(tmp_path, capsys):
    """A user's prompt file, other techniques: attribution vs exact, ablation, circuit validation, wandb."""
    prompts = tmp_path / "landmarks.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in task_prompts("facts")[-6:]))
    target = tmp_path / "own"
    tracking = "wandb" if shutil.which("wandb") or _importable("wandb") else "json"
    assert new(capsys, target, "--task", prompts, "--tracking", tracking,
               "--technique", "attribution-patch", "ablate", "validate-circuit")[0] == 0
    result = _make_test(target)
    _passed(result, 1 + 2 + 1 + 2)
    # an experiment run as a user runs it logs to results/log.jsonl (and to wandb, offline, when chosen)
    env = dict(os.environ, HF_HUB_OFFLINE="1", MPLBACKEND="Agg", WANDB_MODE="offline", PYTHONPATH=str(ROOT / "src"))
    run = subprocess.run([sys.executable, "experiments/01_attribution_patch.py", "--limit", "2", "--sites", "resid"],
                         cwd=target, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    (record,) = [json.loads(line) for line in (target / "results/log.jsonl").read_text().splitlines()]
    assert record["summary"]["n_pairs"] == 2 and Path(record["run_dir"]).is_dir()
    assert record["argv"][:2] == ["mechscope", "attribution-patch"] and "--pairs" in record["argv"]
    if tracking == "wandb":
        offline_runs = list((target / "results/wandb").glob("offline-run-*"))
        assert len(offline_runs) == 1 and any(offline_runs[0].rglob("*.wandb"))


def _importable(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_a_moved_study_installs_in_a_fresh_environment(tmp_path, capsys):
    """A study moved away from the checkout that wrote it: `make test` with nothing installed creates .venv,
    installs torch, mechscope from the study's vendor/ wheel and the study, and passes, offline for mechscope
    and the model (torch and the other dependencies come from the package index or its local mirror; about
    4 minutes on 2 cores). The installed mechscope then writes a study of its own whose wheel is the same."""
    written, moved = tmp_path / "author" / "study", tmp_path / "advisor" / "study"
    assert new(capsys, written, "--task", "induction", "--technique", "heads")[0] == 0
    moved.parent.mkdir()
    shutil.move(written, moved)
    shutil.rmtree(tmp_path / "author")
    result = _make_test(moved, fresh=True, timeout=1800)
    _passed(result, 1 + 2)
    assert (moved / ".venv" / ".installed").exists()
    installed = subprocess.run([str(moved / ".venv/bin/python"), "-c", "import mechscope; print(mechscope.__file__)"],
                               cwd=tmp_path, capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert str(moved / ".venv") in installed.stdout and str(ROOT) not in installed.stdout, installed.stdout

    # the installed (non-editable) mechscope repacks itself: the second study's wheel has the first's files
    second = subprocess.run([str(moved / ".venv/bin/mechscope"), "new", "again", "--technique", "heads", "--json"],
                            cwd=tmp_path, capture_output=True, text=True, env={"PATH": os.environ["PATH"]}, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    wheel = f"vendor/mechscope-{mechscope.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(moved / wheel) as first, zipfile.ZipFile(tmp_path / "again" / wheel) as again:
        def contents(z):
            return {n: z.read(n) for n in z.namelist() if not n.endswith("dist-info/RECORD")}
        assert contents(again) == contents(first)

"""The documentation is tested, so that it cannot drift from the code.

- Every ```python block in SKILL.md and references/*.md runs, offline, on the bundled model. All blocks
  run in order in ONE subprocess (torch and transformer-lens are imported once), each from its own .py
  file (nnsight reads a trace body's source), in a fresh namespace, in its own empty working directory,
  under a per-block alarm. A block whose first line is `# doc-test: skip` is skipped.
- Every `mechscope <command> ...` line in a ```bash block parses with that command's real argument
  parser (stale flags fail here), and every `mechscope <command>` in SKILL.md's code exists.
- SKILL.md follows the agentskills.io spec (frontmatter, body < 500 lines); the files it links exist;
  every reference file is linked from it, and the references link no further .md files (one level deep).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mechscope import cli

ROOT = Path(__file__).resolve().parents[1]
SKILL = ROOT / "SKILL.md"
DOCS = [SKILL] + sorted((ROOT / "references").glob("*.md"))
SKIP_MARK = "# doc-test: skip"
BLOCK_TIMEOUT_S = 120

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.M | re.S)

WORKER = r'''
import json, os, runpy, signal, sys, time, traceback
blocks, results_path, timeout = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3])

def on_alarm(signum, frame):
    raise TimeoutError(f"the block ran longer than {timeout} s")

signal.signal(signal.SIGALRM, on_alarm)
results = {}
for block in blocks:
    os.chdir(block["dir"])
    started = time.time()
    signal.alarm(timeout)
    try:
        runpy.run_path(block["file"], run_name="__main__")
        error = None
    except BaseException as e:  # a block that calls sys.exit or times out is a failure too
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != block["file"]:
            tb = tb.tb_next  # start the traceback at the block: the worker and runpy frames say nothing
        error = "".join(traceback.format_exception(type(e), e, tb or e.__traceback__))
    finally:
        signal.alarm(0)
    try:  # undo global state a block may leave behind
        import torch, matplotlib, matplotlib.pyplot as plt
        torch.set_grad_enabled(True)
        plt.close("all")
        matplotlib.rcdefaults()
        matplotlib.use("Agg")
    except ImportError:
        pass
    results[block["key"]] = {"error": error, "seconds": round(time.time() - started, 2)}
    with open(results_path, "w") as f:  # after every block, so a crash still reports the earlier ones
        json.dump(results, f)
'''


def code_blocks(path: Path) -> list[tuple[str, int, str]]:
    """(language, first line number of the code, code) for every fenced block of a markdown file."""
    text = path.read_text()
    return [(m.group(1), text.count("\n", 0, m.start(2)) + 1, m.group(2)) for m in FENCE.finditer(text)]


def python_blocks() -> list:
    params = []
    for doc in DOCS:
        for lang, line, code in code_blocks(doc):
            if lang == "python":
                skip = code.lstrip().startswith(SKIP_MARK)
                marks = [pytest.mark.skip(reason=f"{SKIP_MARK} (needs the hub or a GPU)")] if skip else []
                params.append(pytest.param(doc.name, line, id=f"{doc.name}:{line}", marks=marks))
    return params


def _run_docs(workdir: Path) -> dict:
    """{(doc name, first line): {"error": traceback or None, "seconds"}} for every runnable block."""
    blocks = []
    for doc in DOCS:
        for lang, line, code in code_blocks(doc):
            if lang != "python" or code.lstrip().startswith(SKIP_MARK):
                continue
            block_dir = workdir / f"{doc.stem}_{line}"
            block_dir.mkdir()
            (block_dir / "doc_block.py").write_text(code)
            blocks.append({"key": f"{doc.name}:{line}", "dir": str(block_dir), "file": str(block_dir / "doc_block.py")})
    (workdir / "blocks.json").write_text(json.dumps(blocks))
    (workdir / "worker.py").write_text(WORKER)
    results = workdir / "results.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               MPLBACKEND="Agg", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    try:
        proc = subprocess.run([sys.executable, str(workdir / "worker.py"), str(workdir / "blocks.json"),
                               str(results), str(BLOCK_TIMEOUT_S)], cwd=workdir, env=env, capture_output=True,
                              text=True, timeout=BLOCK_TIMEOUT_S * len(blocks) + 60)
        crash = f"the worker exited {proc.returncode}: {proc.stderr[-2000:]}" if proc.returncode else None
    except subprocess.TimeoutExpired:
        crash = "the worker process timed out"
    done = json.loads(results.read_text()) if results.exists() else {}
    return {b["key"]: done.get(b["key"], {"error": crash or "not run", "seconds": None}) for b in blocks}


@pytest.fixture(scope="session")
def doc_results(tmp_path_factory):
    """Every block of every file, run once per session in one worker process."""
    return _run_docs(tmp_path_factory.mktemp("doc_blocks"))


@pytest.mark.parametrize("doc, line", python_blocks())
def test_python_block_runs(doc, line, doc_results):
    result = doc_results[f"{doc}:{line}"]
    assert result["error"] is None, f"the ```python block at {doc}:{line} failed:\n{result['error']}"


# ---- command lines --------------------------------------------------------------------------------

def command_lines(doc: Path) -> list[tuple[int, list[str]]]:
    """(line number, argv after `mechscope`) for each `mechscope ...` command in the ```bash blocks."""
    out = []
    for lang, first, code in code_blocks(doc):
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        joined = re.sub(r"\\\n\s*", " ", code)  # line continuations
        for offset, line in enumerate(joined.splitlines()):
            line = line.strip().removeprefix("$ ")
            match = re.match(r"(?:mechscope|python3? scripts/(\w+)\.py)\s+(.*)", line)
            if not match or "<" in line or "..." in line:
                continue
            try:
                words = shlex.split(match.group(2), comments=True)
            except ValueError:
                words = [match.group(2)]
            for i, word in enumerate(words):  # only the first command of a pipeline or list
                if word in ("|", "||", "&&", ";", ">", ">>", "2>", "2>&1") or word.startswith(">"):
                    words = words[:i]
                    break
            if match.group(1):  # python scripts/<module>.py ARGS == mechscope <command> ARGS
                module = match.group(1)
                command = "detect" if module == "detect_compute" else module.replace("_", "-")
                words = [command, *words]
            out.append((first + offset, words))
    return out


def command_params() -> list:
    return [pytest.param(doc.name, line, argv, id=f"{doc.name}:{line}")
            for doc in DOCS for line, argv in command_lines(doc)]


@pytest.mark.parametrize("doc, line, argv", command_params())
def test_documented_command_line_parses(doc, line, argv, capsys):
    assert argv and argv[0] in cli.COMMANDS, f"{doc}:{line}: `mechscope {' '.join(argv)}` is not a command"
    if "--help" in argv or "-h" in argv:
        return
    try:
        cli.build_parser(argv[0]).parse_args(argv)
    except SystemExit:
        pytest.fail(f"{doc}:{line}: `mechscope {' '.join(argv)}` does not parse: {capsys.readouterr().err.strip()}")


def test_every_command_in_skill_md_exists():
    text = SKILL.read_text()
    code = "\n".join(re.findall(r"`([^`\n]+)`", text) + [c for _, _, c in code_blocks(SKILL)])
    mentioned = set(re.findall(r"\bmechscope ([a-z][a-z-]*)", code))
    assert mentioned, "SKILL.md mentions no command"
    assert mentioned <= set(cli.COMMANDS), f"not commands: {sorted(mentioned - set(cli.COMMANDS))}"
    assert set(cli.COMMANDS) <= mentioned, f"commands SKILL.md never mentions: {sorted(set(cli.COMMANDS) - mentioned)}"
    for script in re.findall(r"scripts/(\w+\.py)", text):
        assert (ROOT / "scripts" / script).exists(), f"SKILL.md names scripts/{script}, which does not exist"


def test_skill_md_says_up_front_what_to_do_when_the_model_cannot_be_fetched(tmp_path, monkeypatch):
    """Before its first real-model step, the workflow says what to do when the model is not cached and the hub is
    out of reach, and what it says matches mechscope's own refusal (an assistant learnt it only from that)."""
    from mechscope import hub
    from mechscope.errors import BadInput

    workflow = SKILL.read_text().split("## Workflow", 1)[1].split("\n3. ", 1)[0]   # steps 1 and 2
    for phrase in ("not cached", "hub out of reach", "--model /path/to/dir", "HF_HOME", "mechscope-toy"):
        assert phrase in workflow, phrase
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(BadInput) as refused:
        with hub.access("gpt2"):
            pass
    assert "local directory" in str(refused.value) and "mechscope-toy" in str(refused.value)


# ---- SKILL.md shape ---------------------------------------------------------------------------------

def frontmatter(text: str) -> tuple[dict, str]:
    import yaml

    match = re.match(r"---\n(.*?)\n---\n(.*)", text, re.S)
    assert match, "SKILL.md must start with a --- YAML frontmatter --- block"
    return yaml.safe_load(match.group(1)), match.group(2)


def test_skill_md_frontmatter_follows_the_agentskills_spec():
    meta, body = frontmatter(SKILL.read_text())
    assert set(meta) <= {"name", "description", "license", "compatibility", "metadata", "allowed-tools"}, meta.keys()
    name = meta["name"]
    assert name == "mechscope", "name must equal the skill's folder name (~/.claude/skills/mechscope)"
    assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name) and len(name) <= 64
    assert isinstance(meta["description"], str) and 50 <= len(meta["description"]) <= 1024
    for word in ("patching", "SAE", "steering", "probe"):
        assert word.lower() in meta["description"].lower(), f"the description should say when to use it ({word})"
    if "compatibility" in meta:
        assert len(meta["compatibility"]) <= 500
    assert len(body.splitlines()) < 500, "SKILL.md's body must stay well under 500 lines"


def test_skill_md_links_every_reference_and_references_are_one_level_deep():
    text = SKILL.read_text()
    linked = set(re.findall(r"\]\((references/[\w-]+\.md)\)", text))
    for link in linked:
        assert (ROOT / link).exists(), f"SKILL.md links {link}, which does not exist"
    every = {f"references/{p.name}" for p in (ROOT / "references").glob("*.md")}
    assert every <= linked, f"reference files SKILL.md never links: {sorted(every - linked)}"
    for ref in sorted((ROOT / "references").glob("*.md")):
        deeper = re.findall(r"\]\((?!https?:)([^)#]+\.md)\)", ref.read_text())
        assert not deeper, f"{ref.name} sends the reader on to {deeper}; keep references one level deep"


def test_tests_named_in_the_docs_exist():
    """pitfalls.md names the test that guards each pitfall (tests/FILE.py::NAME): those tests must exist."""
    named = [(doc.name, path, name) for doc in DOCS
             for path, name in re.findall(r"tests/(test_\w+\.py)::(\w+)", doc.read_text())]
    assert len(named) >= 10
    for doc, path, name in named:
        source = ROOT / "tests" / path
        assert source.exists(), f"{doc} names tests/{path}, which does not exist"
        assert re.search(rf"^def {name}\(", source.read_text(), re.M), f"{doc}: no {name} in tests/{path}"

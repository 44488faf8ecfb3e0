"""Scaffold a research repository that fits one study (jinja2 templates in templates/).

    mechscope new ioi-study                                    # IOI on the bundled model, tl engine
    mechscope new recall --model EleutherAI/pythia-410m --backend nnsight --task facts \\
        --technique logit-lens patch dla --question "Where does pythia-410m look up capitals?"
    mechscope new my-study --task prompts.jsonl --technique attribution-patch,patch --tracking wandb

Writes README.md (question, a falsifiable hypothesis, how to run), CLAUDE.md and AGENTS.md (the study's
question, model, engine, techniques, commands, controls, what not to do), configs/study.json,
data/prompts.jsonl, experiments/NN_<technique>.py (one per --technique, calling mechscope), results/
(JSON log, or wandb too), tests/ (known answers on the bundled model, offline; tests/test_findings.py
for the study's own), a Makefile (`make test` creates .venv and installs what it needs; `make run`,
`make report`), vendor/ (this mechscope as a wheel, so the study installs the same version anywhere, offline;
--mechscope-from names another source), .gitignore, notes/; then `git init` and a first commit where git is installed.

--task: a bundled task (ioi, facts, induction, sentiment: prompt pairs that differ in one word) or a
JSON / JSONL file as mechscope reads --pairs / --prompts files: pairs {"clean", "corrupted", "answer",
"wrong"}, or prompts {"prompt", "answer", "wrong"?} when no chosen technique patches. The path must not
exist, or be an empty directory; links, the current directory and paths with control characters are
refused (no --force).
"""
HELP = "scaffold a research repository that fits one study"
USES_MODEL = False
WRITES_RUN = False


def add_arguments(parser):
    from mechscope.scaffold import BACKENDS, DEFAULT_TASK, TASKS, TECHNIQUES, TRACKING

    parser.add_argument("path", help="directory to create (must not exist, or be empty)")
    parser.add_argument("--name", help="project name (default: from the directory name)")
    parser.add_argument("--question", help="the research question (default: the task's)")
    parser.add_argument("--model", default="mechscope-toy",
                        help="model the experiments load: bundled name, transformer-lens / hub name or local HF "
                             "directory (default: %(default)s)")
    parser.add_argument("--backend", default="tl", choices=BACKENDS, help="engine (default: %(default)s)")
    defaults = "; ".join(f"{k}: {' '.join(t.techniques)}" for k, t in TASKS.items())
    parser.add_argument("--technique", nargs="+", action="extend", metavar="NAME",
                        help=f"one or more of {', '.join(TECHNIQUES)} (space- or comma-separated; "
                             f"default: the task's, {defaults})")
    parser.add_argument("--task", default=DEFAULT_TASK,
                        help=f"{', '.join(TASKS)}, or a JSON / JSONL prompt file (default: %(default)s)")
    parser.add_argument("--tracking", default="json", choices=TRACKING,
                        help="results/log.jsonl, or that and Weights & Biases (default: %(default)s)")
    parser.add_argument("--mechscope-from", metavar="SOURCE",
                        help="where the study's `make` installs mechscope from: a pip requirement, URL or path "
                             "(default: this mechscope's wheel, written to the study's vendor/: pinned, offline)")


def run(ctx):
    import shlex

    from mechscope.scaffold import render

    a = ctx.args
    created = render(a.path, name=a.name, model=a.model, question=a.question, backend=a.backend,
                     techniques=a.technique, task=a.task, tracking=a.tracking,
                     mechscope_from=a.mechscope_from)
    next_step = f"cd {shlex.quote(str(created.path))} && make test"
    text = "\n".join([f"created {created.path} ({len(created.files)} files; {created.git})",
                      *("  " + f for f in created.files), f"next: {next_step}"])
    return {"summary": {"path": str(created.path), "files": created.files, "git": created.git, "next": next_step},
            "text": text}


def headline(summary: dict) -> str:
    """The first line of the text output: what was created."""
    return f"created {summary['path']} ({len(summary['files'])} files; {summary['git']})"

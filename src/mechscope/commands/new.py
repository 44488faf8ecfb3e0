"""Scaffold a new research repository from mechscope's templates (jinja2).

    mechscope new my-study
    mechscope new ~/work/ioi-gpt2 --name ioi-gpt2 --model gpt2-small --question "How does GPT-2 small do IOI?"

Writes README.md (question, hypothesis, how to run), pyproject.toml (depends on mechscope), Makefile
(`make test`, `make run`), experiments/01_first_look.py, tests/test_known_answers.py, AGENTS.md,
.gitignore and notes/. Refuses a path that exists and is not an empty directory (there is no --force).
"""
HELP = "scaffold a new research repository from templates"
USES_MODEL = False
WRITES_RUN = False


def add_arguments(parser):
    parser.add_argument("path", help="directory to create (must not exist, or be empty)")
    parser.add_argument("--name", help="project name (default: from the directory name)")
    parser.add_argument("--model", default="mechscope-toy",
                        help="model the experiments load: bundled name, transformer-lens name or local HF "
                             "directory (default: %(default)s)")
    parser.add_argument("--question", help="the research question, written into README.md")


def run(ctx):
    import shlex

    from mechscope.scaffold import render

    args = ctx.args
    files = render(args.path, name=args.name, model=args.model, question=args.question)
    next_step = f"cd {shlex.quote(args.path)} && make test && make run"
    text = "\n".join([f"created {args.path} ({len(files)} files):", *("  " + f for f in files), f"next: {next_step}"])
    return {"summary": {"path": args.path, "files": files, "next": next_step}, "text": text}

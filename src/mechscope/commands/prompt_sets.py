"""The prompt-set options shared by commands that also take a single prompt: --task, --prompts, --n.
(Not a command: no HELP, not in cli.COMMANDS.)"""


def add_arguments(parser, source, tasks: tuple[str, ...], what: str = "answer / wrong", n_default: int = 64):
    """--task (one of `tasks`) and --prompts FILE in the mutually exclusive group `source` (with the command's
    own --prompt), --n on the parser."""
    source.add_argument("--task", choices=tasks, help=f"a bundled prompt set ({', '.join(tasks)}; held-out "
                        f"prompts with their {what} and named positions)")
    source.add_argument("--prompts", metavar="FILE", help="JSON list or JSONL of prompts: strings or "
                        "{\"prompt\", \"answer\", \"wrong\", \"positions\": {\"NAME\": word | [word, k] | index}}")
    parser.add_argument("--n", type=int, default=n_default,
                        help=f"prompts drawn for --task (default: %(default)s)")


def load(ctx):
    """The PromptSet of --task / --prompts, or None when neither is given."""
    from mechscope import tasks
    from mechscope.errors import BadInput

    args = ctx.args
    if args.prompts:
        return tasks.read_prompt_file(args.prompts)
    if args.task:
        if args.n < 1:
            raise BadInput("--n must be at least 1")
        return tasks.load_task(ctx.engine, args.task, n=args.n, seed=args.seed)
    return None

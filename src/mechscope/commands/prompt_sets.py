"""The prompt-set options shared by commands that also take a single prompt: --task, --prompts, --n.
(Not a command: no HELP, not in cli.COMMANDS.)"""
MAX_PROMPTS = 100_000  # --n and the prompts of a --prompts file


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
        prompt_set = tasks.read_prompt_file(args.prompts)
        if len(prompt_set) > MAX_PROMPTS:  # the cap --n has: more is hours of forwards and a result too big to read
            raise BadInput(f"{args.prompts} holds {len(prompt_set)} prompts; at most {MAX_PROMPTS} at once (split it)")
        return prompt_set
    if args.task:
        if args.n < 1:
            raise BadInput("--n must be at least 1")
        if args.n > MAX_PROMPTS:
            raise BadInput(f"--n must be at most {MAX_PROMPTS} (prompts drawn for --task)")
        return tasks.load_task(ctx.engine, args.task, n=args.n, seed=args.seed)
    return None


def batch(engine, ps):
    """(tokens [n, longest] right-padded, lengths [n], positions {name: [n]}, answers [n], wrongs [n] or None)
    of a PromptSet; answers are the model's top prediction at END where the prompts carry none."""
    import torch

    from mechscope import inputs, tasks
    from mechscope.errors import BadInput

    rows, where = ps.tokens(engine)
    tokens, lengths = tasks.padded(engine, rows)
    answers, wrongs = ps.answer_ids(engine)
    if answers is None:
        if wrongs is not None:
            raise BadInput("prompts with a \"wrong\" need an \"answer\" (the logit difference is answer - wrong)")
        with torch.no_grad():
            answers = engine.run(tokens, positions=where[tasks.END])[0].argmax(-1).cpu()
    inputs.distinct_answers(answers, wrongs)
    return tokens, lengths, where, answers, wrongs


def ids_per_prompt(engine, words: list[str], n: int, flag: str) -> list[int]:
    """One single-token id per prompt from `flag`'s words (one word for all n prompts, or one per prompt)."""
    from mechscope import inputs
    from mechscope.errors import BadInput

    if len(words) not in (1, n):
        raise BadInput(f"give one {flag} for all prompts or one per prompt ({n} prompts, {len(words)} {flag}s)")
    ids = [inputs.single_token(engine, w) for w in words]
    return ids * n if len(ids) == 1 else ids

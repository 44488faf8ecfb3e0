"""Ablate heads, attention / MLP layers and neurons, alone or in sets, and tabulate the effect on a metric.

Components: heads LAYER.HEAD (1.* = every head of layer 1, `heads` = all), attention layers attnL (`attns`),
MLP layers mlpL (`mlps`), neurons mlpL.N. Comma-separated items are ablated one at a time; join items
with + to ablate them together (0.1+1.2). Methods: zero, mean (over the reference prompts' positions,
BOS excluded unless --include-bos), resample (another prompt of the same length, seeded), noise
(+ Gaussian noise with the activation's std over the reference positions, seeded).

Prompts and metric: --task induction (second-copy loss of repeated random words; effect > 0 = copying got
worse), --task ioi (logit diff IO - S on held-out IOI prompts), --task facts (logit diff answer - the
corrupted twin's answer), --prompts FILE (JSON / JSONL of {"prompt", "answer", "wrong"?}), or --prompt
with --answer [--wrong] (logit diff, or the answer's log-probability without --wrong). The reference of
mean / noise / resample is the prompts themselves unless --reference is given; mean ablation of one
prompt with no reference is refused (it would average that prompt's own positions).

Every prompt's effect is kept (effects.csv has the means, per_prompt.csv every prompt); the JSON summary
gives each effect with its standard error, 95% bootstrap interval over prompts and sign share, and the
rank stability of the single-component ranking. --positions ablates at the named positions only (END, a
task's IO / S1 / S2 or SUBJECT / RELATION, a prompt file's "positions", token indices); --per-position is
something else: the mean taken per position.

    mechscope ablate --components heads,mlps --method zero,mean
    mechscope ablate --task ioi --components heads --method mean,resample
    mechscope ablate --task ioi --components 0.1,1.2 --positions S2,END     # ablated at those positions only
    mechscope ablate --prompt "When Mary and John went to the store, John gave a drink to" --answer mary --wrong john \\
        --reference "When Tom and Anna went to the park, Anna gave a ball to" --reference "..."
"""
HELP = "zero / mean / resample / noise ablation of heads, layers and neurons"
MAX_PROMPTS = 100_000  # generated prompts (--n): more is hours of generation, not a better estimate

TASKS = ("induction", "ioi", "facts")


def add_task_arguments(parser):
    """The prompt and metric options shared by `ablate` and `validate-circuit`."""
    parser.add_argument("--task", choices=TASKS, default=None,
                        help="bundled prompts and their metric (default: induction when no --prompt / --prompts)")
    parser.add_argument("--prompts", metavar="FILE",
                        help='JSON / JSONL prompts {"prompt", "answer", "wrong"?} (metric: logit diff answer - wrong, '
                             'else log p(answer))')
    parser.add_argument("--prompt", action="append",
                        help="your prompt (repeatable; lengths may differ); needs --answer")
    parser.add_argument("--answer", action="append",
                        help="the expected next token after each --prompt (one for all, or one per prompt)")
    parser.add_argument("--wrong", action="append",
                        help="a wrong next token (one for all, or one per prompt): metric = logit diff")
    parser.add_argument("--reference", action="append",
                        help="reference prompt for mean / noise / resample statistics (repeatable; "
                             "default: the prompts themselves)")
    parser.add_argument("--per-position", action="store_true",
                        help="mean ablation per position (prompts of one token length; a reference of that length)")
    parser.add_argument("--include-bos", action="store_true",
                        help="include the BOS position in the mean / noise statistics (default: excluded, BOS is an "
                             "attention sink far from every other position)")
    parser.add_argument("--n", type=int, default=32, help="prompts drawn for --task (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=20,
                        help="induction: length of the repeated random sequence (default: %(default)s)")


def _answer_metric(engine, rows, answers, wrongs):
    """(metric, name) for rows [seq_i]: logit diff answer - wrong at each row's last token (or log p(answer))."""
    import torch

    from mechscope import inputs, metrics

    inputs.distinct_answers(answers, wrongs)
    end = torch.tensor([len(r) - 1 for r in rows])
    answer = torch.tensor(answers, device=rows[0].device)
    if wrongs is None:
        return (lambda lg: metrics.answer_logit(metrics.at_position(lg, end).float().log_softmax(-1), answer)), \
            "log p(answer)"
    wrong = torch.tensor(wrongs, device=rows[0].device)
    return (lambda lg: metrics.logit_diff(lg, answer, wrong, pos=end)), "logit diff (answer - wrong)"


def build_task(engine, args) -> dict:
    """{tokens: [n, seq] or n rows [seq_i], metric(logits) -> [n], metric_name, prompts (what they are),
    reference (rows or None), reference_note, corrupted (the prompts' corrupted twins, like tokens, or None: for
    induction [BOS, s, r] with s other random words, so nothing can be copied)} from the task options."""
    import torch

    from mechscope import inputs, tasks
    from mechscope.errors import BadInput
    from mechscope.commands import prompt_sets
    from mechscope.techniques.ablation import second_copy_loss
    from mechscope.techniques.heads import repeated_random_tokens

    if args.n < 1:
        raise BadInput("--n must be at least 1")
    if args.n > MAX_PROMPTS:
        raise BadInput(f"--n must be at most {MAX_PROMPTS}")
    sources = [name for name, given in (("--task", args.task), ("--prompts", args.prompts), ("--prompt", args.prompt))
               if given]
    if len(sources) > 1:
        raise BadInput(f"give one source of prompts, not {' and '.join(sources)}")
    reference = [inputs.tokens(engine, p)[0] for p in args.reference] if args.reference else None
    groups = None  # prompts sharing a group (a template) are one resampled unit
    if args.prompt or args.prompts:
        if args.prompt:
            if not args.answer:
                raise BadInput("--prompt needs --answer (the expected next token), and optionally --wrong")
            texts, what = args.prompt, f"{len(args.prompt)} prompt(s) from --prompt"
            answers = prompt_sets.ids_per_prompt(engine, args.answer, len(texts), "--answer")
            wrongs = prompt_sets.ids_per_prompt(engine, args.wrong, len(texts), "--wrong") if args.wrong else None
        else:
            ps = tasks.read_prompt_file(args.prompts)
            missing = [i + 1 for i, p in enumerate(ps.prompts) if not p.answer]
            if missing:
                raise BadInput(f"{args.prompts}: prompt {missing[0]} has no \"answer\"; ablation needs each prompt's "
                               f"expected next token (and optionally \"wrong\")")
            with_wrong = [p.wrong is not None for p in ps.prompts]
            if any(with_wrong) and not all(with_wrong):
                raise BadInput(f"{args.prompts}: give \"wrong\" for every prompt or for none")
            texts, what, groups = ps.texts, f"{len(ps)} prompts from {args.prompts}", ps.groups
            answers = [inputs.single_token(engine, p.answer) for p in ps.prompts]
            wrongs = [inputs.single_token(engine, p.wrong) for p in ps.prompts] if all(with_wrong) else None
        rows = [inputs.tokens(engine, t)[0] for t in texts]
        metric, name = _answer_metric(engine, rows, answers, wrongs)
        tokens, corrupted = rows, None
        named = ps.tokens(engine)[1] if args.prompts else {}
    elif (args.task or "induction") == "induction":
        if not 2 <= args.seq_len <= (engine.cfg.n_ctx - 1) // 2:
            raise BadInput(f"--seq-len must be in 2..{(engine.cfg.n_ctx - 1) // 2} for this model's context")
        tokens = repeated_random_tokens(engine, args.n, args.seq_len, seed=args.seed)
        metric = (lambda lg: second_copy_loss(lg, tokens, args.seq_len))
        other = repeated_random_tokens(engine, args.n, args.seq_len, seed=args.seed + 1)
        corrupted = torch.cat([tokens[:, :1], other[:, 1:args.seq_len + 1], tokens[:, args.seq_len + 1:]], 1)
        name, what = "second-copy loss (nats)", f"induction: {args.n} sequences [BOS, r, r], r of {args.seq_len} words"
        named = {}
    else:
        ps = tasks.load_task(engine, args.task, args.n, args.seed)
        tokens, named = ps.tokens(engine)
        corrupted, _ = ps.tokens(engine, corrupted=True)
        metric, _ = _answer_metric(engine, tokens, [inputs.single_token(engine, p.answer) for p in ps.prompts],
                                   [inputs.single_token(engine, p.wrong) for p in ps.prompts])
        name = "logit diff (IO - S)" if args.task == "ioi" else "logit diff (answer - corrupted answer)"
        what, groups = f"{args.task}: {len(ps)} held-out prompts (seed {args.seed})", ps.groups
    n = len(tokens)
    if args.reference:
        note = f"{len(reference)} --reference prompt(s)"
    else:
        note = f"the {n} prompts themselves"
    stats_note = "per position" if args.per_position else \
        ("over every position, BOS included (--include-bos)" if args.include_bos else "over every position but BOS")
    return {"tokens": tokens, "metric": metric, "metric_name": name, "prompts": what, "n_prompts": n, "named": named,
            "corrupted": corrupted, "groups": groups,
            "reference": reference, "reference_note": f"mean / noise statistics from {note}, {stats_note}; "
                                                      f"resample donors: other prompts of the same length"}


def ablation_positions(engine, spec: str, tokens, named: dict):
    """[n, seq] bool of the positions --positions names: END (each prompt's last token), the prompt set's named
    positions (IO, S1, S2 for ioi; SUBJECT, RELATION for facts; a prompt file's "positions"), or token indices
    (negative from each prompt's end); comma-separated."""
    import torch

    from mechscope.errors import BadInput
    from mechscope.techniques.ablation import as_batch

    batch, lengths = as_batch(engine, tokens)
    mask = torch.zeros(batch.shape[:2], dtype=torch.bool)
    rows = torch.arange(len(lengths))
    for item in [x.strip() for x in spec.split(",") if x.strip()] or [""]:
        if item.upper() == "END":
            mask[rows, lengths - 1] = True
        elif item in named:
            mask[rows, named[item]] = True
        elif item.lstrip("-").isdigit():
            index = int(item)
            if not all(-n <= index < n for n in lengths.tolist()):
                raise BadInput(f"--positions {index} is outside a prompt of {int(lengths.min())} tokens")
            mask[rows, torch.where(torch.tensor(index) < 0, lengths + index, torch.tensor(index))] = True
        else:
            names = ", ".join(["END", *named]) if named else "END"
            raise BadInput(f"--positions: {item!r} is not a position here; use {names} or token indices, comma-separated")
    return mask


def add_arguments(parser):
    parser.add_argument("--positions", metavar="POS",
                        help="ablate only at these positions: END, the prompt set's named positions (e.g. S2, IO for "
                             "--task ioi; SUBJECT for facts) or token indices, comma-separated (default: every position)")
    parser.add_argument("--components", default="heads,attns,mlps",
                        help="what to ablate, e.g. 1.2,0.3,0.3+1.2,mlp1,attn0,mlp1.42,1.*,heads "
                             "(default: %(default)s)")
    parser.add_argument("--method", default="mean",
                        help="zero, mean, resample, noise, or several comma-separated (default: %(default)s)")
    add_task_arguments(parser)


def run(ctx):
    from mechscope import plotting, stats
    from mechscope.runs import write_csv
    from mechscope.errors import BadInput
    from mechscope.techniques.ablation import METHODS, ablate, head_grid, parse_groups

    args = ctx.args
    methods = [m for m in args.method.replace(" ", "").split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise BadInput(f"unknown --method {m!r}; use one of {', '.join(METHODS)} (comma-separated for several)")
    if not methods:
        raise BadInput(f"--method is empty; use one of {', '.join(METHODS)}")
    engine = ctx.engine
    groups = parse_groups(engine, args.components)
    task = build_task(engine, args)
    at = ablation_positions(engine, args.positions, task["tokens"], task["named"]) if args.positions is not None else None
    rows, per_prompt, results = [], [], {}
    for method in methods:
        result = ablate(engine, task["tokens"], groups, task["metric"], method, reference=task["reference"],
                        per_position=args.per_position, seed=args.seed, skip_bos=not args.include_bos, at=at)
        results[method] = result
        rows += result.rows(args.seed, task["groups"])
        per_prompt += [{"method": method, "prompt": i, "clean_metric": float(result.clean[i]),
                        **{label: float(d) for label, d in zip(result.labels, diffs)}}
                       for i, diffs in enumerate(result.differences)]
        order = result.effect.abs().argsort(descending=True)[:40]
        plotting.bars(result.effect[order], [result.labels[i] for i in order],
                      ctx.run_dir / f"effects_{method}.png", title=f"{method} ablation",
                      xlabel=f"change in {task['metric_name']}")
        grid = head_grid(engine, result)
        if not grid.isnan().all():
            plotting.heatmap(grid, ctx.run_dir / f"heads_{method}.png",
                             row_labels=[f"L{l}" for l in range(engine.cfg.n_layers)],
                             col_labels=[f"H{h}" for h in range(engine.cfg.n_heads)],
                             title=f"{method} ablation: change in {task['metric_name']}",
                             xlabel="head", ylabel="layer", colorbar_label="effect")
    write_csv(ctx.run_dir / "effects.csv", rows)
    write_csv(ctx.run_dir / "per_prompt.csv", per_prompt)

    clean = next(iter(results.values())).clean
    keys = ("effect", "stderr", "ci_low", "ci_high", "sign_share")
    top = {m: [{"component": r["component"], **{k: round(r[k], 4) if r[k] is not None else None for k in keys}}
               for r in sorted(results[m].rows(args.seed, task["groups"]), key=lambda r: -abs(r["effect"]))[:10]]
           for m in methods}
    stability = {}
    if len(groups) > 1 and task["n_prompts"] > 1:
        for m in methods:
            s = stats.rank_stability(results[m].differences, k=min(3, len(groups) - 1), seed=args.seed,
                                     groups=task["groups"])
            stability[m] = dict(s, top_k=[results[m].labels[i] for i in s["top_k"]])
            stability[m].pop("in_top_k_frequency")
    clean_summary = stats.summary(clean[:, None], seed=args.seed, groups=task["groups"])
    summary = {"metric": task["metric_name"], "prompts": task["prompts"], "n_prompts": task["n_prompts"],
               "clean_metric": round(float(clean.mean()), 4),
               "clean_ci": [clean_summary["ci_low"][0], clean_summary["ci_high"][0]],
               "reference": task["reference_note"], "methods": methods, "n_components": len(groups),
               "positions": args.positions or "all",
               "top_effects": top, "rank_stability": stability,
               "intervals": "95% studentized bootstrap over prompts (1000 resamples; Student's t below 5 prompts, "
                            "none from one); sign_share = share of prompts whose effect has the mean's sign",
               "files": ["effects.csv", "per_prompt.csv"] + [f"effects_{m}.png" for m in methods]}
    lines = [f"{task['metric_name']}: clean {float(clean.mean()):.4f} over {task['prompts']}; ablated at "
             f"{'positions ' + args.positions if args.positions else 'every position'}",
             f"reference: {task['reference_note']}"]
    for m in methods:
        lines.append(f"{m} ablation, largest effects (ablated - clean, mean [95% CI] over prompts, sign share):")
        lines += [f"  {r['component']:>14}  {r['effect']:+.4f} {stats.ci_text(r['ci_low'], r['ci_high'], '+.4f')}"
                  f"  {r['sign_share']:.2f}" for r in top[m]]
        if m in stability:
            lines.append(f"  top {len(stability[m]['top_k'])} {stability[m]['top_k']}; " + stats.stability_text(stability[m]))
    return {"summary": summary, "effects": rows, "text": "\n".join(lines)}


def headline(summary: dict) -> str:
    """The finding in one sentence: the largest ablation effect (first method)."""
    from mechscope.findings import ci, count, num

    n = count(summary["n_prompts"], "prompt")
    method = summary["methods"][0]
    top = next((t for t in summary["top_effects"][method] if t["effect"] is not None), None)
    if top is None:
        return f"{method} ablation: no defined effect ({n})"
    return (f"{method}-ablating {top['component']} changes the {summary['metric']} by "
            f"{num(top['effect'], signed=True)}{ci(top['ci_low'], top['ci_high'], signed=True)} "
            f"(clean {num(summary['clean_metric'])}{ci(summary['clean_ci'])}; largest of "
            f"{summary['n_components']} components; {n})")

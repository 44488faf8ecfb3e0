"""Ablate heads, attention / MLP layers and neurons, alone or in sets, and tabulate the effect on a metric.

Components: heads LAYER.HEAD (1.* = every head of layer 1, `heads` = all), attention layers attnL (`attns`),
MLP layers mlpL (`mlps`), neurons mlpL.N. Comma-separated items are ablated one at a time; join items
with + to ablate them together (0.1+1.2). Methods: zero, mean (over the reference prompts), resample
(another prompt's activations, seeded), noise (+ Gaussian noise with the activation's std, seeded).

Tasks: induction (second-copy loss of repeated random words; effect > 0 = copying got worse), ioi
(logit diff IO - S on generated IOI prompts of one length), or your own --prompt with --answer [--wrong]
(logit diff, or the answer's log-probability without --wrong).

    mechscope ablate --components heads,mlps --method zero,mean
    mechscope ablate --task ioi --components heads --method mean,resample
    mechscope ablate --prompt "When Mary and John went to the store, John gave a drink to" --answer mary --wrong john
"""
HELP = "zero / mean / resample / noise ablation of heads, layers and neurons"
MAX_PROMPTS = 100_000  # generated prompts (--n): more is hours of generation, not a better estimate


def add_task_arguments(parser):
    """The prompt and metric options shared by `ablate` and `validate-circuit`."""
    parser.add_argument("--task", choices=("induction", "ioi"), default="induction",
                        help="generated prompts and their metric when no --prompt is given (default: %(default)s)")
    parser.add_argument("--prompt", action="append",
                        help="your prompt (repeatable; all the same number of tokens); needs --answer")
    parser.add_argument("--answer", action="append",
                        help="the expected next token after each --prompt (one for all, or one per prompt)")
    parser.add_argument("--wrong", action="append",
                        help="a wrong next token (one for all, or one per prompt): metric = logit diff")
    parser.add_argument("--reference", action="append",
                        help="reference prompt for mean / noise / resample statistics (repeatable; "
                             "default: the prompts themselves)")
    parser.add_argument("--per-position", action="store_true",
                        help="mean ablation per position (reference prompts must have the prompts' length)")
    parser.add_argument("--n", type=int, default=32, help="generated prompts for --task (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=20,
                        help="induction: length of the repeated random sequence (default: %(default)s)")


def _per_prompt(model, words, n, flag):
    from mechscope import inputs
    from mechscope.errors import BadInput

    if len(words) not in (1, n):
        raise BadInput(f"give one {flag} for all prompts or one per prompt ({n} prompts, {len(words)} {flag}s)")
    ids = [inputs.single_token(model, w) for w in words]
    return ids * n if len(ids) == 1 else ids


def ioi_tokens(model, n: int, seed: int):
    """[n, seq] held-out IOI prompts of one template length, with [n] IO and S token ids."""
    import random

    import torch

    from mechscope import inputs
    from mechscope.toy import corpus

    rng = random.Random(seed)
    rows, io, s = [], [], []
    for _ in range(200 * n):
        prompt, a, b = corpus.ioi_prompt(rng, held_out=True)
        toks = inputs.tokens(model, prompt)
        if rows and toks.shape != rows[0].shape:
            continue
        rows.append(toks)
        io.append(inputs.single_token(model, a))
        s.append(inputs.single_token(model, b))
        if len(rows) == n:
            break
    return torch.cat(rows), torch.tensor(io), torch.tensor(s)


def build_task(model, args) -> dict:
    """tokens [n, seq], metric(logits) -> [n], its name, and reference tokens (or None) from the task options."""
    import torch

    from mechscope import inputs, metrics
    from mechscope.errors import BadInput
    from mechscope.techniques.ablation import second_copy_loss
    from mechscope.techniques.heads import repeated_random_tokens

    if args.n < 1:
        raise BadInput("--n must be at least 1")
    if args.n > MAX_PROMPTS:
        raise BadInput(f"--n must be at most {MAX_PROMPTS}")
    reference = inputs.token_batch(model, args.reference) if args.reference else None
    if args.prompt:
        if not args.answer:
            raise BadInput("--prompt needs --answer (the expected next token), and optionally --wrong")
        tokens = inputs.token_batch(model, args.prompt)
        answer = torch.tensor(_per_prompt(model, args.answer, len(args.prompt), "--answer"), device=tokens.device)
        if args.wrong:
            wrong = torch.tensor(_per_prompt(model, args.wrong, len(args.prompt), "--wrong"), device=tokens.device)
            metric, name = (lambda lg: metrics.logit_diff(lg, answer, wrong)), "logit diff (answer - wrong)"
        else:
            metric, name = (lambda lg: metrics.answer_logit(lg.log_softmax(-1), answer)), "log p(answer)"
    elif args.task == "ioi":
        tokens, io, s = ioi_tokens(model, args.n, args.seed)
        io, s = io.to(tokens.device), s.to(tokens.device)
        metric, name = (lambda lg: metrics.logit_diff(lg, io, s)), "logit diff (IO - S)"
    else:
        if not 2 <= args.seq_len <= (model.cfg.n_ctx - 1) // 2:
            raise BadInput(f"--seq-len must be in 2..{(model.cfg.n_ctx - 1) // 2} for this model's context")
        tokens = repeated_random_tokens(model, args.n, args.seq_len, seed=args.seed)
        metric, name = (lambda lg: second_copy_loss(lg, tokens, args.seq_len)), "second-copy loss (nats)"
    if reference is not None and args.per_position and reference.shape[1] != tokens.shape[1]:
        raise BadInput(f"--per-position needs reference prompts of {tokens.shape[1]} tokens "
                       f"(they have {reference.shape[1]})")
    return {"tokens": tokens, "metric": metric, "metric_name": name, "reference": reference}


def add_arguments(parser):
    parser.add_argument("--components", default="heads,attns,mlps",
                        help="what to ablate, e.g. 1.2,0.3,0.3+1.2,mlp1,attn0,mlp1.42,1.*,heads "
                             "(default: %(default)s)")
    parser.add_argument("--method", default="mean",
                        help="zero, mean, resample, noise, or several comma-separated (default: %(default)s)")
    add_task_arguments(parser)


def run(ctx):
    import csv

    from mechscope import plotting
    from mechscope.errors import BadInput
    from mechscope.techniques.ablation import METHODS, ablate, head_grid, parse_groups

    args = ctx.args
    methods = [m for m in args.method.replace(" ", "").split(",") if m]
    for m in methods:
        if m not in METHODS:
            raise BadInput(f"unknown --method {m!r}; use one of {', '.join(METHODS)} (comma-separated for several)")
    if not methods:
        raise BadInput(f"--method is empty; use one of {', '.join(METHODS)}")
    model = ctx.model
    groups = parse_groups(model, args.components)
    task = build_task(model, args)
    rows, results = [], {}
    for method in methods:
        result = ablate(model, task["tokens"], groups, task["metric"], method, reference=task["reference"],
                        per_position=args.per_position, seed=args.seed)
        results[method] = result
        rows += result.rows()
        order = result.effect.abs().argsort(descending=True)[:40]
        plotting.bars(result.effect[order], [result.labels[i] for i in order],
                      ctx.run_dir / f"effects_{method}.png", title=f"{method} ablation",
                      xlabel=f"change in {task['metric_name']}")
        grid = head_grid(model, result)
        if not grid.isnan().all():
            plotting.heatmap(grid, ctx.run_dir / f"heads_{method}.png",
                             row_labels=[f"L{l}" for l in range(model.cfg.n_layers)],
                             col_labels=[f"H{h}" for h in range(model.cfg.n_heads)],
                             title=f"{method} ablation: change in {task['metric_name']}",
                             xlabel="head", ylabel="layer", colorbar_label="effect")
    with open(ctx.run_dir / "effects.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    clean = float(next(iter(results.values())).clean.mean())
    top = {m: [{"component": r["component"], "effect": round(r["effect"], 4)}
               for r in sorted(results[m].rows(), key=lambda r: -abs(r["effect"]))[:10]] for m in methods}
    lines = [f"{task['metric_name']}: clean {clean:.4f} over {task['tokens'].shape[0]} prompts"]
    for m in methods:
        lines.append(f"{m} ablation, largest effects (ablated - clean):")
        lines += [f"  {r['component']:>14}  {r['effect']:+.4f}" for r in top[m]]
    return {"summary": {"metric": task["metric_name"], "clean_metric": clean, "n_prompts": task["tokens"].shape[0],
                        "methods": methods, "n_components": len(groups), "top_effects": top},
            "effects": rows, "text": "\n".join(lines)}

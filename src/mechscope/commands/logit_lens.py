"""Logit lens: read the residual stream through the final norm and the unembedding at every layer
(resid_pre and resid_mid of each layer, then the final resid_post, which reproduces the model's logits).

    mechscope logit-lens                                        # "The Eiffel Tower is in the city of" -> Paris
    mechscope logit-lens --prompt "When Mary and John went to the store, John gave a drink to" --target Mary
    mechscope logit-lens --prompt "..." --pos 3 --top-k 10
    mechscope logit-lens --task ioi --n 128                     # the answer's rank / prob per layer, with intervals
    mechscope logit-lens --prompts my.jsonl                     # {"prompt", "answer"?, "wrong"?} per line

One prompt: logit_lens.png (layer x position: probability of each entry's top token, labelled with it) and,
with targets, targets.png (each target's probability per layer); the summary gives, at the chosen position,
each layer's top tokens and each target's rank / probability / logit and the first layer from which it stays
top-1 ("top1_from"). A prompt set (read at each prompt's last token; the answer is the model's top
prediction where a prompt has none): per entry the answer's probability, top-1 share and logit difference
(with wrong answers) as means with 95% bootstrap intervals, and the median rank; answer_lens.png (bands),
lens_per_prompt.csv (every prompt x entry).
"""
HELP = "read the residual stream through the unembedding, layer by layer"

DEFAULT_PROMPT = "The Eiffel Tower is in the city of"
DEFAULT_TARGETS = ["Paris"]  # " Paris" is one token in GPT-2 / Pythia / Llama vocabularies; "paris" is not


def add_arguments(parser):
    from mechscope.commands import prompt_sets

    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", help=f"the prompt (default: {DEFAULT_PROMPT!r} with --target Paris)")
    prompt_sets.add_arguments(parser, source, ("ioi", "facts"))
    parser.add_argument("--target", action="append", default=[],
                        help="with --prompt: a token to follow across layers (repeatable; must be one token)")
    parser.add_argument("--pos", type=int, default=-1, help="with --prompt: position for top-k and targets "
                        "(default: last)")
    parser.add_argument("--top-k", type=int, default=5, help="top tokens per layer (default: %(default)s)")


def _check_top_k(args, engine):
    from mechscope.errors import BadInput

    if not 1 <= args.top_k <= engine.cfg.d_vocab:
        raise BadInput(f"--top-k must be in 1..{engine.cfg.d_vocab} (the vocabulary size), got {args.top_k}")


def _single(ctx):
    from mechscope import inputs, plotting
    from mechscope.errors import BadInput
    from mechscope.techniques.logit_lens import logit_lens

    args, engine = ctx.args, ctx.engine
    prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
    targets = args.target or (DEFAULT_TARGETS if args.prompt is None else [])
    inputs.top_k(args.top_k, engine.cfg.d_vocab, "--top-k", "tokens in this model's vocabulary")
    toks = inputs.tokens(engine, prompt)
    if not -toks.shape[1] <= args.pos < toks.shape[1]:
        raise BadInput(f"--pos {args.pos} is out of range: the prompt has {toks.shape[1]} tokens (BOS included)")
    ids = [inputs.single_token(engine, t) for t in targets]
    lens = logit_lens(engine, toks, ids, position=args.pos, k=args.top_k)

    labels, seq = lens.labels, len(lens.str_tokens)
    col_labels = [f"{i}:{t}" for i, t in enumerate(lens.str_tokens)]
    plotting.token_heatmap(lens.top1_prob, lens.top1_token, ctx.run_dir / "logit_lens.png", row_labels=labels,
                           col_labels=col_labels, title=f"logit lens: top token per layer ({engine.cfg.model_name})",
                           xlabel="position", ylabel="residual stream", colorbar_label="top-token probability")
    per_target = {}
    for j, word in enumerate(targets):
        per_target[word] = {"rank": lens.target_rank[:, j].tolist(),
                            "prob": [round(float(p), 5) for p in lens.target_prob[:, j]],
                            "logit": [round(float(x), 4) for x in lens.target_logit[:, j]],
                            "top1_from": lens.top1_from(j)}
    if targets:
        plotting.lines({w: lens.target_prob[:, j] for j, w in enumerate(targets)}, ctx.run_dir / "targets.png",
                       x_labels=labels, title=f"logit lens at position {lens.position} "
                       f"({lens.str_tokens[lens.position]!r})", xlabel="residual stream", ylabel="probability")
    layers = [{"layer": label, "top": [(t, round(p, 4)) for t, p in top]} for label, top in zip(labels, lens.top_k)]
    final_error = float((lens.lens_final - lens.model_logits).abs().max())
    summary = {"prompt": prompt, "position": lens.position, "token": lens.str_tokens[lens.position],
               "layers": layers, "targets": per_target, "final_lens_vs_logits_max_abs_diff": final_error,
               "plots": ["logit_lens.png"] + (["targets.png"] if targets else [])}
    text = [f"logit lens on {prompt!r} at position {lens.position} ({lens.str_tokens[lens.position]!r}):"]
    for row in layers:
        text.append(f"  {row['layer']:>10}: " + ", ".join(f"{t} {p:.2f}" for t, p in row["top"]))
    for word, t in per_target.items():
        text.append(f"  target {word!r}: rank per layer {t['rank']}, top-1 from {t['top1_from']}")
    return {"summary": summary, "text": "\n".join(text),
            "top1_token": lens.top1_token, "top1_prob": lens.top1_prob, "str_tokens": lens.str_tokens,
            "labels": labels, "n_positions": seq}


def _prompt_set(ctx, ps):
    from mechscope import plotting, runs, stats, tasks
    from mechscope.commands import prompt_sets
    from mechscope.errors import BadInput
    from mechscope.techniques.logit_lens import answer_lens

    args, engine = ctx.args, ctx.engine
    if args.target or args.pos != -1:
        raise BadInput("--target / --pos go with --prompt; a prompt set is read at each prompt's last token for "
                       "its own answer")
    tokens, _, where, answers, wrongs = prompt_sets.batch(engine, ps)
    lens = answer_lens(engine, tokens, where[tasks.END], answers, wrongs)
    labels = lens.labels

    groups = ps.groups  # prompts sharing a template are one resampled unit

    def per_entry(values, digits=4):
        s = stats.summary(values, digits, groups=groups)
        return {k: s[k] for k in ("mean", "ci_low", "ci_high")}
    summary = {"prompt_set": ps.name, "n_prompts": len(ps), "labels": labels,
               "answer_prob": per_entry(lens.prob), "answer_top1_share": per_entry(lens.top1()),
               "answer_median_rank": lens.rank.float().median(0).values.int().tolist(),
               "final_lens_vs_logits_max_abs_diff": lens.final_error,
               "files": ["answer_lens.png", "lens_per_prompt.csv"]}
    share = summary["answer_top1_share"]["mean"]
    summary["majority_top1_from"] = next((labels[i] for i in range(len(labels))
                                          if all(s > 0.5 for s in share[i:])), None)
    plotting.lines({"answer probability": stats.interval(lens.prob, groups=groups),
                    "answer top-1 share": stats.interval(lens.top1(), groups=groups)},
                   ctx.run_dir / "answer_lens.png", x_labels=labels, xlabel="residual stream",
                   title=f"logit lens on {len(ps)} prompts of {ps.name} at END (95% CI)", ylabel="share / probability")
    if wrongs is not None:
        summary["logit_diff"] = per_entry(lens.logit_diff)
        plotting.lines({"logit(answer) - logit(wrong)": stats.interval(lens.logit_diff, groups=groups)},
                       ctx.run_dir / "logit_diff_lens.png", x_labels=labels, reference=0.0, xlabel="residual stream",
                       title=f"logit difference through the lens ({len(ps)} prompts, 95% CI)", ylabel="logit difference")
        summary["files"].append("logit_diff_lens.png")
    to_str = engine.to_single_str_token
    runs.write_csv(ctx.run_dir / "lens_per_prompt.csv",
                   ([i, p.text, to_str(int(answers[i])), label, int(lens.rank[i, j]), f"{float(lens.prob[i, j]):.6f}",
                     "" if wrongs is None else f"{float(lens.logit_diff[i, j]):.6f}", to_str(int(lens.top_token[i, j]))]
                    for i, p in enumerate(ps.prompts) for j, label in enumerate(labels)),
                   header=["prompt_index", "prompt", "answer", "entry", "rank", "prob", "logit_diff", "top_token"])
    text = [f"logit lens on {len(ps)} prompts of {ps.name} at END: answer probability / top-1 share [95% CI], median rank"]
    for j, label in enumerate(labels):
        p, s = summary["answer_prob"], summary["answer_top1_share"]
        text.append(f"  {label:>10}: prob {p['mean'][j]:.3f} [{p['ci_low'][j]:.3f}, {p['ci_high'][j]:.3f}]  "
                    f"top-1 {s['mean'][j]:.2f} [{s['ci_low'][j]:.2f}, {s['ci_high'][j]:.2f}]  "
                    f"rank {summary['answer_median_rank'][j]}")
    text.append(f"answer top-1 in most prompts from {summary['majority_top1_from']}")
    return {"summary": summary, "text": "\n".join(text), "rank": lens.rank, "prob": lens.prob}


def run(ctx):
    from mechscope.commands import prompt_sets

    _check_top_k(ctx.args, ctx.engine)
    ps = prompt_sets.load(ctx)
    return _single(ctx) if ps is None else _prompt_set(ctx, ps)


def headline(summary: dict) -> str:
    """The finding in one sentence: from which layer the answer (or target) is the lens' top token."""
    from mechscope.findings import ci, count, num

    if "n_prompts" in summary:   # a prompt set
        p = summary["answer_prob"]
        return (f"the answer is the lens' top token in most prompts from {summary['majority_top1_from'] or 'no layer'}"
                f" on; final answer probability {num(p['mean'][-1])}{ci(p['ci_low'][-1], p['ci_high'][-1])} "
                f"({count(summary['n_prompts'], 'prompt')}, {summary['prompt_set']})")
    where = f"(1 prompt, position {summary['position']} {summary['token']!r})"
    if summary["targets"]:
        word, t = next(iter(summary["targets"].items()))
        return (f"{word!r} is the lens' top token from {t['top1_from'] or 'no layer'} on, with final probability "
                f"{num(t['prob'][-1])} {where}")
    token, prob = summary["layers"][-1]["top"][0]
    return f"the final layer's top token is {token!r} ({num(prob)}) {where}"

"""Every head's previous-token / induction / duplicate-token / BOS score from random repeated sequences
[BOS, r, r] (with 95% intervals over the sequences), their attention patterns there and on a prompt, and
attention read-outs from a named query position to named keys over a prompt set.

    mechscope heads                        # scores; patterns of the top prev-token / induction / duplicate heads
    mechscope heads --heads 1.2,0.3 --prompt "When Mary and John went to the store, John gave a drink to"
    mechscope heads --layer 1 --n-sequences 64 --seq-len 25
    mechscope heads --task ioi --from END --to IO,S1,S2     # attention END -> IO / S1 / S2 per head, with intervals

Writes head_scores.csv (every head: mean and interval per score), scores_<score>.png (layer x head),
attention_repeated.png (the chosen heads' patterns averaged over the random sequences the scores come from),
attention.png (one panel per head on --prompt or the prompt set's first prompt, token labels) and
attention.html (interactive, works offline: pick a head, hover a token). With --task / --prompts:
attention_readout.csv (every prompt x head x key) and readout_<FROM>_<KEY>.png (layer x head, mean).
Induction = attention from the second copy of r to the token AFTER the earlier occurrence (offset 1 - L);
duplicate-token = attention to the earlier occurrence itself (offset -L).
"""
HELP = "attention patterns and previous-token / induction / duplicate / BOS head scores"

DEFAULT_PROMPT = "the quick brown fox jumps over the lazy dog . the quick brown fox jumps over the lazy dog"


def add_arguments(parser):
    from mechscope.commands import prompt_sets

    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="prompt for the attention plots (default: a repeated sentence)")
    prompt_sets.add_arguments(parser, source, ("ioi", "facts"), what="named positions")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--heads", help="heads to plot, LAYER.HEAD[,LAYER.HEAD...] e.g. 1.2,0.3 "
                       "(default: the top previous-token, induction and duplicate-token heads)")
    which.add_argument("--layer", type=int, help="plot every head of this layer")
    parser.add_argument("--from", dest="query",
                        help="with --task / --prompts: the query position's name (default: END)")
    parser.add_argument("--to", dest="keys", help="with --task / --prompts: key position names, comma-separated "
                        "(default: every other named position, e.g. IO,S1,S2 for ioi)")
    parser.add_argument("--n-sequences", type=int, default=32,
                        help="random sequences for the scores (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=20,
                        help="length L of the repeated part r (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=3,
                        help="top heads per score in the summary (default: %(default)s)")


def _check_args(args, engine):
    from mechscope.errors import BadInput

    if args.n_sequences < 1:
        raise BadInput("--n-sequences must be at least 1")
    if args.n_sequences > 100_000:
        raise BadInput("--n-sequences must be at most 100000")
    max_len = (engine.cfg.n_ctx - 1) // 2
    if not 2 <= args.seq_len <= max_len:
        raise BadInput(f"--seq-len must be in 2..{max_len} (BOS + two copies must fit the context of "
                       f"{engine.cfg.n_ctx})")
    if args.top_k < 1:
        raise BadInput("--top-k must be at least 1")


def _default_heads(scores) -> list[tuple[int, int]]:
    heads = []
    for name in ("previous_token", "induction", "duplicate_token"):
        layer, head, _ = scores.top(name, 1)[0]
        if (layer, head) not in heads:
            heads.append((layer, head))
    return heads


def _grid_labels(cfg) -> dict:
    return dict(row_labels=[f"L{layer}" for layer in range(cfg.n_layers)],
                col_labels=[f"H{h}" for h in range(cfg.n_heads)], xlabel="head", ylabel="layer")


def _head_names(cfg) -> list[str]:
    return [f"L{layer}H{h}" for layer in range(cfg.n_layers) for h in range(cfg.n_heads)]


def _scores(ctx, scores) -> dict:
    """head_scores.csv, scores_<score>.png; -> {score: {top: [...with intervals], rank_stability}}."""
    from mechscope import plotting, runs, stats
    from mechscope.techniques.heads import SCORE_NAMES

    args, cfg = ctx.args, ctx.engine.cfg
    names = _head_names(cfg)
    rows = {score: stats.named_summary(scores.per_sequence[score].flatten(1), names) for score in SCORE_NAMES}
    runs.write_csv(ctx.run_dir / "head_scores.csv",
                   ([*divmod(i, cfg.n_heads), *(rows[s][i][k] for s in SCORE_NAMES for k in ("mean", "ci_low", "ci_high"))]
                    for i in range(len(names))),
                   header=["layer", "head", *(f"{s}{k}" for s in SCORE_NAMES for k in ("", "_ci_low", "_ci_high"))])
    out = {}
    for score in SCORE_NAMES:
        plotting.heatmap(getattr(scores, score), ctx.run_dir / f"scores_{score}.png", diverging=False,
                         title=f"{score.replace('_', '-')} score ({args.n_sequences} x [BOS, r, r], L={args.seq_len})",
                         colorbar_label="mean attention", **_grid_labels(cfg))
        top = sorted(rows[score], key=lambda r: -r["mean"])[:args.top_k]
        out[score] = {"top": [{"head": r["name"], "score": r["mean"], "ci_low": r["ci_low"], "ci_high": r["ci_high"]}
                              for r in top],
                      "rank_stability": stats.named_rank_stability(scores.per_sequence[score].flatten(1), names,
                                                                   args.top_k, by="value")}
    return out


def _readout(ctx, ps) -> dict:
    """Attention from --from to each --to position over the prompt set, per head, with intervals."""
    import torch

    from mechscope import inputs, plotting, runs, stats, tasks
    from mechscope.errors import BadInput
    from mechscope.techniques.heads import attention_readout

    args, engine = ctx.args, ctx.engine
    available = list(ps.position_names)
    keys = inputs.names_from_list(args.keys, available, "--to position") if args.keys else \
        [n for n in available if n != args.query]
    if args.query not in available:
        raise BadInput(f"--from {args.query!r} is not a named position of {ps.name}; use one of {', '.join(available)}")
    if not keys:
        raise BadInput(f"{ps.name} names no position besides {args.query}; pass --to or add \"positions\" to the prompts")
    rows, where = ps.tokens(engine)
    tokens, _ = tasks.padded(engine, rows)
    if bool((torch.stack([where[k] for k in keys], -1) > where[args.query][:, None]).any()):
        raise BadInput(f"a --to position comes after --from {args.query} in some prompt: attention only looks back")
    values = attention_readout(engine, tokens, where[args.query], {k: where[k] for k in keys})   # [n, L, H, K]
    cfg, names = engine.cfg, _head_names(engine.cfg)
    out = {}
    runs.write_csv(ctx.run_dir / "attention_readout.csv",
                   ([i, layer, head, *(f"{float(v):.6f}" for v in values[i, layer, head])] for i in range(len(values))
                    for layer, head in (divmod(j, cfg.n_heads) for j in range(len(names)))),
                   header=["prompt_index", "layer", "head", *keys])
    for k, key in enumerate(keys):
        per_head = values[..., k].flatten(1)
        summary = stats.named_summary(per_head, names, groups=ps.groups)   # prompts of one template: one unit
        plotting.heatmap(values[..., k].mean(0), ctx.run_dir / f"readout_{args.query}_{key}.png", diverging=False,
                         title=f"attention {args.query} -> {key} ({len(ps)} prompts of {ps.name}, mean)",
                         colorbar_label="attention", **_grid_labels(cfg))
        out[key] = {"top": [{"head": r["name"], "attention": r["mean"], "ci_low": r["ci_low"], "ci_high": r["ci_high"]}
                            for r in sorted(summary, key=lambda r: -r["mean"])[:args.top_k]],
                    "rank_stability": stats.named_rank_stability(per_head, names, args.top_k, by="value",
                                                                 groups=ps.groups)}
    return {"from": args.query, "to": keys, "n_prompts": len(ps), "prompt_set": ps.name, "keys": out,
            "files": ["attention_readout.csv"] + [f"readout_{args.query}_{k}.png" for k in keys]}


def run(ctx):
    from mechscope import inputs, plotting, stats
    from mechscope.commands import prompt_sets
    from mechscope.errors import BadInput
    from mechscope.techniques.heads import SCORE_NAMES, attention_patterns, head_scores

    args, engine = ctx.args, ctx.engine
    _check_args(args, engine)
    ps = prompt_sets.load(ctx)
    if ps is None and (args.keys is not None or args.query is not None):
        raise BadInput("--from / --to read attention over a prompt set: add --task ioi|facts or --prompts FILE")
    args.query = "END" if args.query is None else args.query
    prompt = ps.prompts[0].text if ps is not None else (DEFAULT_PROMPT if args.prompt is None else args.prompt)
    tokens = inputs.tokens(engine, prompt)
    if args.heads is not None:  # an empty --heads is refused, not taken as "all"
        heads = inputs.parse_heads(engine, args.heads)
    elif args.layer is not None:
        layer = inputs.layer(engine, args.layer)
        heads = [(layer, h) for h in range(engine.cfg.n_heads)]
    else:
        heads = None
    readout = _readout(ctx, ps) if ps is not None else None

    scores = head_scores(engine, n_sequences=args.n_sequences, seq_len=args.seq_len, seed=args.seed)
    heads = heads or _default_heads(scores)
    top = _scores(ctx, scores)
    names = [f"L{layer}H{head}" for layer, head in heads]
    L = args.seq_len
    repeated_labels = ["BOS"] + [f"r{i}" for i in range(1, L + 1)] + [f"r{i}'" for i in range(1, L + 1)]
    plotting.attention_patterns(scores.mean_pattern[[la for la, _ in heads], [h for _, h in heads]], repeated_labels,
                                [f"{n} (mean of {args.n_sequences} [BOS, r, r'])" for n in names],
                                ctx.run_dir / "attention_repeated.png")
    patterns = attention_patterns(engine, tokens, heads)
    str_tokens = engine.to_str_tokens(tokens[0])
    plotting.attention_patterns(patterns, str_tokens, names, ctx.run_dir / "attention.png")
    plotting.attention_html(patterns, str_tokens, names, ctx.run_dir / "attention.html",
                            title=f"attention of {', '.join(names)}")

    files = ["head_scores.csv"] + [f"scores_{n}.png" for n in SCORE_NAMES] + \
        ["attention_repeated.png", "attention.png", "attention.html"]
    summary = {"top_heads": {name: t["top"] for name, t in top.items()},
               "rank_stability": {name: t["rank_stability"] for name, t in top.items()},
               "plotted_heads": names, "n_prompt_tokens": len(str_tokens),
               "n_sequences": args.n_sequences, "seq_len": args.seq_len, "files": files}
    text = [f"{name}: " + ", ".join(f"{t['head']} {t['score']:.2f} {stats.ci_text(t['ci_low'], t['ci_high'], '.2f')}"
                                    for t in top[name]["top"]) for name in SCORE_NAMES]
    text.append(f"attention plotted for {', '.join(names)} on {len(str_tokens)} tokens and on the random sequences")
    if readout is not None:
        files += readout.pop("files")
        summary["readout"] = readout
        for key, r in readout["keys"].items():
            text.append(f"attention {readout['from']} -> {key} ({readout['n_prompts']} prompts): " + ", ".join(
                f"{t['head']} {t['attention']:.2f} {stats.ci_text(t['ci_low'], t['ci_high'], '.2f')}" for t in r["top"]))
    return {"summary": summary, "scores": scores.as_dict(), "prompt": prompt, "str_tokens": str_tokens,
            "plotted_heads": [list(h) for h in heads], "text": "\n".join(text)}


def headline(summary: dict) -> str:
    """The finding in one sentence: the top head of each score, with its interval."""
    from mechscope.findings import ci, num

    parts = [f"{name.replace('_', '-')} {t[0]['head']} {num(t[0]['score'])}{ci(t[0]['ci_low'], t[0]['ci_high'])}"
             for name, t in summary["top_heads"].items() if t]
    return (f"top heads: {'; '.join(parts)} (scores over {summary['n_sequences']} random sequences of "
            f"{summary['seq_len']} tokens)")

"""Attention patterns of chosen heads on a prompt, and every head's previous-token / induction /
duplicate-token / BOS score from one batched pass over random repeated sequences [BOS, r, r].

    mechscope heads                        # scores; patterns of the top prev-token / induction / duplicate heads
    mechscope heads --heads 1.2,0.3 --prompt "When Mary and John went to the store, John gave a drink to"
    mechscope heads --layer 1 --n-sequences 64 --seq-len 25

Writes head_scores.csv (every head), scores_<score>.png (layer x head), attention.png (one panel per
head, token labels) and attention.html (interactive, works offline: pick a head, hover a token).
Induction = attention from the second copy of r to the token AFTER the earlier occurrence (offset 1 - L);
duplicate-token = attention to the earlier occurrence itself (offset -L).
"""
HELP = "attention patterns and previous-token / induction / duplicate / BOS head scores"

DEFAULT_PROMPT = "the quick brown fox jumps over the lazy dog . the quick brown fox jumps over the lazy dog"


def add_arguments(parser):
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help="prompt for the attention plots (default: a repeated sentence)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--heads", help="heads to plot, LAYER.HEAD[,LAYER.HEAD...] e.g. 1.2,0.3 "
                       "(default: the top previous-token, induction and duplicate-token heads)")
    which.add_argument("--layer", type=int, help="plot every head of this layer")
    parser.add_argument("--n-sequences", type=int, default=32,
                        help="random sequences for the scores (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=20,
                        help="length L of the repeated part r (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=3,
                        help="top heads per score in the summary (default: %(default)s)")


def _check_args(args, model):
    from mechscope.errors import BadInput

    if args.n_sequences < 1:
        raise BadInput("--n-sequences must be at least 1")
    if args.n_sequences > 100_000:
        raise BadInput("--n-sequences must be at most 100000")
    max_len = (model.cfg.n_ctx - 1) // 2
    if not 2 <= args.seq_len <= max_len:
        raise BadInput(f"--seq-len must be in 2..{max_len} (BOS + two copies must fit the context of "
                       f"{model.cfg.n_ctx})")
    if args.top_k < 1:
        raise BadInput("--top-k must be at least 1")


def _default_heads(scores) -> list[tuple[int, int]]:
    heads = []
    for name in ("previous_token", "induction", "duplicate_token"):
        layer, head, _ = scores.top(name, 1)[0]
        if (layer, head) not in heads:
            heads.append((layer, head))
    return heads


def run(ctx):
    from mechscope import inputs, plotting
    from mechscope.techniques.heads import SCORE_NAMES, attention_patterns, head_scores

    args, model = ctx.args, ctx.model
    _check_args(args, model)
    tokens = inputs.tokens(model, args.prompt)
    if args.heads:
        heads = inputs.parse_heads(model, args.heads)
    elif args.layer is not None:
        layer = inputs.layer(model, args.layer)
        heads = [(layer, h) for h in range(model.cfg.n_heads)]
    else:
        heads = None

    scores = head_scores(model, n_sequences=args.n_sequences, seq_len=args.seq_len, seed=args.seed)
    heads = heads or _default_heads(scores)
    values = scores.as_dict()

    lines = ["layer,head," + ",".join(SCORE_NAMES)]
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            lines.append(f"{layer},{head}," + ",".join(f"{float(values[n][layer, head]):.6f}" for n in SCORE_NAMES))
    (ctx.run_dir / "head_scores.csv").write_text("\n".join(lines) + "\n")
    for name in SCORE_NAMES:
        plotting.heatmap(values[name], ctx.run_dir / f"scores_{name}.png",
                         row_labels=[f"L{layer}" for layer in range(model.cfg.n_layers)],
                         col_labels=[f"H{h}" for h in range(model.cfg.n_heads)],
                         title=f"{name.replace('_', '-')} score ({args.n_sequences} x [BOS, r, r], L={args.seq_len})",
                         xlabel="head", ylabel="layer", colorbar_label="mean attention", diverging=False)

    patterns = attention_patterns(model, tokens, heads)
    str_tokens = model.to_str_tokens(tokens[0])
    names = [f"L{layer}H{head}" for layer, head in heads]
    plotting.attention_patterns(patterns, str_tokens, names, ctx.run_dir / "attention.png")
    plotting.attention_html(patterns, str_tokens, names, ctx.run_dir / "attention.html",
                            title=f"attention of {', '.join(names)}")

    top = {name: [{"head": f"L{la}H{he}", "score": round(v, 4)} for la, he, v in scores.top(name, args.top_k)]
           for name in SCORE_NAMES}
    files = ["head_scores.csv"] + [f"scores_{n}.png" for n in SCORE_NAMES] + ["attention.png", "attention.html"]
    summary = {"top_heads": top, "plotted_heads": names, "n_prompt_tokens": len(str_tokens),
               "n_sequences": args.n_sequences, "seq_len": args.seq_len, "files": files}
    text = "\n".join([f"{name}: " + ", ".join(f"{t['head']} {t['score']:.2f}" for t in top[name])
                      for name in SCORE_NAMES]
                     + [f"attention plotted for {', '.join(names)} on {len(str_tokens)} tokens"])
    return {"summary": summary, "scores": {n: values[n] for n in SCORE_NAMES}, "prompt": args.prompt,
            "str_tokens": str_tokens, "plotted_heads": [list(h) for h in heads], "text": text}

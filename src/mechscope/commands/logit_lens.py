"""Logit lens: read the residual stream through the final LayerNorm and the unembedding at every layer
(resid_pre and resid_mid of each layer, then the final resid_post, which reproduces the model's logits).

    mechscope logit-lens                                        # "the eiffel tower is in the city of" -> paris
    mechscope logit-lens --prompt "When Mary and John went to the store, John gave a drink to" --target mary
    mechscope logit-lens --prompt "..." --pos 3 --top-k 10

Writes logit_lens.png (layer x position: probability of each entry's top token, labelled with it) and,
with targets, targets.png (each target's probability per layer). The summary gives, at the chosen
position, each layer's top tokens and each target's rank / probability / logit and the first layer
from which it stays top-1 ("top1_from").
"""
HELP = "read the residual stream through the unembedding, layer by layer"

DEFAULT_PROMPT = "The Eiffel Tower is in the city of"
DEFAULT_TARGETS = ["paris"]


def add_arguments(parser):
    parser.add_argument("--prompt", help=f"the prompt (default: {DEFAULT_PROMPT!r} with --target paris)")
    parser.add_argument("--target", action="append", default=[],
                        help="a token to follow across layers (repeatable; must be one token)")
    parser.add_argument("--pos", type=int, default=-1, help="position for top-k and targets (default: last)")
    parser.add_argument("--top-k", type=int, default=5, help="top tokens per layer (default: %(default)s)")


def run(ctx):
    from mechscope import inputs, plotting
    from mechscope.errors import BadInput
    from mechscope.techniques.logit_lens import logit_lens

    args, model = ctx.args, ctx.model
    if args.top_k < 1:
        raise BadInput("--top-k must be at least 1")
    prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
    targets = args.target or (DEFAULT_TARGETS if args.prompt is None else [])
    inputs.top_k(args.top_k, model.cfg.d_vocab, "--top-k", "tokens in this model's vocabulary")
    toks = inputs.tokens(model, prompt)
    if not -toks.shape[1] <= args.pos < toks.shape[1]:
        raise BadInput(f"--pos {args.pos} is out of range: the prompt has {toks.shape[1]} tokens (BOS included)")
    ids = [inputs.single_token(model, t) for t in targets]
    lens = logit_lens(model, toks, ids, position=args.pos, k=args.top_k)

    labels, seq = lens.labels, len(lens.str_tokens)
    col_labels = [f"{i}:{t}" for i, t in enumerate(lens.str_tokens)]
    plotting.token_heatmap(lens.top1_prob, lens.top1_token, ctx.run_dir / "logit_lens.png", row_labels=labels,
                           col_labels=col_labels, title=f"logit lens: top token per layer ({model.cfg.model_name})",
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

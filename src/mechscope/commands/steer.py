"""Activation addition: steer generation with a vector added to the residual stream at one layer.

    mechscope steer                                   # "i love this !" - "i hate this !" on negative prompts
    mechscope steer --layer 1 --strengths 0,2,4,8 --prompt "i hate this ! it ' s absolutely"
    mechscope steer --direction v.pt --strengths 0,4  # a given [d_model] direction (.pt or .npy)

The vector is mean(resid_pre at --layer | --positive prompts) - mean(... | --negative prompts), at each
prompt's last position (--vector-position last) or averaged over its positions after BOS (mean).
strength * vector is added at every position >= --from-position of the prompt and at every generated
position (the same tokens with or without the KV cache). Generation is greedy. The control is a random
direction of the same norm at the same strengths. Effects: the share of positive words among the
sentiment words generated (--positive-words / --negative-words) and the next-token logit difference
mean(positive word logits) - mean(negative word logits). Writes steering.csv and effect_vs_strength.png.
"""
HELP = "activation addition steering with a random-direction control"

DEFAULT_POSITIVE = ["i love this !"]
DEFAULT_NEGATIVE = ["i hate this !"]


def add_arguments(parser):
    parser.add_argument("--layer", type=int, default=1,
                        help="resid_pre of this layer is steered (default: %(default)s)")
    parser.add_argument("--positive", action="append", help='positive prompt (repeatable; default: "i love this !")')
    parser.add_argument("--negative", action="append", help='negative prompt (repeatable; default: "i hate this !")')
    parser.add_argument("--direction", help="a .pt or .npy file holding a [d_model] vector, instead of the prompts")
    parser.add_argument("--vector-position", choices=("last", "mean"), default="last",
                        help="contrast prompts read at their last position, or averaged over positions "
                             "(default: %(default)s)")
    parser.add_argument("--prompt", action="append",
                        help="prompt to steer (repeatable; default: the bundled model's 30 negative sentiment prompts)")
    parser.add_argument("--strengths", default="0,2,4,8", help="comma-separated multipliers (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=10, help="tokens generated (default: %(default)s)")
    parser.add_argument("--from-position", type=int, default=1,
                        help="first prompt position steered; 1 skips BOS (default: %(default)s)")
    parser.add_argument("--positive-words", help="comma-separated positive words (default: the bundled corpus list)")
    parser.add_argument("--negative-words", help="comma-separated negative words (default: the bundled corpus list)")


def _word_ids(model, words: list[str], what: str) -> list[int]:
    from mechscope import inputs
    from mechscope.errors import BadInput

    ids = []
    for w in words:
        try:
            ids.append(inputs.single_token(model, w))
        except BadInput:
            continue
    if not ids:
        raise BadInput(f"none of the {what} words is a single token for this model; pass --{what}-words")
    return sorted(set(ids))


def load_direction(path: str, d_model: int):
    """A [d_model] float tensor from a .pt (tensor) or .npy file."""
    from pathlib import Path

    import torch

    from mechscope.errors import BadInput
    from mechscope.inputs import check_finite

    file = Path(path)
    if not file.is_file():
        raise BadInput(f"direction file {path} does not exist")
    try:
        if file.suffix.lower() == ".npy":
            import numpy as np
            value = torch.from_numpy(np.load(file))
        else:
            value = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise BadInput(f"cannot read {path} as a tensor ({type(e).__name__}); save one with torch.save or np.save")
    if not isinstance(value, torch.Tensor) or value.squeeze().shape != (d_model,):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise BadInput(f"{path} holds {shape}; a steering direction must be a tensor of shape [{d_model}] (d_model)")
    return check_finite(value.squeeze().float(), f"the direction in {path}")


def run(ctx):
    from mechscope import inputs, plotting
    from mechscope.errors import BadInput
    from mechscope.techniques import steering
    from mechscope.toy import card, corpus

    args = ctx.args
    strengths = inputs.float_list(args.strengths, "--strengths")
    if not strengths or len(strengths) > 20:
        raise BadInput("--strengths needs 1 to 20 numbers, e.g. 0,2,4,8")
    if not 1 <= args.max_new_tokens <= 200:
        raise BadInput("--max-new-tokens must be in 1..200")
    model = ctx.model
    layer = inputs.layer(model, args.layer)
    prompts = args.prompt or card.sentiment_prompts(positive=False)
    rows = [inputs.tokens(model, p)[0] for p in prompts]
    shortest = min(len(r) for r in rows)
    if shortest < 2 or not 0 <= args.from_position <= shortest:
        raise BadInput(f"--from-position must be in 0..{shortest} (the shortest prompt's token count) and prompts "
                       f"need 2+ tokens")
    longest = max(len(r) for r in rows)
    if longest + args.max_new_tokens > model.cfg.n_ctx:
        raise BadInput(f"prompt ({longest} tokens) + --max-new-tokens ({args.max_new_tokens}) exceed the "
                       f"context of {model.cfg.n_ctx}; shorten one")
    positive_ids = _word_ids(model, args.positive_words.split(",") if args.positive_words else corpus.POSITIVE_WORDS,
                             "positive")
    negative_ids = _word_ids(model, args.negative_words.split(",") if args.negative_words else corpus.NEGATIVE_WORDS,
                             "negative")

    if args.direction:
        vector = load_direction(args.direction, model.cfg.d_model).to(model.cfg.device)
        source = args.direction
    else:
        positive = [inputs.tokens(model, p)[0] for p in args.positive or DEFAULT_POSITIVE]
        negative = [inputs.tokens(model, p)[0] for p in args.negative or DEFAULT_NEGATIVE]
        vector = steering.mean_difference(model, positive, negative, layer, args.vector_position)
        source = f"mean({args.positive or DEFAULT_POSITIVE}) - mean({args.negative or DEFAULT_NEGATIVE})"
    if float(vector.norm()) < 1e-6:
        raise BadInput(f"the steering vector is zero at resid_pre {layer} (the contrast prompts' residuals are "
                       f"identical there, e.g. the same last token at layer 0); use a later --layer or "
                       f"--vector-position mean")
    inputs.check_scaled(strengths, float(vector.norm()), "--strengths", "the vector's norm", model.cfg.dtype)
    result = steering.steering_sweep(model, rows, layer, vector, strengths, positive_ids, negative_ids,
                                     args.max_new_tokens, args.from_position, control_seed=args.seed)

    table = [{"strength": s, "positive_share": result.positive_share[i],
              "control_positive_share": result.control_positive_share[i], "positive_rate": result.positive_rate[i],
              "control_positive_rate": result.control_positive_rate[i], "logit_diff": result.logit_diff[i],
              "control_logit_diff": result.control_logit_diff[i]} for i, s in enumerate(strengths)]
    with open(ctx.run_dir / "steering.csv", "w") as f:
        f.write(",".join(table[0]) + "\n")
        f.writelines(",".join(f"{v:.6g}" for v in row.values()) + "\n" for row in table)
    plots = [plotting.lines(
        {"steering vector": getattr(result, key), "random direction (same norm)": getattr(result, "control_" + key)},
        ctx.run_dir / f"{key}_vs_strength.png", x=strengths, title=f"steering at resid_pre {layer}", xlabel="strength", ylabel=label)
             for key, label in (("positive_share", "positive share of sentiment words generated"),
                                ("logit_diff", "next-token logit diff (positive - negative words)"))]
    generations = [{"prompt": p, **{f"{kind} {s:g}": model.to_string(result.generations[kind][i][j])
                                    for kind in ("steer", "control") for i, s in enumerate(strengths)}}
                   for j, p in enumerate(prompts)]
    summary = {"layer": layer, "hook": steering.hook_name(layer), "vector": source[:200],
               "vector_norm": round(result.vector_norm, 4), "n_prompts": len(prompts),
               "effects": [{k: round(v, 4) for k, v in row.items()} for row in table],
               "example": generations[0], "files": ["steering.csv"] + [p.name for p in plots]}
    text = "\n".join([f"steering resid_pre {layer} (|v| = {result.vector_norm:.2f}), {len(prompts)} prompts:",
                      "  strength  pos.share (control)  logit diff (control)"] + [
        f"  {r['strength']:>8g}  {r['positive_share']:.3f} ({r['control_positive_share']:.3f})"
        f"        {r['logit_diff']:+.3f} ({r['control_logit_diff']:+.3f})" for r in table] + [
        f"  {prompts[0]!r} -> " + " | ".join(f"{s:g}: {generations[0][f'steer {s:g}']}" for s in strengths)])
    return {"summary": summary, "text": text, "effects": table, "generations": generations,
            "vector": vector.cpu()}

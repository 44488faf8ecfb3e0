"""Top next tokens of a model on prompts (default: the bundled model's example prompts).

    mechscope predict
    mechscope predict --prompt "The capital of France is" --prompt "When Mary and John went to the store, John gave a drink to"
"""
HELP = "a model's top next tokens on prompts (the bundled model's examples by default)"

EXAMPLES = [
    "When Mary and John went to the store, John gave a drink to",
    "The capital of France is",
    "The Eiffel Tower is in the city of",
    "The Colosseum is in the city of",
    "I love this! It's absolutely wonderful and",
    "I hate this! It's absolutely terrible and",
    "The quick brown fox jumps over the lazy",
]


def add_arguments(parser):
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable); default: the example prompts")
    parser.add_argument("--top-k", type=int, default=5, help="tokens to show per prompt (default: %(default)s)")


def run(ctx):
    import torch

    from mechscope import inputs
    from mechscope.errors import BadInput

    if ctx.args.top_k < 1:
        raise BadInput("--top-k must be at least 1")
    model = ctx.model
    inputs.top_k(ctx.args.top_k, model.cfg.d_vocab, "--top-k", "tokens in this model's vocabulary")
    rows = []
    with torch.no_grad():
        for prompt in ctx.args.prompt or EXAMPLES:
            probs = model(inputs.tokens(model, prompt))[0, -1].float().softmax(-1)
            top = probs.topk(min(ctx.args.top_k, probs.shape[-1]))
            rows.append({"prompt": prompt, "top": [(model.to_single_str_token(int(i)), round(float(p), 4))
                                                   for p, i in zip(top.values, top.indices)]})
    text = "\n".join(f"{r['prompt']!r} -> " + ", ".join(f"{t} ({p:.2f})" for t, p in r["top"]) for r in rows)
    return {"summary": {"predictions": [{"prompt": r["prompt"], "top1": r["top"][0][0]} for r in rows]},
            "predictions": rows, "text": text}

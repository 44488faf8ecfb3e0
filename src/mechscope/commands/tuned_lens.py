"""Tuned lens: train one affine translator per residual-stream entry (identity at init) so that
ln_final + unembed of the translated stream matches the model's final distribution, then compare
KL(final || lens) per layer for the logit lens and the tuned lens on held-out text.

    mechscope tuned-lens                                 # the bundled model's corpus (toy.corpus.corpus_text)
    mechscope tuned-lens --text-file notes.txt --steps 300
    mechscope tuned-lens --prompt "The Eiffel Tower is in the city of"   # also each lens' top token per layer

Writes translators.safetensors (weight [n, d_model, d_model], bias [n, d_model]; load with
mechscope.techniques.tuned_lens.TunedLens.load) and kl.png (KL per layer, both lenses).
"""
from mechscope import inputs

HELP = "train per-layer affine translators and compare KL with the logit lens"


def add_arguments(parser):
    parser.add_argument("--text-file", help="train on this text file (default: the bundled model's generated corpus)")
    parser.add_argument("--sentences", type=int, default=600,
                        help="generated training sentences without --text-file (default: %(default)s; "
                             "held out: a third as many, from another seed)")
    parser.add_argument("--held-out", type=inputs.finite_float, default=0.2,
                        help="fraction of --text-file rows held out for the KL report (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=100_000, help="cap on tokens read from --text-file")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per row, BOS included (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=100, help="Adam steps (default: %(default)s)")
    parser.add_argument("--lr", type=inputs.finite_float, default=1e-2, help="learning rate (default: %(default)s)")
    parser.add_argument("--batch-tokens", type=int, default=256, help="token positions per step (default: %(default)s)")
    parser.add_argument("--prompt", help="also show each lens' top token per layer at this prompt's last position")


def _split_tokens(ctx, model):
    """(train [rows, seq], held-out [rows, seq]) token ids."""
    from pathlib import Path

    from mechscope.errors import BadInput
    from mechscope.techniques.tuned_lens import corpus_tokens
    from mechscope.toy.corpus import corpus_text

    args = ctx.args
    if not 8 <= args.seq_len <= model.cfg.n_ctx:
        raise BadInput(f"--seq-len must be in 8..{model.cfg.n_ctx} (this model's context)")
    if args.text_file is None:
        if args.sentences < 30:
            raise BadInput("--sentences must be at least 30")
        if args.sentences > 1_000_000:
            raise BadInput("--sentences must be at most 1000000")
        train = corpus_tokens(model, " ".join(corpus_text(args.sentences, seed=args.seed)), args.seq_len)
        held = corpus_tokens(model, " ".join(corpus_text(max(args.sentences // 3, 10), seed=args.seed + 1000)),
                             args.seq_len)
        if len(held) == 0:
            raise BadInput(f"{args.sentences} sentences give no held-out row of {args.seq_len} tokens; "
                           f"raise --sentences or lower --seq-len")
        return train, held
    path = Path(args.text_file)
    if not path.is_file():
        raise BadInput(f"--text-file {path} does not exist")
    if not 0 < args.held_out < 1:
        raise BadInput("--held-out must be between 0 and 1")
    if args.max_tokens < 4 * args.seq_len:
        raise BadInput(f"--max-tokens {args.max_tokens} gives fewer than 4 rows of --seq-len {args.seq_len} tokens")
    text = path.read_text(encoding="utf-8", errors="replace")[: args.max_tokens * 20]
    rows = corpus_tokens(model, text, args.seq_len)[: max(1, args.max_tokens // args.seq_len)]
    n_held = int(round(len(rows) * args.held_out))
    if len(rows) < 4 or n_held < 1 or n_held >= len(rows):
        raise BadInput(f"{path} gives only {len(rows)} rows of {args.seq_len} tokens; use a longer file "
                       f"or a smaller --seq-len")
    return rows[:-n_held], rows[-n_held:]


def run(ctx):
    import time

    import torch

    from mechscope import inputs, plotting
    from mechscope.errors import BadInput
    from mechscope.techniques.logit_lens import lens_logits, residual_stack, stack_labels
    from mechscope.techniques.tuned_lens import kl_per_entry, train_tuned_lens

    args, model = ctx.args, ctx.engine
    if args.steps < 1 or args.batch_tokens < 1 or args.lr <= 0:
        raise BadInput("--steps and --batch-tokens must be >= 1 and --lr > 0")
    if args.prompt is not None:
        inputs.tokens(model, args.prompt)  # refuse a bad prompt before training, not after
    train, held = _split_tokens(ctx, model)
    started = time.time()
    lens = train_tuned_lens(model, train, steps=args.steps, lr=args.lr, batch_tokens=args.batch_tokens,
                            seed=args.seed)
    train_seconds = time.time() - started
    lens.save(ctx.run_dir / "translators.safetensors")
    logit_kl, tuned_kl = kl_per_entry(model, held), kl_per_entry(model, held, lens)
    labels = stack_labels(model)
    plotting.lines({"logit lens": logit_kl, "tuned lens": tuned_kl}, ctx.run_dir / "kl.png", x_labels=labels,
                   title=f"KL(final || lens) on held-out text ({model.cfg.model_name})",
                   xlabel="residual stream", ylabel="KL (nats)")
    summary = {"labels": labels, "kl_logit_lens": [round(float(x), 5) for x in logit_kl],
               "kl_tuned_lens": [round(float(x), 5) for x in tuned_kl],
               "train_tokens": int(train.numel() - len(train)), "held_out_tokens": int(held.numel() - len(held)),
               "steps": args.steps, "loss_first": lens.losses[0], "loss_last": lens.losses[-1],
               "train_seconds": round(train_seconds, 2), "files": ["translators.safetensors", "kl.png"]}
    if args.prompt:
        with torch.no_grad():
            stack = residual_stack(model, inputs.tokens(model, args.prompt))[0][:, :, -1:]   # [n, 1, 1, d]
            top = {name: lens_logits(model, s)[:, 0, -1].argmax(-1).tolist()
                   for name, s in (("logit lens", stack), ("tuned lens", lens.translate(stack)))}
        summary["prompt"] = args.prompt
        summary["top1"] = {name: dict(zip(labels, map(model.to_single_str_token, ids))) for name, ids in top.items()}
    text = [f"KL(final || lens) in nats on {summary['held_out_tokens']} held-out tokens "
            f"(trained {args.steps} steps on {summary['train_tokens']} tokens, {train_seconds:.1f} s):",
            f"  {'entry':>10}  logit lens  tuned lens"]
    text += [f"  {label:>10}  {a:10.4f}  {b:10.4f}" for label, a, b in zip(labels, logit_kl, tuned_kl)]
    return {"summary": summary, "text": "\n".join(text), "losses": lens.losses}


def headline(summary: dict) -> str:
    """The finding in one sentence: KL to the final output at the first layer, tuned lens vs logit lens."""
    from mechscope.findings import num

    return (f"at {summary['labels'][0]} the tuned lens is {num(summary['kl_tuned_lens'][0])} nats of KL from the final "
            f"output, the logit lens {num(summary['kl_logit_lens'][0])} ({summary['held_out_tokens']} held-out tokens, "
            f"{summary['steps']} training steps)")

"""Train the bundled model `mechscope-toy` from scratch on the generated corpus (CPU, fixed seeds).

    python -m mechscope.toy.train                 # writes src/mechscope/toy/weights/
    python -m mechscope.toy.train --steps 200 --out /tmp/toy   # a quick try elsewhere

Prints the model-card measurements every --eval-every steps (stderr) and at the end (stdout, JSON).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is robust when other work shares the CPU)")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--out", type=Path, default=None, help="weights directory (default: the bundled one)")
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from mechscope.toy import card, corpus
    from mechscope.toy.model import ARCHITECTURE, WEIGHTS_DIR, build_tokenizer, save

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    words = corpus.vocabulary()
    vocab = {w: i for i, w in enumerate(words)}
    out_dir = args.out or WEIGHTS_DIR
    tokenizer = build_tokenizer(words, out_dir)
    cfg = HookedTransformerConfig(**ARCHITECTURE, d_vocab=len(words), seed=args.seed, device="cpu",
                                  default_prepend_bos=True)
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    # no unembedding bias: GPT-2's lm_head has none, so the weights export exactly to a Hugging Face
    # GPT2LMHeadModel (mechscope.toy.export); b_U stays at its initial zero
    model.unembed.b_U.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    decay_start = int(0.7 * args.steps)  # constant LR (after warmup) for 70% of the steps, then cosine to 0

    def lr_factor(s: int) -> float:
        if s < decay_start:
            return min(1.0, (s + 1) / args.warmup)
        return 0.5 * (1 + math.cos(math.pi * (s - decay_start) / (args.steps - decay_start)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    pad = vocab["<pad>"]
    start = time.time()
    for step in range(1, args.steps + 1):
        rows = corpus.training_batch(rng, vocab, args.batch, cfg.n_ctx)
        width = max(len(r) for r in rows)
        tokens = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, cfg.d_vocab), tokens[:, 1:].reshape(-1), ignore_index=pad)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.time() - start:.0f}s", file=sys.stderr, flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            report = card.measure(model)
            model.train()
            print(json.dumps({"step": step, **report}), file=sys.stderr, flush=True)
    model.eval()
    save(model, tokenizer, out_dir)
    print(json.dumps({"steps": args.steps, "seconds": round(time.time() - start), **card.measure(model)}, indent=2))


if __name__ == "__main__":
    main()

"""What one nnsight trace costs next to the forward it wraps (mechscope's nnsight engine).

    python bench/nnsight_overhead.py              # GPT-2-small shape, 15 tokens, batch 1 and 16
    python bench/nnsight_overhead.py --quick      # fewer repeats

A random-weight GPT2LMHeadModel of GPT-2 small's shape (12 layers, d_model 768, 12 heads, vocab 50257),
eager attention, CPU, float32, no grad. Prints the median seconds of: the plain Hugging Face forward; an
empty nnsight trace; NNsightEngine.run reading nothing, reading every resid_post (12 sites), editing one
site, and with logits at one position only — and each as a ratio to the plain forward, same run.
"""
from __future__ import annotations

import argparse
import time

import torch


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from mechscope.engines.nnsight import NNsightEngine
    from mechscope.toy import model as toy

    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024, n_ctx=1024,
                        attn_implementation="eager")
    hf = GPT2LMHeadModel(config).eval()
    engine = NNsightEngine(TransformersModel(hf, tokenizer=AutoTokenizer.from_pretrained(str(toy.WEIGHTS_DIR))))
    repeats = 5 if args.quick else 21
    resid = [f"blocks.{l}.hook_resid_post" for l in range(12)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {repeats}")
    print(f"{'batch':>5} {'what':<42} {'seconds':>9} {'/ forward':>10}")
    for batch in (1, 16):
        tokens = torch.randint(1000, 20000, (batch, 15), generator=torch.Generator().manual_seed(0))
        cases = {
            "plain HF forward": lambda: hf(tokens),
            "empty nnsight trace": lambda: _empty_trace(engine.model, tokens),
            "run(): logits": lambda: engine.run(tokens),
            "run(): logits + 12 resid_post reads": lambda: engine.run(tokens, read=resid),
            "run(): one edit (resid_pre 6 scaled)": lambda: engine.run(
                tokens, edits=[("blocks.6.hook_resid_pre", lambda x: x * 1.01)]),
            "run(): logits at the last position only": lambda: engine.run(
                tokens, positions=torch.full((batch,), 14)),
        }
        with torch.no_grad():
            base = None
            for what, fn in cases.items():
                seconds = median_seconds(fn, repeats)
                base = base or seconds
                print(f"{batch:>5} {what:<42} {seconds:>9.4f} {seconds / base:>9.2f}x")


def _empty_trace(model, tokens):
    import nnsight

    with model.trace(tokens):
        logits = nnsight.save(model.output.logits)
    return logits


if __name__ == "__main__":
    main()

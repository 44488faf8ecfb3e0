"""What one nnsight trace costs next to the forward it wraps (mechscope's nnsight engine).

    python bench/nnsight_overhead.py              # 30 rounds, 1 torch thread
    python bench/nnsight_overhead.py --rounds 10 --threads 2

Random-weight GPT2LMHeadModels, eager attention, CPU, float32, no grad, 15 tokens: a tiny one (2 layers,
d_model 64, vocab 1000), where the forward is short and the fixed cost of a trace shows, and one of GPT-2
small's shape (12 layers, d_model 768, 12 heads, vocab 50257). Each round runs every case once, in turn,
so load from other processes hits all cases alike; the table has each case's median over the rounds, its
ratio to the plain Hugging Face forward and the difference (the trace's own cost) in milliseconds.
"""
from __future__ import annotations

import argparse
import time


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch  # after --help, which answers without torch
    torch.set_num_threads(args.threads)
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from mechscope.engines.nnsight import NNsightEngine
    from mechscope.toy import model as toy

    tokenizer = AutoTokenizer.from_pretrained(str(toy.WEIGHTS_DIR))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); median of {args.rounds} rounds")
    print(f"{'model':<12} {'batch':>5} {'case':<40} {'ms':>9} {'/ forward':>10} {'+ ms':>8}")
    for label, shape in [("tiny", dict(n_layer=2, n_embd=64, n_head=4, vocab_size=1000)),
                         ("gpt2-small", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257))]:
        torch.manual_seed(0)
        hf = GPT2LMHeadModel(GPT2Config(**shape, attn_implementation="eager")).eval()
        engine = NNsightEngine(TransformersModel(hf, tokenizer=tokenizer))
        layers = shape["n_layer"]
        resid = [f"blocks.{l}.hook_resid_post" for l in range(layers)]
        for batch in (1, 16):
            tokens = torch.randint(0, 1000, (batch, 15), generator=torch.Generator().manual_seed(0))
            cases = {
                "plain HF forward": lambda: hf(tokens),
                "run(): logits": lambda: engine.run(tokens),
                f"run(): logits + {layers} resid_post reads": lambda: engine.run(tokens, read=resid),
                "run(): one edit (resid_pre scaled)": lambda: engine.run(
                    tokens, edits=[(f"blocks.{layers // 2}.hook_resid_pre", lambda x: x * 1.01)]),
                "run(): logits at the last position only": lambda: engine.run(tokens, positions=[14] * batch),
            }
            times = {case: [] for case in cases}
            with torch.no_grad():
                for fn in cases.values():  # warm-up
                    fn()
                for _ in range(args.rounds):
                    for case, fn in cases.items():
                        start = time.perf_counter()
                        fn()
                        times[case].append(time.perf_counter() - start)
            median = {case: sorted(t)[len(t) // 2] * 1000 for case, t in times.items()}
            base = median["plain HF forward"]
            for case, ms in median.items():
                print(f"{label:<12} {batch:>5} {case:<40} {ms:>9.2f} {ms / base:>9.2f}x {ms - base:>8.2f}")


if __name__ == "__main__":
    main()

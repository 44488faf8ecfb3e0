"""SAE speed: the max-activating search over the bundled corpus (batched vs a per-prompt loop) and training throughput.

    python bench/sae.py                  # 1M-token search, both ways, and a 200k-token training run
    python bench/sae.py --quick          # 100k tokens, a 50k-token training run

Search: the shipped SAE (mechscope-toy, blocks.1.hook_resid_pre), top 20 activations of every feature kept
incrementally over rows of 64 tokens (BOS first, BOS positions excluded). "batched" is
`mechscope.techniques.sae_features.max_activating` (64 rows per forward, transformer-lens running only the
blocks before the hook); "per-prompt loop" is the same top-k bookkeeping with one `run_with_cache` of the
whole model per row, as tutorial code does it. They alternate on chunks of 100k tokens (the machine's load
changes over minutes) and must find the same top activations (max |difference| printed).
Training: `mechscope sae-train`'s recipe (TopK, the shipped SAE's shape) on the bundled corpus, tokens/s
including the model's forward passes that make the activations. CPU, float32, torch threads as given.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path



def per_prompt_loop(engine, sae, rows, k: int = 20):
    """The reference: one full forward per row, then the same incremental top-k as the batched search."""
    import torch

    hook = sae.cfg.metadata.hook_name
    model, n_f, seq = engine.model, sae.cfg.d_sae, rows.shape[1]
    top_v, top_i = torch.zeros(n_f, k), torch.full((n_f, k), -1, dtype=torch.long)
    special = torch.tensor(sorted(engine.special_token_ids))
    with torch.no_grad():
        for r, row in enumerate(rows):
            _, cache = model.run_with_cache(row[None], names_filter=hook)
            f = sae.encode(cache[hook])[0]                            # [seq, d_sae]
            f[torch.isin(row, special)] = 0.0
            values = torch.cat([top_v, f.T], 1)
            index = torch.cat([top_i, (torch.arange(seq) + r * seq).expand(n_f, -1)], 1)
            best = values.topk(k, dim=1)
            top_v, top_i = best.values, index.gather(1, best.indices)
    return top_v, top_i


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch  # after --help, which answers without torch

    from mechscope.models import load_model
    from mechscope.techniques import sae as saes
    from mechscope.techniques import sae_features as sf
    from mechscope.techniques import sae_training

    torch.set_num_threads(args.threads)
    n_search, n_train = (100_000, 50_000) if args.quick else (1_000_000, 200_000)

    engine = load_model("mechscope-toy", backend="tl", device="cpu")
    sae = saes.load_sae("mechscope-toy")
    rows = saes.corpus_rows(engine, n_search, 64, seed=0)
    tokens = rows.numel()
    print(f"search: {tokens:,} tokens ({len(rows):,} rows of 64), {sae.cfg.d_sae} features, top 20 each; the two "
          f"methods alternate on chunks of 100k tokens, so a change in the machine's load hits both")
    t_batched = t_loop = 0.0
    worst = 0.0
    for chunk in rows.split(1563):
        t, batched = timed(lambda: sf.max_activating(engine, sae, chunk, None, k=20, batch_size=64))
        t_batched += t
        t, (loop_v, _) = timed(lambda: per_prompt_loop(engine, sae, chunk))
        t_loop += t
        worst = max(worst, float((batched.top_values - loop_v).abs().max()))
    print(f"  batched (64 rows / forward, only the blocks before the hook): {t_batched:7.2f} s  "
          f"{tokens / t_batched:10,.0f} tokens/s")
    print(f"  per-prompt loop (one full forward per row):                   {t_loop:7.2f} s  "
          f"{tokens / t_loop:10,.0f} tokens/s")
    print(f"  speed-up {t_loop / t_batched:.1f}x; max |top-20 difference| {worst:.2e}")

    rows_train = saes.corpus_rows(engine, n_train, 64, seed=1)
    with tempfile.TemporaryDirectory() as out:
        t_train, _ = timed(lambda: sae_training.train_on_model(
            engine, sae.cfg.metadata.hook_name, rows_train, Path(out), "topk", sae.cfg.d_sae, sae.cfg.k,
            training_tokens=n_train, batch_tokens=4096))
    print(f"training ({sae.cfg.d_sae} features, k {sae.cfg.k}, batches of 4096 tokens): {n_train:,} tokens in "
          f"{t_train:.1f} s = {n_train / t_train:,.0f} tokens/s")


if __name__ == "__main__":
    main()

"""Edge discovery speed: EAP-IG over every edge and the exact evaluation of one circuit, in forward-equivalents,
against exact per-edge patching (one patched forward per edge).

    python bench/edges.py               # the bundled model (induction, 32 x 21 tokens) and a GPT-2-small shape
    python bench/edges.py --toy-only    # the bundled model only

CPU, float32, the tl engine (per-head q / k / v inputs on). A forward-equivalent is one plain forward of the
same batch (no hooks, median of 3). Rows:
    scores        mechscope.techniques.edges.edge_scores: one corrupted forward + one forward and backward of
                  steps x n rows (EAP and EAP-IG for every edge)
    one circuit   edges.evaluate of one edge set, the corrupted outputs cached (one patched forward)
    per edge      exact patching of one edge (edges.evaluate, 16 edges timed together), times the edge count:
                  what scoring every edge exactly would cost
The GPT-2-small shape is a random-weight HookedTransformer (12 layers, d_model 768, 12 heads, d_vocab 50257),
8 prompts x 16 tokens, metric a logit difference at the last position.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the mechscope command sets it: no spinning threads


def timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(engine, clean, corrupted, metric, label: str, steps: int = 5, max_batch: int = 512) -> None:
    import torch

    from mechscope.techniques import edges

    graph = edges.build_graph(engine.cfg)
    with torch.no_grad():
        forward = timed(lambda: engine.run(clean))
    scores = edges.edge_scores(engine, clean, corrupted, metric, steps, graph)
    score_time = timed(lambda: edges.edge_scores(engine, clean, corrupted, metric, steps, graph), repeats=1)
    keep = edges.top_edges(scores.mean("eap-ig"), [len(graph.edges) // 10], graph)
    circuit = timed(lambda: edges.evaluate(engine, clean, corrupted, metric, keep, graph, scores.corrupted_outputs,
                                           max_batch))
    sample = list(range(0, len(graph.edges), max(1, len(graph.edges) // 16)))[:16]
    per_edge = timed(lambda: edges.single_edge_effects(engine, clean, corrupted, metric, sample, scores, max_batch),
                     repeats=1) / len(sample)
    n_edges = len(graph.edges)
    print(f"\n{label}: {n_edges} edges, batch {tuple(clean.shape)}, one forward {forward * 1e3:.1f} ms")
    print(f"  scores (EAP + EAP-IG, {steps} steps): {score_time:8.2f} s = {score_time / forward:7.1f} forward-equivalents")
    print(f"  one circuit (exact):              {circuit:8.2f} s = {circuit / forward:7.1f} forward-equivalents")
    print(f"  exact per edge, all {n_edges} edges:  {per_edge * n_edges:8.1f} s = "
          f"{per_edge * n_edges / forward:7.0f} forward-equivalents ({per_edge * 1e3:.0f} ms per edge)")
    print(f"  scores vs exact per edge: {per_edge * n_edges / score_time:.0f}x faster")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--toy-only", action="store_true", help="the bundled model only")
    args = parser.parse_args()

    import torch
    import transformer_lens as tl

    from mechscope.engines.hooked import HookedEngine
    from mechscope.models import load_model
    from mechscope.techniques.path_patching import induction_task

    torch.manual_seed(0)
    toy = load_model("mechscope-toy", backend="tl", device="cpu")
    clean, corrupted, metric = induction_task(toy, 32, 10, seed=0)
    measure(toy, clean, corrupted, metric, "mechscope-toy, induction")
    if args.toy_only:
        return
    cfg = tl.HookedTransformerConfig(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024,
                                     d_vocab=50257, act_fn="gelu_new", normalization_type="LN", seed=0)
    gpt2 = HookedEngine(tl.HookedTransformer(cfg).eval())
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(1000, 20000, (8, 16), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 3] = torch.randint(1000, 20000, (8,), generator=gen)
    measure(gpt2, clean, corrupted, lambda logits: logits[:, -1, 1234] - logits[:, -1, 4321],
            "GPT-2-small shape (random weights)", max_batch=32)


if __name__ == "__main__":
    main()

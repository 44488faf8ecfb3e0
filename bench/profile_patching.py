"""Where a patching sweep's time goes: torch.profiler shares of operator time and matmul FLOPs (BENCHMARKS.md,
"Where the time goes").

    python bench/profile_patching.py              # the engines (nnsight, bridge, tl) on --engines' sweep, then tl's
                                                  # packed engine on layer 6's cells at 256 tokens (~5 minutes)
    python bench/profile_patching.py --tokens 64 --skip-engines

Models and tokens as in bench/patching.py (random GPT-2-small-shaped weights; 180 resid_pre cells at 15 tokens for
the engines). Shares of operator time are steadier than wall time on a shared machine; quote those.
"""
import argparse
import collections
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def profile(fn, title: str, rows: int = 12) -> None:
    """Run fn once unprofiled (wall time) and once under torch.profiler; print the top operators."""
    import torch

    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as prof:
        fn()
    ops = collections.defaultdict(lambda: [0.0, 0, 0])
    for event in prof.key_averages():
        ops[event.key][0] += event.self_cpu_time_total / 1e6
        ops[event.key][1] += event.count
        ops[event.key][2] += event.flops or 0
    total = sum(v[0] for v in ops.values())
    matmul = sum(v[0] for k, v in ops.items() if k in MATMULS)
    flops = sum(v[2] for v in ops.values())
    print(f"\n== {title}: wall {wall:.2f} s unprofiled; operator time {total:.2f} s, matmuls {matmul / total:.0%} "
          f"of it, matmul work {flops / 1e9:.1f} GFLOP")
    for key, (seconds, count, f) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:rows]:
        print(f"  {key:32s} {seconds / total:6.1%}  {count:6d} calls  {f / 1e9:8.2f} GFLOP")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256, help="tokens of the packed-engine profile (default 256)")
    parser.add_argument("--layer", type=int, default=6, help="the layer whose cells are profiled (default 6)")
    parser.add_argument("--skip-engines", action="store_true", help="only the packed-engine profile")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import pandas
    import torch
    import transformer_lens
    import transformer_lens.patching

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import patching as bench

    from mechscope.models import load_model
    from mechscope.techniques import patching

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    bench.pd, bench.torch, bench.tl, bench.tlp, bench.patching = (pandas, torch, transformer_lens,
                                                                  transformer_lens.patching, patching)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {bench.machine_state()}")
    if not args.skip_engines:
        with tempfile.TemporaryDirectory() as directory:
            bench.save_gpt2_small_shape(directory)
            engines = {name: load_model(directory, backend=name, device="cpu", dtype="float32")
                       for name in ("nnsight", "bridge", "tl")}
        clean, corrupted = bench.make_tokens(15)
        clean[0, 0] = corrupted[0, 0] = engines["tl"].bos_token_id
        for name, engine in engines.items():
            bench.ours(engine, clean, corrupted, "resid_pre")            # warm-up
            profile(lambda engine=engine: bench.ours(engine, clean, corrupted, "resid_pre"),
                    f"{name}: resid_pre layer x position, 180 cells, 15 tokens")
    model = bench.make_model(12, 768)
    clean, corrupted = bench.make_tokens(args.tokens)
    bench.ours(model, clean, corrupted, "resid_pre", layers=[11])        # warm-up
    profile(lambda: bench.ours(model, clean, corrupted, "resid_pre", layers=[args.layer]),
            f"tl packed engine: layer {args.layer}'s {args.tokens} cells at {args.tokens} tokens", rows=14)


if __name__ == "__main__":
    main()

"""Activation-patching speed: mechscope's engines vs transformer_lens.patching vs the tutorial loops.

    python bench/patching.py            # everything (about 20 minutes on 2 CPU cores)
    python bench/patching.py --quick    # no tutorial loop, no TL per-head-by-position sweep, no large shapes
    python bench/patching.py --bound    # the sweeps against the compute bound and transformer-lens (~6 minutes)
    python bench/patching.py --engines  # only mechscope on nnsight / bridge / tl vs the naive nnsight loop and
                                        # transformer_lens.patching on the bridge (~6 minutes)

Random-weight HookedTransformers (the arithmetic of real weights), CPU, float32. For each sweep it
prints seconds for mechscope, the compute bound, transformer-lens and the tutorial loop, the ratios, and the
largest |difference| between mechscope's cells and transformer-lens' (and the tutorial's). Each timing
includes the clean / corrupted runs that the method needs; mechscope's is the median of 3 runs (the others
take minutes and run once). The tutorial loop is the widely copied per-cell function
(bench/patching_anchor.py): it re-runs the clean cache and the corrupted baseline for every cell.

The bound (`bound_macs`) counts the multiply-adds any exact engine must do: a cell patched at layer l,
position p recomputes layers >= l at positions >= p (4 d^2 + 2 d d_mlp per token and layer: q, k, v, out
projection, MLP; attention scores not counted); a head patch leaves its own layer's q, k, v alone (d^2 +
2 d d_mlp there); the metric is a logit difference, so the unembedding is one direction, d per cell. It is
divided by this machine's fp32 matmul rate measured in the same run on the sweep's own shapes
(`matmul_rate`). "bound" counts every position, "strict" only the cells after the first token where the
clean and corrupted prompts differ (cells before it are the target run itself, by causality). "TL (est.)" in the scaling table times transformer-lens on 16 cells and
multiplies by the number of cells (its cost per cell is constant: one full forward).

The engines section saves a random GPT-2-small-shaped Hugging Face checkpoint and loads it on each engine:
mechscope's generic path (nnsight, bridge: the cells of all layers as batch rows of one edited forward,
logits at the read position, cells with equal source and target activations skipped) and its tl engine,
against the tutorials' one-trace-per-cell nnsight loop and transformer_lens.patching on the bridge.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the mechscope command sets it: no spinning threads

A, B = 1234, 4321


DEVICE, DTYPE = "cpu", "float32"  # set from --device / --dtype in main()


def make_model(n_layers: int, d_model: int):
    cfg = tl.HookedTransformerConfig(n_layers=n_layers, d_model=d_model, n_heads=d_model // 64, d_head=64,
                                     d_mlp=4 * d_model, n_ctx=1024, d_vocab=50257, act_fn="gelu_new",
                                     normalization_type="LN", seed=0, device=DEVICE, dtype=getattr(torch, DTYPE))
    return tl.HookedTransformer(cfg).eval()


def make_tokens(seq: int):
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(1000, 20000, (1, seq), generator=gen)
    corrupted = clean.clone()
    corrupted[0, 2], corrupted[0, 4] = 777, 888
    return clean.to(DEVICE), corrupted.to(DEVICE)


def synchronize():
    """Wait for queued GPU work: a CUDA timing without it measures the launch, not the computation."""
    if DEVICE.startswith("cuda"):
        torch.cuda.synchronize()


def machine_state() -> str:
    """The load average and CPU count, printed beside every table: a busy machine slows the matmuls the bound
    divides by more than mechscope's fixed costs, so ratios measured under load flatter mechscope."""
    load = os.getloadavg()
    return f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1 / 5 / 15 min) on {os.cpu_count()} cores"


def warn_if_busy() -> None:
    """One line on stderr when the 1-minute load average shows other work (> 0.5 beyond this process's threads
    on the CPU): the bound ratios of this run are then flattering; rerun on a quiet machine for published numbers."""
    import sys

    busy = os.getloadavg()[0] - (torch.get_num_threads() if DEVICE == "cpu" else 1)
    if busy > 0.5:
        print(f"warning: the machine is busy ({machine_state()}): other work slows the matmul rate the bound "
              "divides by, so the ratios below flatter mechscope; publish only numbers measured quiet",
              file=sys.stderr, flush=True)


def tl_metric(logits):
    return logits[0, -1, A] - logits[0, -1, B]


def timed(fn):
    synchronize()
    start = time.perf_counter()
    out = fn()
    synchronize()
    return time.perf_counter() - start, out


def timed_cpu(fn):
    """(wall seconds, this process's CPU seconds, result)."""
    synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    synchronize()
    return time.perf_counter() - start, time.process_time() - cpu, out


def timed_median(fn, repeats=3):
    """Median of `repeats` timings: a short run on a shared machine is easily hit by another process."""
    runs = [timed(fn) for _ in range(repeats)]
    return sorted(t for t, _ in runs)[repeats // 2], runs[0][1]


def tutorial_sweep(model, clean, corrupted):
    """The tutorial's per-cell loop (3 forwards per cell), same code shape as the anchor."""
    n_layers, seq = model.cfg.n_layers, clean.shape[1]

    def tutorial_cell(hook_point, position):
        _, clean_cache = model.run_with_cache(clean)
        clean_act = clean_cache[hook_point]
        baseline = tl_metric(model(corrupted))

        def patch_hook(activation, hook):
            activation[:, position, :] = clean_act[:, position, :]
            return activation
        patched = model.run_with_hooks(corrupted, fwd_hooks=[(hook_point, patch_hook)])
        return tl_metric(patched) - baseline

    out = torch.zeros(n_layers, seq, device=DEVICE)
    for layer in range(n_layers):
        for p in range(seq):
            out[layer, p] = tutorial_cell(f"blocks.{layer}.hook_resid_pre", p)
    return out + tl_metric(model(corrupted))  # back to metric values, comparable cell for cell


def tl_sweep(model, clean, corrupted, fn):
    _, clean_cache = model.run_with_cache(clean)
    return fn(model, corrupted, clean_cache, tl_metric)


def ours(model, clean, corrupted, component, by_position=True, **kw):
    return patching.patch_sweep(model, clean, corrupted, component, patching.logit_diff_metric(A, B),
                                by_position=by_position, **kw).values


# ---------------------------------------------------------------------------------------------- the bound
def bound_macs(cfg, seq: int, sweep: str, first: int = 0) -> int:
    """Multiply-adds of an exact sweep ("resid_pre", "z_all_pos", "z_by_pos") over positions >= first.
    cfg: n_layers, d_model, d_mlp, n_heads."""
    n_layers, d, d_mlp, heads = cfg.n_layers, cfg.d_model, cfg.d_mlp, cfg.n_heads
    block, after_attention = 4 * d * d + 2 * d * d_mlp, d * d + 2 * d * d_mlp
    positions = range(first, seq)
    if sweep == "resid_pre":
        cells = [(n_layers - l) * (seq - p) * block for l in range(n_layers) for p in positions]
    elif sweep == "z_all_pos":
        cells = [len(positions) * (after_attention + (n_layers - l - 1) * block) for l in range(n_layers)] * heads
    else:
        cells = [after_attention + (n_layers - l - 1) * (seq - p) * block for l in range(n_layers) for p in positions]
        cells *= heads
    return sum(cells) + len(cells) * d  # + one unembedding direction per cell


def matmul_rate(cfg, seq: int, repeats: int = 20) -> float:
    """This machine's multiply-adds per second (in the run's device and dtype) on the sweep's shapes:
    [T(T+1)/2, d] @ [d, d_mlp] @ [d_mlp, d] (the rows of one layer's cells)."""
    rows = seq * (seq + 1) // 2
    kw = dict(device=DEVICE, dtype=getattr(torch, DTYPE))
    a, w1, w2 = torch.randn(rows, cfg.d_model, **kw), torch.randn(cfg.d_model, cfg.d_mlp, **kw), \
        torch.randn(cfg.d_mlp, cfg.d_model, **kw)
    for _ in range(3):
        (a @ w1) @ w2
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        (a @ w1) @ w2
    synchronize()
    return repeats * 2 * rows * cfg.d_model * cfg.d_mlp / (time.perf_counter() - start)


RATES: list[float] = []  # every matmul rate measured, for the table footers


def timed_with_bound(fn, model, clean, corrupted, sweep: str, repeats: int = 3):
    """(median seconds of fn, (bound, strict bound) seconds, fn's result): bound_macs over every position /
    after the first differing token, at the matmul rate measured just before each of the `repeats` timings (on
    a shared machine the rate moves with the load; both medians come from the same interleaved rounds)."""
    seq = clean.shape[1]
    first = int((clean != corrupted).any(0).nonzero()[0])
    rates, runs = [], []
    for _ in range(repeats):
        rates.append(matmul_rate(model.cfg, seq))
        runs.append(timed(fn))
    rate = sorted(rates)[repeats // 2]
    RATES.append(rate)
    bound = (bound_macs(model.cfg, seq, sweep) / rate, bound_macs(model.cfg, seq, sweep, first) / rate)
    return sorted(t for t, _ in runs)[repeats // 2], bound, runs[0][1]


def row(name, t_ours, bound, t_tl, t_tut=None, diff=None, diff_tut=None):
    """One table row; bound: (bound, strict bound) seconds."""
    tut_txt = f"{t_tut:9.2f}" if t_tut is not None else "        -"
    tl_txt, ratio_tl = (f"{t_tl:8.2f}", f"{t_tl / t_ours:7.1f}x") if t_tl is not None else ("       -", "       -")
    ratio_tut = f"{t_tut / t_ours:8.1f}x" if t_tut is not None else "        -"
    diffs = (f"{diff:.1e}" if diff is not None else "-") + (f" / {diff_tut:.1e}" if diff_tut is not None else "")
    print(f"{name:34s} {t_ours:8.2f} {bound[0]:7.2f} {t_ours / bound[0]:6.2f}x {bound[1]:7.2f} {t_ours / bound[1]:6.2f}x "
          f"{tl_txt} {tut_txt}  {ratio_tl} {ratio_tut}   {diffs}", flush=True)


def conditions() -> None:
    """The table's footer: the machine's load and the matmul rates its bound ratios divided by."""
    rates = ", ".join(f"{r / 1e9:.0f}" for r in RATES)
    print(f"  ({machine_state()}; matmul rate {rates} GMAC/s)", flush=True)
    RATES.clear()


def header(title):
    warn_if_busy()
    print(f"\n{title}  [{machine_state()}]")
    print(f"{'sweep':34s} {'mechscope':>8s} {'bound':>7s} {'ms/bnd':>7s} {'strict':>7s} {'ms/str':>7s} {'TL':>8s} "
          f"{'tutorial':>9s}  {'TL/ms':>8s} {'tut/ms':>9s}   max|ms-TL| / |ms-tut|")


# ---------------------------------------------------------------------------------------------- engines
def save_gpt2_small_shape(directory) -> None:
    """A random GPT-2-small-shaped Hugging Face checkpoint (12 layers, d_model 768, vocab 50257), saved with
    save_pretrained beside the bundled word-level tokenizer (the engines need one; token ids come from here)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from mechscope.toy import model as toy

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_ctx=1024, n_embd=768, n_layer=12, n_head=12)
    GPT2LMHeadModel(cfg).eval().save_pretrained(str(directory))
    AutoTokenizer.from_pretrained(str(toy.WEIGHTS_DIR)).save_pretrained(str(directory))


def naive_nnsight_sweep(nnsight_model, clean, corrupted):
    """The per-cell nnsight loop of the tutorials: the clean block inputs saved once, then one trace per
    (layer, position) patching that block input, the full logits, and one .item() per cell."""
    import nnsight

    h = nnsight_model.transformer.h
    n_layers, seq = len(h), clean.shape[1]
    with nnsight_model.trace(clean):
        clean_inputs = nnsight.save([h[layer].input for layer in range(n_layers)])
    out = torch.zeros(n_layers, seq, device=DEVICE)
    for layer in range(n_layers):
        for p in range(seq):
            with nnsight_model.trace(corrupted):
                h[layer].input[:, p, :] = clean_inputs[layer][:, p, :]
                logits = nnsight_model.lm_head.output
                value = (logits[0, -1, A] - logits[0, -1, B]).save()
            out[layer, p] = value.item()
    return out


def engines_bench(rounds: int = 3):
    """resid_pre layer x position on a GPT-2-small-shaped random HF checkpoint: mechscope on nnsight and on
    the bridge (the generic path) and on tl (the suffix-only engine) vs the naive nnsight loop and vs
    transformer_lens.patching on the bridge, in the same run. Each round runs every method once in turn (so
    a change of the machine's load hits them alike); medians over rounds."""
    import statistics
    import tempfile

    from mechscope.models import load_model

    with tempfile.TemporaryDirectory() as directory:
        save_gpt2_small_shape(directory)
        engines = {name: load_model(directory, backend=name, device=DEVICE, dtype=DTYPE)
                   for name in ("nnsight", "bridge", "tl")}
    clean, corrupted = make_tokens(15)
    clean[0, 0] = corrupted[0, 0] = engines["tl"].bos_token_id
    warn_if_busy()
    print(f"\nengines: resid_pre layer x position (180 cells), GPT-2-small-shaped random HF checkpoint, 15 tokens, "
          f"{DEVICE} {DTYPE}, medians of {rounds} interleaved rounds  [{machine_state()}]")
    for engine in engines.values():  # warm-up
        engine.run(clean)
    methods = {"naive nnsight loop (1 trace / cell)":
               lambda: naive_nnsight_sweep(engines["nnsight"].model, clean, corrupted),
               "transformer_lens.patching on the bridge":
               lambda: tl_sweep(engines["bridge"].model, clean, corrupted, tlp.get_act_patch_resid_pre)}
    for name in ("nnsight", "bridge", "tl"):
        methods[f"mechscope patch --backend {name}"] = lambda name=name: ours(engines[name], clean, corrupted,
                                                                              "resid_pre")
    runs = {name: [] for name in methods}
    for _ in range(rounds):
        for name, fn in methods.items():
            runs[name].append(timed_cpu(fn))
    rows = [(name, statistics.median(r[0] for r in results), statistics.median(r[1] for r in results), results[0][2])
            for name, results in runs.items()]
    (_, naive, naive_cpu, reference), (_, tl_wall, tl_cpu, _) = rows[:2]
    print("wall = elapsed seconds, cpu = this process's CPU seconds (steadier on a shared machine); ratios: "
          "naive loop / method and transformer_lens.patching on the bridge / method")
    print(f"{'method':42s} {'wall':>8s} {'cpu':>8s} {'naive/wall':>10s} {'naive/cpu':>9s} {'TL-br/wall':>10s} "
          f"{'TL-br/cpu':>9s}   max|this - naive|")
    for name, wall, cpu, values in rows:
        print(f"{name:42s} {wall:8.2f} {cpu:8.2f} {naive / wall:9.1f}x {naive_cpu / cpu:8.1f}x {tl_wall / wall:9.1f}x "
              f"{tl_cpu / cpu:8.1f}x   {(values - reference).abs().max().item():.1e}", flush=True)
    print("per round (wall s): " + "; ".join(f"{name.split(' (')[0]}: " + ", ".join(f"{r[0]:.1f}" for r in results)
                                           for name, results in runs.items()))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip the tutorial loop, TL's head-by-position sweep and the large shapes")
    parser.add_argument("--engines", action="store_true", help="only the engines comparison (nnsight, bridge, tl)")
    parser.add_argument("--bound", action="store_true", help="only the sweeps against the compute bound and "
                        "transformer-lens (no tutorial loop, no head-by-position sweep, no engines section)")
    parser.add_argument("--gpt2-tokens", default="",
                        help="also the GPT-2-small-shaped resid_pre sweep at these token counts, e.g. 64,256 (256: ~7 "
                        "minutes, timed once; shorter ones the median of 3)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: timings synchronise the GPU")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the models' and the matmul rate's dtype (default float32; the 1e-5 agreement with "
                        "transformer-lens holds in float32 only)")
    args = parser.parse_args()
    global pd, torch, tl, tlp, patching, DEVICE, DTYPE  # imported here: --help stays fast
    import pandas as pd
    import torch
    import transformer_lens as tl
    from transformer_lens import patching as tlp

    from mechscope.techniques import patching
    if args.threads:
        torch.set_num_threads(args.threads)
    DEVICE, DTYPE = args.device, args.dtype
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    torch.set_grad_enabled(False)
    where = torch.cuda.get_device_name(DEVICE) if DEVICE.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}, {DTYPE}, transformer-lens patching vs mechscope; {machine_state()}")
    if args.engines:
        engines_bench()
        return

    model = make_model(12, 768)
    clean, corrupted = make_tokens(15)
    model(clean)  # warm-up
    header(f"GPT-2-small shape (12 layers, d_model 768, 12 heads, d_mlp 3072, vocab 50257), 15 tokens, {DEVICE} {DTYPE}")
    t_ms, bound, v_ms = timed_with_bound(lambda: ours(model, clean, corrupted, "resid_pre"), model, clean, corrupted,
                                         "resid_pre")
    t_tl, v_tl = timed(lambda: tl_sweep(model, clean, corrupted, tlp.get_act_patch_resid_pre))
    t_tut = d_tut = None
    if not (args.quick or args.bound):
        t_tut, v_tut = timed(lambda: tutorial_sweep(model, clean, corrupted))
        d_tut = (v_ms - v_tut).abs().max().item()
    row("resid_pre layer x pos (180 cells)", t_ms, bound, t_tl, t_tut,
        (v_ms - v_tl).abs().max().item(), d_tut)
    t_ms, bound, v_ms = timed_with_bound(lambda: ours(model, clean, corrupted, "z", by_position=False), model, clean,
                                         corrupted, "z_all_pos")
    t_tl, v_tl = timed(lambda: tl_sweep(model, clean, corrupted, tlp.get_act_patch_attn_head_out_all_pos))
    row("head out all_pos (144 cells)", t_ms, bound, t_tl, None,
        (v_ms - v_tl).abs().max().item())
    if not args.quick:
        t_ms, bound, v_ms = timed_with_bound(lambda: ours(model, clean, corrupted, "z"), model, clean, corrupted,
                                             "z_by_pos")
        t_tl = diff = None
        if not args.bound:  # transformer-lens takes about 10 minutes here
            t_tl, v_tl = timed(lambda: tl_sweep(model, clean, corrupted, tlp.get_act_patch_attn_head_out_by_pos))
            diff = (v_ms - v_tl.permute(0, 2, 1)).abs().max().item()
        row("head out by_pos (2160 cells)", t_ms, bound, t_tl, None, diff)
    conditions()
    attribution_cost(model, clean, corrupted)
    if args.gpt2_tokens:
        seqs = [int(t) for t in args.gpt2_tokens.split(",")]
        scaling(model, "GPT-2-small shape", seqs, long_once=True)

    if not args.bound:
        engines_bench(rounds=1 if args.quick else 3)
    if args.quick:
        return
    model = make_model(4, 256)
    clean, corrupted = make_tokens(64)
    header(f"4 layers, d_model 256, 4 heads, d_mlp 1024, vocab 50257, 64 tokens, {DEVICE} {DTYPE}")
    t_ms, bound, v_ms = timed_with_bound(lambda: ours(model, clean, corrupted, "resid_pre"), model, clean, corrupted,
                                         "resid_pre")
    t_tl, v_tl = timed(lambda: tl_sweep(model, clean, corrupted, tlp.get_act_patch_resid_pre))
    row("resid_pre layer x pos (256 cells)", t_ms, bound, t_tl, None,
        (v_ms - v_tl).abs().max().item())
    t_ms, bound, v_ms = timed_with_bound(lambda: ours(model, clean, corrupted, "z", by_position=False), model, clean,
                                         corrupted, "z_all_pos")
    t_tl, v_tl = timed(lambda: tl_sweep(model, clean, corrupted, tlp.get_act_patch_attn_head_out_all_pos))
    row("head out all_pos (16 cells)", t_ms, bound, t_tl, None,
        (v_ms - v_tl).abs().max().item())
    conditions()

    scaling(model, "4 layers, d_model 256", (16, 64, 256))


def scaling(model, shape: str, seqs, long_once: bool = False):
    """resid_pre layer x position sweeps at each sequence length: mechscope (median of 3; once above 64 tokens
    with long_once) against the bound, and transformer-lens estimated from 16 timed cells (its cost per cell is
    one full forward)."""
    n_layers = model.cfg.n_layers
    warn_if_busy()
    print(f"\nscaling with sequence length: resid_pre layer x pos, {shape}, {DEVICE} {DTYPE} (* = TL timed on 16 "
          f"cells x n_cells / 16)  [{machine_state()}]")
    print(f"{'tokens':>6s} {'cells':>6s} {'mechscope':>10s} {'bound':>8s} {'ms/bound':>8s} {'strict':>8s} {'ms/strict':>9s} "
          f"{'TL (est.)':>10s} {'TL/ms':>7s}")
    for seq in seqs:
        clean, corrupted = make_tokens(seq)
        n_cells = n_layers * seq
        t_ms, (bound, strict), _ = timed_with_bound(lambda: ours(model, clean, corrupted, "resid_pre"), model, clean,
                                                    corrupted, "resid_pre", 1 if long_once and seq > 64 else 3)
        sample = pd.DataFrame({"layer": [i % n_layers for i in range(16)], "pos": [(i * 7) % seq for i in range(16)]})
        t_cache, (_, clean_cache) = timed(lambda: model.run_with_cache(clean))
        t_cells, _ = timed(lambda: tlp.generic_activation_patch(
            model, corrupted, clean_cache, tl_metric, patch_setter=tlp.layer_pos_patch_setter,
            activation_name="resid_pre", index_df=sample))
        t_tl = t_cache + t_cells * n_cells / 16
        print(f"{seq:6d} {n_cells:6d} {t_ms:10.2f} {bound:8.2f} {t_ms / bound:7.2f}x {strict:8.2f} {t_ms / strict:8.2f}x "
              f"{t_tl:10.2f} {t_tl / t_ms:6.1f}x", flush=True)
    conditions()


def attribution_cost(model, clean, corrupted, repeats: int = 3):
    """Attribution patching (every default site) in forward-equivalents: its time over one plain forward's."""
    from mechscope.techniques import attribution_patching as atp

    def metric(logits, prompts):
        return logits[:, -1, A] - logits[:, -1, B]
    t_forward, _ = timed_median(lambda: model(corrupted), repeats)
    t_atp, _ = timed_median(lambda: atp.attribution_patch(model, clean, corrupted, metric), repeats)
    print(f"attribution patching (sites {', '.join(atp.DEFAULT_SITES)}): {t_atp:.3f} s = "
          f"{t_atp / t_forward:.2f} forward-equivalents (one forward {t_forward:.3f} s)", flush=True)

if __name__ == "__main__":
    main()

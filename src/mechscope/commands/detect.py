"""This machine's hardware, and which library / device / dtype a model needs on it. Loads no weights.

    mechscope detect                                  # hardware + a table of common models
    mechscope detect --model gpt2-small --seq-len 256 --batch 16
    mechscope detect --model /path/to/hf_dir --json   # a local Hugging Face directory (reads config.json)
    mechscope detect --params 7e9                     # an unknown 7B model (a Llama-like shape)

Memory = weights + every tensor a full `run_with_cache` keeps + the largest temporary of the forward
(see references/compute-awareness.md). Writes no run directory: the answer describes the machine at
this moment (free memory changes), not an experiment, so there is nothing to reproduce; --json prints it.
"""
HELP = "hardware, and which model / library / dtype fits it"
USES_MODEL = False   # takes its own --model string and never loads weights
WRITES_RUN = False   # a query about the machine: stdout only


def add_arguments(parser):
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", help="common model name (see --models), mechscope-toy, a transformer-lens "
                       "name, or a local Hugging Face directory")
    which.add_argument("--params", help="only a parameter count, e.g. 7e9 or 7B (assumes a Llama-like shape)")
    which.add_argument("--models", action="store_true", help="table of common models (the default)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per forward pass (default: %(default)s)")


def _gb(x: float) -> str:
    return f"{x:.2f} GB" if x >= 1 else f"{x * 1000:.0f} MB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _versions() -> dict:
    from importlib import metadata

    versions = {}
    for name in ("torch", "transformer-lens", "nnsight"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _hardware_text(hw: dict, versions: dict) -> str:
    gpus = "; ".join(f"{g['name']} ({g['free_gb']:.1f} of {g['total_gb']:.1f} GB free, sm {g['capability']}, "
                     f"bf16 {'yes' if g['bf16'] else 'no'})" for g in hw["gpus"]) or "no CUDA GPU"
    return (f"hardware: {hw['cpu_cores']} CPU cores, {hw['ram_total_gb']:.1f} GB RAM ({hw['ram_available_gb']:.1f} GB "
            f"available); {gpus}; MPS {'yes' if hw['mps'] else 'no'}\n"
            "libraries: " + ", ".join(f"{k} {v or 'NOT INSTALLED'}" for k, v in versions.items()))


def _detail_text(r: dict) -> str:
    m = r["memory_gb"]
    lines = [f"{r['model']} ({_count(r['n_params'])} params), run_with_cache of {r['batch']} x {r['seq_len']} tokens:",
             f"  library {r['library']}   device {r['device']}   dtype {r['dtype']}",
             f"  memory: weights {_gb(m['weights'])} + cache {_gb(m['cache'])} + working set {_gb(m['working'])} = "
             f"{_gb(m['total'])} (a forward without cache: {_gb(m['forward'])}); usable here: {_gb(m['usable'])}",
             "  " + ("a full run_with_cache fits" if r["cache_fits"] else
                     "a forward fits, a full run_with_cache does not" if r["fits"] else "does not fit locally")]
    if r["library"] == "transformer-lens":
        lines.append(f"  load: mechscope <command> --model {r['model']} --device {r['device']} --dtype {r['dtype']}")
    return "\n".join(lines + [f"  note: {n}" for n in r["notes"]])


def _table_text(rows: list[dict], seq_len: int, batch: int) -> str:
    head = f"{'model':<14} {'params':>7}  {'library':<16} {'device':<11} {'dtype':<9} {'weights':>9} {'full cache':>10}  fits"
    lines = [f"run_with_cache of {batch} x {seq_len} tokens (--batch, --seq-len); full cache = weights + cache + "
             "working set", head]
    for r in rows:
        m = r["memory_gb"]
        fits = "cache" if r["cache_fits"] else "forward" if r["fits"] else "no"
        lines.append(f"{r['model']:<14} {_count(r['n_params']):>7}  {r['library']:<16} {r['device']:<11} "
                     f"{r['dtype']:<9} {_gb(m['weights']):>9} {_gb(m['total']):>10}  {fits}")
    return "\n".join(lines)


def run(ctx):
    from mechscope import compute

    args = ctx.args
    hw = compute.detect_hardware()
    versions = _versions()
    summary = {"hardware": hw.to_dict(), "libraries": versions}
    if args.model or args.params:
        shape = compute.model_shape(args.model) if args.model else compute.generic_shape(compute.parse_count(args.params))
        rec = compute.recommend(shape, hw, args.seq_len, args.batch).to_dict()
        if versions.get(rec["library"]) is None:
            rec["notes"].append(f"{rec['library']} is not installed: pip install {rec['library']}")
        summary["recommendation"] = rec
        body = _detail_text(rec)
    else:
        rows = [compute.recommend(s, hw, args.seq_len, args.batch).to_dict()
                for s in [compute.model_shape("mechscope-toy"), *compute.COMMON_MODELS.values()]]
        summary["seq_len"], summary["batch"] = args.seq_len, args.batch
        summary["models"] = [{k: r[k] for k in ("model", "n_params", "library", "device", "dtype", "fits",
                                                "cache_fits")} | {"total_gb": r["memory_gb"]["total"]} for r in rows]
        body = _table_text(rows, args.seq_len, args.batch)
    return {"summary": summary, "text": _hardware_text(summary["hardware"], versions) + "\n\n" + body}

"""The front door: this machine's hardware (or one you describe), and how a model runs on it, as a command
line to copy. Loads no weights.

    mechscope detect                                  # hardware + a table of common models
    mechscope detect --model gpt2-small --seq-len 256 --batch 16
    mechscope detect --model meta-llama/Llama-2-13b-hf --gpu 24GB --ram 64GB   # a machine you plan for
    mechscope detect --model llama-3-70b --gpus 2x80GB --command steer
    mechscope detect --model /path/to/hf_dir --json   # a local Hugging Face directory (reads config.json)
    mechscope detect --params 7e9                     # an unknown 7B model (a Llama-like shape)

For a model it weighs every plan in order: one GPU, all GPUs, in full or half precision; 8-bit, then 4-bit
weights (bitsandbytes); GPU + CPU RAM offload; MPS; CPU; NDIF. The first that fits is the recommendation,
printed as a runnable `mechscope COMMAND ...` line (`--command`, default patch), with the others that fit.
Memory is what the chosen engine needs at its peak: transformer-lens = weights + a full run_with_cache;
nnsight = weights + one forward + a saved residual per layer (references/compute-awareness.md).
Writes a run directory (result.json, meta.json) only with --out: the answer describes a machine at one
moment, not an experiment, and the front door should not leave a directory behind at every look.
"""
HELP = "hardware (or one you describe), and how a model runs on it: engine, device, precision, command line"
USES_MODEL = False         # takes its own --model string and never loads weights
WRITES_RUN = "with --out"  # a query about a machine: stdout, and a run directory only when asked

NOT_LOADING = ("detect", "new", "report")  # the commands without --model (tests/test_compute.py checks)
MAX_BATCH = 100_000         # --batch: sequences per forward; more is a typo, not a plan
MAX_SEQ_LEN = 10_000_000    # --seq-len without --model (with one: its context)


def add_arguments(parser):
    from mechscope.cli import COMMANDS

    which = parser.add_mutually_exclusive_group()
    which.add_argument("--model", help="common model name or hub id (see --models), mechscope-toy, a "
                       "transformer-lens name, or a local Hugging Face directory")
    which.add_argument("--params", help="only a parameter count, e.g. 7e9 or 7B (assumes a Llama-like shape)")
    which.add_argument("--models", action="store_true", help="table of common models (the default)")
    parser.add_argument("--gpus", "--gpu", dest="gpus", metavar="GPUS",
                        help="GPUs to plan for instead of this machine's: 24GB, 2x80GB, 2x80GB,24GB, 32GB:fp16 "
                             "(no bfloat16, e.g. a V100) or 0 (none); taken as empty")
    parser.add_argument("--ram", help="CPU RAM to plan for instead of this machine's, e.g. 64GB")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per forward pass (default: %(default)s)")
    parser.add_argument("--command", dest="for_command", default="patch", choices=[c for c in COMMANDS if c not in NOT_LOADING],
                        help="the command the printed command lines run (default: %(default)s)")


def _gb(x: float) -> str:
    return f"{x:.2f} GB" if x >= 1 else f"{x * 1000:.0f} MB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _versions() -> dict:
    from importlib import metadata

    versions = {}
    for name in ("torch", "transformer-lens", "nnsight", "bitsandbytes"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _hardware_text(hw: dict, versions: dict) -> str:
    gpus = "; ".join(f"{g['name']} ({g['free_gb']:.1f} of {g['total_gb']:.1f} GB free, sm {g['capability']}, "
                     f"bf16 {'yes' if g['bf16'] else 'no'})" for g in hw["gpus"]) or "no CUDA GPU"
    described = f" (described: {', '.join(hw['described'])})" if hw["described"] else ""
    return (f"hardware{described}: {hw['cpu_cores']} CPU cores, {hw['ram_total_gb']:.1f} GB RAM "
            f"({hw['ram_available_gb']:.1f} GB available); {gpus}; MPS {'yes' if hw['mps'] else 'no'}\n"
            "libraries: " + ", ".join(f"{k} {v or 'NOT INSTALLED'}" for k, v in versions.items()))


def _precision(r: dict) -> str:
    return f"{r['quantization']} ({r['dtype']})" if r["quantization"] else r["dtype"]


def _detail_text(r: dict) -> str:
    m = r["memory_gb"]
    engine = ("weights + a full run_with_cache" if r["library"] == "transformer-lens" and r["cache_fits"] else
              "weights + a forward (cache only the hooks you need)" if r["library"] == "transformer-lens" else
              "weights + a forward + a saved residual per layer")
    where = "runs remotely" if r["device"] == "ndif-remote" else f"usable here: {_gb(m['usable'])}"
    lines = [f"{r['model']} ({_count(r['n_params'])} params), batch {r['batch']} x {r['seq_len']} tokens:",
             f"  recommended: {r['library']} (--backend {r['backend']}), {r['device']}, {_precision(r)}",
             f"  run: {r['command']}",
             f"  memory for this engine: {_gb(m['engine'])} ({engine}); {where}",
             f"  weights {_gb(m['weights'])}; a full run_with_cache would need {_gb(m['total'])}"]
    lines += [f"  also: {a['command']}  ({_gb(a['engine_gb'])}{'' if a['fits'] else ', remote'})"
              for a in r["alternatives"]]
    return "\n".join(lines + [f"  note: {n}" for n in r["notes"]])


def _table_text(rows: list[dict], seq_len: int, batch: int) -> str:
    head = (f"{'model':<14} {'params':>7}  {'backend':<8} {'device':<11} {'precision':<16} {'weights':>9} "
            f"{'engine':>9}  fits")
    lines = [f"batch {batch} x {seq_len} tokens (--batch, --seq-len); engine = what the backend needs at its peak "
             "(transformer-lens: weights + a full run_with_cache; nnsight: weights + a forward); "
             "`--model NAME` for the command line", head]
    for r in rows:
        m = r["memory_gb"]
        fits = "cache" if r["cache_fits"] else "forward" if r["fits"] else "no"
        lines.append(f"{r['model']:<14} {_count(r['n_params']):>7}  {r['backend']:<8} {r['device']:<11} "
                     f"{_precision(r):<16} {_gb(m['weights']):>9} {_gb(m['engine']):>9}  {fits}")
    return "\n".join(lines)


def _install_notes(rec: dict, versions: dict) -> list[str]:
    needed = [rec["library"]] + (["bitsandbytes"] if rec["quantization"] else [])
    return [f"{name} is not installed: pip install {name}" for name in needed if versions.get(name) is None]


def run(ctx):
    from mechscope import compute
    from mechscope.errors import BadInput

    args = ctx.args
    if not 1 <= args.batch <= MAX_BATCH or not 1 <= args.seq_len <= MAX_SEQ_LEN:
        raise BadInput(f"--batch must be in 1..{MAX_BATCH:,} and --seq-len in 1..{MAX_SEQ_LEN:,}")
    hw = compute.described_hardware(args.gpus, args.ram)
    versions = _versions()
    described = [name for name, value in (("gpus", args.gpus), ("ram", args.ram)) if value is not None]
    summary = {"hardware": {**hw.to_dict(), "described": described}, "libraries": versions}
    if args.model or args.params:
        shape = compute.model_shape(args.model) if args.model else compute.generic_shape(compute.parse_count(args.params))
        if args.model and args.seq_len > shape.n_ctx:
            raise BadInput(f"--seq-len {args.seq_len} is beyond {shape.name}'s context ({shape.n_ctx} tokens); "
                           f"pass at most {shape.n_ctx}")
        spec = shape.hub_id if args.model and shape.hub_id else (args.model or "MODEL")
        rec = compute.recommend(shape, hw, args.seq_len, args.batch, model=spec, command=args.for_command).to_dict()
        rec["notes"] += _install_notes(rec, versions)
        summary["recommendation"] = rec
        body = _detail_text(rec)
    else:
        rows = [compute.recommend(s, hw, args.seq_len, args.batch, command=args.for_command).to_dict()
                for s in [compute.model_shape("mechscope-toy"), *compute.COMMON_MODELS.values()]]
        summary["seq_len"], summary["batch"] = args.seq_len, args.batch
        keys = ("model", "n_params", "library", "backend", "device", "dtype", "quantization", "fits", "cache_fits",
                "command")
        summary["models"] = [{k: r[k] for k in keys} | {"total_gb": r["memory_gb"]["total"],
                                                        "engine_gb": r["memory_gb"]["engine"]} for r in rows]
        body = _table_text(rows, args.seq_len, args.batch)
    return {"summary": summary, "text": _hardware_text(summary["hardware"], versions) + "\n\n" + body}


def headline(summary: dict) -> str:
    """The finding in one sentence: whether (and how) the model fits, or how many of the listed models fit."""
    from mechscope.findings import num

    if "recommendation" in summary:
        r = summary["recommendation"]
        m = r["memory_gb"]
        if not r["fits"]:
            return f"{r['model']} ({r['n_params']:,} parameters) does not fit this machine ({num(m['engine'], 1)} GB needed)"
        how = "with its activation cache" if r["cache_fits"] else "for forward passes, not its full activation cache"
        return (f"{r['model']} ({r['n_params']:,} parameters) fits {how}: --backend {r['backend']} on {r['device']} "
                f"in {r['dtype']}, {num(m['engine'], 3)} GB of {num(m['usable'])} GB usable")
    fit = [m["model"] for m in summary["models"] if m["fits"]]
    return f"{len(fit)} of {len(summary['models'])} listed models fit this machine ({summary['hardware']['cpu_cores']} CPU cores)"

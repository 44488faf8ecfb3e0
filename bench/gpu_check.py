"""The GPU check (issue 19): every command on the bundled model (and on a small local checkpoint, --checkpoint)
on CUDA in float32 and bfloat16, on nnsight split across every visible GPU (--device-map auto) and with CPU
offload, each --json summary compared with the same command's CPU float32 run; one pass / fail table at the end.

    python bench/gpu_check.py                       # a machine with CUDA (make gpu-check)
    python bench/gpu_check.py --dry-run             # CPU only: the same comparisons on CPU stand-ins
    python bench/gpu_check.py --commands dla,patch --checkpoint path/to/save_pretrained_dir --report check.json

Configurations (each against the CPU float32 run of its own backend; `--backend auto` is tl for small models):
    cuda-fp32        --device cuda --dtype float32                  tl
    cuda-bf16        --device cuda --dtype bfloat16                 tl
    nnsight-fp32     --device cuda --dtype float32                  nnsight
    nnsight-bf16     --device cuda --dtype bfloat16                 nnsight
    device-map       --device-map auto, --max-memory a share of the model per GPU (a real split with 2+ GPUs)
    cpu-offload      --device-map auto, --max-memory 0=a third of the model,cpu=64GiB (accelerate offload)
--dry-run replaces them by cpu-bf16 (tl), nnsight-cpu-fp32, nnsight-cpu-bf16 and nnsight --device-map cpu.

Tolerances, on every number of the summaries (|value - reference| <= atol + rtol * |reference|):
    float32 (another device, split or offloaded): atol 1e-3, rtol 1e-3: other kernels, the same precision;
    bfloat16: atol 0.35, rtol 0.1: one bfloat16 step at logits of 16-32 is 0.125; on the bundled model
    packed and generic patching differ per prompt by 0.16 and each is 0.28 from float32 (techniques/patching.py).
Strings and booleans (top component names, flags) and numbers read off a ranking (top-k overlaps, rank stability,
ranks, p-values: RANK_KEYS; z statistics) are compared in float32 only (bfloat16 reorders near-ties); entries of
ranked lists are matched by identity in bfloat16;
run directories, file lists and timings are not compared. A command both runs refuse (exit 2: e.g. circuits
on nnsight) counts as n/a. Exit status 0 when no row fails. Which of these have run on a GPU: BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# command -> arguments that keep it short on the bundled model (every command that computes something)
COMMANDS = {
    "predict": [],
    "logit-lens": [],
    "tuned-lens": ["--steps", "20"],
    "dla": [],
    "patch": [],
    "attribution-patch": [],
    "path-patch": ["--receivers", "2.1,2.2", "--n", "8"],
    "ablate": ["--n", "16"],
    "heads": ["--n", "16"],
    "circuits": [],
    "probe": ["--n", "200"],
    "steer": ["--n-random", "2"],
    "validate-circuit": ["--circuit", "0.1,1.2,2.1,2.2", "--n", "16", "--random", "2"],
    "sae-eval": ["--n-tokens", "4000"],
    "sae-features": [],
    "sae-steer": ["--controls", "2"],
    "sae-ablate": [],
}
TOLERANCES = {"float32": (1e-3, 1e-3), "bfloat16": (0.35, 0.1)}
SKIP_KEYS = ("run_dir", "files", "seconds", "time", "elapsed", "path", "device", "dtype", "engine", "backend",
             "command")
# numbers read off a ranking (top-k overlaps, rank stability, ranks, p-values: an empirical p is the value's rank
# among its controls, and both kinds jump at ties): bfloat16 reorders near-ties (on the bundled model most patching
# cells are 0 +- one bfloat16 step of the logits; steer's net rate of generated words moves from 0.008 to 0, a tie
# with its controls), so like strings they are compared in float32 only
RANK_KEYS = ("top_k_overlap", "set_frequency", "rank_correlation", "in_top", "top_k_fraction", "rank", "p_value",
             "p_adjusted", "beats")
# test statistics over a spread that bfloat16 resolves coarsely (steer's z against 2 Gaussian controls whose values
# differ by a few bfloat16 steps: 282 vs 439): compared in float32 only, like the p-values they give
STATISTIC_KEYS = ("z",)


def configs(dry_run: bool, n_gpus: int, model_bytes: int) -> dict:
    """name -> (backend, dtype, extra argv)."""
    if dry_run:
        return {"cpu-bf16": ("tl", "bfloat16", ["--device", "cpu"]),
                "nnsight-cpu-fp32": ("nnsight", "float32", ["--device", "cpu"]),
                "nnsight-cpu-bf16": ("nnsight", "bfloat16", ["--device", "cpu"]),
                "nnsight-device-map-cpu": ("nnsight", "float32", ["--device-map", "cpu"])}
    share = f"{max(1, model_bytes // max(n_gpus, 1) * 6 // 5)}B"
    split = ",".join(f"{i}={share}" for i in range(n_gpus))
    return {"cuda-fp32": ("tl", "float32", ["--device", "cuda"]),
            "cuda-bf16": ("tl", "bfloat16", ["--device", "cuda"]),
            "nnsight-fp32": ("nnsight", "float32", ["--device", "cuda"]),
            "nnsight-bf16": ("nnsight", "bfloat16", ["--device", "cuda"]),
            "device-map": ("nnsight", "float32", ["--device-map", "auto", "--max-memory", f"{split},cpu=64GiB"]),
            "cpu-offload": ("nnsight", "float32", ["--device-map", "auto", "--max-memory",
                                                   f"0={max(1, model_bytes // 3)}B,cpu=64GiB"])}


def run(command: str, model: str, backend: str, dtype: str, extra: list, out: Path, timeout: int) -> tuple:
    """(exit status, summary dict or the last stderr line)."""
    argv = [sys.executable, "-m", "mechscope", command, *COMMANDS[command], "--model", model, "--backend", backend,
            "--dtype", dtype, *extra, "--out", str(out), "--json"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return 124, f"timed out after {timeout} s"
    if done.returncode != 0:
        return done.returncode, (done.stderr.strip().splitlines() or ["(no message)"])[-1][:200]
    return 0, json.loads(done.stdout)["summary"]


def leaves(value, path: str = "") -> dict:
    """{path: number / string / bool / None} of a JSON value, without the keys SKIP_KEYS names."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() if not any(s in key for s in SKIP_KEYS)
                for k, v in leaves(item, f"{path}.{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in leaves(item, f"{path}[{i}]").items()}
    return {path or ".": value}


def _identity(entry: dict) -> tuple:
    """What names an entry of a ranked list: its string and integer fields (component, position, feature, ...)."""
    return tuple(sorted((k, v) for k, v in entry.items() if isinstance(v, (str, int)) and not isinstance(v, bool)))


def align_ranked(reference, value, problems: list, key: str = ""):
    """(reference, value) with every ranked list (a list of dicts under a key naming "top") cut to the entries both
    list, matched by identity, in the reference's order: in half precision near-tied entries swap places, and the
    k-th entry of one run is then another item than the other's. A list sharing under half its entries is
    appended to `problems`."""
    if isinstance(reference, dict) and isinstance(value, dict):
        pairs = {k: align_ranked(reference[k], value[k], problems, k) for k in reference if k in value}
        return ({**reference, **{k: a for k, (a, _) in pairs.items()}}, {**value, **{k: b for k, (_, b) in pairs.items()}})
    if "top" in key and isinstance(reference, list) and isinstance(value, list) and reference \
            and all(isinstance(e, dict) for e in reference + value):
        found = {_identity(e): e for e in value}
        common = [(e, found[_identity(e)]) for e in reference if _identity(e) in found]
        if 2 * len(common) < len(reference):
            problems.append(f"{key}: {len(common)} of {len(reference)} entries shared")
        return [a for a, _ in common], [b for _, b in common]
    return reference, value


def compare(reference: dict, value: dict, dtype: str) -> tuple[bool, float, str]:
    """(pass, largest |difference| over tolerance, the first mismatch) of two summaries; in half precision the
    entries of ranked lists are matched by identity (align_ranked)."""
    atol, rtol = TOLERANCES[dtype]
    if dtype != "float32":
        problems = []
        reference, value = align_ranked(reference, value, problems)
        if problems:
            return False, math.inf, problems[0]
    ref, got = leaves(reference), leaves(value)
    if set(ref) != set(got):
        return False, math.inf, f"keys differ: {sorted(set(ref) ^ set(got))[:3]}"
    worst, first = 0.0, ""
    for key, a in ref.items():
        b = got[key]
        parts = key.split(".")
        if dtype != "float32" and (any(r in part for part in parts for r in RANK_KEYS) or parts[-1] in STATISTIC_KEYS):
            continue
        if isinstance(a, (int, float)) and not isinstance(a, bool) and isinstance(b, (int, float)) \
                and not isinstance(b, bool):
            ratio = abs(b - a) / (atol + rtol * abs(a))
            worst = max(worst, ratio)
            if ratio > 1 and not first:
                first = f"{key}: {b} vs {a}"
        elif dtype == "float32" and a != b and not first:
            worst, first = math.inf, f"{key}: {b!r} vs {a!r}"
    return worst <= 1, worst, first


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU stand-ins for the GPU configurations")
    parser.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated (default: all)")
    parser.add_argument("--configs", help="comma-separated configuration names (default: all)")
    parser.add_argument("--checkpoint", help="also check this local Hugging Face directory (save_pretrained)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per command run")
    parser.add_argument("--report", help="write the table as JSON here")
    args = parser.parse_args(argv)
    commands = [c for c in args.commands.split(",") if c]
    unknown = [c for c in commands if c not in COMMANDS]
    if unknown:
        parser.error(f"unknown commands {unknown}; choose from {', '.join(COMMANDS)}")
    import torch  # after --help, which answers without torch

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device here: run with --dry-run for the CPU stand-ins", file=sys.stderr)
        return 2
    from mechscope.toy.export import HF_DIR

    models = ["mechscope-toy"] + ([args.checkpoint] if args.checkpoint else [])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            directory = HF_DIR if model == "mechscope-toy" else Path(model)
            size = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
            plan = configs(args.dry_run, torch.cuda.device_count(), size)
            if args.configs:
                plan = {k: v for k, v in plan.items() if k in args.configs.split(",")}
            for command in commands:
                baselines = {}
                for name, (backend, dtype, extra) in plan.items():
                    if backend not in baselines:
                        baselines[backend] = run(command, model, backend, "float32", ["--device", "cpu"],
                                                 Path(tmp), args.timeout)
                    base_status, base = baselines[backend]
                    status, got = run(command, model, backend, dtype, extra, Path(tmp), args.timeout)
                    if status == base_status == 2:
                        verdict, worst, detail = "n/a", 0.0, f"refused on both: {got}"
                    elif status != 0 or base_status != 0:
                        verdict, worst, detail = "FAIL", math.inf, f"exit {status} (cpu fp32: {base_status}): " \
                                                                   f"{got if status else base}"
                    else:
                        ok, worst, detail = compare(base, got, dtype)
                        verdict = "pass" if ok else "FAIL"
                    rows.append({"model": model, "command": command, "config": name, "dtype": dtype,
                                 "verdict": verdict, "worst": worst, "detail": detail})
                    print(f"{verdict:4}  {Path(model).name:16} {command:18} {name:24} worst {worst:.3g} "
                          f"{detail}", file=sys.stderr, flush=True)
    width = max(len(r["command"]) for r in rows) if rows else 8
    print(f"\n{'verdict':7} {'model':16} {'command':{width}} {'config':24} worst/tol")
    for r in rows:
        print(f"{r['verdict']:7} {Path(r['model']).name:16} {r['command']:{width}} {r['config']:24} {r['worst']:.3g}")
    failed = sum(r["verdict"] == "FAIL" for r in rows)
    print(f"\n{len(rows) - failed} of {len(rows)} pass{'' if failed else ' (all)'}; tolerances: "
          + "; ".join(f"{k} atol {a} rtol {r}" for k, (a, r) in TOLERANCES.items()))
    if args.report:
        Path(args.report).write_text(json.dumps(rows, indent=1, default=str) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

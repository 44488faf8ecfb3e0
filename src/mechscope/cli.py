"""`mechscope <command> ...`: the command registry and the conventions every command follows.

- `--help` never imports torch: command modules import heavy libraries inside `run`.
- Bad input raises `BadInput` -> one line on stderr, exit 2. Any other error -> one line, exit 1
  (`MECHSCOPE_DEBUG=1` shows the traceback).
- Commands that compute something write a new run directory under `--out` (default `runs/`) with
  result.json (atomic) and meta.json; stdout gets a short summary, or with `--json` one JSON object
  `{"command", "run_dir", "summary"}`. Diagnostics and progress bars go to stderr.

A command module defines HELP (one line), `add_arguments(parser)` and `run(ctx) -> dict`; the dict's
"summary" (small) is printed, "text" (optional, human-readable) replaces it without --json, and the
whole dict goes to result.json. Set USES_MODEL = False / WRITES_RUN = False where they do not apply
(WRITES_RUN = "with --out": a run directory only when --out is given).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mechscope.errors import BadInput

# OpenMP threads that spin while waiting make small forwards 10-50x slower when the CPU is shared
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# name -> (module under mechscope.commands, one-line help); a module is imported only when its command runs
COMMANDS = {
    "detect": ("detect", "hardware, and which model / library / dtype fits it"),
    "predict": ("predict", "a model's top next tokens on prompts (the bundled model's examples by default)"),
    "model-card": ("model_card", "measure the bundled model's behaviour and circuits (MODEL_CARD.md)"),
    "logit-lens": ("logit_lens", "read the residual stream through the unembedding, layer by layer"),
    "tuned-lens": ("tuned_lens", "train per-layer affine translators and compare KL with the logit lens"),
    "dla": ("dla", "direct logit attribution to embeddings, heads, MLPs and neurons"),
    "patch": ("patch", "activation patching sweeps (resid, attn/mlp out, heads) with a fast exact engine"),
    "attribution-patch": ("attribution_patch", "attribution patching (AtP): gradient estimates of every patch"),
    "path-patch": ("path_patch", "path patching: sender heads -> receiver heads (q/k/v) or logits"),
    "ablate": ("ablate", "zero / mean / resample / noise ablation of heads, layers and neurons"),
    "heads": ("heads", "attention patterns and previous-token / induction / duplicate / BOS head scores"),
    "circuits": ("circuits", "QK / OV circuits, copying scores, K/Q/V composition"),
    "probe": ("probe", "linear probes per layer with controls and confidence intervals"),
    "steer": ("steer", "activation addition steering with a random-direction control"),
    "validate-circuit": ("validate_circuit", "necessity, sufficiency / faithfulness and minimality of a circuit"),
    "new": ("new", "scaffold a new research repository from templates"),
    "report": ("report", "one self-contained offline HTML page from run directories"),
}

MAX_STDOUT_CHARS = 20_000
# import names of pyproject's dependencies: a command run from a bare copy of the skill folder says how to install
DEPENDENCIES = {"torch", "transformer_lens", "sae_lens", "nnsight", "transformers", "tokenizers", "safetensors",
                "matplotlib", "jinja2", "tqdm", "numpy"}


@dataclass
class Context:
    """What a command's run() gets: parsed args, its run directory, and the model's engine (loaded on first use)."""
    args: argparse.Namespace
    run_dir: Path | None
    _engine: object = field(default=None, repr=False)

    @property
    def engine(self):
        """The model on the chosen --backend (mechscope.engines.Engine)."""
        if self._engine is None:
            from mechscope.models import load_model
            a = self.args
            self._engine = load_model(a.model, backend=a.backend, device=a.device, dtype=a.dtype,
                                      device_map=a.device_map, max_memory=parse_max_memory(a.max_memory),
                                      quantization=a.quantization, remote=a.remote)
        return self._engine

    @property
    def model(self):
        """The library object under the engine (a HookedTransformer on --backend tl)."""
        return self.engine.model


def parse_max_memory(spec: str | None) -> dict | None:
    """'0=20GiB,1=20GiB,cpu=64GiB' -> {0: '20GiB', 1: '20GiB', 'cpu': '64GiB'} (accelerate's max_memory)."""
    if spec is None:
        return None
    import re

    out = {}
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        m = re.fullmatch(r"(\d+|cpu|disk|mps)\s*=\s*(\d+(?:\.\d+)?\s*(?:[KMGT]i?B))", item, flags=re.IGNORECASE)
        if not m:
            raise BadInput(f"cannot read --max-memory item {item!r}: write DEVICE=SIZE, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
        key = int(m.group(1)) if m.group(1).isdigit() else m.group(1).lower()
        out[key] = m.group(2).replace(" ", "")
    if not out:
        raise BadInput("--max-memory is empty: write DEVICE=SIZE, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def add_engine_arguments(parser) -> None:
    """--backend and the nnsight loading options, on every command that loads a model."""
    parser.add_argument("--backend", default="auto", choices=("auto", "tl", "bridge", "nnsight"),
                        help="engine: transformer-lens HookedTransformer (tl), TransformerBridge (bridge), nnsight, "
                             "or auto = what `mechscope detect` recommends (default: %(default)s)")
    parser.add_argument("--remote", action="store_true",
                        help="nnsight: run on NDIF (a hub model id; needs NDIF_API_KEY and the network)")
    parser.add_argument("--device-map", help="nnsight: Hugging Face device_map, e.g. auto (several GPUs, offload)")
    parser.add_argument("--max-memory", help="nnsight with --device-map: per-device limits, e.g. 0=20GiB,1=20GiB,cpu=64GiB")
    parser.add_argument("--quantization", choices=("8bit", "4bit"), help="nnsight: bitsandbytes 8- or 4-bit weights")


def _command_module(name: str):
    return importlib.import_module(f"mechscope.commands.{COMMANDS[name][0]}")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="mechscope", description="Vetted mechanistic-interpretability techniques. "
                     "Run `mechscope <command> --help` for one command.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    for name, (_, help_line) in COMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_line)  # listed; its arguments are built only when it is asked for
            continue
        module = _command_module(name)
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        if getattr(module, "USES_MODEL", True):
            p.add_argument("--model", default="mechscope-toy",
                           help="bundled model, transformer-lens name, or local HF directory (default: %(default)s)")
            p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps (default: %(default)s)")
            p.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16 (default: %(default)s)")
            add_engine_arguments(p)
        if getattr(module, "WRITES_RUN", True) == "with --out":  # a query: a run directory only when asked
            p.add_argument("--out", help="parent directory of a new run directory (result.json, meta.json) to keep "
                                         "the answer; without it nothing is written")
        elif getattr(module, "WRITES_RUN", True):
            p.add_argument("--out", default="runs", help="parent directory of the new run directory (default: %(default)s)")
            p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return parser


def _print_result(command: str, result: dict, run_dir: Path | None, as_json: bool) -> None:
    from mechscope.runs import to_json

    summary = result.get("summary", {k: v for k, v in result.items() if k != "text"})
    if as_json:
        text = to_json({"command": command, "run_dir": str(run_dir) if run_dir else None, "summary": summary},
                       indent=None)
        if len(text) > MAX_STDOUT_CHARS:
            text = json.dumps({"command": command, "run_dir": str(run_dir) if run_dir else None,
                               "summary": "too long for stdout; see result.json in run_dir"})
    else:
        text = result.get("text") or to_json(summary)
        if len(text) > MAX_STDOUT_CHARS:
            text = text[:MAX_STDOUT_CHARS] + "\n... (cut; the full result is in result.json)"
        if run_dir:
            text += f"\nresults: {run_dir}"
    print(text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(command)
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    module = _command_module(args.command)
    started = time.time()
    try:
        run_dir = None
        if getattr(module, "WRITES_RUN", True) and args.out is not None:
            from mechscope.runs import new_run_dir
            run_dir = new_run_dir(args.out, args.command)
        ctx = Context(args=args, run_dir=run_dir)
        if hasattr(args, "seed"):
            import torch
            torch.manual_seed(args.seed)
        with contextlib.redirect_stdout(sys.stderr):  # libraries that print must not corrupt --json
            result = module.run(ctx)
        if run_dir is not None:
            from mechscope.models import model_info
            from mechscope.runs import metadata_for, write_json
            write_json(run_dir / "result.json", result)
            info = model_info(ctx._engine) if ctx._engine is not None else None
            write_json(run_dir / "meta.json", metadata_for(args.command, vars(args), started, info, argv))
        _print_result(args.command, result, run_dir, args.json)
        return 0
    except BadInput as e:
        sys.stderr.write(f"mechscope {args.command}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns crashes into a line
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in DEPENDENCIES:
            sys.stderr.write(f"mechscope {args.command}: error: {e.name} is not installed; install mechscope's "
                             f"dependencies once: python3 -m pip install -e {Path(__file__).resolve().parents[2]}\n")
            return 2
        if os.environ.get("MECHSCOPE_DEBUG"):
            raise
        sys.stderr.write(f"mechscope {args.command}: internal error: {type(e).__name__}: {e} "
                         f"(MECHSCOPE_DEBUG=1 for the traceback)\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())

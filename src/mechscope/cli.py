"""`mechscope <command> ...`: the command registry and the conventions every command follows.

- `--help` never imports torch: command modules import heavy libraries inside `run`.
- Exit codes: 0 done; 2 bad input (`BadInput`, an argparse error, or out of memory: one line on stderr
  saying what to fix);
  1 an internal error (one line; `MECHSCOPE_DEBUG=1` shows the traceback); 130 / 143 interrupted by
  Ctrl-C / SIGTERM.
- Commands that compute something write a new run directory under `--out` (default `runs/`, see
  mechscope.runs): created on the first file written, removed again if the input is refused; its
  meta.json says "status": "complete", "failed" or "interrupted". stdout gets a short summary, or with
  `--json` one JSON object `{"headline", "command", "run_dir", "summary"}`. Diagnostics and progress bars go to
  stderr.
- JSON is strict (no NaN / Infinity): an undefined value (e.g. 0/0) is written as null, and the result's
  "notes" (also in the printed summary) say where and why; a command may add its own notes.

A command module defines HELP (one line), `add_arguments(parser)`, `run(ctx) -> dict` and
`headline(summary) -> str`; the dict's "summary" (small: top-k rows, full tables in files of the run
directory) is printed, "text" (optional, human-readable) replaces it without --json, "notes" (optional,
one-line strings, e.g. why a value is null) are printed with it, and the whole dict goes to result.json.
`headline` states the finding in one sentence with its number, 95% interval and n, read from the summary's
fields (never recomputed; helpers in mechscope.findings): it becomes the summary's first key, the first
key of --json and the first line of the text output, and leads the run's section in `mechscope report`.
A new command adds it beside its summary; tests/test_findings.py checks every command has one.
--json output stays under MAX_STDOUT_CHARS: the largest parts of an oversized summary are replaced by a
pointer to result.json. Set USES_MODEL = False / WRITES_RUN = False where they do not apply
(WRITES_RUN = "with --out": a run directory only when --out is given).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mechscope import inputs
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
    "discover": ("discover", "edge-level circuit discovery (EAP, EAP-IG) checked by exact edge patching (tl, nnsight)"),
    "ablate": ("ablate", "zero / mean / resample / noise ablation of heads, layers and neurons"),
    "heads": ("heads", "attention patterns and previous-token / induction / duplicate / BOS head scores"),
    "circuits": ("circuits", "QK / OV circuits, copying scores, K/Q/V composition"),
    "probe": ("probe", "linear probes per layer with controls and confidence intervals"),
    "steer": ("steer", "activation addition steering with a random-direction control"),
    "validate-circuit": ("validate_circuit", "necessity, sufficiency / faithfulness and minimality of a circuit"),
    "sae-train": ("sae_train", "train a sparse autoencoder with sae-lens (curves, checkpoints, correct metadata)"),
    "sae-eval": ("sae_eval", "evaluate an SAE: L0, explained variance, CE loss recovered, dead / dense features"),
    "sae-features": ("sae_features", "SAE features: top features, max-activating contexts, logit effects, HTML page"),
    "sae-steer": ("sae_steer", "steer generation along an SAE feature, with random-feature / direction controls"),
    "sae-ablate": ("sae_ablate", "ablate SAE features (error term kept); attribute a metric to features, checked exactly"),
    "new": ("new", "scaffold a new research repository from templates"),
    "report": ("report", "one self-contained offline HTML page from run directories"),
}

MAX_STDOUT_CHARS = 16_000  # --json on stdout, in characters
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}  # OSErrors that are the machine's, not a bug
# import names of pyproject's dependencies: a command run from a bare copy of the skill folder says how to install
DEPENDENCIES = {"torch", "transformer_lens", "sae_lens", "nnsight", "transformers", "tokenizers", "safetensors",
                "matplotlib", "jinja2", "markdown_it", "tqdm", "numpy"}


@dataclass
class Context:
    """What a command's run() gets: parsed args, its run directory, and the model's engine (loaded on first use)."""
    args: argparse.Namespace
    run: object = None                  # mechscope.runs.Run, or None for commands that write no run
    _engine: object = field(default=None, repr=False)

    @property
    def run_dir(self) -> Path | None:
        """The run directory, created on first use (so refusals before any output leave nothing)."""
        return self.run.path if self.run is not None else None

    @property
    def engine(self):
        """The model on the chosen --backend (mechscope.engines.Engine)."""
        if self._engine is None:
            from mechscope.models import load_model
            a = self.args
            self._engine = load_model(a.model, backend=a.backend, device=a.device, dtype=a.dtype,
                                      device_map=a.device_map, max_memory=parse_max_memory(a.max_memory),
                                      quantization=a.quantization, remote=a.remote, offload_folder=a.offload_folder)
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
    parser.add_argument("--offload-folder", metavar="DIR",
                        help="nnsight with --device-map: where weights offloaded to disk are written when they cannot "
                             "be read from the checkpoint's safetensors (.bin checkpoints, weights converted on load)")
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
            p.add_argument("--seed", type=inputs.seed, default=0, help="random seed (default: %(default)s)")
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return parser


class Interrupted(KeyboardInterrupt):
    """SIGTERM (or another handled signal) while a command runs: treated like Ctrl-C."""


@contextlib.contextmanager
def _signals_interrupt():
    """Turn SIGTERM into an Interrupted exception while a command runs (main thread only)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signal.Signals(signum).name)
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _with_notes(command_result: dict) -> tuple[dict, list[str]]:
    """The result made strict-JSON-safe (non-finite -> null) and its notes: the command's own, then where
    nulls were written."""
    from mechscope.runs import null_note, sanitize

    result, found = sanitize(command_result)
    notes = [str(n) for n in (result.get("notes") or [])]
    generic = null_note(found)
    if generic:
        notes.append(generic)
    if notes:
        result["notes"] = notes
    return result, notes


def _with_headline(module, result: dict, notes: list[str]) -> dict:
    """The result with the command's headline(summary) as the summary's first key (where it defines one). A
    headline that fails is a note, not a failed run: the results are written all the same."""
    summary = result.get("summary")
    if not hasattr(module, "headline") or not isinstance(summary, dict):
        return result
    try:
        line = module.headline(summary)
    except Exception as e:  # noqa: BLE001 - a bug in one sentence must not discard a finished run
        notes.append(f"no headline: {type(e).__name__}: {_one_line(e, 200)} (a bug; please report it)")
        return {**result, "notes": notes}
    return {**result, "summary": {"headline": line, **summary}}


def bounded(summary: dict, limit: int) -> dict:
    """The summary with its largest values replaced, one at a time, by a pointer to result.json until its JSON
    fits in `limit` characters: tables (lists, long strings) at any depth go first, whole sections only when no
    table is left, so the headline and the small values stay."""
    import copy

    from mechscope.runs import to_json

    out = copy.deepcopy(summary)

    def entries(node, path):
        for key, value in node.items():
            if not path and key == "headline":
                continue
            yield node, key, path + [str(key)], value
            if isinstance(value, dict):
                yield from entries(value, path + [str(key)])

    while len(to_json(out, indent=None)) > limit:
        sized = [(len(to_json(v, indent=None)), isinstance(v, dict), node, key, path)
                 for node, key, path, v in entries(out, []) if not str(v).startswith("too long for stdout")]
        sized = [entry for entry in sized if entry[0] >= 100]
        if not sized:
            break
        size, _, node, key, path = max(sized, key=lambda e: (not e[1], e[0]))  # tables before sections
        node[key] = f"too long for stdout ({size:,} characters): see {'.'.join(path)} in result.json"
    return out


def _print_result(command: str, result: dict, notes: list[str], run_dir: Path | None, as_json: bool) -> None:
    from mechscope.runs import to_json

    summary = result.get("summary", {k: v for k, v in result.items() if k not in ("text", "notes")})
    if notes and isinstance(summary, dict):
        summary = {**summary, "notes": notes}
    headline = summary.get("headline") if isinstance(summary, dict) else None
    if as_json:
        head = {"headline": headline} if headline else {}
        out = {**head, "command": command, "run_dir": str(run_dir) if run_dir else None, "summary": summary}
        text = to_json(out, indent=None)
        if len(text) > MAX_STDOUT_CHARS and isinstance(summary, dict):
            out["summary"] = bounded(summary, MAX_STDOUT_CHARS - (len(text) - len(to_json(summary, indent=None))) - 200)
            text = to_json(out, indent=None)
    else:
        text = result.get("text") or to_json(summary)
        if len(text) > MAX_STDOUT_CHARS:
            text = text[:MAX_STDOUT_CHARS] + "\n... (cut; the full result is in result.json)"
        if headline and not text.startswith(headline):
            text = f"{headline}\n{text}"
        if notes and result.get("text"):
            text += "".join(f"\nnote: {n}" for n in notes)
        if run_dir:
            text += f"\nresults: {run_dir}"
    print(text)


def _print_finished(command: str, result: dict, notes: list[str], run, as_json: bool) -> int:
    """Print the result of a finished run: exit 0, also when the reader of stdout has gone (`... | head`):
    the run is complete and saved, so it stays "complete"."""
    try:
        _print_result(command, result, notes, run.path if run else None, as_json)
        sys.stdout.flush()
    except BrokenPipeError:
        try:  # Python flushes stdout again at exit: point it at /dev/null so that fails silently too
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # not a real file (tests capture it)
            pass
        with contextlib.suppress(OSError):
            where = f"; the result is in {run.path}" if run is not None else ""
            sys.stderr.write(f"mechscope {command}: stdout was closed before the result was printed{where}\n")
    return 0


def _out_of_memory(error: BaseException) -> bool:
    """A failed allocation: MemoryError, torch.OutOfMemoryError, or the CPU allocator's RuntimeError."""
    text = str(error)
    return (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
            or (isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)))


def _model_info(ctx: Context | None) -> dict | None:
    """meta.json's "model": the loaded engine's facts, or None if no model was loaded."""
    if ctx is None or ctx._engine is None:
        return None
    from mechscope.models import model_info
    try:
        return model_info(ctx._engine)
    except Exception:  # noqa: BLE001 - never let the record of a failure fail
        return None


def _one_line(error: BaseException, limit: int = 1000) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(command)
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    module = _command_module(args.command)
    run = ctx = None
    try:
        if getattr(module, "WRITES_RUN", True) and args.out is not None:
            from mechscope.runs import Run
            run = Run(args.out, args.command, vars(args), argv)  # checks --out; the directory comes later
        ctx = Context(args=args, run=run)
        with _signals_interrupt():
            if hasattr(args, "seed"):
                import torch
                torch.manual_seed(args.seed)
            from mechscope import inputs

            inputs.unknown_token_note()  # forget prompts of an earlier call in this process
            with contextlib.redirect_stdout(sys.stderr):  # libraries that print must not corrupt --json
                command_result = module.run(ctx)
            unknown = inputs.unknown_token_note()
            if unknown:  # on every command: stderr now, and the summary's notes
                sys.stderr.write(f"mechscope {args.command}: warning: {unknown}\n")
                command_result = {**command_result, "notes": [*(command_result.get("notes") or []), unknown]}
            result, notes = _with_notes(command_result)
            result = _with_headline(module, result, notes)
            if run is not None:
                run.model_info = _model_info(ctx)
                run.finish(result)
        return _print_finished(args.command, result, notes, run, args.json)
    except BadInput as e:
        if run is not None:
            run.discard()
        sys.stderr.write(f"mechscope {args.command}: error: {_one_line(e)}\n")
        return 2
    except KeyboardInterrupt as e:
        name = str(e) if isinstance(e, Interrupted) else "SIGINT"
        if run is not None:
            run.model_info = _model_info(ctx)
            run.close("interrupted", signal=name)
        where = f"; partial output in {run.path} (meta.json status: interrupted)" if run and run.exists else ""
        sys.stderr.write(f"mechscope {args.command}: interrupted ({name}){where}\n")
        return 143 if name == "SIGTERM" else 130
    except Exception as e:  # noqa: BLE001 - the one place that turns crashes into a line
        if _out_of_memory(e):  # sizes the user chose (--n, --batch-size, ...): as fixable as bad input
            if run is not None:
                run.discard()
            sys.stderr.write(f"mechscope {args.command}: error: out of memory ({_one_line(e, 200)}); lower the sizes "
                             f"(--n, --batch-size, --seq-len, ...) or use a machine with more memory\n")
            return 2
        if isinstance(e, OSError) and e.errno in DISK_ERRORS:  # a full, read-only or closed disk: the user's to fix
            if run is not None:
                run.discard()  # a run that could not write its results is no result (and may not fit anyway)
            where = f" {e.filename}" if e.filename else ""
            sys.stderr.write(f"mechscope {args.command}: error: cannot use{where}: {e.strerror}; free some space, fix "
                             f"the permissions, or pass another --out DIR\n")
            return 2
        if isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] in DEPENDENCIES:
            if run is not None:
                run.discard()
            sys.stderr.write(f"mechscope {args.command}: error: {e.name} is not installed; install mechscope's "
                             f"dependencies once: python3 -m pip install -e {Path(__file__).resolve().parents[2]}\n")
            return 2
        if run is not None:
            run.model_info = _model_info(ctx)
            run.close("failed", error=f"{type(e).__name__}: {_one_line(e)}")
        if os.environ.get("MECHSCOPE_DEBUG"):
            raise
        sys.stderr.write(f"mechscope {args.command}: internal error: {type(e).__name__}: {_one_line(e)} "
                         f"(MECHSCOPE_DEBUG=1 for the traceback)\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())

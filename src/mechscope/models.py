"""load_model(spec, backend=...): one entry point for the bundled model, hub names and local HF directories,
on one of three engines (mechscope.engines):

    load_model("mechscope-toy")                          # bundled, offline, trained (MODEL_CARD.md)
    load_model("gpt2-small")                             # a transformer-lens / hub name (needs the hub)
    load_model("/path/to/hf_checkpoint")                 # a local Hugging Face directory, offline
    load_model("mechscope-toy", backend="nnsight")       # the same weights on nnsight (the bundled HF export)
    load_model("meta-llama/Llama-2-13b-hf", backend="nnsight", device_map="auto", quantization="8bit")

backend: "tl" (transformer-lens HookedTransformer, LayerNorm folded unless fold_ln=False), "bridge"
(transformer-lens TransformerBridge in compatibility mode), "nnsight" (the Hugging Face module under
nnsight: device_map / max_memory / 8- and 4-bit weights / NDIF remote), or "auto": what `mechscope detect`
recommends (transformer-lens up to 2B parameters, nnsight above, bridge where HookedTransformer is gone).
The transformer-lens engines fold LayerNorm and centre weights as HookedTransformer.from_pretrained does,
but never fold the value biases into b_O: so `attn.hook_z` is the same vector on every engine (the input of
the attention output projection), and zero-ablating a head or attributing to it means the same thing on all
three. Every technique takes the returned engine (or a raw HookedTransformer / TransformerBridge / nnsight model:
`as_engine` wraps it). Loading never changes torch's global state (grad mode, default dtype).
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

from mechscope import catalog
from mechscope.catalog import (  # noqa: F401  (re-exported: `from mechscope.models import BUNDLED` keeps working)
    BUNDLED, DTYPES, _hooked_transformer_available, _official_name, _table_names, close_names_hint,
    known_model_names, resolve_device, resolve_dtype, transformer_lens_backend)
from mechscope.engines.base import BACKENDS
from mechscope.errors import BadInput


def load_local_hf(directory: Path, device: str, dtype, fold_ln: bool = True):
    """A local Hugging Face checkpoint directory as a HookedTransformer, without the network."""
    import torch
    from transformer_lens import HookedTransformer, loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    check_hf_directory(directory)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a small (transformer-lens) model loads in seconds: keep stderr for errors
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(str(directory), torch_dtype=torch.float32)
    except OSError as e:  # no weights file, unreadable weights
        raise BadInput(f"cannot load the weights in {directory}: {' '.join(str(e).split())[:300]}") from None
    except (ValueError, KeyError) as e:  # a config.json transformers cannot use (no or unknown model_type)
        raise BadInput(f"{directory}/config.json does not describe a model transformers can load: "
                       f"{' '.join(str(e).split())[:300]}") from None
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    try:
        with _config_filled_for_transformer_lens():
            cfg = loading.get_pretrained_model_config(str(directory), fold_ln=fold_ln, device=device, dtype=dtype)
    except (ValueError, NotImplementedError, KeyError, AttributeError) as e:
        raise BadInput(f"transformer-lens cannot convert the architecture in {directory}: "
                       f"{' '.join(str(e).split())[:300]}; try --backend bridge or --backend nnsight") from None
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    state = loading.get_pretrained_state_dict(str(directory), cfg, hf_model=hf_model, dtype=dtype)
    model.load_and_process_state_dict(state, **_processing(cfg, fold_ln))
    return model.to(device, print_details=False).to(dtype, print_details=False).eval()


def _processing(cfg, fold_ln: bool) -> dict:
    """load_and_process_state_dict's options: HookedTransformer.from_pretrained's (LayerNorm folded, writing
    weights and unembedding centred when fold_ln) with its guards: no folding on post-norm architectures, no
    centred unembedding under a logit soft cap (the cap is not invariant to a constant added to the logits);
    value biases never folded (see the module docstring)."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    fold = fold_ln and cfg.original_architecture not in POST_NORM_ARCHITECTURES
    capped = cfg.output_logits_soft_cap is not None and cfg.output_logits_soft_cap > 0
    return dict(fold_ln=fold, center_writing_weights=fold, center_unembed=fold_ln and not capped,
                fold_value_biases=False)


# fields transformer-lens 3.9's config conversion reads that transformers 5 no longer stores:
# architecture -> (field, its value from the config)
_MISSING_CONFIG_FIELDS = {
    "GPT2LMHeadModel": ("n_ctx", lambda c: c.n_positions),
    "PhiForCausalLM": ("partial_rotary_factor", lambda c: (getattr(c, "rope_parameters", None) or {}).get(
        "partial_rotary_factor", 1.0)),
}


@contextlib.contextmanager
def _config_filled_for_transformer_lens():
    """While this holds, transformer-lens's config conversion reads Hugging Face configs with the fields of
    _MISSING_CONFIG_FIELDS filled in (a GPT-2 saved by transformers 5 has n_positions but no n_ctx)."""
    from unittest import mock

    from transformer_lens import loading
    from transformers import AutoConfig

    def from_pretrained(*args, **kwargs):
        config = AutoConfig.from_pretrained(*args, **kwargs)
        field, fill = _MISSING_CONFIG_FIELDS.get((config.architectures or [None])[0], (None, None))
        if field and not hasattr(config, field):
            setattr(config, field, fill(config))
        return config

    with mock.patch.object(loading, "AutoConfig", mock.Mock(from_pretrained=from_pretrained)):
        yield


def check_hf_directory(directory: Path) -> dict:
    """The config.json of a local Hugging Face directory as a dict, or BadInput saying what is wrong."""
    from mechscope import inputs

    if not (directory / "config.json").is_file():
        raise BadInput(f"{directory} has no config.json: pass a directory written by save_pretrained")
    config = inputs.read_json(directory / "config.json", "the model configuration")
    if not isinstance(config, dict) or not config.get("model_type"):
        raise BadInput(f"{directory}/config.json has no model_type: pass a directory written by save_pretrained")
    for weights in sorted(directory.glob("*.safetensors")):
        _check_safetensors(weights)
    from transformers import AutoConfig

    try:  # values transformers' own validation refuses (e.g. a width that the heads do not divide)
        AutoConfig.from_pretrained(str(directory))
    except Exception as e:  # noqa: BLE001 - ValueError, KeyError, huggingface_hub's StrictDataclassError ...
        if not isinstance(e, (ValueError, KeyError, TypeError)) and "StrictDataclass" not in type(e).__name__:
            raise
        raise BadInput(f"{directory}/config.json does not describe a model transformers can load: "
                       f"{' '.join(str(e).split())[:300]}") from None
    return config


def _check_safetensors(path: Path) -> None:
    """BadInput unless `path` is a whole safetensors file: a readable header, and as many bytes as it lists."""
    import json

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n <= size - 8 else None
        end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        header = end = None
    if header is None or size != 8 + n + end:
        raise BadInput(f"{path} is damaged or cut short (a copy or download that did not finish?); save or copy "
                       f"the model again")


def auto_backend(spec: str, remote: bool = False, device_map=None, quantization=None) -> str:
    """detect's rule: nnsight for remote / split / quantised runs and above 2B parameters; else
    transformer-lens (the bridge where HookedTransformer no longer exists)."""
    if remote or device_map is not None or quantization is not None:
        return "nnsight"
    from mechscope import compute

    try:
        n_params = compute.model_shape(spec).n_params
    except BadInput:
        n_params = 0
    if n_params > compute.TL_MAX_PARAMS:
        return "nnsight"
    return catalog.transformer_lens_backend()


def _load_tl(spec: str, device: str, dtype: str, fold_ln: bool):
    """A HookedTransformer for `spec` (bundled name, transformer-lens name, or local HF directory)."""
    if not catalog._hooked_transformer_available():
        raise BadInput("this transformer-lens has no HookedTransformer (removed in transformer-lens 4); "
                       "use --backend bridge or --backend nnsight")
    if spec in (BUNDLED, "toy"):
        from mechscope.toy import model as toy

        if not (toy.WEIGHTS_DIR / "model.safetensors").exists():
            raise BadInput(f"bundled weights missing in {toy.WEIGHTS_DIR}; run `python -m mechscope.toy.train`")
        return toy.load(device=device, dtype=resolve_dtype(dtype, device, 1e6), fold_ln=fold_ln)
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_local_hf(path, device, resolve_dtype(dtype, device), fold_ln=fold_ln)
    from mechscope import hub

    with hub.access(spec, close_names_hint(spec)):  # out of reach and nothing cached: fails before importing TL
        name = _official_name(spec)
        from transformer_lens import HookedTransformer, loading

        try:
            n_params = loading.get_pretrained_model_config(name).n_params
            model = HookedTransformer.from_pretrained(name, device=device,
                                                      dtype=resolve_dtype(dtype, device, n_params, name),
                                                      fold_ln=fold_ln,
                                                      center_writing_weights=fold_ln, center_unembed=fold_ln,
                                                      fold_value_biases=False)
        except OSError as e:
            raise BadInput(f"could not fetch {name!r} from the Hugging Face hub ({type(e).__name__}); offline? "
                           f"pass a local directory saved with save_pretrained, or use {BUNDLED!r}") from None
    return model.eval()


def _with_model_params(engine, spec: str):
    """The engine with cfg.n_params = the model's own parameter count, the one detect gives (mechscope.compute.
    model_shape: the bundled model's weights, a common model's published count, a local directory's safetensors),
    so every command, report and engine names one number; each engine's tensors count differently (transformer-lens
    drops folded LayerNorms and counts attention and MLP weights only, Hugging Face ties or drops W_U's bias).
    A hub model keeps the engine's count (no second hub request)."""
    from dataclasses import replace

    from mechscope import compute

    path = Path(spec).expanduser()
    if spec in (BUNDLED, "toy") or compute.ALIASES.get(spec, spec).lower() in compute.COMMON_MODELS or path.is_dir():
        try:
            engine.cfg = replace(engine.cfg, n_params=compute.model_shape(spec).n_params)
        except BadInput:
            pass
    return engine


def load_model(spec: str = BUNDLED, backend: str = "auto", device: str = "auto", dtype: str = "auto",
               fold_ln: bool = True, device_map: str | None = None, max_memory: dict | None = None,
               quantization: str | None = None, remote: bool = False, offload_folder: str | None = None):
    """An engine (mechscope.engines.Engine) for `spec` on `backend`; see the module docstring. offload_folder:
    where accelerate writes the weights a device_map puts on "disk" when it cannot read them from the
    checkpoint's safetensors (created if missing)."""
    import torch

    if backend not in ("auto",) + BACKENDS:
        raise BadInput(f"unknown backend {backend!r}; use auto, {', '.join(BACKENDS)}")
    if not isinstance(spec, str) or not spec.strip():
        raise BadInput("the model name is empty; pass --model NAME (default mechscope-toy)")
    path = Path(spec).expanduser()
    if spec.startswith((".", "/", "~")) and not path.is_dir():
        raise BadInput(f"model directory {spec} does not exist")
    if path.is_dir() and spec not in (BUNDLED, "toy"):
        check_hf_directory(path)
    device = "auto" if remote else resolve_device(device)
    if dtype not in DTYPES:
        raise BadInput(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if backend == "auto":
        backend = auto_backend(spec, remote, device_map, quantization)
    if backend != "nnsight" and (remote or device_map is not None or max_memory is not None or quantization
                                 or offload_folder is not None):
        raise BadInput(f"--remote, --device-map, --max-memory, --offload-folder and --quantization need --backend "
                       f"nnsight (not {backend})")
    if device_map is not None and not re.fullmatch(r"auto|balanced|balanced_low_0|sequential|cpu|mps|cuda(:\d+)?",
                                                   device_map):
        raise BadInput(f"unknown --device-map {device_map!r}; use auto, balanced, balanced_low_0, sequential, "
                       f"cpu or cuda:N")
    if max_memory is not None and device_map is None:
        raise BadInput("--max-memory limits what --device-map places on each device: pass --device-map auto too")
    if offload_folder is not None:
        offload_folder = _offload_folder(offload_folder, device_map)
    grad, default_dtype = torch.is_grad_enabled(), torch.get_default_dtype()
    try:  # libraries toggle grad mode and default dtypes while loading: leave the caller's as they were
        if backend == "tl":
            from mechscope.engines.hooked import HookedEngine
            engine = HookedEngine(_load_tl(spec, device, dtype, fold_ln))
        elif backend == "bridge":
            from mechscope.engines.bridge import load_bridge
            engine = load_bridge(spec, device=device, dtype=dtype, fold_ln=fold_ln)
        else:
            from mechscope.engines.nnsight import load_nnsight
            engine = load_nnsight(spec, device=device, dtype=dtype, device_map=device_map, max_memory=max_memory,
                                  quantization=quantization, remote=remote, offload_folder=offload_folder)
        return _with_model_params(engine, spec)
    finally:
        torch.set_grad_enabled(grad)
        torch.set_default_dtype(default_dtype)


def _offload_folder(folder: str, device_map) -> str:
    """The --offload-folder as a writable directory (created if missing), or BadInput in one line."""
    import os

    if device_map is None:
        raise BadInput("--offload-folder holds the weights --device-map puts on disk: pass --device-map auto too")
    if not str(folder).strip():
        raise BadInput("--offload-folder is empty: pass a directory")
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise BadInput(f"--offload-folder {folder} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"cannot use --offload-folder {folder}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise BadInput(f"cannot use --offload-folder {folder}: not writable")
    return str(path)


def as_engine(model):
    """An Engine for a loaded model: an Engine as it is, a HookedTransformer, a TransformerBridge or an
    nnsight model wrapped (so techniques accept what a user already has)."""
    from mechscope.engines.base import Engine

    if isinstance(model, Engine):
        return model
    kind = type(model).__name__
    if kind == "TransformerBridge":
        from mechscope.engines.bridge import BridgeEngine
        return BridgeEngine(model)
    if hasattr(model, "run_with_hooks") and hasattr(model, "blocks"):
        from mechscope.engines.hooked import HookedEngine
        return HookedEngine(model)
    if hasattr(model, "trace"):
        from mechscope.engines.nnsight import NNsightEngine
        return NNsightEngine(model)
    raise TypeError(f"cannot use a {kind} as a model: pass load_model(...), a HookedTransformer, a "
                    f"TransformerBridge or an nnsight model")


def model_info(model) -> dict:
    """What meta.json records about a loaded model (engine, facts, dtype, device)."""
    return as_engine(model).info()

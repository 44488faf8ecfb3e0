"""load_model(spec): one entry point for the bundled model, transformer-lens names and local HF directories.

    load_model("mechscope-toy")            # bundled, offline, trained (see MODEL_CARD.md)
    load_model("gpt2-small")               # any official transformer-lens name (needs the hub)
    load_model("/path/to/hf_checkpoint")   # a local Hugging Face directory (config.json + weights), offline

Every model comes back as a `HookedTransformer` in eval mode, LayerNorm folded unless fold_ln=False.
The technique functions take the model and token tensors only, so a second backend (nnsight, for
models above ~2B parameters and NDIF remote runs) can be added here without changing them.
"""
from __future__ import annotations

import difflib
from pathlib import Path

from mechscope.errors import BadInput

BUNDLED = "mechscope-toy"
DTYPES = ("auto", "float32", "float16", "bfloat16")


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
    if device not in ("cpu", "mps") and not device.startswith("cuda"):
        raise BadInput(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def resolve_dtype(dtype: str, device: str, n_params: float | None = None):
    """'auto' -> float32 on CPU/MPS and for models up to 1B parameters; bfloat16 on CUDA above that."""
    import torch

    if dtype not in DTYPES:
        raise BadInput(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if dtype == "auto":
        big = n_params is not None and n_params > 1e9
        if device.startswith("cuda") and big:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def known_model_names() -> list[str]:
    from transformer_lens import loading

    aliases = [a for names in loading.MODEL_ALIASES.values() for a in names]
    return [BUNDLED] + list(loading.OFFICIAL_MODEL_NAMES) + aliases


def _official_name(spec: str) -> str:
    from transformer_lens import loading

    try:
        return loading.get_official_model_name(spec)
    except ValueError:
        close = difflib.get_close_matches(spec, known_model_names(), n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise BadInput(f"unknown model {spec!r}: not {BUNDLED!r}, not a transformer-lens model name, and not "
                       f"a local directory.{hint} (`mechscope detect --models` lists common ones)") from None


def load_local_hf(directory: Path, device: str, dtype, fold_ln: bool = True):
    """A local Hugging Face checkpoint directory as a HookedTransformer, without the network."""
    import torch
    from transformer_lens import HookedTransformer, loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (directory / "config.json").exists():
        raise BadInput(f"{directory} has no config.json: pass a directory written by save_pretrained")
    hf_model = AutoModelForCausalLM.from_pretrained(str(directory), torch_dtype=torch.float32)
    try:
        cfg = loading.get_pretrained_model_config(str(directory), fold_ln=fold_ln, device=device, dtype=dtype)
    except (ValueError, NotImplementedError, KeyError) as e:
        raise BadInput(f"transformer-lens cannot convert the architecture in {directory}: {e}") from None
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    state = loading.get_pretrained_state_dict(str(directory), cfg, hf_model=hf_model, dtype=dtype)
    model.load_and_process_state_dict(state, fold_ln=fold_ln, center_writing_weights=fold_ln,
                                      center_unembed=fold_ln, fold_value_biases=fold_ln)
    return model.to(device, print_details=False).to(dtype, print_details=False).eval()


def load_model(spec: str = BUNDLED, device: str = "auto", dtype: str = "auto", fold_ln: bool = True):
    """A HookedTransformer for `spec` (bundled name, transformer-lens name, or local HF directory)."""
    import torch

    torch.set_grad_enabled(True)  # techniques decide; loading never leaves grad globally off
    device = resolve_device(device)
    if spec in (BUNDLED, "toy"):
        from mechscope.toy import model as toy

        if not (toy.WEIGHTS_DIR / "model.safetensors").exists():
            raise BadInput(f"bundled weights missing in {toy.WEIGHTS_DIR}; run `python -m mechscope.toy.train`")
        return toy.load(device=device, dtype=resolve_dtype(dtype, device, 1e6), fold_ln=fold_ln)
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_local_hf(path, device, resolve_dtype(dtype, device), fold_ln=fold_ln)
    if any(sep in spec for sep in ("/", ".")) and spec.startswith((".", "/", "~")):
        raise BadInput(f"model directory {spec} does not exist")
    name = _official_name(spec)
    from transformer_lens import HookedTransformer, loading

    try:
        n_params = loading.get_pretrained_model_config(name).n_params
        model = HookedTransformer.from_pretrained(name, device=device, dtype=resolve_dtype(dtype, device, n_params),
                                                  fold_ln=fold_ln, center_writing_weights=fold_ln,
                                                  center_unembed=fold_ln)
    except OSError as e:
        raise BadInput(f"could not fetch {name!r} from the Hugging Face hub ({type(e).__name__}); offline? "
                       f"pass a local directory saved with save_pretrained, or use {BUNDLED!r}") from None
    return model.eval()


def model_info(model) -> dict:
    """What meta.json records about a loaded model."""
    cfg = model.cfg
    return {"name": cfg.model_name, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "d_model": cfg.d_model,
            "d_vocab": cfg.d_vocab, "n_ctx": cfg.n_ctx, "n_params": cfg.n_params,
            "normalization_type": cfg.normalization_type, "dtype": str(cfg.dtype), "device": str(cfg.device)}

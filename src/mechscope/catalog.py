"""Facts about models that every part of mechscope reads, and nothing here imports the rest of mechscope (a
leaf: models.py, compute.py and the engines import it, it imports none of them): the bundled model's name,
dtypes and devices, the table of common models (published shapes and hub ids), and model names
(transformer-lens's official names, close-name hints, whether HookedTransformer exists).

mechscope.models and mechscope.compute re-export these names (`from mechscope.models import BUNDLED` works).
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from mechscope.errors import BadInput

BUNDLED = "mechscope-toy"
DTYPES = ("auto", "float32", "float16", "bfloat16")


def resolve_device(device: str = "auto") -> str:
    """'auto' -> cuda, else mps, else cpu; an explicit device must exist here (BadInput otherwise)."""
    import torch

    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if not isinstance(device, str) or not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
        raise BadInput(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadInput(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise BadInput(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                           f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    if device == "mps" and not mps:
        raise BadInput("device 'mps' requested but MPS (Apple GPU) is not available here; use --device cpu or auto")
    return device


# architectures (or model names) whose activations overflow float16 (Gemma 2 / 3 upstream: beyond 65504)
NO_FLOAT16 = re.compile(r"gemma-?[23]", re.I)


def resolve_dtype(dtype: str, device: str, n_params: float | None = None, architecture: str | None = None):
    """'auto' -> float32 on CPU/MPS and for models up to 1B parameters; bfloat16 on CUDA above that (float16 on a
    GPU without bfloat16, except for NO_FLOAT16 architectures: float32). float16 for those is refused."""
    import torch

    if dtype not in DTYPES:
        raise BadInput(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    no_fp16 = bool(architecture and NO_FLOAT16.search(architecture))
    if dtype == "float16" and no_fp16:
        raise BadInput(f"{architecture} overflows in float16 (its activations exceed float16's range): use "
                       f"--dtype bfloat16 or float32")
    if dtype == "auto":
        big = n_params is not None and n_params > 1e9
        if device.startswith("cuda") and big:
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32 if no_fp16 else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def _table_names() -> list[str]:
    """The bundled model and detect's table (names and hub ids): known without transformer-lens or the hub."""
    return [BUNDLED, *COMMON_MODELS, *ALIASES]


def known_model_names() -> list[str]:
    """The bundled model, detect's table, and (transformer-lens 3) every transformer-lens name and alias."""
    try:
        from transformer_lens import loading  # removed in transformer-lens 4
    except ImportError:
        return _table_names()
    return _table_names() + list(loading.OFFICIAL_MODEL_NAMES) + [a for group in loading.MODEL_ALIASES.values()
                                                                  for a in group]


def close_names_hint(spec: str, names: list[str] | None = None) -> str:
    """' Did you mean: a, b?' for names close to spec, or ''. Without `names`: detect's table, and only
    for a short name (a hub id "org/name" is taken as meant)."""
    if names is None:
        if "/" in spec:
            return ""
        names = _table_names()
    close = difflib.get_close_matches(spec, names, n=3, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def _official_name(spec: str) -> str:
    """transformer-lens's official (hub) name for a transformer-lens name or alias; spec itself on
    transformer-lens 4, whose TransformerBridge takes hub ids."""
    try:
        from transformer_lens import loading  # removed in transformer-lens 4
    except ImportError:
        return spec
    try:
        return loading.get_official_model_name(spec)
    except ValueError:
        raise BadInput(f"unknown model {spec!r}: not {BUNDLED!r}, not a transformer-lens model name, and not "
                       f"a local directory.{close_names_hint(spec, known_model_names())} "
                       f"(`mechscope detect --models` lists common ones)") from None


def _hooked_transformer_available() -> bool:
    """Whether the installed transformer-lens still has HookedTransformer (removed in 4.0); reads only the
    package version, so it costs no import."""
    from importlib import metadata

    try:
        return int(metadata.version("transformer-lens").split(".")[0]) < 4
    except (metadata.PackageNotFoundError, ValueError):
        return False


# ---------------------------------------------------------------- the table of common models
@dataclass
class ModelShape:
    """A decoder-only transformer's shape. n_params: the published (Hugging Face) count."""
    name: str
    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    n_params: int
    n_kv_heads: int | None = None   # grouped-query attention; None = n_heads
    gated_mlp: bool = False         # SwiGLU / GeGLU: W_gate and hook_pre_linear
    rotary: bool = False            # rotary: no W_pos, hook_rot_q / hook_rot_k cached
    tied_embeddings: bool = False   # Hugging Face ties W_U to W_E; transformer-lens keeps a separate copy
    act_fn: str = "gelu_new"
    hub_id: str | None = None       # the Hugging Face repository, where known


def transformer_lens_backend() -> str:
    """The transformer-lens engine detect names and --backend auto runs: tl (HookedTransformer), unless the
    installed transformer-lens is 4 or later (no HookedTransformer: the bridge). Not installed yet counts as
    tl, since installing mechscope brings transformer-lens < 4: one decision before and after the install."""
    from importlib import metadata

    try:
        metadata.version("transformer-lens")
    except metadata.PackageNotFoundError:
        return "tl"
    return "tl" if _hooked_transformer_available() else "bridge"

def _shape(name, n_layers, d_model, n_heads, d_head, d_mlp, d_vocab, n_ctx, n_params, **kw) -> ModelShape:
    return ModelShape(name, n_layers, d_model, n_heads, d_head, d_mlp, d_vocab, n_ctx, int(n_params), **kw)


_PYTHIA = dict(rotary=True, act_fn="gelu", n_ctx=2048)
_GPT2 = dict(d_head=64, d_vocab=50257, n_ctx=1024, tied_embeddings=True)
_LLAMA = dict(d_head=128, gated_mlp=True, rotary=True, act_fn="silu")
_GEMMA2 = dict(n_ctx=8192, gated_mlp=True, rotary=True, tied_embeddings=True, act_fn="gelu_pytorch_tanh")
_QWEN = dict(d_head=128, n_ctx=32768, d_vocab=152064, **{k: v for k, v in _LLAMA.items() if k != "d_head"})
_SMALL_QWEN = dict(_QWEN, d_vocab=151936, tied_embeddings=True)
# Published shapes (Hugging Face configs; n_params as published by the model authors) and hub ids.
COMMON_MODELS = {s.name: s for s in [
    _shape("gpt2-small", 12, 768, 12, d_mlp=3072, n_params=124_439_808, hub_id="gpt2", **_GPT2),
    _shape("gpt2-medium", 24, 1024, 16, d_mlp=4096, n_params=354_823_168, hub_id="gpt2-medium", **_GPT2),
    _shape("gpt2-large", 36, 1280, 20, d_mlp=5120, n_params=774_030_080, hub_id="gpt2-large", **_GPT2),
    _shape("gpt2-xl", 48, 1600, 25, d_mlp=6400, n_params=1_557_611_200, hub_id="gpt2-xl", **_GPT2),
    *[_shape(f"pythia-{size}", n_layers, d, n_heads, d_head, 4 * d, vocab, n_params=n, hub_id=f"EleutherAI/pythia-{size}",
             **_PYTHIA)
      for size, n_layers, d, n_heads, d_head, vocab, n in [
          ("70m", 6, 512, 8, 64, 50304, 70_426_624), ("160m", 12, 768, 12, 64, 50304, 162_322_944),
          ("410m", 24, 1024, 16, 64, 50304, 405_334_016), ("1b", 16, 2048, 8, 256, 50304, 1_011_781_632),
          ("1.4b", 24, 2048, 16, 128, 50304, 1_414_647_808), ("2.8b", 32, 2560, 32, 80, 50304, 2_775_208_960),
          ("6.9b", 32, 4096, 32, 128, 50432, 6_857_302_016), ("12b", 36, 5120, 40, 128, 50688, 11_846_072_320)]],
    _shape("qwen2.5-0.5b", 24, 896, 14, 64, 4864, n_params=494_032_768, n_kv_heads=2, hub_id="Qwen/Qwen2.5-0.5B",
           **{k: v for k, v in _SMALL_QWEN.items() if k != "d_head"}),
    _shape("qwen2.5-1.5b", 28, 1536, 12, d_mlp=8960, n_params=1_543_714_304, n_kv_heads=2,
           hub_id="Qwen/Qwen2.5-1.5B", **_SMALL_QWEN),
    _shape("gemma-2-2b", 26, 2304, 8, 256, 9216, 256000, n_params=2_614_341_888, n_kv_heads=4,
           hub_id="google/gemma-2-2b", **_GEMMA2),
    _shape("llama-2-7b", 32, 4096, 32, d_mlp=11008, d_vocab=32000, n_ctx=4096, n_params=6_738_415_616,
           hub_id="meta-llama/Llama-2-7b-hf", **_LLAMA),
    _shape("mistral-7b", 32, 4096, 32, d_mlp=14336, d_vocab=32000, n_ctx=32768, n_params=7_241_732_096, n_kv_heads=8,
           hub_id="mistralai/Mistral-7B-v0.1", **_LLAMA),
    _shape("qwen2.5-7b", 28, 3584, 28, d_mlp=18944, n_params=7_615_616_512, n_kv_heads=4, hub_id="Qwen/Qwen2.5-7B",
           **_QWEN),
    _shape("llama-3-8b", 32, 4096, 32, d_mlp=14336, d_vocab=128256, n_ctx=8192, n_params=8_030_261_248, n_kv_heads=8,
           hub_id="meta-llama/Meta-Llama-3-8B", **_LLAMA),
    _shape("gemma-2-9b", 42, 3584, 16, 256, 14336, 256000, n_params=9_241_705_984, n_kv_heads=8,
           hub_id="google/gemma-2-9b", **_GEMMA2),
    _shape("llama-2-13b", 40, 5120, 40, d_mlp=13824, d_vocab=32000, n_ctx=4096, n_params=13_015_864_320,
           hub_id="meta-llama/Llama-2-13b-hf", **_LLAMA),
    _shape("qwen2.5-14b", 48, 5120, 40, d_mlp=13824, n_params=14_770_033_664, n_kv_heads=8, hub_id="Qwen/Qwen2.5-14B",
           **_QWEN),
    _shape("gemma-2-27b", 46, 4608, 32, 128, 36864, 256000, n_params=27_227_128_320, n_kv_heads=16,
           hub_id="google/gemma-2-27b", **_GEMMA2),
    _shape("qwen2.5-32b", 64, 5120, 40, d_mlp=27648, n_params=32_763_876_352, n_kv_heads=8, hub_id="Qwen/Qwen2.5-32B",
           **_QWEN),
    _shape("llama-2-70b", 80, 8192, 64, d_mlp=28672, d_vocab=32000, n_ctx=4096, n_params=68_976_648_192, n_kv_heads=8,
           hub_id="meta-llama/Llama-2-70b-hf", **_LLAMA),
    _shape("llama-3-70b", 80, 8192, 64, d_mlp=28672, d_vocab=128256, n_ctx=8192, n_params=70_553_706_496,
           n_kv_heads=8, hub_id="meta-llama/Meta-Llama-3-70B", **_LLAMA),
    _shape("qwen2.5-72b", 80, 8192, 64, d_mlp=29568, n_params=72_706_203_648, n_kv_heads=8, hub_id="Qwen/Qwen2.5-72B",
           **_QWEN),
]}
ALIASES = {s.hub_id: s.name for s in COMMON_MODELS.values() if s.hub_id != s.name}

"""What this machine can run: hardware detection, model shapes, the memory of a full run_with_cache,
and a recommendation of library / device / dtype. Nothing here loads model weights.

    hw = detect_hardware()                                # or Hardware(...) in tests
    shape = model_shape("gpt2-small")                     # table, bundled model, local HF dir, TL name
    estimate_memory(shape, seq_len=128, batch=8, dtype_bytes=4).total   # bytes
    recommend(shape, hw, seq_len=128, batch=8)            # -> Recommendation

The estimate counts the tensors transformer-lens 3.9 keeps in the cache of `run_with_cache` (every
hook point, under torch.no_grad(), LayerNorm folded as `load_model` does) plus the largest temporary
of the forward pass; it was checked against the measured peak RSS (references/compute-awareness.md).
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from mechscope import inputs
from mechscope.errors import BadInput

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TL_MAX_PARAMS = 2e9      # above this, nnsight on the Hugging Face model (transformer-lens copies and converts weights)
FP32_MAX_PARAMS = 1e9    # on accelerators, float32 only up to this size; half precision above
USABLE_FRACTION = 0.85   # of free memory: allocator retention (CPU peak RSS ran 6-11% above the estimate),
                         # the CUDA context, the OS


@dataclass
class Gpu:
    name: str
    total_bytes: int
    free_bytes: int
    capability: tuple[int, int]
    bf16: bool


@dataclass
class Hardware:
    cpu_cores: int
    ram_total_bytes: int
    ram_available_bytes: int
    gpus: list[Gpu] = field(default_factory=list)
    mps: bool = False

    def to_dict(self) -> dict:
        return {"cpu_cores": self.cpu_cores, "ram_total_gb": round(self.ram_total_bytes / GB, 2),
                "ram_available_gb": round(self.ram_available_bytes / GB, 2), "mps": self.mps,
                "gpus": [{"name": g.name, "total_gb": round(g.total_bytes / GB, 2), "free_gb": round(g.free_bytes / GB, 2),
                          "capability": f"{g.capability[0]}.{g.capability[1]}", "bf16": g.bf16} for g in self.gpus]}


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


def _shape(name, n_layers, d_model, n_heads, d_head, d_mlp, d_vocab, n_ctx, n_params, **kw) -> ModelShape:
    return ModelShape(name, n_layers, d_model, n_heads, d_head, d_mlp, d_vocab, n_ctx, int(n_params), **kw)


_PYTHIA = dict(rotary=True, act_fn="gelu", n_ctx=2048)
_GPT2 = dict(d_head=64, d_vocab=50257, n_ctx=1024, tied_embeddings=True)
# Published shapes (Hugging Face configs; n_params as published by the model authors).
COMMON_MODELS = {s.name: s for s in [
    _shape("gpt2-small", 12, 768, 12, d_mlp=3072, n_params=124_439_808, **_GPT2),
    _shape("gpt2-medium", 24, 1024, 16, d_mlp=4096, n_params=354_823_168, **_GPT2),
    _shape("gpt2-large", 36, 1280, 20, d_mlp=5120, n_params=774_030_080, **_GPT2),
    _shape("gpt2-xl", 48, 1600, 25, d_mlp=6400, n_params=1_557_611_200, **_GPT2),
    _shape("pythia-70m", 6, 512, 8, 64, 2048, 50304, n_params=70_426_624, **_PYTHIA),
    _shape("pythia-160m", 12, 768, 12, 64, 3072, 50304, n_params=162_322_944, **_PYTHIA),
    _shape("pythia-410m", 24, 1024, 16, 64, 4096, 50304, n_params=405_334_016, **_PYTHIA),
    _shape("pythia-1b", 16, 2048, 8, 256, 8192, 50304, n_params=1_011_781_632, **_PYTHIA),
    _shape("pythia-1.4b", 24, 2048, 16, 128, 8192, 50304, n_params=1_414_647_808, **_PYTHIA),
    _shape("pythia-2.8b", 32, 2560, 32, 80, 10240, 50304, n_params=2_775_208_960, **_PYTHIA),
    _shape("pythia-6.9b", 32, 4096, 32, 128, 16384, 50432, n_params=6_857_302_016, **_PYTHIA),
    _shape("pythia-12b", 36, 5120, 40, 128, 20480, 50688, n_params=11_846_072_320, **_PYTHIA),
    _shape("gemma-2-2b", 26, 2304, 8, 256, 9216, 256000, 8192, 2_614_341_888, n_kv_heads=4, gated_mlp=True,
           rotary=True, tied_embeddings=True, act_fn="gelu_pytorch_tanh"),
    _shape("llama-3-8b", 32, 4096, 32, 128, 14336, 128256, 8192, 8_030_261_248, n_kv_heads=8, gated_mlp=True,
           rotary=True, act_fn="silu"),
    _shape("llama-3-70b", 80, 8192, 64, 128, 28672, 128256, 8192, 70_553_706_496, n_kv_heads=8, gated_mlp=True,
           rotary=True, act_fn="silu"),
]}
ALIASES = {"gpt2": "gpt2-small", "meta-llama/Meta-Llama-3-8B": "llama-3-8b",
           "meta-llama/Meta-Llama-3-70B": "llama-3-70b", "google/gemma-2-2b": "gemma-2-2b",
           **{f"EleutherAI/{n}": n for n in COMMON_MODELS if n.startswith("pythia")}}


# ---------------------------------------------------------------- memory arithmetic (pure functions)

def count_params(shape: ModelShape, transformer_lens: bool = True) -> int:
    """Parameters as transformer-lens allocates them (separate W_U, zero biases everywhere, unfolded LN);
    transformer_lens=False: as Hugging Face does (W_U tied to W_E where the model ties them)."""
    d, h, dh, f = shape.d_model, shape.n_heads, shape.d_head, shape.d_mlp
    kv = shape.n_kv_heads or h
    attn = d * dh * (2 * h + 2 * kv) + dh * (h + 2 * kv) + d        # W_Q W_O W_K W_V, b_Q b_K b_V b_O
    mlp = (3 if shape.gated_mlp else 2) * d * f + f + d             # W_in (W_gate) W_out, b_in b_out
    layer = attn + mlp + 4 * d                                      # ln1, ln2 (w, b)
    embed = shape.d_vocab * d + (0 if shape.rotary else shape.n_ctx * d)
    unembed = d * shape.d_vocab + shape.d_vocab                     # W_U, b_U
    if not transformer_lens:  # Hugging Face: no unembedding bias; tied models store W_E once
        unembed = 0 if shape.tied_embeddings else d * shape.d_vocab
    return shape.n_layers * layer + embed + unembed + 2 * d         # + ln_final


@dataclass
class MemoryEstimate:
    """Bytes. total = weights + cache + working (the peak of a full run_with_cache)."""
    weights: int
    cache: int     # every cached hook tensor (logits included: unembed.hook_out is the returned logits)
    working: int   # the largest temporary of the forward pass, freed before it returns
    layer: int     # the cached tensors of one layer (what a forward without a cache keeps alive at once)
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.cache + self.working

    @property
    def forward(self) -> int:
        """Peak of a forward pass that keeps no cache (nnsight saving a few activations is close to this)."""
        return self.weights + self.layer + self.logits + self.working


def estimate_memory(shape: ModelShape, seq_len: int, batch: int, dtype_bytes: int) -> MemoryEstimate:
    """Peak memory of `logits, cache = model.run_with_cache(tokens[batch, seq_len])` under torch.no_grad().

    Cached per position and layer (transformer-lens 3.9 hook points; resid_pre of layer l+1 is the
    same tensor as resid_post of layer l): resid_mid, resid_post, attn_out, mlp_out [d_model];
    ln1/ln2 hook_normalized [d_model] and hook_scale [1] (float32 even for half models);
    q, z [n_heads, d_head], k, v [n_kv_heads, d_head] (+ rot_q, rot_k with rotary);
    attn_scores, pattern [n_heads, seq] (per query position); mlp pre, post (+ pre_linear) [d_mlp].
    Once per position: hook_embed, hook_pos_embed and blocks.0.hook_resid_pre (standard positions),
    ln_final normalized + scale, unembed.hook_in [d_model] (half precision only), logits [d_vocab].
    Working set: the largest of the W_U.T.contiguous() copy in the unembed [d_model, d_vocab], the
    attention softmax temporaries (2 tensors + a bool mask of [batch, heads, seq, seq]), the
    activation-function temporaries [batch, seq, d_mlp] (3 for gelu_new, 2 for a gated MLP) plus the
    transposed weight copy of a gated MLP [d_model, d_mlp].
    """
    b, s = dtype_bytes, seq_len
    ln = max(b, 4)
    d, h, dh, f, v = shape.d_model, shape.n_heads, shape.d_head, shape.d_mlp, shape.d_vocab
    kv = shape.n_kv_heads or h
    qkvz = (2 * h + 2 * kv) * dh + (h + kv) * dh * shape.rotary
    per_layer = (4 * d + qkvz + 2 * h * s + (3 if shape.gated_mlp else 2) * f) * b + 2 * (d + 1) * ln
    unembed_in = d if b < 4 else 0  # float32: unembed.hook_in is ln_final's hook_normalized tensor
    per_model = (d * (1 if shape.rotary else 3) + unembed_in + v) * b + (d + 1) * ln
    positions = batch * s
    attention_tmp = batch * h * s * s * (2 * b + 1)
    if shape.gated_mlp:
        mlp_tmp = 2 * positions * f * b + d * f * b
    else:
        mlp_tmp = positions * f * b * (3 if shape.act_fn == "gelu_new" else 1)
    return MemoryEstimate(weights=count_params(shape) * b,
                          cache=positions * (shape.n_layers * per_layer + per_model),
                          working=max(d * v * b, attention_tmp, mlp_tmp),
                          layer=positions * per_layer, logits=positions * v * b)


# ---------------------------------------------------------------- model shapes

def parse_count(text: str) -> int:
    """'7e9', '7B', '124m', '1.5b', '70_000_000' -> an integer parameter count."""
    m = re.fullmatch(r"\s*([0-9][0-9_.]*(?:e[0-9]+)?)\s*([kmbt]?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise BadInput(f"--params {text!r} is not a count; write e.g. 7e9, 7B, 124M")
    value = float(m.group(1).replace("_", "")) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2).lower()]
    if value < 1e6:
        raise BadInput(f"--params {text!r} is below a million; write e.g. 7e9 or 7B (small models: use --model)")
    return int(value)


def generic_shape(n_params: int) -> ModelShape:
    """A Llama-like shape with about n_params parameters (n_layers = d_model / 128, d_head 128, gated MLP
    of width 8/3 d_model, vocabulary 32000), for `--params` when the architecture is unknown."""
    label = f"{n_params / 1e9:.3g}B" if n_params >= 1e9 else f"{n_params / 1e6:.3g}M"

    def shape(d: int) -> ModelShape:
        return ModelShape(f"custom-{label}", n_layers=d // 128, d_model=d, n_heads=d // 128, d_head=128,
                          d_mlp=(8 * d // 3 + 255) // 256 * 256, d_vocab=32000, n_ctx=4096, n_params=n_params,
                          gated_mlp=True, rotary=True, act_fn="silu")

    return min((shape(d) for d in range(128, 32769, 128)),
               key=lambda s: abs(count_params(s, transformer_lens=False) - n_params))


GATED_TYPES = ("llama", "mistral", "mixtral", "gemma", "qwen2", "qwen3", "phi3", "olmo", "granite", "smollm")


def shape_from_hf_config(cfg: dict, name: str) -> ModelShape:
    """A ModelShape from a Hugging Face config.json dict (GPT-2, GPT-NeoX, Llama-style keys)."""
    def get(*keys, default=None):
        return next((cfg[k] for k in keys if cfg.get(k) is not None), default)

    d = get("hidden_size", "n_embd", "d_model")
    n_layers = get("num_hidden_layers", "n_layer", "num_layers")
    n_heads = get("num_attention_heads", "n_head")
    if not (d and n_layers and n_heads and cfg.get("vocab_size")):
        raise BadInput(f"{name}: config.json lacks hidden_size / num_hidden_layers / num_attention_heads / "
                       f"vocab_size; pass --params instead")
    model_type = str(cfg.get("model_type", ""))
    shape = ModelShape(name, n_layers=n_layers, d_model=d, n_heads=n_heads, d_head=get("head_dim", default=d // n_heads),
                       d_mlp=get("intermediate_size", "n_inner", "ffn_dim", default=4 * d), d_vocab=cfg["vocab_size"],
                       n_ctx=get("max_position_embeddings", "n_positions", "n_ctx", default=2048), n_params=0,
                       n_kv_heads=cfg.get("num_key_value_heads"), gated_mlp=model_type.startswith(GATED_TYPES),
                       rotary="n_positions" not in cfg, tied_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                       act_fn=str(get("activation_function", "hidden_act", default="gelu")))
    return replace(shape, n_params=count_params(shape, transformer_lens=False))


def safetensors_params(directory: Path) -> int:
    """Exact parameter count of the *.safetensors files in a directory, read from their headers."""
    total = 0
    for file in sorted(directory.glob("*.safetensors")):
        try:
            with open(file, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            total += sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise BadInput(f"{file} is not a readable safetensors file (save the model with save_pretrained)") from None
    return total


def _bundled_shape() -> ModelShape:
    from mechscope.toy import model as toy

    a = toy.ARCHITECTURE
    config = toy.WEIGHTS_DIR / "config.json"
    if config.exists():
        d_vocab = json.loads(config.read_text())["d_vocab"]
    else:  # weights not trained yet: the tokenizer fixes the vocabulary
        d_vocab = len(json.loads((toy.WEIGHTS_DIR / "tokenizer.json").read_text())["model"]["vocab"])
    shape = ModelShape("mechscope-toy", a["n_layers"], a["d_model"], a["n_heads"], a["d_head"], a["d_mlp"], d_vocab,
                       a["n_ctx"], 0, act_fn=a["act_fn"])
    return replace(shape, n_params=count_params(shape))


def _transformer_lens_shape(spec: str) -> ModelShape:
    """Any other transformer-lens name (imports transformer-lens and reads the config from the hub or its cache)."""
    from mechscope.models import _official_name

    name = _official_name(spec)
    from transformer_lens import loading

    try:
        c = loading.get_pretrained_model_config(name)
    except OSError as e:
        raise BadInput(f"cannot read the config of {name!r} ({type(e).__name__}: offline?); pass --params "
                       f"or a local Hugging Face directory") from None
    shape = ModelShape(name, c.n_layers, c.d_model, c.n_heads, c.d_head, c.d_mlp or 0, c.d_vocab, c.n_ctx, 0,
                       n_kv_heads=c.n_key_value_heads, gated_mlp=bool(c.gated_mlp),
                       rotary=c.positional_embedding_type == "rotary", act_fn=str(c.act_fn))
    return replace(shape, n_params=count_params(shape, transformer_lens=False))


def model_shape(spec: str) -> ModelShape:
    """The shape of a common model (table), the bundled model, a local HF directory, or a transformer-lens name."""
    if spec in ("mechscope-toy", "toy"):
        return _bundled_shape()
    key = ALIASES.get(spec, spec)
    if key.lower() in COMMON_MODELS:
        return COMMON_MODELS[key.lower()]
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise BadInput(f"{path} has no config.json: pass a directory written by save_pretrained")
        config = inputs.read_json(path / "config.json", "the model configuration")
        if not isinstance(config, dict):
            raise BadInput(f"{path}/config.json is not a JSON object: pass a directory written by save_pretrained")
        shape = shape_from_hf_config(config, path.name)
        return replace(shape, n_params=safetensors_params(path) or shape.n_params)
    if spec.startswith((".", "/", "~")):
        raise BadInput(f"model directory {spec} does not exist")
    return _transformer_lens_shape(spec)


# ---------------------------------------------------------------- hardware

def _ram() -> tuple[int, int]:
    """(total, available) bytes: /proc/meminfo capped by a cgroup limit, else os.sysconf."""
    try:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in open("/proc/meminfo")}
        total, available = info["MemTotal"], info.get("MemAvailable", info["MemFree"])
    except (OSError, KeyError, ValueError, IndexError):  # no /proc (macOS)
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
        available = page * os.sysconf("SC_AVPHYS_PAGES") if "SC_AVPHYS_PAGES" in os.sysconf_names else total
    for limit_file, used_file in [("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                  ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                   "/sys/fs/cgroup/memory/memory.usage_in_bytes")]:
        try:
            limit, used = int(Path(limit_file).read_text()), int(Path(used_file).read_text())
        except (OSError, ValueError):  # absent, or "max"
            continue
        if limit < total:
            total, available = limit, min(available, limit - used)
    return total, available


def _may_have_accelerator() -> bool:
    """Skip importing torch (seconds) where no GPU can exist: Linux without NVIDIA, ROCm or WSL GPU nodes."""
    if not sys.platform.startswith("linux"):
        return True
    return any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia", "/dev/kfd",
                                          "/dev/dxg"))


def detect_hardware() -> Hardware:
    """CPU cores, RAM, CUDA GPUs (name, total/free memory, compute capability, bf16) and Apple MPS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    total, available = _ram()
    gpus, mps = [], False
    if _may_have_accelerator():
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                free, gpu_total = torch.cuda.mem_get_info(i)
                capability = (props.major, props.minor)
                gpus.append(Gpu(props.name, gpu_total, free, capability,
                                bf16=capability >= (8, 0) or torch.version.hip is not None))
        mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return Hardware(cores, total, available, gpus, mps)


# ---------------------------------------------------------------- recommendation

@dataclass
class Recommendation:
    model: str
    n_params: int
    library: str          # "transformer-lens" or "nnsight"
    device: str           # cpu, cuda, cuda:N, mps, multi-gpu, ndif-remote
    dtype: str
    fits: bool            # a forward pass (weights + one layer + logits + working set) fits locally
    cache_fits: bool      # a full run_with_cache at seq_len x batch fits as well
    seq_len: int
    batch: int
    memory_gb: dict       # weights, cache, working, total (full run_with_cache), forward, usable
    notes: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def _devices(hw: Hardware) -> list[tuple[str, int, str]]:
    """(device, usable bytes, its half dtype), fastest first."""
    options = [(f"cuda:{i}" if len(hw.gpus) > 1 else "cuda", int(g.free_bytes * USABLE_FRACTION),
                "bfloat16" if g.bf16 else "float16")
               for i, g in sorted(enumerate(hw.gpus), key=lambda ig: -ig[1].free_bytes)]
    if len(hw.gpus) > 1:  # the model split across all GPUs (device_map="auto")
        options.append(("multi-gpu", sum(int(g.free_bytes * USABLE_FRACTION) for g in hw.gpus),
                        "bfloat16" if all(g.bf16 for g in hw.gpus) else "float16"))
    if hw.mps:  # unified memory: the GPU shares the RAM
        options.append(("mps", int(hw.ram_available_bytes * USABLE_FRACTION), "float16"))
    options.append(("cpu", int(hw.ram_available_bytes * USABLE_FRACTION), "bfloat16"))
    return options


def _memory(shape: ModelShape, seq_len: int, batch: int, dtype: str, library: str) -> MemoryEstimate:
    mem = estimate_memory(shape, seq_len, batch, DTYPE_BYTES[dtype])
    if library == "nnsight":  # nnsight keeps the Hugging Face weights (tied embeddings stay tied)
        mem = replace(mem, weights=shape.n_params * DTYPE_BYTES[dtype])
    return mem


def recommend(shape: ModelShape, hw: Hardware, seq_len: int = 128, batch: int = 8) -> Recommendation:
    """Library, device and dtype for `shape` on `hw`, and whether a full run_with_cache of
    [batch, seq_len] tokens fits. The fastest device where a forward pass fits wins; on it, float32
    (models up to 1B parameters, and on CPU) before bfloat16 (GPUs with bf16) or float16, and a dtype
    where the full cache fits before one where only a forward does. transformer-lens up to 2B
    parameters, nnsight above, and past local memory nnsight on several GPUs or on NDIF."""
    if seq_len < 1 or batch < 1:
        raise BadInput("--seq-len and --batch must be at least 1")
    library = "transformer-lens" if shape.n_params <= TL_MAX_PARAMS else "nnsight"
    notes, pick = [], None
    for device, usable, half in _devices(hw):
        lib = "nnsight" if device == "multi-gpu" else library
        small = shape.n_params <= FP32_MAX_PARAMS or device == "cpu"
        options = [(dtype, _memory(shape, seq_len, batch, dtype, lib))
                   for dtype in (["float32"] if small else []) + [half]]
        pick = next((o for o in options if o[1].total <= usable), None) or \
            next((o for o in options if o[1].forward <= usable), None)
        if pick:
            library = lib
            break
    if pick:
        dtype, mem = pick
        fits, cache_fits = True, mem.total <= usable
        if not cache_fits:
            notes.append("a full run_with_cache does not fit: cache only the hooks you need (names_filter), "
                         "or lower --batch / --seq-len")
        if device == "cpu" and shape.n_params > FP32_MAX_PARAMS:
            notes.append("a forward pass of a model this size takes seconds to minutes per batch on CPU")
        if device == "multi-gpu":
            notes.append(f"split across {len(hw.gpus)} GPUs: nnsight LanguageModel(..., device_map='auto')")
    else:
        library, device, fits, cache_fits = "nnsight", "ndif-remote", False, False
        _, usable, dtype = _devices(hw)[0]
        mem = _memory(shape, seq_len, batch, dtype, library)
        notes.append("does not fit locally: run it on NDIF with nnsight `model.trace(..., remote=True)` (the "
                     "model must be hosted there; needs NDIF_API_KEY), or use a machine with more memory")
    if library == "nnsight" and device != "ndif-remote":
        notes.append("nnsight on the Hugging Face model; .save() only the activations you need")
    memory_gb = {k: round(v / GB, 3) for k, v in [("weights", mem.weights), ("cache", mem.cache),
                                                  ("working", mem.working), ("total", mem.total),
                                                  ("forward", mem.forward), ("usable", usable)]}
    return Recommendation(shape.name, shape.n_params, library, device, dtype, fits, cache_fits, seq_len, batch,
                          memory_gb, notes)

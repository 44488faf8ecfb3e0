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

from mechscope import catalog, inputs
from mechscope.catalog import ALIASES, COMMON_MODELS, ModelShape  # noqa: F401  (re-exported)
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

MAX_PARAMS = 1e14      # --params: 100T, past any model (a larger count is a typo)
MAX_SIZE = 2 ** 31      # a config.json dimension (width, layers, heads, vocabulary, context) beyond this is not a model


def parse_count(text: str) -> int:
    """'7e9', '7B', '124m', '1.5b', '70_000_000' -> an integer parameter count."""
    m = re.fullmatch(r"\s*([0-9][0-9_.]*(?:e[0-9]+)?)\s*([kmbt]?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise BadInput(f"--params {text!r} is not a count; write e.g. 7e9, 7B, 124M")
    try:
        value = float(m.group(1).replace("_", "")) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[
            m.group(2).lower()]
    except ValueError:  # '1.2.3'
        raise BadInput(f"--params {text!r} is not a count; write e.g. 7e9, 7B, 124M") from None
    if not value <= MAX_PARAMS:  # 1e400 reads as inf
        raise BadInput(f"--params {text!r} is more than {MAX_PARAMS:.0e} parameters (100T); write e.g. 7e9 or 7B")
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

    for keys in (("hidden_size", "n_embd", "d_model"), ("num_hidden_layers", "n_layer", "num_layers"),
                 ("num_attention_heads", "n_head"), ("vocab_size",), ("head_dim",),
                 ("intermediate_size", "n_inner", "ffn_dim"), ("max_position_embeddings", "n_positions", "n_ctx"),
                 ("num_key_value_heads",)):
        key = next((k for k in keys if cfg.get(k) is not None), None)
        if key is not None and (type(cfg[key]) is not int or not 1 <= cfg[key] <= MAX_SIZE):
            raise BadInput(f"{name}: config.json's {key} is {cfg[key]!r}, not a whole number in 1..{MAX_SIZE}; "
                           f"fix config.json or pass --params instead")
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


def _hub_shape(spec: str) -> ModelShape:
    """A hub model's shape from its config.json (a transformer-lens name is mapped to its hub id first).
    Out of reach of the hub with nothing cached, it fails at once (mechscope.hub)."""
    from mechscope import hub

    with hub.access(spec, catalog.close_names_hint(spec)):
        name = catalog._official_name(spec)
        from huggingface_hub import errors, hf_hub_download

        try:
            config = json.loads(Path(hf_hub_download(name, "config.json")).read_text())
        except (OSError, ValueError, errors.HfHubHTTPError) as e:
            raise BadInput(f"cannot read the config of {name!r} from the Hugging Face hub ({type(e).__name__}: "
                           f"offline, or not a model id?); pass --params or a local Hugging Face directory") from None
    return shape_from_hf_config(config, name)


def model_shape(spec: str) -> ModelShape:
    """The shape of a common model (table), the bundled model, a local HF directory, or a hub id /
    transformer-lens name (its config.json from the hub or its cache)."""
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
    return _hub_shape(spec)


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


def detect_hardware(gpus: bool = True) -> Hardware:
    """CPU cores, RAM, CUDA GPUs (name, total/free memory, compute capability, bf16) and Apple MPS
    (gpus=False: neither, and no torch import)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    total, available = _ram()
    look, gpus, mps = gpus, [], False
    if look and _may_have_accelerator():
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


def parse_size(text: str, what: str = "--ram") -> int:
    """'24GB', '24G', '24' (GB), '80GiB', '512MB' -> bytes (GB = 10^9, GiB = 2^30)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(?:([kmgt])(i?)b?)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise BadInput(f"{what} {text!r} is not a memory size; write e.g. 24GB, 80GiB or 512MB")
    scale = {"k": 1, "m": 2, "g": 3, "t": 4}[(m.group(2) or "g").lower()]
    value = float(m.group(1)) * (1024 if m.group(3) else 1000) ** scale
    if not math.isfinite(value) or value < 1e8:
        raise BadInput(f"{what} {text!r} is below 100 MB; write e.g. 24GB")
    return int(value)


def parse_gpus(text: str) -> list[Gpu]:
    """'24GB' (one), '2x80GB' (two), '2x80GB,24GB' (three), '32GB:fp16' (no bfloat16, e.g. a V100), '0' (none).
    A described GPU is taken as empty (all of its memory free) and, unless ':fp16', as bfloat16-capable."""
    if str(text).strip().lower() in ("0", "none"):
        return []
    gpus = []
    for item in [s.strip() for s in str(text).split(",") if s.strip()]:
        m = re.fullmatch(r"(?:(\d+)\s*x\s*)?([^:]+?)(?::(fp16|bf16))?", item, re.IGNORECASE)
        if not m or (m.group(1) is not None and not 1 <= int(m.group(1)) <= 64):
            raise BadInput(f"--gpus item {item!r}: write SIZE or NxSIZE, e.g. 24GB, 2x80GB, 32GB:fp16")
        size = parse_size(m.group(2), "--gpus")
        bf16 = (m.group(3) or "bf16").lower() == "bf16"
        gpus += [Gpu(f"described {size / GB:g} GB GPU", size, size, (8, 0) if bf16 else (7, 0), bf16)
                 for _ in range(int(m.group(1) or 1))]
    if not gpus:
        raise BadInput("--gpus is empty: write e.g. 24GB, 2x80GB or 0")
    return gpus


def described_hardware(gpus: str | None = None, ram: str | None = None, base: Hardware | None = None) -> Hardware:
    """This machine with the GPUs and / or RAM the user describes instead of what it has (`--gpus`, `--ram`):
    for a plan on another machine. Detects only what is not described (no torch import when --gpus is given)."""
    hw = base or detect_hardware(gpus=gpus is None)
    if gpus is not None:
        hw = replace(hw, gpus=parse_gpus(gpus), mps=False)
    if ram is not None:
        size = parse_size(ram)
        hw = replace(hw, ram_total_bytes=size, ram_available_bytes=size)
    return hw


# ---------------------------------------------------------------- recommendation

QUANT_BYTES = {"8bit": 1.0, "4bit": 0.5625}  # per linear-layer weight: int8; nf4 + a float32 absmax per 64 weights


def linear_params(shape: ModelShape) -> int:
    """The weights of the blocks' linear layers (attention and MLP matrices): what bitsandbytes quantises."""
    kv = shape.n_kv_heads or shape.n_heads
    attn = shape.d_model * shape.d_head * (2 * shape.n_heads + 2 * kv)
    return shape.n_layers * (attn + (3 if shape.gated_mlp else 2) * shape.d_model * shape.d_mlp)


def weight_bytes(shape: ModelShape, dtype: str, quantization: str | None = None) -> int:
    """The Hugging Face weights in memory (nnsight's engine): every parameter in dtype, or with bitsandbytes
    8-bit / 4-bit the blocks' linear layers quantised while embeddings, unembedding, norms and biases stay
    in dtype (transformers keeps lm_head unquantised)."""
    if quantization is None:
        return shape.n_params * DTYPE_BYTES[dtype]
    linear = linear_params(shape)
    return int(linear * QUANT_BYTES[quantization] + (shape.n_params - linear) * DTYPE_BYTES[dtype])


@dataclass
class Plan:
    """One way to run a model here: engine (backend), where the weights go, their precision, and the memory
    that engine needs at its peak (`need`): transformer-lens / bridge = weights + a full run_with_cache;
    nnsight = weights + a forward's working memory + one saved residual per layer."""
    backend: str                  # tl, bridge or nnsight
    device: str                   # cuda, cuda:N, multi-gpu, gpu+cpu, mps, cpu, ndif-remote
    dtype: str
    quantization: str | None      # bitsandbytes "8bit" / "4bit", or None
    memory: MemoryEstimate        # weights as this engine holds them
    need: int
    usable: int
    fits: bool
    full_cache: bool = True       # tl / bridge: the need is a full run_with_cache (else a forward: cache less)
    max_memory: str | None = None  # --max-memory of a load offloaded to CPU RAM

    @property
    def library(self) -> str:
        return "nnsight" if self.backend == "nnsight" else "transformer-lens"

    def argv(self, model: str, command: str = "patch") -> list[str]:
        """The mechscope command line that loads the model this way."""
        words = ["mechscope", command, "--model", model, "--backend", self.backend]
        if self.device == "ndif-remote":
            return words + ["--remote"]
        if self.device in ("multi-gpu", "gpu+cpu"):
            words += ["--device-map", "auto"] + (["--max-memory", self.max_memory] if self.max_memory else [])
        else:
            words += ["--device", self.device]
        words += ["--dtype", self.dtype]
        return words + (["--quantization", self.quantization] if self.quantization else [])

    def command(self, model: str, command: str = "patch") -> str:
        import shlex

        return shlex.join(self.argv(model, command))


def _gpu_devices(hw: Hardware) -> list[tuple[str, int, str]]:
    """(device, usable bytes, half dtype) of each GPU (most free memory first), then of all together."""
    singles = [(f"cuda:{i}" if len(hw.gpus) > 1 else "cuda", int(g.free_bytes * USABLE_FRACTION),
                "bfloat16" if g.bf16 else "float16")
               for i, g in sorted(enumerate(hw.gpus), key=lambda ig: -ig[1].free_bytes)]
    if len(hw.gpus) > 1:  # the model split across all GPUs (device_map="auto")
        singles.append(("multi-gpu", sum(u for _, u, _ in singles),
                        "bfloat16" if all(g.bf16 for g in hw.gpus) else "float16"))
    return singles


def _plan(shape, seq_len, batch, backend, device, dtype, usable, quantization=None, full_cache=True) -> Plan:
    mem = estimate_memory(shape, seq_len, batch, DTYPE_BYTES[dtype])
    if backend == "nnsight":  # the Hugging Face weights (tied embeddings stay tied), quantised or not
        mem = replace(mem, weights=weight_bytes(shape, dtype, quantization))
        saved = shape.n_layers * batch * seq_len * shape.d_model * DTYPE_BYTES[dtype]  # one residual per layer
        dequant = shape.d_model * shape.d_mlp * 2 if quantization else 0  # a weight matrix dequantised at a time
        need = mem.forward + saved + max(0, dequant - mem.working)
    else:
        need = mem.total if full_cache else mem.forward
    return Plan(backend, device, dtype, quantization, mem, need, usable, need <= usable, full_cache)


def plans(shape: ModelShape, hw: Hardware, seq_len: int = 128, batch: int = 8) -> list[Plan]:
    """Every way to run `shape` on `hw`, in order of preference (the first that fits is the recommendation):
    1. on one GPU, then on all GPUs, in full (float32 up to 1B parameters) or half precision;
    2. the same with 8-bit, then 4-bit weights (bitsandbytes; changes activations slightly);
    3. half precision on the GPUs with the rest of the weights in CPU RAM (exact, slow: device_map offload);
    4. Apple MPS, then the CPU (float32 if it fits, else bfloat16; slow above ~1B parameters);
    5. NDIF (nnsight remote), always last (needs the model hosted there and an API key).
    transformer-lens (or its bridge where HookedTransformer is gone) up to 2B parameters on one device, where
    a full run_with_cache fitting comes before a forward fitting; nnsight above, split, quantised or remote,
    with transformer-lens after nnsight on each single GPU (listed as an alternative where its cache fits)."""
    tl = catalog.transformer_lens_backend()
    small = shape.n_params <= TL_MAX_PARAMS
    out: list[Plan] = []
    no_fp16 = any(catalog.NO_FLOAT16.search(name or "") for name in (shape.name, shape.hub_id))

    def half_of(dtype: str) -> str:
        """float16 overflows Gemma 2 / 3 (catalog.NO_FLOAT16): float32 on a device without bfloat16."""
        return "float32" if dtype == "float16" and no_fp16 else dtype

    def on_device(device, usable, half, fp32):
        dtypes = (["float32"] if fp32 else []) + ([half] if half != "float32" else [])
        if small and device != "multi-gpu":
            return [_plan(shape, seq_len, batch, tl, device, d, usable, full_cache=full)
                    for full in (True, False) for d in dtypes]
        return [_plan(shape, seq_len, batch, "nnsight", device, d, usable) for d in dtypes]

    gpus = [(device, usable, half_of(half)) for device, usable, half in _gpu_devices(hw)]
    for device, usable, half in gpus:
        out += on_device(device, usable, half, shape.n_params <= FP32_MAX_PARAMS)
        if not small and device != "multi-gpu":  # a large model whose full run_with_cache fits one GPU: an alternative
            out.append(_plan(shape, seq_len, batch, tl, device, half, usable))
    for quantization in ("8bit", "4bit"):
        out += [_plan(shape, seq_len, batch, "nnsight", device, half, usable, quantization)
                for device, usable, half in gpus]
    ram = int(hw.ram_available_bytes * USABLE_FRACTION)
    if gpus:  # offload: the GPUs hold what they can, CPU RAM the rest
        device, gpu_usable, half = gpus[-1]
        plan = _plan(shape, seq_len, batch, "nnsight", "gpu+cpu", half, gpu_usable + ram)
        activations = plan.need - plan.memory.weights
        gpu_share = [int(g.free_bytes * USABLE_FRACTION) - activations for g in hw.gpus]
        plan.fits = plan.fits and min(gpu_share) > 0
        plan.max_memory = ",".join([f"{i}={max(s, 0) // 2**30}GiB" for i, s in enumerate(gpu_share)] +
                                   [f"cpu={ram // 2**30}GiB"])
        out.append(plan)
    if hw.mps:  # unified memory: the GPU shares the RAM
        out += on_device("mps", ram, half_of("float16"), shape.n_params <= FP32_MAX_PARAMS)
    out += on_device("cpu", ram, "bfloat16", True)
    half = gpus[0][2] if gpus else "bfloat16"
    remote = _plan(shape, seq_len, batch, "nnsight", "ndif-remote", half, 0)
    remote.fits = False
    return out + [remote]


@dataclass
class Recommendation:
    model: str
    n_params: int
    library: str          # "transformer-lens" or "nnsight"
    backend: str          # the --backend: tl, bridge or nnsight
    device: str           # cpu, cuda, cuda:N, mps, multi-gpu, gpu+cpu (offload), ndif-remote
    dtype: str
    quantization: str | None  # bitsandbytes "8bit" / "4bit" weights, or None
    fits: bool            # the chosen engine's peak memory (memory_gb["engine"]) fits locally
    cache_fits: bool      # a full run_with_cache at seq_len x batch fits as well
    seq_len: int
    batch: int
    memory_gb: dict       # weights, cache, working, total (full run_with_cache), forward, engine, usable
    command: str          # the mechscope command line that loads it this way
    notes: list[str]
    alternatives: list[dict]  # other plans that fit (and NDIF): backend, device, dtype, quantization, ...

    def to_dict(self) -> dict:
        return asdict(self)


def _gb(plan: Plan) -> dict:
    m = plan.memory
    return {k: round(v / GB, 3) for k, v in [("weights", m.weights), ("cache", m.cache), ("working", m.working),
                                             ("total", m.total), ("forward", m.forward), ("engine", plan.need),
                                             ("usable", plan.usable)]}


def recommend(shape: ModelShape, hw: Hardware, seq_len: int = 128, batch: int = 8, model: str | None = None,
              command: str = "patch") -> Recommendation:
    """The first of `plans(shape, hw)` that fits (else NDIF), why, and its command line (`mechscope COMMAND
    --model MODEL ...`; MODEL defaults to the shape's hub id) with up to four alternatives that fit."""
    if seq_len < 1 or batch < 1:
        raise BadInput("--seq-len and --batch must be at least 1")
    model = model or shape.hub_id or shape.name
    options = plans(shape, hw, seq_len, batch)
    pick = next((p for p in options if p.fits), options[-1])
    notes = []
    if pick.device == "ndif-remote":
        notes.append("does not fit locally: run it on NDIF (`--backend nnsight --remote`: the model must be hosted "
                     "there, `nnsight.is_model_running(...)`; needs NDIF_API_KEY and the network), or describe a "
                     "bigger machine with --gpus / --ram")
    elif pick.backend != "nnsight" and not pick.full_cache:
        notes.append("a full run_with_cache does not fit: cache only the hooks you need (names_filter), "
                     "or lower --batch / --seq-len")
    if pick.quantization:
        notes.append(f"{pick.quantization} weights (bitsandbytes, CUDA only) change activations slightly"
                     f"{' (4-bit more so)' if pick.quantization == '4bit' else ''}: confirm key numbers at full "
                     "precision (an offloaded, multi-GPU or NDIF run among the alternatives)")
    if pick.device == "gpu+cpu":
        notes.append("weights that do not fit on the GPU stay in CPU RAM and move in at every forward: exact, slow")
    if pick.device == "multi-gpu":
        notes.append(f"split across {len(hw.gpus)} GPUs: nnsight on the Hugging Face model, device_map='auto'")
    if pick.device == "cpu" and shape.n_params > FP32_MAX_PARAMS:
        notes.append("a forward pass of a model this size takes seconds to minutes per batch on CPU")
    if pick.backend == "nnsight" and pick.device != "ndif-remote":
        notes.append("nnsight on the Hugging Face model; .save() only the activations you need")
    seen, alternatives = {(pick.backend, pick.device, pick.dtype, pick.quantization)}, []
    for plan in options:
        key = (plan.backend, plan.device, plan.dtype, plan.quantization)
        if (plan.fits or plan.device == "ndif-remote") and key not in seen and len(alternatives) < 4:
            seen.add(key)
            alternatives.append({"backend": plan.backend, "device": plan.device, "dtype": plan.dtype,
                                 "quantization": plan.quantization, "fits": plan.fits,
                                 "engine_gb": round(plan.need / GB, 3), "command": plan.command(model, command),
                                 **({"full_cache": plan.full_cache} if plan.backend != "nnsight" else {})})
    cache_fits = pick.fits and pick.memory.total <= pick.usable
    return Recommendation(shape.name, shape.n_params, pick.library, pick.backend, pick.device, pick.dtype,
                          pick.quantization, pick.fits, cache_fits, seq_len, batch, _gb(pick),
                          pick.command(model, command), notes, alternatives)

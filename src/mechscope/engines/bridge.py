"""The TransformerBridge engine: transformer-lens's successor to HookedTransformer (in 3.9, and the only
model class left in 4.x). The bridge wraps the Hugging Face module itself, so it loads any architecture
transformers can (146 in transformer-lens 4.3) without a weight conversion of mechscope's own; in
compatibility mode it has HookedTransformer's hook names, shapes and processed weights (LayerNorm folded,
writing weights and unembedding centred), so HookedEngine drives it unchanged. What differs is here:
loading, the config, the site list (hooks that fire), per-layer weights and the final norm.

    engine = load_bridge("mechscope-toy")             # the bundled model's Hugging Face export (toy/hf/)
    engine = load_bridge("/path/to/hf_checkpoint")    # any local save_pretrained directory, offline
    engine = load_bridge("EleutherAI/pythia-160m")    # a hub id (fails in one line when the hub is out of reach)
"""
from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import torch

from mechscope.engines.base import FinalNorm, layer_of, on_device
from mechscope.engines.hooked import HookedEngine, config_from_tl
from mechscope.errors import BadInput


# the largest |cached - uncached| logit the KV-cache check accepts, per dtype, as a share of the largest |logit|. A
# broken cache is off by most of a logit's size (0.75 on the toy with transformers 5.25: each cached step attends to
# itself alone); a working one by rounding, at most what the dtype's own arithmetic does: on the toy's three steps
# 1.5e-6 in float32 (cached against uncached), and in half precision against float32's logits rounded to it 0.005
# (float16) and 0.053 (bfloat16): tests/test_gpu_speed.py
KV_CACHE_TOLERANCE = {torch.float32: 1e-3, torch.float16: 0.02, torch.bfloat16: 0.15}


class BridgeEngine(HookedEngine):
    """A transformer-lens TransformerBridge in compatibility mode (transformer-lens 3.9 and 4.x)."""
    name = "bridge"
    split_inputs = False                # the bridge refuses hooks on hook_q_input / hook_mlp_in (edge discovery)

    def __init__(self, model, model_name: str | None = None):
        if not getattr(model, "compatibility_mode", False):
            raise BadInput("mechscope reads transformer-lens's hook names, which a TransformerBridge has after "
                           "bridge.enable_compatibility_mode(): call it first, or load with "
                           "load_model(..., backend='bridge')")
        self.model = model
        self.tokenizer = model.tokenizer
        cfg = model.cfg
        name = model_name or str(cfg.model_name)
        norm = cfg.normalization_type
        if norm in ("LN", "RMS") and getattr(model, "_weights_processed", False):
            norm += "Pre"  # folded into the next weights, as HookedTransformer names it
        self.cfg = replace(config_from_tl(cfg, n_params=model.n_params_total),
                           model_name=Path(name).name if Path(name).is_dir() else name,
                           original_architecture=str(getattr(cfg, "architecture", None) or cfg.original_architecture
                                                     or name),
                           normalization_type=norm)
        self._kv_cache_exact: bool | None = None  # kv_cache_exact() finds out on the first cached generate
        self._layer_output: int | None = None      # _layer_output_width() finds out on the first run_from

    def sites(self) -> list[str]:
        """The hook names that fire: the bridge also lists aliases its architecture never runs (e.g.
        hook_pos_embed on rotary models), so one forward of two BOS tokens finds the live ones."""
        names = super().sites()
        fired = set()

        def mark(name):
            return lambda act, hook: fired.add(name)

        tokens = torch.full((1, 2), self.bos_token_id, device=self.model.cfg.device)
        with torch.no_grad(), self.model.hooks(fwd_hooks=[(n, mark(n)) for n in names]):
            self.model(tokens)
        return [n for n in names if n in fired]

    def _hooks(self, edits) -> list:
        """As HookedEngine's, except resid_mid: the bridge's hook_resid_mid is the input of the second norm,
        so writing it would reach only the MLP. An edit of resid_mid l is applied to attn_out l instead,
        as attn_out + (fn(mid) - mid) with mid = resid_pre + attn_out: the residual stream itself changes."""
        direct = [(site, fn) for site, fn in edits if not site.endswith(".hook_resid_mid")]
        hooks = super()._hooks(direct)
        pre = {}

        def keep(layer):
            def hook(act, hook):
                pre[layer] = act
            return hook

        def via_attn_out(layer, fn):
            def hook(attn_out, hook):
                mid = pre[layer] + attn_out
                return attn_out + (fn(mid) - mid)
            return hook

        for site, fn in edits:
            if site.endswith(".hook_resid_mid"):
                layer = layer_of(site)
                hooks += [(f"blocks.{layer}.hook_resid_pre", keep(layer)),
                          (f"blocks.{layer}.hook_attn_out", via_attn_out(layer, on_device(fn, self.cfg.device)))]
        return hooks

    def run_from(self, layer: int, resid, tokens, read=(), edits=(), positions=None):
        """Blocks before `layer` skipped: their Hugging Face layers return resid without computing (the bridge's
        hooks there see it, so edits there are dropped: their effect is inside resid)."""
        early = [site for site in list(read) if (layer_of(site) if site.startswith("blocks.") else -1) < layer]
        if early:
            raise ValueError(f"run_from({layer}) cannot read {early}: those blocks are skipped")
        if layer == 0:
            return self.run(tokens, read, edits, positions)
        edits = [(site, fn) for site, fn in edits if site.startswith("blocks.") and layer_of(site) >= layer]
        output = resid if self._layer_output_width() == 0 else (resid, *[None] * (self._layer_output_width() - 1))
        layers = [self.model.blocks[i].original_component for i in range(layer)]
        try:
            for hf_layer in layers:
                hf_layer.forward = lambda *args, **kwargs: output
            return self.run(tokens, read, edits, positions)
        finally:
            for hf_layer in layers:
                del hf_layer.forward

    def _layer_output_width(self) -> int:
        """0 when a Hugging Face decoder layer returns a tensor (transformers 5), else its tuple's length (4.x)."""
        if self._layer_output is None:
            seen = []
            handle = self.model.blocks[0].original_component.register_forward_hook(lambda m, i, o: seen.append(o))
            try:
                with torch.no_grad():
                    self.model(torch.full((1, 2), self.bos_token_id, device=self.model.cfg.device))
            finally:
                handle.remove()
            self._layer_output = 0 if torch.is_tensor(seen[0]) else len(seen[0])
        return self._layer_output

    def generate(self, tokens, edits=(), max_new_tokens: int = 10, use_kv_cache: bool = True):
        if use_kv_cache and not self.kv_cache_exact():
            use_kv_cache = False  # exact, one full forward per new token
        return super().generate(tokens, edits, max_new_tokens, use_kv_cache)

    def kv_cache_exact(self) -> bool:
        """Whether the bridge's cached generation gives the logits of uncached generation (checked once on three
        tokens). transformer-lens 3.9 and 4.3 update the cache only when Hugging Face passes it as
        `past_key_values`; transformers 5.2x passes it to GPT-2 and Llama-family attention as `cache`, so there
        each cached step attends to itself alone, and generate() runs without the cache instead (with a warning)."""
        if self._kv_cache_exact is None:
            tokens = torch.full((1, 3), self.bos_token_id, device=self.model.cfg.device)
            with warnings.catch_warnings():  # transformers' deprecation of past_key_values, once per check
                warnings.simplefilter("ignore", FutureWarning)
                logits = [torch.stack(self.model.generate(tokens, max_new_tokens=3, do_sample=False,
                                                          stop_at_eos=False, use_past_kv_cache=cached, verbose=False,
                                                          output_logits=True).logits)
                          for cached in (True, False)]
            cached, uncached = (x.float() for x in logits)
            tolerance = KV_CACHE_TOLERANCE.get(self.cfg.dtype, KV_CACHE_TOLERANCE[torch.float32])
            self._kv_cache_exact = bool((cached - uncached).abs().max() <= tolerance * uncached.abs().max())
            if not self._kv_cache_exact:
                warnings.warn(f"TransformerBridge's KV cache is wrong for {self.cfg.original_architecture} with this "
                              f"transformers release: generating without it (exact, slower)", stacklevel=3)
        return self._kv_cache_exact

    # ---------------------------------------------------------------- weights (W_O, W_out: HookedEngine's)
    def b_O(self, layer: int):
        bias = self.model.blocks[layer].attn.b_O
        if bias is None:  # no attention output bias (Llama, Qwen2, ...)
            W_O = self.W_O(layer)
            bias = torch.zeros(self.cfg.d_model, dtype=W_O.dtype, device=W_O.device)
        return bias

    @property
    def final_norm(self) -> FinalNorm:
        kind = self.cfg.normalization_type
        if kind is None:
            return FinalNorm(None)
        ln = self.model.ln_final
        hf_norm = ln.original_component
        weight = ln.weight + 1.0 if getattr(self.model.cfg, "rmsnorm_uses_offset", False) else ln.weight  # Gemma
        eps = next((float(e) for e in (getattr(hf_norm, "eps", None), getattr(hf_norm, "variance_epsilon", None),
                                      self.model.cfg.eps) if e is not None))
        base = "RMS" if kind.startswith("RMS") else "LN"
        return FinalNorm(base, weight, getattr(hf_norm, "bias", None) if base == "LN" else None, eps)


def _source(spec: str) -> tuple[str, str, bool]:
    """(what boot_transformers loads, the model's name, whether it comes from the hub)."""
    from mechscope.catalog import BUNDLED

    if spec in (BUNDLED, "toy"):
        from mechscope.toy import export

        if not (export.HF_DIR / "config.json").exists():
            raise BadInput(f"the bundled model's Hugging Face export is missing in {export.HF_DIR}: run "
                           f"`python -m mechscope.toy.export` (with transformer-lens 3), or use --backend tl")
        return str(export.HF_DIR), BUNDLED, False
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise BadInput(f"{path} has no config.json: pass a directory written by save_pretrained")
        return str(path), path.name, False
    return spec, spec, True


def load_bridge(spec: str, device: str = "cpu", dtype: str = "auto", fold_ln: bool = True) -> BridgeEngine:
    """`TransformerBridge.boot_transformers` + `enable_compatibility_mode()` (LayerNorm folded and weights
    centred like HookedTransformer's default load; fold_ln=False keeps the raw Hugging Face weights)."""
    import contextlib

    from mechscope import compute, hub
    from mechscope.catalog import close_names_hint, resolve_dtype

    source, name, from_hub = _source(spec)
    known = not from_hub or spec in compute.ALIASES or spec.lower() in compute.COMMON_MODELS  # no hub request
    torch_dtype = resolve_dtype(dtype, device, compute.model_shape(spec).n_params if known else None, spec)
    guard = hub.access(spec, close_names_hint(spec)) if from_hub else contextlib.nullcontext()
    with guard:
        from transformer_lens.model_bridge import TransformerBridge

        try:
            bridge = TransformerBridge.boot_transformers(source, device=device, dtype=torch_dtype)
        except OSError as e:
            raise BadInput(f"could not load {spec!r} ({type(e).__name__}: not a model id, or offline?); pass a "
                           f"local directory saved with save_pretrained, or use 'mechscope-toy'") from None
        except (ValueError, NotImplementedError, KeyError) as e:
            raise BadInput(f"TransformerBridge cannot load {spec!r}: {str(e).splitlines()[0]}") from None
    bridge.enable_compatibility_mode(disable_warnings=True, no_processing=not fold_ln, fold_value_biases=False)
    return BridgeEngine(bridge.eval(), model_name=name)

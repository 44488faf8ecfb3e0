"""The transformer-lens engine: a HookedTransformer (and, through BridgeEngine, a TransformerBridge in
compatibility mode), driven by its own hooks. Sites are its hook points; nothing is translated.

The fast exact patching sweep (mechscope.engines.hooked_sweep) runs on this engine's blocks directly.
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from mechscope.engines.base import INPUT_KINDS, Edit, Engine, FinalNorm, ModelConfig, Metric, SITE_KINDS, on_device

# per-receiver inputs (INPUT_KINDS, edge patching): transformer-lens fires them only with use_split_qkv_input /
# use_hook_mlp_in, which run() turns on for a call that reads or edits one of them (the residual stream copied per
# head: slower)


class _Read(Exception):
    """Raised by the hook of activations()' last read: the forward stops there."""


def _hook(fn):
    """A transformer-lens hook from an edit function fn(activation) -> activation."""
    return lambda act, hook: fn(act)


def config_from_tl(cfg, n_params: int | None = None) -> ModelConfig:
    """ModelConfig from a HookedTransformerConfig (or a TransformerBridgeConfig)."""
    return ModelConfig(
        model_name=str(cfg.model_name), original_architecture=str(cfg.original_architecture or cfg.model_name),
        n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_model=cfg.d_model, d_head=cfg.d_head,
        d_mlp=0 if cfg.attn_only else int(cfg.d_mlp or 0), d_vocab=cfg.d_vocab, n_ctx=cfg.n_ctx,
        n_params=int(n_params if n_params is not None else (cfg.n_params or 0)),
        n_key_value_heads=getattr(cfg, "n_key_value_heads", None), attn_only=bool(cfg.attn_only),
        parallel_attn_mlp=bool(cfg.parallel_attn_mlp), gated_mlp=bool(getattr(cfg, "gated_mlp", False)),
        normalization_type=cfg.normalization_type, positional_embedding_type=cfg.positional_embedding_type,
        attention_dir=cfg.attention_dir, device=cfg.device, dtype=cfg.dtype)


class HookedEngine(Engine):
    """transformer-lens's HookedTransformer."""
    name = "tl"
    split_inputs = True                 # offers INPUT_KINDS (HookedTransformer's use_split_qkv_input / use_hook_mlp_in)

    def __init__(self, model):
        self.model = model
        self.tokenizer = model.tokenizer
        self.cfg = config_from_tl(model.cfg)

    # ---------------------------------------------------------------- tokens
    def to_tokens(self, text, prepend_bos: bool = True, truncate: bool = False):
        return self.model.to_tokens(text, prepend_bos=prepend_bos, truncate=truncate)

    def to_str_tokens(self, tokens, prepend_bos: bool = True) -> list[str]:
        if isinstance(tokens, str):
            return self.model.to_str_tokens(tokens, prepend_bos=prepend_bos)
        tokens = torch.as_tensor(tokens)
        return self.model.to_str_tokens(tokens.reshape(-1))

    def to_string(self, tokens) -> str:
        return self.model.to_string(torch.as_tensor(tokens))

    # ---------------------------------------------------------------- sites
    def sites(self) -> list[str]:
        names = [n for n in self.model.hook_dict if n.endswith(SITE_KINDS)]
        if self.cfg.attn_only:  # transformer-lens keeps hook_mlp_out on attention-only blocks; it never fires
            names = [n for n in names if not n.endswith(("hook_mlp_out", "mlp.hook_post"))]
        return names

    def has_site(self, site: str) -> bool:
        """sites(), plus the per-head / per-MLP inputs (INPUT_KINDS) where split_inputs: not listed in sites(),
        so that reading every site stays cheap and the same on every engine."""
        if self.split_inputs and site.endswith(INPUT_KINDS) and site in self.model.hook_dict:
            return not (self.cfg.attn_only and site.endswith("hook_mlp_in"))
        return super().has_site(site)

    @contextlib.contextmanager
    def _inputs_split(self, names):
        """Turn on transformer-lens's per-head q/k/v inputs and hook_mlp_in while a call uses one of them."""
        cfg = self.model.cfg
        if not any(n.endswith(INPUT_KINDS) for n in names):
            yield
            return
        old = cfg.use_split_qkv_input, cfg.use_hook_mlp_in
        cfg.use_split_qkv_input, cfg.use_hook_mlp_in = True, not cfg.attn_only
        try:
            yield
        finally:
            cfg.use_split_qkv_input, cfg.use_hook_mlp_in = old

    # ---------------------------------------------------------------- running
    def _forward(self, tokens, names, hooks, **kwargs):
        mask = torch.ones_like(tokens)  # right padding is handled by reading each row's own positions
        with self.model.hooks(fwd_hooks=hooks), self._inputs_split(list(names) + [name for name, _ in hooks]):
            if names:
                logits, cache = self.model.run_with_cache(tokens, names_filter=list(names), attention_mask=mask,
                                                          **kwargs)
                return logits, dict(cache.items())
            return self.model(tokens, attention_mask=mask, **kwargs), {}

    def _hooks(self, edits: Sequence[Edit]) -> list:
        """transformer-lens hooks (name, fn(act, hook)) that apply `edits`."""
        return [(site, _hook(on_device(fn, self.cfg.device))) for site, fn in edits]

    def run(self, tokens, read: Sequence[str] = (), edits: Sequence[Edit] = (), positions=None):
        self.require(list(read) + [site for site, _ in edits])
        hooks = self._hooks(edits)
        if positions is not None and "unembed.hook_in" in self.model.hook_dict:  # unembed only those positions
            rows = torch.arange(len(tokens), device=tokens.device)
            at = torch.as_tensor(positions, device=tokens.device)
            select = ("unembed.hook_in", lambda x, hook: x[rows, at][:, None])
            logits, acts = self._forward(tokens, read, hooks + [select])
            return logits[:, 0], acts
        logits, acts = self._forward(tokens, read, hooks)
        if positions is not None:
            rows = torch.arange(len(tokens), device=logits.device)
            logits = logits[rows, torch.as_tensor(positions, device=logits.device)]
        return logits, acts

    def activations(self, tokens, read: Sequence[str], edits: Sequence[Edit] = ()) -> dict:
        """The hook that reads the last site asked for ends the forward (an exception caught here): nothing after
        it runs. (transformer-lens's stop_at_layer stops only between blocks, and the bridge's never before the
        final norm and unembedding.)"""
        self.require(list(read) + [site for site, _ in edits])
        acts, wanted = {}, set(read)

        def keep(site):
            def hook(act, hook):
                acts[site] = act.detach()
                if len(acts) == len(wanted):
                    raise _Read
            return hook

        if wanted:
            try:
                self._forward(tokens, (), self._hooks(edits) + [(site, keep(site)) for site in wanted])
            except _Read:
                pass
        return acts

    def run_with_grads(self, tokens, metric: Metric, read: Sequence[str], edits: Sequence[Edit] = ()):
        self.require(list(read) + [site for site, _ in edits])
        acts = {}

        def keep(site):  # by the site's name: on the bridge, hook.name is the canonical name of an alias
            def hook(act, hook):
                act.retain_grad() if act.requires_grad else None
                acts[site] = act
                return act
            return hook

        with torch.enable_grad():
            hooks = self._hooks(edits) + [(site, keep(site)) for site in read]
            logits, _ = self._forward(tokens, (), hooks)
            value = metric(logits)
            grads = torch.autograd.grad(value.sum(), [acts[s] for s in read], allow_unused=True)
        grads = {s: (g if g is not None else torch.zeros_like(acts[s])).detach() for s, g in zip(read, grads)}
        return value.detach(), {s: a.detach() for s, a in acts.items()}, grads

    def generate(self, tokens, edits: Sequence[Edit] = (), max_new_tokens: int = 10, use_kv_cache: bool = True):
        self.require([site for site, _ in edits])
        with self.model.hooks(fwd_hooks=self._hooks(edits)):
            return self.model.generate(tokens, max_new_tokens=max_new_tokens, do_sample=False,
                                       use_past_kv_cache=use_kv_cache, verbose=False)

    # ---------------------------------------------------------------- weights (one layer: model.W_O stacks them all)
    def W_O(self, layer: int):
        return self.model.blocks[layer].attn.W_O

    def b_O(self, layer: int):
        return self.model.blocks[layer].attn.b_O

    def W_out(self, layer: int):
        return self.model.blocks[layer].mlp.W_out

    @property
    def W_U(self):
        return self.model.W_U

    @property
    def b_U(self):
        return self.model.b_U

    @property
    def final_norm(self) -> FinalNorm:
        kind = self.cfg.normalization_type
        if kind is None:
            return FinalNorm(None)
        ln = self.model.ln_final
        base = "RMS" if kind.startswith("RMS") or getattr(self.model.cfg, "final_rms", False) else "LN"
        return FinalNorm(base, getattr(ln, "w", None), getattr(ln, "b", None), float(self.model.cfg.eps))

    def readout(self, resid):
        model = self.model
        x = model.ln_final(resid[:, None])[:, 0] if self.cfg.normalization_type is not None else resid
        logits = x @ model.W_U + model.b_U
        cap = getattr(model.cfg, "output_logits_soft_cap", -1.0)
        return cap * torch.tanh(logits / cap) if cap is not None and cap > 0 else logits

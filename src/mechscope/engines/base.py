"""The engine interface: the small surface every technique speaks, in transformer-lens's hook names.

An engine wraps one loaded model of one library (transformer-lens HookedTransformer, TransformerBridge,
nnsight on a Hugging Face module) and offers the same few things:

    engine.cfg                       ModelConfig: the model's facts (transformer-lens field names)
    engine.to_tokens(text)           [1, seq] ids, BOS prepended the way transformer-lens does it
    engine.has_site(name)            whether a site exists here, e.g. "blocks.1.attn.hook_z"
    engine.run(tokens, read=[...], edits=[...])     -> (logits [batch, seq, d_vocab], {site: activation})
    engine.activations(tokens, read=[...], edits=[...])  -> {site: activation}: run's reads, no logits
    engine.run_with_grads(tokens, metric, read=[...]) -> (metric [batch], {site: act}, {site: d sum(metric)/d act})
    engine.generate(tokens, edits=[...], max_new_tokens=n)  greedy, edits applied at every step
    engine.W_O(layer), engine.W_U, engine.final_norm ...   weights in transformer-lens's shapes
    engine.readout(resid)           final norm + unembedding of final-residual vectors

Sites are transformer-lens hook names, and an activation has transformer-lens's shape on every engine:
    hook_embed, hook_pos_embed, blocks.{l}.hook_resid_pre|resid_mid|resid_post  [batch, pos, d_model]
    blocks.{l}.hook_attn_out, blocks.{l}.hook_mlp_out                          [batch, pos, d_model]
    blocks.{l}.attn.hook_z|hook_q                                              [batch, pos, n_heads, d_head]
    blocks.{l}.attn.hook_k|hook_v                                              [batch, pos, n_kv_heads, d_head]
    blocks.{l}.attn.hook_pattern                                               [batch, n_heads, dest, src]
    blocks.{l}.mlp.hook_post                                                   [batch, pos, d_mlp]
    blocks.{l}.hook_q_input (tl, nnsight)                                      [batch, pos, n_heads, d_model]
    blocks.{l}.hook_k_input|hook_v_input (tl, nnsight)                         [batch, pos, n_kv_heads, d_model]
    blocks.{l}.hook_mlp_in (tl, nnsight)                                        [batch, pos, d_model]
(the last three, INPUT_KINDS: each head's / MLP's own copy of the residual stream, before its norm, for edge
patching; has_site says yes, sites() leaves them out: reading them copies the residual stream per head)
An edit is (site, fn): fn gets the activation and returns its replacement (same shape); a read
returns the value after the edits at that site. Engines differ in basis, not in meaning: with the final
norm folded, transformer-lens (and the bridge) centre the unembedding (W_U and b_U have mean 0 over the
vocabulary, on LayerNorm and RMSNorm models alike; not under a logit soft cap, which is not invariant to
a constant) and, on LayerNorm models, the residual stream; Hugging Face (nnsight) does neither. So residual
vectors agree after centring, and logits up to a constant per position. Everything the techniques report is
defined in one basis and agrees across engines: probabilities, ranks, logit differences, patching
recoveries, and, where one answer stands alone (single-answer DLA, the logit lens's target_logit), the
centred logit: logit[t] - mean over the vocabulary of the logits (references/pitfalls.md, 19).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from mechscope.errors import BadInput

Edit = tuple[str, Callable]           # (site, fn(activation) -> activation)
Metric = Callable                     # logits [batch, seq, d_vocab] -> [batch]

SITE_KINDS = ("hook_embed", "hook_pos_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post",
              "hook_attn_out", "hook_mlp_out", "attn.hook_z", "attn.hook_q", "attn.hook_k", "attn.hook_v",
              "attn.hook_pattern", "mlp.hook_post")
BACKENDS = ("tl", "bridge", "nnsight")
INPUT_KINDS = ("hook_q_input", "hook_k_input", "hook_v_input", "hook_mlp_in")  # per-receiver inputs (see above)


@dataclass(frozen=True)
class ModelConfig:
    """A model's facts, named as in transformer-lens's HookedTransformerConfig."""
    model_name: str
    original_architecture: str
    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_mlp: int                          # 0 for attention-only models
    d_vocab: int
    n_ctx: int
    n_params: int                       # the model's own count, the one detect gives (models._with_model_params)
    n_key_value_heads: int | None = None  # grouped-query attention; None = n_heads
    attn_only: bool = False
    parallel_attn_mlp: bool = False
    gated_mlp: bool = False
    normalization_type: str | None = "LN"   # LN, LNPre, RMS, RMSPre or None
    positional_embedding_type: str = "standard"  # standard, rotary, shortformer, alibi
    attention_dir: str = "causal"
    device: object = "cpu"
    dtype: object = None

    def to_dict(self) -> dict:
        return {k: str(v) if k in ("device", "dtype") else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class FinalNorm:
    """The final normalisation, x -> (x - centre) / scale * weight + bias, with scale = sqrt(mean(x'^2) + eps)
    (x' = x - mean(x) when `centres`). weight / bias: [d_model] or None (folded, or absent)."""
    kind: str | None                    # "LN", "RMS" or None (no final norm)
    weight: object = None
    bias: object = None
    eps: float = 1e-5

    @property
    def centres(self) -> bool:
        return self.kind == "LN"

    def scale(self, resid):
        """[..., d_model] final residual -> [..., 1] the norm's divisor at each position."""
        import torch

        if self.kind is None:
            return torch.ones_like(resid[..., :1])
        x = resid - resid.mean(-1, keepdim=True) if self.centres else resid
        return (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()


def on_device(fn: Callable, device) -> Callable:
    """The edit fn run on `device` (where the engine gathers reads, so where an edit's own tensors live) whatever
    device its activation is on (a later GPU under a device_map, NDIF's GPU on a remote run): the activation moves
    in and the result moves back (no copy when they agree). Engines apply every edit through this."""
    def edit(act):
        return fn(act.to(device)).to(act.device)
    return edit


def layer_of(site: str) -> int | None:
    """The layer index in a site name ("blocks.3.attn.hook_z" -> 3), or None."""
    m = re.match(r"blocks\.(\d+)\.", site)
    return int(m.group(1)) if m else None


VOCAB_CHUNK = 8192  # unembedding columns cast to float32 at a time (W_U.float() whole: 3.7 GB on Gemma-2-9B in bf16)


def unembed_float(x, W_U, chunk: int | None = None):
    """x [..., d_model] @ W_U [d_model, d_vocab] in float32 -> [..., d_vocab] on W_U's device, casting W_U `chunk`
    columns at a time (default VOCAB_CHUNK): never a float32 copy of the whole unembedding."""
    import torch

    chunk = chunk or VOCAB_CHUNK
    x = x.to(W_U.device, torch.float32)
    out = x.new_empty(*x.shape[:-1], W_U.shape[1])
    for start in range(0, W_U.shape[1], chunk):
        out[..., start:start + chunk] = x @ W_U[:, start:start + chunk].float()
    return out


def vocab_mean(W_U, squared: bool = False, chunk: int | None = None):
    """[d_model] the mean over the vocabulary of W_U [d_model, d_vocab] (of its squares when `squared`) in float32,
    casting `chunk` columns at a time (default VOCAB_CHUNK)."""
    chunk = chunk or VOCAB_CHUNK
    total = 0
    for start in range(0, W_U.shape[1], chunk):
        part = W_U[:, start:start + chunk].float()
        total = total + (part.pow(2) if squared else part).sum(1)
    return total / W_U.shape[1]


class Engine:
    """The interface (see the module docstring). Subclasses: HookedEngine (transformer-lens hooks, also the
    bridge's compatibility mode) and NNsightEngine."""
    name: str = "?"
    cfg: ModelConfig
    tokenizer: object
    model: object                       # the library object underneath

    # ---------------------------------------------------------------- tokens
    def to_tokens(self, text: str, prepend_bos: bool = True, truncate: bool = False):
        """[1, seq] token ids of text, with BOS (the tokenizer's, else EOS) first when prepend_bos."""
        raise NotImplementedError

    def to_str_tokens(self, tokens, prepend_bos: bool = True) -> list[str]:
        """The text of each token of a [seq] / [1, seq] id tensor or list, or of a string."""
        raise NotImplementedError

    def to_single_str_token(self, token_id: int) -> str:
        return self.to_str_tokens([int(token_id)])[0]

    def to_string(self, tokens) -> str:
        raise NotImplementedError

    @property
    def bos_token_id(self) -> int:
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @property
    def special_token_ids(self) -> set[int]:
        return set(getattr(self.tokenizer, "all_special_ids", []) or [])

    # ---------------------------------------------------------------- sites
    def sites(self) -> list[str]:
        """Every site this engine offers for this model."""
        raise NotImplementedError

    def has_site(self, site: str) -> bool:
        return site in self._site_set()

    def _site_set(self) -> set[str]:
        if getattr(self, "_sites_cache", None) is None:
            self._sites_cache = set(self.sites())
        return self._sites_cache

    def require(self, sites: Sequence[str], what: str = "this analysis") -> None:
        """BadInput naming the first site this engine lacks for this model."""
        for site in sites:
            if not self.has_site(site):
                raise BadInput(f"{what} needs {site}, which the {self.name} engine does not offer for "
                               f"{self.cfg.model_name} ({self.cfg.original_architecture}); "
                               f"{self.missing_site_hint(site)}")

    def missing_site_hint(self, site: str) -> str:
        kind = site.split(".", 2)[-1] if site.startswith("blocks.") else site
        if kind == "hook_resid_mid" and (self.cfg.parallel_attn_mlp or self.cfg.attn_only):
            return "parallel-block and attention-only models have no resid_mid; use resid_pre or attn_out"
        if kind == "hook_mlp_out" and self.cfg.attn_only:
            return "this model has no MLP layers (attention only)"
        return "pick another component, or another --backend"

    # ---------------------------------------------------------------- running
    def run(self, tokens, read: Sequence[str] = (), edits: Sequence[Edit] = (), positions=None):
        """One forward of tokens [batch, seq] with `edits` applied.

        -> (logits, {site: activation} for `read`). logits: [batch, seq, d_vocab], or [batch, d_vocab] at
        `positions` ([batch] per-row indices) when given. Gradients flow where torch's grad mode is on."""
        raise NotImplementedError

    def activations(self, tokens, read: Sequence[str], edits: Sequence[Edit] = ()) -> dict:
        """{site: activation}: run(tokens, read, edits)'s reads, with the forward stopped once the last of them is
        read (no later block, no final norm or unembedding): for techniques that would discard the logits. This
        default runs the whole forward; every engine here stops early."""
        return self.run(tokens, read, edits)[1]

    def run_from(self, layer: int, resid, tokens, read: Sequence[str] = (), edits: Sequence[Edit] = (),
                 positions=None):
        """run() when the blocks before `layer` need not be recomputed: resid [batch, seq, d_model] is block
        `layer`'s input exactly as those blocks compute it for `tokens` under `edits` (a speed-up, never an
        edit). Edits before `layer` are inside resid already; reads there are refused. This default runs every
        block; engines that can skip blocks (nnsight, the bridge) override it."""
        return self.run(tokens, read, edits, positions)

    def run_with_grads(self, tokens, metric: Metric, read: Sequence[str], edits: Sequence[Edit] = ()):
        """-> (metric [batch] detached, {site: activation}, {site: d metric.sum() / d activation})."""
        raise NotImplementedError

    def generate(self, tokens, edits: Sequence[Edit] = (), max_new_tokens: int = 10, use_kv_cache: bool = True):
        """Greedy generation from tokens [batch, seq] (rows of one length) with `edits` at every forward:
        with the KV cache an edit sees the whole prompt first, then one position per step.
        -> [batch, seq + max_new_tokens] (rows that emit EOS continue with EOS)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- weights (transformer-lens shapes)
    def W_O(self, layer: int):
        """[n_heads, d_head, d_model]: head h writes z[..., h, :] @ W_O[h] to the residual stream."""
        raise NotImplementedError

    def b_O(self, layer: int):
        """[d_model] the attention output bias (zeros where absent)."""
        raise NotImplementedError

    def W_out(self, layer: int):
        """[d_mlp, d_model]: neuron n writes post[..., n] * W_out[n]."""
        raise NotImplementedError

    @property
    def W_U(self):
        """[d_model, d_vocab]"""
        raise NotImplementedError

    @property
    def b_U(self):
        """[d_vocab] (zeros where absent)"""
        raise NotImplementedError

    @property
    def final_norm(self) -> FinalNorm:
        raise NotImplementedError

    def readout(self, resid):
        """[n, d_model] final residual -> [n, d_vocab] logits (final norm, unembedding, soft cap)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- facts
    def info(self) -> dict:
        """What meta.json records about the model and engine."""
        return {"engine": self.name, "name": self.cfg.model_name, **self.cfg.to_dict()}

    def __repr__(self) -> str:
        c = self.cfg
        return (f"<{type(self).__name__} {c.model_name}: {c.n_layers} layers x {c.n_heads} heads, d_model {c.d_model}, "
                f"{c.device}, {c.dtype}>")

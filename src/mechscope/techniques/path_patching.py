"""Path patching (Wang et al. 2022): the effect of sender heads on receivers through one path only.

A target run t (usually the clean input) and a source run s (usually the corrupted one); metric m(logits) -> [batch].
Each batch row is one path (a sender set and a receiver set):
 1. run t and s once, caching every head's output (hook_z), and the MLP outputs of t;
 2. run t with the row's sender heads' z taken from s and every other head's z frozen to its value in t
    (MLP outputs frozen to t too with freeze_mlps=True; by default they recompute, as in Wang et al.);
    cache the receivers' q / k / v (hook_q / hook_k / hook_v of the receiver heads);
 3. run t again replacing only the receivers' q / k / v by the step-2 values (everything downstream of the
    receivers recomputes); measure m.
effect = m(step 3) - m(t). Replacing hook_q[:, :, h] is the same as patching head h's query input
(q = LN(resid) W_Q + b_Q; rotary embeddings act after hook_q), so set_use_split_qkv_input is not needed.

Receivers = "logits": the senders' change reaches the logits by the direct path only: the final residual of t
gets sum_senders (z_s - z_t) W_O added, then the final LayerNorm (recomputed) and the unembedding.

Shapes: tokens [n_prompts, pos]; effects [n_rows] (mean over prompts; NaN for a row with no path, i.e. every
sender at or after every receiver's layer).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

Metric = Callable[[torch.Tensor], torch.Tensor]  # logits [batch, pos, d_vocab] -> [batch]
Head = tuple[int, int]
Receiver = tuple[int, int, str]  # (layer, head, "q" | "k" | "v")
SWEEPS = ("senders", "receivers", "none")


@dataclass
class PathPatchResult:
    """effects[i] = metric with path i patched - metric of the target run (mean over prompts)."""
    effects: torch.Tensor
    rows: list[tuple[list[Head], list[Receiver] | str]]
    target_metric: float
    source_metric: float
    freeze_mlps: bool
    meta: dict = field(default_factory=dict)

    @property
    def fraction(self) -> torch.Tensor:
        """effects / (source - target): 1 = the path carries the whole source-vs-target difference."""
        return self.effects / (self.source_metric - self.target_metric)


def _masks(model, rows, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """senders [n_rows, n_layers, n_heads] and receivers [n_rows, 3 (q, k, v), n_layers, n_heads] (None: logits)."""
    cfg = model.cfg
    send = torch.zeros(len(rows), cfg.n_layers, cfg.n_heads, dtype=torch.bool, device=device)
    recv = None if rows[0][1] == "logits" else torch.zeros(len(rows), 3, cfg.n_layers, cfg.n_heads,
                                                           dtype=torch.bool, device=device)
    for i, (senders, receivers) in enumerate(rows):
        for layer, head in senders:
            send[i, layer, head] = True
        for layer, head, component in ([] if recv is None else receivers):
            recv[i, "qkv".index(component), layer, head] = True
    return send, recv


def _direct_path_logits(model, t_cache, s_cache, send) -> torch.Tensor:
    """Logits [n_rows * n_prompts, pos, d_vocab] of t, each row's senders' output change added to the final residual."""
    n_layers = model.cfg.n_layers
    delta = 0
    for layer in range(n_layers):
        name = f"blocks.{layer}.attn.hook_z"
        dz = s_cache[name] - t_cache[name]                                          # [n, pos, head, d_head]
        per_head = torch.einsum("nphd,hdm->nphm", dz, model.W_O[layer])            # [n, pos, head, d_model]
        delta = delta + torch.einsum("rh,nphm->rnpm", send[:, layer].to(dz.dtype), per_head)
    resid = (t_cache[f"blocks.{n_layers - 1}.hook_resid_post"] + delta).flatten(0, 1)
    if model.cfg.normalization_type is not None:
        resid = model.ln_final(resid)
    logits, cap = model.unembed(resid), model.cfg.output_logits_soft_cap
    return cap * torch.tanh(logits / cap) if cap is not None and cap > 0 else logits


def _receiver_path_logits(model, target, t_cache, s_cache, send, recv, freeze_mlps) -> torch.Tensor:
    """Steps 2 and 3 for a chunk of rows -> logits [n_rows * n_prompts, pos, d_vocab]."""
    n_rows, n = send.shape[0], target.shape[0]
    rows = target.repeat(n_rows, 1)                                  # row r * n + j: path r on prompt j

    def per_row(mask):  # [n_rows, ...] -> [n_rows * n, ...]
        return mask.repeat_interleave(n, 0)
    last = int(recv.any(0).any(0).any(-1).nonzero().max())          # the last layer with a receiver
    names = [f"blocks.{layer}.attn.hook_{c}" for layer in range(last + 1) for i, c in enumerate("qkv")
             if recv[:, i, layer].any()]

    def freeze_heads(z, hook):
        layer = hook.layer()
        mask = per_row(send[:, layer])[:, None, :, None]
        source, target_z = s_cache[hook.name].repeat(n_rows, 1, 1, 1), t_cache[hook.name].repeat(n_rows, 1, 1, 1)
        return torch.where(mask, source, target_z)

    def freeze_mlp(out, hook):
        return t_cache[hook.name].repeat(n_rows, 1, 1)

    received = {}

    def keep(x, hook):
        received[hook.name] = x

    hooks = [(f"blocks.{layer}.attn.hook_z", freeze_heads) for layer in range(last)] + [(n_, keep) for n_ in names]
    if freeze_mlps and not model.cfg.attn_only:
        hooks += [(f"blocks.{layer}.hook_mlp_out", freeze_mlp) for layer in range(last)]
    model.run_with_hooks(rows, fwd_hooks=hooks, stop_at_layer=last + 1)

    def patch_receivers(x, hook):
        mask = per_row(recv[:, "qkv".index(hook.name[-1]), hook.layer()])[:, None, :, None]
        return torch.where(mask, received[hook.name], x)

    return model.run_with_hooks(rows, fwd_hooks=[(n_, patch_receivers) for n_ in names])


@torch.no_grad()
def path_patch(model, target_tokens: torch.Tensor, source_tokens: torch.Tensor, senders: Sequence[Head],
               receivers: Sequence[Receiver] | str, metric: Metric, sweep: str = "senders",
               freeze_mlps: bool = False, max_batch: int = 64) -> PathPatchResult:
    """Path patching from `senders` to `receivers` ((layer, head, "q"|"k"|"v") list, or "logits").

    sweep="senders": one path per sender head (all receivers together); "receivers": one path per receiver
    (all senders together); "none": one path, all senders to all receivers.
    target_tokens, source_tokens: [n_prompts, pos]; max_batch: rows x prompts per forward call.
    """
    if sweep not in SWEEPS:
        raise ValueError(f"sweep must be one of {SWEEPS}")
    to_logits = isinstance(receivers, str)
    if to_logits and receivers != "logits":
        raise ValueError(f"receivers must be a list of (layer, head, component) or 'logits', not {receivers!r}")
    if to_logits and sweep == "receivers":
        raise ValueError("sweep='receivers' needs receiver heads, not 'logits'")
    if not to_logits and model.cfg.n_key_value_heads not in (None, model.cfg.n_heads) \
            and any(c in "kv" for _, _, c in receivers):
        raise ValueError("k / v receivers are shared by several heads on grouped-query models; use q receivers")
    receivers = "logits" if to_logits else [tuple(r) for r in receivers]
    senders = [tuple(s) for s in senders]
    if sweep == "senders":
        rows = [([s], receivers) for s in senders]
    elif sweep == "receivers":
        rows = [(senders, [r]) for r in receivers]
    else:
        rows = [(senders, receivers)]

    n_layers, n = model.cfg.n_layers, target_tokens.shape[0]
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    t_names = names + [f"blocks.{n_layers - 1}.hook_resid_post"]
    if freeze_mlps and not model.cfg.attn_only:
        t_names += [f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)]
    t_logits, t_cache = model.run_with_cache(target_tokens, names_filter=t_names)
    s_logits, s_cache = model.run_with_cache(source_tokens, names_filter=names)
    target_metric, source_metric = metric(t_logits).mean(), metric(s_logits).mean()

    def has_path(row):
        last = n_layers if row[1] == "logits" else max(layer for layer, _, _ in row[1])
        return len(row[0]) > 0 and min(layer for layer, _ in row[0]) < last

    effects = torch.full((len(rows),), float("nan"))
    live = [i for i, row in enumerate(rows) if has_path(row)]
    for chunk in torch.tensor(live, dtype=torch.long).split(max(1, max_batch // n)):
        send, recv = _masks(model, [rows[i] for i in chunk], target_tokens.device)
        if to_logits:
            logits = _direct_path_logits(model, t_cache, s_cache, send)
        else:
            logits = _receiver_path_logits(model, target_tokens, t_cache, s_cache, send, recv, freeze_mlps)
        effects[chunk] = (metric(logits).view(len(chunk), n).mean(1) - target_metric).float().cpu()
    return PathPatchResult(effects=effects, rows=rows, target_metric=target_metric.item(),
                           source_metric=source_metric.item(), freeze_mlps=freeze_mlps,
                           meta={"sweep": sweep, "n_prompts": n})


# ------------------------------------------------------------------------------------------- induction task
def induction_task(model, n_sequences: int = 16, seq_len: int = 10, seed: int = 0):
    """Clean [BOS, r, r], corrupted [BOS, r', r] (first copy re-drawn, so copying fails) and a metric.

    Returns (clean [n, 2L+1], corrupted [n, 2L+1], metric): the mean log-probability of the correct next token
    over the second copy (positions L+1..2L-1 predict tokens L+2..2L; higher = better copying) -> [batch].
    """
    from mechscope.techniques.heads import repeated_random_tokens

    clean = repeated_random_tokens(model, n_sequences, seq_len, seed=seed)
    other = repeated_random_tokens(model, n_sequences, seq_len, seed=seed + 1)
    corrupted = clean.clone()
    corrupted[:, 1:seq_len + 1] = other[:, 1:seq_len + 1]
    targets = clean[:, seq_len + 2:]                                  # [n, L-1]

    def metric(logits):
        logprobs = logits[:, seq_len + 1:-1].float().log_softmax(-1)   # [batch, L-1, d_vocab]
        rows = targets.repeat(logits.shape[0] // targets.shape[0], 1)
        return logprobs.gather(-1, rows[..., None])[..., 0].mean(-1)
    return clean, corrupted, metric

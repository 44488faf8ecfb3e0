"""Attribution patching (AtP): first-order estimates of every activation patch from 2 forwards + 1 backward.

Patching the clean value of an activation `a` into the corrupted run changes a metric m(logits) by about

    (a_clean - a_corrupted) . dm/da   (gradient taken on the corrupted run)

(Nanda 2023; Kramár et al. 2024). One forward + backward on the corrupted input gives every a_corrupted and
dm/da, one forward on the clean input every a_clean. The estimate is exact when m is linear in `a` (e.g. a
logit read from the last layer's outputs of a model without final normalisation). It degrades through
softmaxes and LayerNorms: query/key patches that saturate an attention softmax, and big changes such as a
swapped token at layer 0, leave the linear regime (false negatives). So compare with exact patching
(`exact_effects`, `agreement`).

AtP* QK fix (Kramár et al. 2024, sec. 3.1.1), `atp_star=True`: for q and k patches the attention pattern is
recomputed exactly with the clean query (or key), and only the step from the pattern onwards is linearised:
Δpattern . dm/dpattern. Their second fix (GradDrop) is not implemented.

Score names and shapes (the same as `transformer_lens.patching.get_act_patch_*`):
    resid_pre, attn_out, mlp_out      [n_layers, pos]
    head_out, head_q, head_k, head_v  [n_layers, n_heads]          (all positions patched together)
    head_*_by_pos                     [n_layers, pos, n_heads]
    neurons                           [n_layers, d_mlp]           (hook_post, all positions together)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

SITES = ("resid", "attn_out", "mlp_out", "heads", "qkv", "neurons")
DEFAULT_SITES = ("resid", "attn_out", "mlp_out", "heads", "neurons")
Metric = Callable[[torch.Tensor], torch.Tensor]  # logits [batch, pos, d_vocab] -> [batch]


@dataclass
class AttributionResult:
    """AtP estimates of metric(corrupted + clean patch) - metric(corrupted), averaged over the batch."""
    scores: dict[str, torch.Tensor]
    clean_metric: float
    corrupted_metric: float
    atp_star: bool = False
    meta: dict = field(default_factory=dict)


def _hook_suffixes(model, sites: Sequence[str], atp_star: bool) -> list[str]:
    unknown = set(sites) - set(SITES)
    if unknown:
        raise ValueError(f"unknown sites {sorted(unknown)}; choose from {SITES}")
    has_mlp = not model.cfg.attn_only
    suffixes = {"resid": ["hook_resid_pre"], "attn_out": ["hook_attn_out"],
                "mlp_out": ["hook_mlp_out"] if has_mlp else [], "heads": ["attn.hook_z"],
                "qkv": ["attn.hook_q", "attn.hook_k", "attn.hook_v"], "neurons": ["mlp.hook_post"] if has_mlp else []}
    out = [s for site in sites for s in suffixes[site]]
    if atp_star and "qkv" in sites:
        out += ["attn.hook_pattern", "attn.hook_attn_scores"]
        if model.cfg.positional_embedding_type == "rotary":
            out += ["attn.hook_rot_q", "attn.hook_rot_k"]
    return out


def _check_atp_star(model) -> None:
    if model.cfg.attn_scores_soft_cap > 0:
        raise ValueError("AtP* assumes attention scores bilinear in q and k; this model soft-caps them")
    if model.cfg.n_key_value_heads not in (None, model.cfg.n_heads):
        raise ValueError("AtP* needs one key per head; this model uses grouped-query attention")


def _qk_star(model, layer: int, clean: dict, corrupted: dict, grads: dict) -> dict[str, torch.Tensor]:
    """AtP* estimates for q and k patches of one layer -> q/k by_pos [batch, pos, n_heads], all_pos [batch, n_heads]."""
    name = f"blocks.{layer}.attn.hook_"
    rot = "rot_" if model.cfg.positional_embedding_type == "rotary" else ""
    scale = model.blocks[layer].attn.attn_scale
    q, k = corrupted[name + rot + "q"], corrupted[name + rot + "k"]                # [batch, pos, head, d_head]
    dq, dk = clean[name + rot + "q"] - q, clean[name + rot + "k"] - k
    scores, pattern = corrupted[name + "attn_scores"], corrupted[name + "pattern"]  # [batch, head, dest, src]
    g = grads[name + "pattern"]
    # q patched at dest p changes row p only: rows are independent, so all positions = the sum over p
    scores_q = scores + torch.einsum("bphd,bshd->bhps", dq, k) / scale
    q_by_pos = ((scores_q.softmax(-1) - pattern) * g).sum(-1)                      # [batch, head, dest]
    # k patched at all positions: every row recomputed
    delta = torch.einsum("bphd,bshd->bhps", q, dk) / scale                         # score change of (p, s)
    k_all = ((torch.softmax(scores + delta, -1) - pattern) * g).sum((-1, -2))      # [batch, head]
    # k patched at one source s: one logit of each row p changes by delta; with a = pattern[p, s] and
    # D = 1 - a + a e^delta, the row becomes pattern / D except entry s, which becomes a e^delta / D
    delta = delta.where(torch.isfinite(scores), torch.zeros((), device=delta.device))
    log_a = pattern.log()
    log_d = torch.logaddexp(torch.log1p(-pattern), log_a + delta)
    row_dot = (pattern * g).sum(-1, keepdim=True)
    per_row = (torch.exp(-log_d) - 1) * (row_dot - pattern * g) + g * (torch.exp(log_a + delta - log_d) - pattern)
    k_by_pos = per_row.sum(-2)                                                     # [batch, head, src]
    return {"head_q_by_pos": q_by_pos.transpose(1, 2), "head_q": q_by_pos.sum(-1),
            "head_k_by_pos": k_by_pos.transpose(1, 2), "head_k": k_all}


def attribution_patch(model, clean_tokens: torch.Tensor, corrupted_tokens: torch.Tensor, metric: Metric,
                      sites: Sequence[str] = DEFAULT_SITES, atp_star: bool = False) -> AttributionResult:
    """AtP estimates of patching each clean activation into the corrupted run, for every cell of `sites`.

    clean_tokens, corrupted_tokens: [batch, pos] (same shape); metric: logits -> [batch].
    Two forwards (clean without grad, corrupted with grad) and one backward, caching only the needed hooks.
    """
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError(f"clean {tuple(clean_tokens.shape)} and corrupted {tuple(corrupted_tokens.shape)} differ")
    if atp_star and "qkv" in sites:
        _check_atp_star(model)
    n_layers = model.cfg.n_layers
    suffixes = _hook_suffixes(model, sites, atp_star)
    names = [f"blocks.{layer}.{s}" for layer in range(n_layers) for s in suffixes]

    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean_tokens, names_filter=names)
        clean_metric = metric(clean_logits).mean().item()
    corrupted = {}

    def keep(act, hook):
        corrupted[hook.name] = act

    with torch.enable_grad(), model.hooks(fwd_hooks=[(name, keep) for name in names]):
        corrupted_values = metric(model(corrupted_tokens))
    with_grad = [n for n in names if not n.endswith(("attn_scores", "rot_q", "rot_k"))]
    grads = dict(zip(with_grad, torch.autograd.grad(corrupted_values.sum(), [corrupted[n] for n in with_grad])))
    corrupted = {n: a.detach() for n, a in corrupted.items()}

    def atp(name):  # [batch, pos, ...] per-cell estimate, summed over the last (feature) axis
        return ((clean_cache[name] - corrupted[name]) * grads[name]).sum(-1)

    per_layer: dict[str, list[torch.Tensor]] = {}
    for layer in range(n_layers):
        block = f"blocks.{layer}."
        found = {}
        if "resid" in sites:
            found["resid_pre"] = atp(block + "hook_resid_pre")
        if "attn_out" in sites:
            found["attn_out"] = atp(block + "hook_attn_out")
        if "mlp_out" in sites and not model.cfg.attn_only:
            found["mlp_out"] = atp(block + "hook_mlp_out")
        if "heads" in sites:
            found["head_out_by_pos"] = atp(block + "attn.hook_z")
            found["head_out"] = found["head_out_by_pos"].sum(1)
        if "qkv" in sites:
            for c in "qkv":
                found[f"head_{c}_by_pos"] = atp(block + f"attn.hook_{c}")
                found[f"head_{c}"] = found[f"head_{c}_by_pos"].sum(1)
            if atp_star:
                found.update(_qk_star(model, layer, clean_cache, corrupted, grads))
        if "neurons" in sites and not model.cfg.attn_only:
            name = block + "mlp.hook_post"
            found["neurons"] = ((clean_cache[name] - corrupted[name]) * grads[name]).sum(1)
        for key, value in found.items():
            per_layer.setdefault(key, []).append(value.mean(0))  # mean over the batch
    scores = {key: torch.stack(per_layer_values) for key, per_layer_values in per_layer.items()}
    return AttributionResult(scores=scores, clean_metric=clean_metric, corrupted_metric=corrupted_values.mean().item(),
                             atp_star=atp_star, meta={"sites": list(sites), "n_prompts": clean_tokens.shape[0]})


# ------------------------------------------------------------------------------------------- exact patching
# score name -> (patching.patch_sweep component, by_position)
EXACT = {"resid_pre": ("resid_pre", True), "attn_out": ("attn_out", True), "mlp_out": ("mlp_out", True),
         "head_out": ("z", False), "head_out_by_pos": ("z", True), "head_q": ("q", False),
         "head_q_by_pos": ("q", True), "head_k": ("k", False), "head_k_by_pos": ("k", True),
         "head_v": ("v", False), "head_v_by_pos": ("v", True)}


def exact_effects(model, clean_tokens: torch.Tensor, corrupted_tokens: torch.Tensor, metric,
                  score_names: Sequence[str], lengths: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Exact metric(corrupted + clean patch) - metric(corrupted) for the named score grids (not neurons),
    shaped like the AtP scores, from the exact engine `patching.patch_sweep` (metric: a `patching.Metric`).

    With right-padded prompts (`lengths` [batch]) a padding cell counts as 0 effect, as in AtP.
    """
    from mechscope.techniques.patching import patch_sweep

    out = {}
    for name in [n for n in score_names if n in EXACT]:
        component, by_position = EXACT[name]
        result = patch_sweep(model, clean_tokens, corrupted_tokens, component, metric, mode="denoise",
                             by_position=by_position, lengths=lengths)
        corrupted = result.corrupted.view(-1, *[1] * (result.per_prompt.ndim - 1))
        effect = (result.per_prompt - corrupted).nan_to_num(0.0).mean(0)
        out[name] = effect.transpose(1, 2) if result.axes == ("layer", "head", "pos") else effect
    return out


@torch.no_grad()
def exact_neuron_effects(model, clean_tokens: torch.Tensor, corrupted_tokens: torch.Tensor, metric,
                         neurons: Sequence[tuple[int, int]], lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Exact effect of patching each (layer, neuron)'s clean hook_post (all positions) into the corrupted run,
    mean over prompts; metric: a `patching.Metric`. One batched forward, one row per neuron -> [len(neurons)]."""
    n, seq = corrupted_tokens.shape
    read = torch.full((n,), seq - 1, device=corrupted_tokens.device) if lengths is None else lengths - 1
    rows = len(neurons)
    names = sorted({f"blocks.{layer}.mlp.hook_post" for layer, _ in neurons})
    clean_logits, clean_cache = model.run_with_cache(clean_tokens, names_filter=names)
    at_read = lambda logits: logits[torch.arange(len(logits)), read.repeat(len(logits) // n)].float()  # noqa: E731
    prompt = torch.arange(n, device=corrupted_tokens.device)
    clean_logits = at_read(clean_logits)
    base = metric(at_read(model(corrupted_tokens)), prompt, clean_logits)

    def patch(post, hook):  # post: [rows * n, pos, d_mlp]; row i*n + j = neuron i on prompt j
        for i, (layer, unit) in enumerate(neurons):
            if hook.layer() == layer:
                post[i * n:(i + 1) * n, :, unit] = clean_cache[hook.name][:, :, unit]
        return post

    logits = model.run_with_hooks(corrupted_tokens.repeat(rows, 1), fwd_hooks=[(name, patch) for name in names])
    return (metric(at_read(logits), prompt.repeat(rows), clean_logits).view(rows, n) - base).mean(1)


def agreement(estimate: torch.Tensor, exact: torch.Tensor, k: int = 10) -> dict:
    """Pearson r over all cells and the overlap of the top-k cells by |effect| (fraction of k)."""
    a, b = estimate.flatten().double(), exact.flatten().double()
    k = min(k, a.numel())
    r = torch.corrcoef(torch.stack([a, b]))[0, 1].item() if a.numel() > 1 else float("nan")
    top_a, top_b = set(a.abs().topk(k).indices.tolist()), set(b.abs().topk(k).indices.tolist())
    return {"pearson_r": r, "top_k": k, "top_k_overlap": len(top_a & top_b) / k,
            "max_abs_error": (a - b).abs().max().item()}

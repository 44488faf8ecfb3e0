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
Δpattern . dm/dpattern (transformer-lens engine only: it reads attention scores). Their second fix
(GradDrop) is not implemented.

Every engine: the two runs are engine.run (clean) and engine.run_with_grads (corrupted); per-prompt
estimates are kept (`per_prompt`), so a prompt set gives intervals and per-prompt agreement with exact
patching (`exact_effects(..., per_prompt=True)`). Prompts run in chunks whose forward + backward fit a memory
budget (`prompts_per_chunk`); a prompt's estimates depend on its own row only (the metric's gradient is taken
of its sum over prompts), so chunked and whole runs give the same numbers.

Score names and shapes (the same as `transformer_lens.patching.get_act_patch_*`):
    resid_pre, attn_out, mlp_out      [n_layers, pos]
    head_out, head_q, head_k, head_v  [n_layers, n_heads]          (all positions patched together)
    head_*_by_pos                     [n_layers, pos, n_heads]
    neurons                           [n_layers, d_mlp]           (hook_post, all positions together)
per_prompt adds a leading [n_prompts] axis.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from mechscope.errors import BadInput

SITES = ("resid", "attn_out", "mlp_out", "heads", "qkv", "neurons")
DEFAULT_SITES = ("resid", "attn_out", "mlp_out", "heads", "neurons")
BY_POSITION = ("resid_pre", "attn_out", "mlp_out", "head_out_by_pos", "head_q_by_pos", "head_k_by_pos", "head_v_by_pos")
# metric(logits [chunk, pos, d_vocab], prompts [chunk] the rows' indices in the prompt set, on the CPU) -> [chunk]
Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class AttributionResult:
    """AtP estimates of metric(corrupted + clean patch) - metric(corrupted). scores: {name: mean over prompts},
    per_prompt: {name: [n_prompts, *score shape]} (NaN at a prompt's padding positions); clean / corrupted:
    [n_prompts] the metric of the two runs."""
    scores: dict[str, torch.Tensor]
    per_prompt: dict[str, torch.Tensor]
    clean: torch.Tensor
    corrupted: torch.Tensor
    atp_star: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def clean_metric(self) -> float:
        return self.clean.mean().item()

    @property
    def corrupted_metric(self) -> float:
        return self.corrupted.mean().item()


def _hook_suffixes(cfg, sites: Sequence[str]) -> list[str]:
    unknown = set(sites) - set(SITES)
    if unknown:
        raise BadInput(f"unknown sites {sorted(unknown)}; choose from {', '.join(SITES)}")
    has_mlp = not cfg.attn_only
    suffixes = {"resid": ["hook_resid_pre"], "attn_out": ["hook_attn_out"],
                "mlp_out": ["hook_mlp_out"] if has_mlp else [], "heads": ["attn.hook_z"],
                "qkv": ["attn.hook_q", "attn.hook_k", "attn.hook_v"], "neurons": ["mlp.hook_post"] if has_mlp else []}
    return [s for site in sites for s in suffixes[site]]


def _star_extras(engine, clean_tokens, corrupted_tokens) -> tuple[dict, dict]:
    """AtP* reads attention scores (and rotary q / k) that are not engine sites: transformer-lens only.
    -> (clean, corrupted) {hook name: activation}."""
    if engine.name != "tl":
        raise BadInput(f"AtP* (--atp-star) reads attention scores, which the {engine.name} engine does not offer; "
                       f"use --backend tl or drop --atp-star")
    model, cfg = engine.model, engine.model.cfg
    if cfg.attn_scores_soft_cap > 0:
        raise BadInput("AtP* assumes attention scores bilinear in q and k; this model soft-caps them; drop --atp-star")
    if cfg.n_key_value_heads not in (None, cfg.n_heads):
        raise BadInput("AtP* needs one key per head; this model uses grouped-query attention; drop --atp-star")
    extra = ["attn.hook_attn_scores"] + (["attn.hook_rot_q", "attn.hook_rot_k"]
                                         if cfg.positional_embedding_type == "rotary" else [])
    names = [f"blocks.{layer}.{s}" for layer in range(cfg.n_layers) for s in extra]
    with torch.no_grad():
        caches = [dict(model.run_with_cache(t, names_filter=names)[1].items()) for t in (clean_tokens, corrupted_tokens)]
    return caches[0], caches[1]


def _qk_star(engine, layer: int, clean: dict, corrupted: dict, grads: dict) -> dict[str, torch.Tensor]:
    """AtP* estimates for q and k patches of one layer -> q/k by_pos [batch, pos, n_heads], all_pos [batch, n_heads]."""
    name = f"blocks.{layer}.attn.hook_"
    rot = "rot_" if engine.cfg.positional_embedding_type == "rotary" else ""
    scale = engine.model.blocks[layer].attn.attn_scale
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


def _positional_args(fn) -> int:
    """How many positional arguments fn takes (2 for *args; 2 when it cannot be inspected)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return 2
    kinds = [p.kind for p in params]
    if inspect.Parameter.VAR_POSITIONAL in kinds:
        return 2
    return sum(k in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) for k in kinds)


def prompts_per_chunk(cfg, seq: int, dtype=None) -> int:
    """Prompts per forward + backward that keep it near hooked_sweep.MEMORY_BUDGET: a prompt's activations in
    every layer (hooked_sweep.row_bytes per layer) and their gradients; at least 1."""
    from mechscope.engines.hooked_sweep import MEMORY_BUDGET, row_bytes

    return max(1, MEMORY_BUDGET // (2 * cfg.n_layers * row_bytes(cfg, seq, dtype)))


def attribution_patch(model, clean_tokens: torch.Tensor, corrupted_tokens: torch.Tensor, metric: Metric,
                      sites: Sequence[str] = DEFAULT_SITES, atp_star: bool = False,
                      lengths: torch.Tensor | None = None, chunk_prompts: int | None = None) -> AttributionResult:
    """AtP estimates of patching each clean activation into the corrupted run, for every cell of `sites`.

    model: an engine (or a HookedTransformer / TransformerBridge / nnsight model).
    clean_tokens, corrupted_tokens: [batch, pos] (same shape; right-padded rows give `lengths` [batch]);
    metric(logits, prompts) -> one value per row (see Metric); a one-argument metric(logits) still works and
    sees every prompt in one forward (no chunking). Per chunk of chunk_prompts prompts (default:
    prompts_per_chunk, a memory budget): one forward on clean, one forward + backward on corrupted
    (engine.run_with_grads), reading only the needed sites.
    """
    from mechscope.models import as_engine

    engine = as_engine(model)
    if clean_tokens.shape != corrupted_tokens.shape:
        raise BadInput(f"clean {tuple(clean_tokens.shape)} and corrupted {tuple(corrupted_tokens.shape)} tokens differ "
                       f"in shape; pair prompts of the same token length")
    cfg = engine.cfg
    n, seq = clean_tokens.shape
    star = atp_star and "qkv" in sites
    suffixes = _hook_suffixes(cfg, sites) + (["attn.hook_pattern"] if star else [])
    names = [f"blocks.{layer}.{s}" for layer in range(cfg.n_layers) for s in suffixes]
    engine.require(names, "attribution patching")
    chunk = chunk_prompts or prompts_per_chunk(cfg, seq)
    if _positional_args(metric) < 2:  # metric(logits) as before chunking: it sees the whole prompt set at once
        chunk, whole = n, metric
        metric = lambda logits, rows: whole(logits)  # noqa: E731
    parts = []
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(n, start + chunk))  # on the CPU: indexes tensors on any device
        parts.append(_chunk_estimates(engine, clean_tokens[start:start + chunk], corrupted_tokens[start:start + chunk],
                                      lambda logits, rows=rows: metric(logits, rows), sites, names, star))
    per_prompt = {key: torch.cat([part[0][key] for part in parts]) for key in parts[0][0]}   # [n, layers, ...]
    clean_values, corrupted_values = (torch.cat([part[i] for part in parts]) for i in (1, 2))
    if lengths is not None:  # padding positions are no cells of that prompt
        pad = torch.arange(seq)[None] >= lengths.cpu()[:, None]                              # [n, pos]
        for key, value in per_prompt.items():
            if key in BY_POSITION:
                view = pad.view(n, 1, seq, *[1] * (value.ndim - 3))
                per_prompt[key] = value.masked_fill(view, float("nan"))
    scores = {key: value.nanmean(0) for key, value in per_prompt.items()}
    return AttributionResult(scores=scores, per_prompt=per_prompt, clean=clean_values, corrupted=corrupted_values,
                             atp_star=star, meta={"sites": list(sites), "n_prompts": n, "engine": engine.name})


def _chunk_estimates(engine, clean_tokens, corrupted_tokens, metric, sites, names, star):
    """AtP of one chunk of prompts [chunk, pos]; metric: logits -> [chunk].
    -> ({name: [chunk, layers, ...]}, clean metric [chunk], corrupted metric [chunk]), float32 on the CPU."""
    cfg = engine.cfg
    extra_clean, extra_corrupted = _star_extras(engine, clean_tokens, corrupted_tokens) if star else ({}, {})
    with torch.no_grad():
        clean_logits, clean_acts = engine.run(clean_tokens, read=names)
        clean_values = metric(clean_logits).float()
    corrupted_values, corrupted, grads = engine.run_with_grads(corrupted_tokens, metric, read=names)
    clean_acts, corrupted = {**clean_acts, **extra_clean}, {**corrupted, **extra_corrupted}

    def atp(name):  # [batch, pos, ...] per-cell estimate, summed over the last (feature) axis
        return ((clean_acts[name] - corrupted[name]) * grads[name]).float().sum(-1)

    per_layer: dict[str, list[torch.Tensor]] = {}
    for layer in range(cfg.n_layers):
        block = f"blocks.{layer}."
        found = {}
        if "resid" in sites:
            found["resid_pre"] = atp(block + "hook_resid_pre")
        if "attn_out" in sites:
            found["attn_out"] = atp(block + "hook_attn_out")
        if "mlp_out" in sites and not cfg.attn_only:
            found["mlp_out"] = atp(block + "hook_mlp_out")
        if "heads" in sites:
            found["head_out_by_pos"] = atp(block + "attn.hook_z")
            found["head_out"] = found["head_out_by_pos"].sum(1)
        if "qkv" in sites:
            for c in "qkv":
                found[f"head_{c}_by_pos"] = atp(block + f"attn.hook_{c}")
                found[f"head_{c}"] = found[f"head_{c}_by_pos"].sum(1)
            if star:
                found.update({k: v.float() for k, v in _qk_star(engine, layer, clean_acts, corrupted, grads).items()})
        if "neurons" in sites and not cfg.attn_only:
            name = block + "mlp.hook_post"
            found["neurons"] = ((clean_acts[name] - corrupted[name]) * grads[name]).float().sum(1)
        for key, value in found.items():
            per_layer.setdefault(key, []).append(value.detach())
    per_prompt = {key: torch.stack(values, 1).cpu() for key, values in per_layer.items()}
    return per_prompt, clean_values.cpu(), corrupted_values.float().cpu()


# ------------------------------------------------------------------------------------------- exact patching
# score name -> (patching.patch_sweep component, by_position)
EXACT = {"resid_pre": ("resid_pre", True), "attn_out": ("attn_out", True), "mlp_out": ("mlp_out", True),
         "head_out": ("z", False), "head_out_by_pos": ("z", True), "head_q": ("q", False),
         "head_q_by_pos": ("q", True), "head_k": ("k", False), "head_k_by_pos": ("k", True),
         "head_v": ("v", False), "head_v_by_pos": ("v", True)}


def exact_effects(model, clean_tokens: torch.Tensor, corrupted_tokens: torch.Tensor, metric,
                  score_names: Sequence[str], lengths: torch.Tensor | None = None,
                  per_prompt: bool = False) -> dict[str, torch.Tensor]:
    """Exact metric(corrupted + clean patch) - metric(corrupted) for the named score grids (not neurons),
    shaped like the AtP scores, from the exact sweep `patching.patch_sweep` (metric: a `patching.Metric`).

    Mean over prompts, or per_prompt=True: [n_prompts, *shape] (NaN at a prompt's padding positions, as in
    AttributionResult.per_prompt). Mean: a padding cell counts as missing (NaN-aware mean).
    """
    from mechscope.techniques.patching import patch_sweep

    out = {}
    for name in [n for n in score_names if n in EXACT]:
        component, by_position = EXACT[name]
        result = patch_sweep(model, clean_tokens, corrupted_tokens, component, metric, mode="denoise",
                             by_position=by_position, lengths=lengths)
        effect = result.effect_per_prompt(normalise=False)
        effect = effect.transpose(2, 3) if result.axes == ("layer", "head", "pos") else effect
        out[name] = effect if per_prompt else effect.nanmean(0)
    return out


@torch.no_grad()
def exact_neuron_effects(model, clean_tokens: torch.Tensor, corrupted_tokens: torch.Tensor, metric,
                         neurons: Sequence[tuple[int, int]], lengths: torch.Tensor | None = None,
                         per_prompt: bool = False) -> torch.Tensor:
    """Exact effect of patching each (layer, neuron)'s clean hook_post (all positions) into the corrupted run;
    metric: a `patching.Metric`. One batched forward (engine.run with edits), one row block per neuron ->
    [len(neurons)] mean over prompts, or [len(neurons), n_prompts] with per_prompt."""
    from mechscope.models import as_engine

    engine = as_engine(model)
    n, seq = corrupted_tokens.shape
    read = torch.full((n,), seq - 1, device=corrupted_tokens.device) if lengths is None else lengths - 1
    rows = len(neurons)
    names = sorted({f"blocks.{layer}.mlp.hook_post" for layer, _ in neurons})
    engine.require(names, "patching neurons")
    prompt = torch.arange(n, device=corrupted_tokens.device)
    clean_logits, clean_acts = engine.run(clean_tokens, read=names, positions=read)
    base_logits, _ = engine.run(corrupted_tokens, positions=read)
    clean_logits = clean_logits.float()
    base = metric(base_logits.float(), prompt, clean_logits)

    def patch(name):  # post: [rows * n, pos, d_mlp]; row i*n + j = neuron i on prompt j
        layer = int(name.split(".")[1])
        mask = torch.zeros(rows, 1, 1, clean_acts[name].shape[-1], dtype=torch.bool, device=corrupted_tokens.device)
        for i, (neuron_layer, unit) in enumerate(neurons):
            mask[i, ..., unit] = neuron_layer == layer
        return name, lambda post: torch.where(mask, clean_acts[name][None], post.unflatten(0, (rows, n))
                                              ).flatten(0, 1)

    logits, _ = engine.run(corrupted_tokens.repeat(rows, 1), edits=[patch(name) for name in names],
                           positions=read.repeat(rows))
    effects = metric(logits.float(), prompt.repeat(rows), clean_logits).view(rows, n) - base
    return effects.cpu() if per_prompt else effects.mean(1).cpu()


def agreement(estimate: torch.Tensor, exact: torch.Tensor, k: int = 10) -> dict:
    """Pearson r over all cells and the overlap of the top-k cells by |effect| (fraction of k); cells that
    are NaN in either (a prompt's padding) are left out."""
    a, b = estimate.flatten().double(), exact.flatten().double()
    keep = ~(a.isnan() | b.isnan())
    a, b = a[keep], b[keep]
    k = min(k, a.numel())
    r = torch.corrcoef(torch.stack([a, b]))[0, 1].item() if a.numel() > 1 else float("nan")
    top_a, top_b = set(a.abs().topk(k).indices.tolist()), set(b.abs().topk(k).indices.tolist())
    return {"pearson_r": r, "top_k": k, "top_k_overlap": len(top_a & top_b) / max(k, 1),
            "max_abs_error": (a - b).abs().max().item() if a.numel() else float("nan")}


def agreement_over_prompts(estimate: torch.Tensor, exact: torch.Tensor, k: int = 10, seed: int = 0,
                           groups=None) -> dict:
    """Agreement of AtP with exact patching on each prompt: estimate, exact [n_prompts, *cells] ->
    {pearson_r, top_k_overlap: {mean, ci_low, ci_high, median}, n_prompts} over prompts (95% interval,
    resampling `groups` [n_prompts] when given)."""
    from mechscope import stats

    rows = [agreement(a, b, k) for a, b in zip(estimate, exact)]
    out = {}
    for key in ("pearson_r", "top_k_overlap"):
        values = torch.tensor([row[key] for row in rows], dtype=torch.float32)
        mean, low, high = stats.interval(values[:, None], seed=seed, groups=groups)
        out[key] = {"mean": mean.item(), "ci_low": low.item(), "ci_high": high.item(),
                    "median": values.nanmedian().item()}
    return dict(out, top_k=rows[0]["top_k"] if rows else k, n_prompts=len(rows))

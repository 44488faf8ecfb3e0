"""What SAE features respond to and what they do: top features at a position, max-activating contexts over a
corpus (with examples from lower activation quantiles), and each feature's direct effect on the logits.

Top features (`top_features`): over a prompt set, at one position per prompt (negative = from the end),
each feature's mean activation with a 95% bootstrap interval over prompts, the fraction of prompts it is
active on and of prompts where it is among that prompt's top k, and the ranking's stability over
bootstrap resamples of the prompts (`stats.rank_stability`).

Max-activating search (`max_activating`): token rows are run in batches; for each chosen feature the k
largest activations are kept incrementally (one top-k over [kept + this batch's own top k] per batch, on the
activations' device: only the kept entries reach the CPU), with the
count and sum of its activations (density, mean), and a uniform sample of its active positions (the
active positions with the smallest random keys, kept the same way), from which `quantile_examples`
draws examples in activation-quantile bands (0-25%, 25-50%, 50-75%, 75-100% of the feature's active
values): a feature that looks clean at its top often fires on other things lower down. Special-token
positions never count. `contexts` re-reads a window of tokens around each example with the feature's
activation at every token.

Logit effect (`logit_effects`): the feature's decoder direction in the residual stream (W_dec[f], through
W_out / W_O for MLP-neuron and per-head sites) read out directly through the final norm, linearised at
the final norm's mean scale on the corpus (`final_scale`; frozen scale, as DLA does) and the
unembedding: which next tokens writing this feature pushes up and down. It ignores every later layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mechscope.engines.base import unembed_float
from mechscope.techniques import sae as saes

BANDS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))


# ------------------------------------------------------------------------------------- top features
@torch.no_grad()
def acts_at(engine, sae, rows: list[torch.Tensor], positions: list[int], batch_size: int = 64) -> torch.Tensor:
    """Feature activations of each prompt at its own position. rows: n x [seq_i] -> [n, d_sae] (CPU)."""
    from mechscope import tasks

    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        tokens = tasks.padded(engine, chunk)[0].to(engine.cfg.device)   # later positions cannot change earlier ones
        f = saes.feature_acts(engine, sae, tokens)
        pos = torch.tensor(positions[start:start + batch_size], device=f.device)
        out.append(f[torch.arange(len(chunk), device=f.device), pos].float().cpu())
    return torch.cat(out)


def top_features(engine, sae, rows: list[torch.Tensor], positions: list[int], k: int = 10, seed: int = 0,
                 groups=None) -> dict:
    """The k features with the largest mean activation at each prompt's position (see the module docstring).
    rows: n x [seq_i] token ids; positions: n indices; groups: [n] the unit intervals resample (a template)
    -> {features: [{feature, mean, ci, active_fraction,
    top_k_fraction, per_prompt}], rank_stability: stats.rank_stability of the ranking over prompts}."""
    from mechscope import stats

    f = acts_at(engine, sae, rows, positions)                     # [n, d_sae]
    k = min(k, f.shape[1])
    mean, low, high = stats.interval(f, seed=seed, groups=groups)
    top = mean.topk(k).indices
    in_top = torch.zeros_like(f, dtype=torch.bool).scatter_(1, f.topk(k, dim=1).indices, True) & (f > 0)
    stability = stats.rank_stability(f, k=k, by="value", seed=seed, groups=groups)
    stability.pop("in_top_k_frequency")
    features = [{"feature": int(i), "mean": float(mean[i]), "ci": (float(low[i]), float(high[i])),
                 "active_fraction": float((f[:, i] > 0).float().mean()),
                 "top_k_fraction": float(in_top[:, i].float().mean()), "per_prompt": f[:, i].tolist()}
                for i in top.tolist()]
    return {"features": features, "rank_stability": stability}


# ------------------------------------------------------------------------------- max-activating search
@dataclass
class SearchResult:
    """Per chosen feature ([n_features, ...]); an index is row * seq + position into the searched rows."""
    features: list[int]
    top_values: torch.Tensor        # [F, k] largest activations, descending (0 where fewer were active)
    top_index: torch.Tensor         # [F, k]
    count: torch.Tensor             # [F] active positions
    total: torch.Tensor             # [F] sum of activations
    sample_values: torch.Tensor     # [F, n_sample] a uniform sample of active positions (0 = empty slot)
    sample_index: torch.Tensor      # [F, n_sample]
    n_tokens: int                   # non-special positions searched
    seq_len: int


def _keep_top(values: torch.Tensor, index: torch.Tensor, new_values: torch.Tensor, new_index: torch.Tensor,
              k: int, keys: torch.Tensor | None = None, new_keys: torch.Tensor | None = None):
    """Merge [F, k] kept entries with [F, m] new ones, keeping the k largest by value (or by key): the new ones'
    own top k first, so that nothing [F, k + m] is built."""
    by = new_values if keys is None else new_keys
    best = by.topk(min(k, by.shape[1]), dim=1).indices
    all_values = torch.cat([values, new_values.gather(1, best)], 1)
    all_index = torch.cat([index, new_index.gather(1, best)], 1)
    if keys is None:
        best = all_values.topk(k, dim=1)
        return best.values, all_index.gather(1, best.indices)
    all_keys = torch.cat([keys, new_keys.gather(1, best)], 1)
    best = all_keys.topk(k, dim=1)
    return all_values.gather(1, best.indices), all_index.gather(1, best.indices), best.values


@torch.no_grad()
def max_activating(engine, sae, rows: torch.Tensor, features: list[int] | None = None, k: int = 20,
                   n_sample: int = 256, batch_size: int = 64, seed: int = 0) -> SearchResult:
    """The search over rows [n, seq] (see the module docstring); features=None searches all d_sae. It runs where
    the activations are (the sampling keys come from a generator there: the same sample for a seed on one
    device); only the kept [F, k] and [F, n_sample] entries come to the CPU, at the end."""
    from mechscope.progress import progress

    device = engine.cfg.device
    feats = torch.arange(sae.cfg.d_sae) if features is None else torch.tensor(features)
    n_f, seq = len(feats), rows.shape[1]
    top_v, top_i = torch.zeros(n_f, k, device=device), torch.full((n_f, k), -1, dtype=torch.long, device=device)
    smp_v = torch.zeros(n_f, n_sample, device=device)
    smp_i = torch.full((n_f, n_sample), -1, dtype=torch.long, device=device)
    smp_k = torch.full((n_f, n_sample), -1.0, device=device)      # sampling keys: active ones are in (0, 1]
    count, total = torch.zeros(n_f, device=device), torch.zeros(n_f, device=device)
    gen = torch.Generator(device).manual_seed(seed)
    n_tokens = torch.zeros((), dtype=torch.long, device=device)
    for start in progress(range(0, len(rows), batch_size), desc="max-activating"):
        batch = rows[start:start + batch_size].to(device)
        f = saes.feature_acts(engine, sae, batch)[..., feats.to(device)].float()   # [b, seq, F]
        n_tokens += (~saes.special_mask(engine, batch)).sum()
        values = f.reshape(-1, n_f).T                             # [F, b * seq]
        index = (torch.arange(values.shape[1], device=device) + start * seq).expand(n_f, -1)
        active = values > 0
        count += active.sum(1)
        total += values.sum(1)
        top_v, top_i = _keep_top(top_v, top_i, values, index, k)
        keys = torch.where(active, 1 - torch.rand(values.shape, generator=gen, device=device), -1.0)
        smp_v, smp_i, smp_k = _keep_top(smp_v, smp_i, values, index, n_sample, smp_k, keys)
    return SearchResult(features=feats.tolist(), top_values=top_v.cpu(), top_index=top_i.cpu(), count=count.cpu(),
                        total=total.cpu(), sample_values=torch.where(smp_k > 0, smp_v, 0.0).cpu(),
                        sample_index=smp_i.cpu(), n_tokens=int(n_tokens), seq_len=seq)


def quantile_examples(result: SearchResult, j: int, per_band: int = 3, seed: int = 0) -> list[dict]:
    """Examples of feature result.features[j] from each activation-quantile band of its sampled active values:
    [{band, low, high, examples: [(value, index)]}] (bands with no sampled values are left out)."""
    values, index = result.sample_values[j], result.sample_index[j]
    alive = values > 0
    values, index = values[alive], index[alive]
    if len(values) == 0:
        return []
    gen = torch.Generator().manual_seed(seed + j)
    edges = values.quantile(torch.tensor([b for b, _ in BANDS] + [1.0]))
    out = []
    for b, (lo_q, hi_q) in enumerate(BANDS):
        lo, hi = float(edges[b]), float(edges[b + 1])
        inside = ((values >= lo) & (values <= hi)).nonzero().flatten()
        if len(inside) == 0:
            continue
        pick = inside[torch.randperm(len(inside), generator=gen)[:per_band]]
        out.append({"band": f"{int(lo_q * 100)}-{int(hi_q * 100)}%", "low": lo, "high": hi,
                    "examples": [(float(values[i]), int(index[i])) for i in pick]})
    return out


@torch.no_grad()
def contexts(engine, sae, rows: torch.Tensor, feature: int, indices: list[int], before: int = 8, after: int = 3) -> list[dict]:
    """For each flat index (row * seq + pos) into rows: the tokens of a window around it and the feature's
    activation at each -> [{tokens: [str], values: [float], at: position of the example in the window}]."""
    seq = rows.shape[1]
    where = [divmod(int(i), seq) for i in indices if i >= 0]
    if not where:
        return []
    unique = sorted({r for r, _ in where})
    tokens = rows[unique].to(engine.cfg.device)
    f = saes.feature_acts(engine, sae, tokens)[..., feature].float().cpu()    # [n_unique, seq]
    slot = {r: n for n, r in enumerate(unique)}
    out = []
    for r, p in where:
        lo, hi = max(0, p - before), min(seq, p + after + 1)
        ids = rows[r, lo:hi]
        out.append({"tokens": [engine.to_single_str_token(int(t)) for t in ids],
                    "values": [round(float(v), 4) for v in f[slot[r], lo:hi]], "at": p - lo})
    return out


# -------------------------------------------------------------------------------------- logit effect
@torch.no_grad()
def residual_directions(engine, sae, features: list[int]) -> torch.Tensor:
    """[F, d_model] what one unit of each feature writes to the residual stream at its hook's layer."""
    hook = sae.cfg.metadata.hook_name
    W_dec = sae.W_dec[features].float()                           # [F, d_in]
    layer = int(hook.split(".")[1]) if hook.startswith("blocks.") else None
    if hook.endswith("mlp.hook_post"):
        return W_dec @ engine.W_out(layer).float()
    if hook.endswith("attn.hook_z"):
        W_O = engine.W_O(layer).float()                           # [heads, d_head, d_model]
        return torch.einsum("fhd,hdm->fm", W_dec.view(len(features), *W_O.shape[:2]), W_O)
    return W_dec


@torch.no_grad()
def final_scale(engine, rows: torch.Tensor, n_rows: int = 64) -> float:
    """The final norm's mean divisor over the non-special positions of the first n_rows rows (1 without a norm)."""
    norm = engine.final_norm
    if norm.kind is None:
        return 1.0
    last = f"blocks.{engine.cfg.n_layers - 1}.hook_resid_post"
    tokens = rows[:n_rows].to(engine.cfg.device)
    resid = engine.activations(tokens, [last])[last].float()
    keep = ~saes.special_mask(engine, tokens)
    return float(norm.scale(resid)[..., 0][keep].mean())


@torch.no_grad()
def logit_effects(engine, sae, features: list[int], scale: float) -> torch.Tensor:
    """[F, d_vocab] direct logit effect of one unit of each feature through the final norm at `scale`."""
    norm = engine.final_norm
    d = residual_directions(engine, sae, features).to(engine.W_U.device)
    if norm.centres:
        d = d - d.mean(-1, keepdim=True)
    d = d / scale
    if norm.weight is not None:
        d = d * norm.weight.float()
    return unembed_float(d, engine.W_U)  # no float32 copy of the whole W_U


def top_tokens(engine, effects: torch.Tensor, n: int = 8) -> tuple[list[list[tuple[str, float]]], list[list[tuple[str, float]]]]:
    """effects [F, d_vocab] -> (pushed up, pushed down): per feature the n tokens with the largest / smallest
    effect, special tokens (BOS, PAD, ...: never predicted, their unembedding is untrained) left out."""
    def pick(values, idx):
        return [[(engine.to_single_str_token(int(t)), round(float(v), 4)) for v, t in zip(vr, ir)]
                for vr, ir in zip(values, idx)]
    special = torch.zeros(effects.shape[1], dtype=torch.bool)
    special[sorted(i for i in engine.special_token_ids if i < effects.shape[1])] = True
    up = torch.where(special, float("-inf"), effects).topk(n, dim=1)
    down = torch.where(special, float("inf"), effects).topk(n, dim=1, largest=False)
    return pick(up.values, up.indices), pick(down.values, down.indices)

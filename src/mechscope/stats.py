"""Uncertainty over prompt sets, shared by every technique: bootstrap intervals, sign agreement, rank stability.

A technique returns per-prompt values [n_prompts, *cells] (NaN where a prompt has no value, e.g. a
position past its end); these functions summarise them without assuming normality:

    summary(values)          mean, 95% percentile-bootstrap interval, share of prompts with the mean's sign
    rank_stability(values)   how stable a ranking of items (heads, layers, cells) is across prompts

Resampling is over prompts (the unit that varies), seeded, and vectorised: a resample is a row of
multinomial counts, so all resample means are one matrix product.
"""
from __future__ import annotations

import math

import torch

N_RESAMPLES = 1000
LEVEL = 0.95


def _counts(n: int, n_resamples: int, seed: int) -> torch.Tensor:
    """[n_resamples, n] how often each prompt is drawn in each bootstrap resample."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n, (n_resamples, n), generator=gen)
    return torch.zeros(n_resamples, n).scatter_add_(1, draws, torch.ones(n_resamples, n))


def bootstrap_means(values: torch.Tensor, n_resamples: int = N_RESAMPLES, seed: int = 0) -> torch.Tensor:
    """values [n, *cells] -> [n_resamples, *cells] NaN-aware means of bootstrap resamples of the prompts
    (NaN where a resample drew no prompt with a value)."""
    values = values.detach().float().cpu()
    flat = values.reshape(values.shape[0], -1)
    present = ~flat.isnan()
    counts = _counts(flat.shape[0], n_resamples, seed)
    sums = counts @ torch.where(present, flat, torch.zeros(()))
    totals = counts @ present.float()
    means = sums / totals
    return means.reshape(n_resamples, *values.shape[1:])


def interval(values: torch.Tensor, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = LEVEL):
    """values [n, *cells] -> (mean, low, high), each [*cells]: the NaN-aware mean over prompts and its
    percentile-bootstrap interval (low = high = mean for a single prompt)."""
    values = values.detach().float().cpu()
    mean = values.nanmean(0)
    if values.shape[0] < 2:
        return mean, mean.clone(), mean.clone()
    means = bootstrap_means(values, n_resamples, seed)
    alpha = (1 - level) / 2
    low, high = means.nanquantile(alpha, dim=0), means.nanquantile(1 - alpha, dim=0)
    return mean, low, high


def sign_share(values: torch.Tensor) -> torch.Tensor:
    """values [n, *cells] -> [*cells] share of prompts whose value has the sign of the mean (NaN ignored;
    a zero mean counts zeros)."""
    values = values.detach().float().cpu()
    mean_sign = values.nanmean(0).sign()
    present = ~values.isnan()
    agree = (values.sign() == mean_sign) & present
    return agree.sum(0) / present.sum(0).clamp_min(1)


def standard_error(values: torch.Tensor) -> torch.Tensor:
    """values [n, *cells] -> [*cells] standard error of the NaN-aware mean (0 for one prompt)."""
    values = values.detach().float().cpu()
    n = (~values.isnan()).sum(0)
    mean = values.nanmean(0)
    var = ((values - mean).pow(2).nansum(0) / (n - 1).clamp_min(1))
    return torch.where(n > 1, (var / n).sqrt(), torch.zeros_like(mean))


def _round(x, digits: int):
    x = float(x)
    return round(x, digits) if math.isfinite(x) else None


def summary(values: torch.Tensor, digits: int = 4, n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict:
    """{mean, ci_low, ci_high, sign_share, stderr, n_prompts} for values [n, *cells] (nested lists for cells;
    non-finite entries become None)."""
    mean, low, high = interval(values, n_resamples, seed)
    share = sign_share(values)

    def out(t):
        if t.ndim == 0:
            return _round(t, digits)
        return [out(row) for row in t]
    return {"mean": out(mean), "ci_low": out(low), "ci_high": out(high), "sign_share": out(share),
            "stderr": out(standard_error(values)), "n_prompts": int(values.shape[0])}


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks (0 = smallest) along the last axis; ties broken by position."""
    return x.argsort(-1).argsort(-1).float()


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of a [..., m] with b [m] along the last axis -> [...]."""
    ra, rb = _ranks(a), _ranks(b.expand_as(a))
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1)).clamp_min(1e-12)


def rank_stability(values: torch.Tensor, k: int = 5, by: str = "abs", n_resamples: int = N_RESAMPLES,
                   seed: int = 0) -> dict:
    """How stable the ranking of m items is across prompts. values [n, m] per-prompt scores (no NaN rows
    needed; NaN entries count as 0). by: "abs" ranks by |mean| (effects of either sign), "value" by mean.

    -> {top_k: pooled top-k item indices, top_k_set_frequency: share of bootstrap resamples whose top-k set
    equals the pooled one, in_top_k_frequency: [m] share of resamples where each item is in the top k,
    median_rank_correlation: median over prompts of the Spearman correlation between the prompt's scores
    and the pooled mean, n_prompts}."""
    if by not in ("abs", "value"):
        raise ValueError("by must be 'abs' or 'value'")
    values = torch.nan_to_num(values.detach().float().cpu().reshape(values.shape[0], -1))
    n, m = values.shape
    k = max(1, min(k, m))
    key = (lambda x: x.abs()) if by == "abs" else (lambda x: x)
    pooled = values.mean(0)
    top = key(pooled).topk(k).indices
    means = bootstrap_means(values, n_resamples, seed)                # [R, m]
    resampled_top = key(means).topk(k, dim=-1).indices                # [R, k]
    in_top = torch.zeros(n_resamples, m).scatter_(1, resampled_top, 1.0)
    top_mask = torch.zeros(m).index_fill_(0, top, 1.0)
    same_set = (in_top == top_mask).all(-1).float().mean()
    per_prompt = spearman(key(values), key(pooled)) if n > 1 and m > 1 else torch.ones(n)
    return {"top_k": top.tolist(), "k": k, "by": by, "top_k_set_frequency": round(float(same_set), 4),
            "in_top_k_frequency": [round(float(f), 4) for f in in_top.mean(0)],
            "median_rank_correlation": round(float(per_prompt.median()), 4), "n_prompts": n}


def named_summary(values: torch.Tensor, names: list[str], digits: int = 4, seed: int = 0) -> list[dict]:
    """One row {name, mean, ci_low, ci_high, sign_share, stderr} per item of values [n, m] (m = len(names)),
    in the order given."""
    s = summary(values.reshape(values.shape[0], -1), digits, seed=seed)
    keys = ("mean", "ci_low", "ci_high", "sign_share", "stderr")
    return [{"name": name, **{key: s[key][i] for key in keys}} for i, name in enumerate(names)]


def named_rank_stability(values: torch.Tensor, names: list[str], k: int = 5, by: str = "abs", seed: int = 0) -> dict:
    """rank_stability of values [n, m] with item names in place of indices; in_top_k_frequency is kept for
    the (at most 4k) items that enter the top k most often (bounded output)."""
    out = rank_stability(values, k, by, seed=seed)
    freq = out.pop("in_top_k_frequency")
    out["top_k"] = [names[i] for i in out["top_k"]]
    often = sorted(enumerate(freq), key=lambda x: -x[1])[:4 * out["k"]]
    out["in_top_k_frequency"] = {names[i]: f for i, f in often if f > 0}
    return out


def empirical_p(value: float, controls, larger: str = "abs") -> float | None:
    """Empirical p-value of `value` against a control distribution (controls: n numbers): (1 + the controls at
    least as extreme) / (n + 1), extreme meaning |c| >= |value| (larger="abs"), c >= value ("value") or
    c <= value ("negative"). Exact under the null that the value is one more draw from the controls; the
    smallest p with n controls is 1 / (n + 1) (8 controls can never give p < 0.05). None without controls."""
    c = torch.as_tensor(controls, dtype=torch.float64).flatten()
    c = c[~c.isnan()]
    if len(c) == 0 or not math.isfinite(float(value)):
        return None
    as_extreme = {"abs": c.abs() >= abs(value), "value": c >= value, "negative": c <= value}[larger]
    return float((1 + as_extreme.sum()) / (len(c) + 1))

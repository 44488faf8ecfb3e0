"""Uncertainty over prompt sets, shared by every technique: intervals, p-values, multiplicity, rank stability.

A technique returns per-prompt values [n_prompts, *cells] (NaN where a prompt has no value, e.g. a
position past its end: NaN is "missing" in every function here, never 0). The unit resampled is the
independent one: a prompt, or with `groups` (one key per prompt: a template, an opener, a name pair) a
group of prompts (cluster bootstrap; a group's prompts are drawn together).

    interval(values)                 mean and 95% interval: studentized (bootstrap-t) bootstrap from 5 units
                                     (never narrower than Student's t), Student's t below; none from one unit
    ratio_interval(num, den)         ratio of means and its Fieller interval (unbounded: -inf, inf)
    p_value(values)                  two-sided p of "mean = 0" (Student t on the same standard error)
    adjust(p, "bh" | "holm")         Benjamini-Hochberg (FDR) or Holm (family-wise) adjusted p-values
    summary(values)                  mean, interval, sign share, standard error as JSON-ready lists
    rank_stability(values, k)        how stable the top 1..k of the cells whose interval excludes 0 is

Why these: at the sizes the commands use (5 to 50 prompts) a percentile bootstrap covers 74-92% instead of
95%; the bootstrap-t keeps near-nominal coverage on normal data and much of it on skewed data (run
`python -m mechscope.stats --coverage` for the table). Resampling is seeded and vectorised: a resample is a
row of multinomial counts over units, so all resample sums are one matrix product.
"""
from __future__ import annotations

import math

import torch

N_RESAMPLES = 1000
LEVEL = 0.95
MIN_BOOTSTRAP_UNITS = 5  # below: Student's t (a bootstrap of 2-4 units has too few distinct resamples)
NO_INTERVAL = "no interval from a single prompt (or group): its spread is unknown"


def _counts(n: int, n_resamples: int, seed: int) -> torch.Tensor:
    """[n_resamples, n] how often each unit is drawn in each bootstrap resample."""
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, n, (n_resamples, n), generator=gen)
    return torch.zeros(n_resamples, n).scatter_add_(1, draws, torch.ones(n_resamples, n))


def _membership(groups, n: int) -> torch.Tensor:
    """[n_units, n] one-hot: which prompts each unit (group, or each prompt when groups is None) holds."""
    if groups is None:
        return torch.eye(n)
    if len(groups) != n:
        raise ValueError(f"groups has {len(groups)} keys for {n} prompts")
    keys = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    index = torch.tensor([keys[g] for g in groups])
    return torch.zeros(len(keys), n).scatter_(0, index[None], 1.0)


def _units(values: torch.Tensor, groups=None):
    """values [n, *cells] -> (sums [G, c], counts [G, c], cell shape): per unit, the sum and number of its
    prompts' values per cell (NaN left out). float64: resampled variances expand into sums of squares."""
    values = values.detach().double().cpu()
    flat = values.reshape(values.shape[0], -1)
    present = ~flat.isnan()
    member = _membership(groups, flat.shape[0]).double()
    return member @ torch.where(present, flat, torch.zeros((), dtype=flat.dtype)), member @ present.double(), \
        values.shape[1:]


def _mean_and_se(sums: torch.Tensor, counts: torch.Tensor):
    """Unit sums / counts [..., G, c] -> (mean, standard error, units with a value) [..., c]: the mean over
    prompts and its (cluster-robust, linearised) standard error; with one prompt per unit, s / sqrt(n)."""
    total = counts.sum(-2)
    mean = sums.sum(-2) / total
    residual = sums - mean.unsqueeze(-2) * counts
    k = (counts > 0).float().sum(-2)
    var = k / (k - 1) * residual.pow(2).sum(-2) / total.pow(2)
    return mean, var.clamp_min(0).sqrt(), k


def _t_quantile(q: float, df: torch.Tensor) -> torch.Tensor:
    from scipy.stats import t

    return torch.as_tensor(t.ppf(q, df.clamp_min(1).numpy()), dtype=torch.float64)


def _nan_quantiles(x: torch.Tensor, qs) -> list[torch.Tensor]:
    """x [R, c] -> one [c] per q: the q-quantile over R, NaN left out (linear interpolation, as
    torch.nanquantile; NaN where a column has no value), with one sort for every q."""
    ordered = x.sort(0).values                                 # NaN sort last
    valid = (~x.isnan()).sum(0)
    out = []
    for q in qs:
        pos = q * (valid - 1).clamp_min(0)
        below, above = pos.floor().long(), pos.ceil().long()
        lo, hi = ordered.gather(0, below[None])[0], ordered.gather(0, above[None])[0]
        out.append((lo + (hi - lo) * (pos - below)).masked_fill(valid == 0, float("nan")))
    return out


def bootstrap_means(values: torch.Tensor, n_resamples: int = N_RESAMPLES, seed: int = 0, groups=None) -> torch.Tensor:
    """values [n, *cells] -> [n_resamples, *cells] NaN-aware means of bootstrap resamples of the prompts (of
    whole groups with `groups`; NaN where a resample drew no prompt with a value)."""
    sums, counts, shape = _units(values, groups)
    c = _counts(sums.shape[0], n_resamples, seed)
    c = c.double()
    return ((c @ sums) / (c @ counts)).float().reshape(n_resamples, *shape)


def interval(values: torch.Tensor, n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = LEVEL, groups=None):
    """values [n, *cells] -> (mean, low, high), each [*cells]: the NaN-aware mean over prompts and its interval.
    Units (prompts, or groups): >= 5 studentized bootstrap (the t statistic's distribution over resamples,
    each resample with its own standard error; each bound at least as wide as Student's t's); 2-4 Student's
    t; 1 NaN (no interval, see NO_INTERVAL)."""
    sums, counts, shape = _units(values, groups)
    mean, se, k = _mean_and_se(sums, counts)
    centre = mean
    alpha = (1 - level) / 2
    t_low, t_high = -_t_quantile(1 - alpha, k - 1), _t_quantile(1 - alpha, k - 1)
    if (k >= MIN_BOOTSTRAP_UNITS).any():
        c = _counts(sums.shape[0], n_resamples, seed).double()
        sums = sums - mean.nan_to_num() * counts     # centred (t is shift-invariant): less cancellation below
        mean = mean - mean.nan_to_num()
        # resample sums: one matrix product per moment (the residuals' squares expand into these)
        s, n, units = c @ sums, c @ counts, c @ (counts > 0).double()
        m = s / n
        sq = c @ sums.pow(2) - 2 * m * (c @ (sums * counts)) + m.pow(2) * (c @ counts.pow(2))
        se_star = (units / (units - 1) * sq.clamp_min(0) / n.pow(2)).sqrt()
        t_star = (m - mean) / se_star
        # a resample without spread (one distinct value; rounding leaves ~1e-17) has no t: left out
        t_star = torch.where(se_star > 1e-6 * se, t_star, torch.full_like(t_star, float("nan")))
        boot = k >= MIN_BOOTSTRAP_UNITS
        q_low, q_high = _nan_quantiles(t_star, (alpha, 1 - alpha))
        # each bound the wider of the bootstrap-t's and Student's t's: the bootstrap's t distribution degenerates
        # on data with few distinct values (a rare 0/1 outcome: resamples without it have no spread)
        t_low = torch.where(boot, torch.minimum(q_low.nan_to_num(0.0), t_low), t_low)
        t_high = torch.where(boot, torch.maximum(q_high.nan_to_num(0.0), t_high), t_high)
    low, high = centre - t_high * se, centre - t_low * se
    none = k < 2
    low, high = low.masked_fill(none, float("nan")), high.masked_fill(none, float("nan"))
    return centre.float().reshape(shape), low.float().reshape(shape), high.float().reshape(shape)


def p_value(values: torch.Tensor, groups=None) -> torch.Tensor:
    """values [n, *cells] -> [*cells] two-sided p-value of "the mean is 0": Student's t on the (cluster)
    standard error with units - 1 degrees of freedom (NaN from one unit; a constant cell: 1 at 0, else 0)."""
    from scipy.stats import t

    sums, counts, shape = _units(values, groups)
    mean, se, k = _mean_and_se(sums, counts)
    p = torch.as_tensor(2 * t.sf((mean / se).abs().numpy(), (k - 1).clamp_min(1).numpy()), dtype=torch.float64)
    p = torch.where(se > 0, p, (mean == 0).float())
    return p.masked_fill(k < 2, float("nan")).float().reshape(shape)


def ratio_interval(numerator: torch.Tensor, denominator: torch.Tensor, *, level: float = LEVEL, groups=None):
    """mean(numerator) / mean(denominator) over the prompts that have both (NaN = the prompt lacks the cell)
    and its Fieller interval: the ratios r with |mean(num) - r mean(den)| <= t * se(num - r den), Student's t
    with units - 1 degrees of freedom, (co)variances over units (groups with `groups`). Exact for normal data;
    unbounded (-inf, inf) when the denominator's own interval includes 0; NaN from one unit.
    [n, *cells] -> 3 x [*cells]."""
    numerator, denominator = numerator.detach().float().cpu(), denominator.detach().float().cpu()
    both = ~(numerator.isnan() | denominator.isnan())
    num_sums, counts, shape = _units(numerator.masked_fill(~both, float("nan")), groups)
    den_sums, _, _ = _units(denominator.masked_fill(~both, float("nan")), groups)
    ratio = num_sums.sum(0) / den_sums.sum(0)
    live = (counts > 0).float()
    k = live.sum(0)
    a, b = num_sums.sum(0) / k, den_sums.sum(0) / k               # means of the unit totals
    da, db = (num_sums - a) * live, (den_sums - b) * live
    v_aa, v_bb, v_ab = ((x * y).sum(0) / (k - 1) / k for x, y in ((da, da), (db, db), (da, db)))
    t2 = _t_quantile(1 - (1 - level) / 2, k - 1).pow(2)
    qa, qb, qc = b * b - t2 * v_bb, a * b - t2 * v_ab, a * a - t2 * v_aa
    root = (qb * qb - qa * qc).clamp_min(0).sqrt()
    bounded = qa > 0
    low = torch.where(bounded, (qb - root) / qa, torch.full_like(ratio, -math.inf))
    high = torch.where(bounded, (qb + root) / qa, torch.full_like(ratio, math.inf))
    none = (k < 2) | ratio.isnan()
    low, high = low.masked_fill(none, float("nan")), high.masked_fill(none, float("nan"))
    return ratio.float().reshape(shape), low.float().reshape(shape), high.float().reshape(shape)


def adjust(p: torch.Tensor, method: str = "bh") -> torch.Tensor:
    """Adjusted p-values for a family of tests p [*cells] (NaN = no test, not counted): "bh" Benjamini-Hochberg
    (controls the false discovery rate), "holm" (controls the family-wise error rate). A test is flagged at
    level a when its adjusted p < a; the family's size is the number of finite p."""
    if method not in ("bh", "holm"):
        raise ValueError("method must be 'bh' or 'holm'")
    p = torch.as_tensor(p, dtype=torch.float64)
    flat, out = p.flatten(), torch.full((p.numel(),), float("nan"), dtype=torch.float64)
    live = (~flat.isnan()).nonzero().flatten()
    m = len(live)
    if m == 0:
        return out.reshape(p.shape).float()
    order = flat[live].argsort()
    sorted_p = flat[live][order]
    rank = torch.arange(1, m + 1, dtype=torch.float64)
    if method == "bh":  # p_(i) m / i, made monotone from the largest down
        adj = (sorted_p * m / rank).flip(0).cummin(0).values.flip(0)
    else:               # p_(i) (m - i + 1), made monotone from the smallest up
        adj = (sorted_p * (m - rank + 1)).cummax(0).values
    out[live[order]] = adj.clamp_max(1.0)
    return out.reshape(p.shape).float()


def sign_share(values: torch.Tensor) -> torch.Tensor:
    """values [n, *cells] -> [*cells] share of prompts whose value has the sign of the mean (NaN ignored;
    a zero mean counts zeros). For a ratio of means pass the numerators: the per-prompt terms
    num_i / mean(den) average to the ratio, and their sign is the ratio's when num_i's is mean(num)'s."""
    values = values.detach().float().cpu()
    mean_sign = values.nanmean(0).sign()
    present = ~values.isnan()
    agree = (values.sign() == mean_sign) & present
    return agree.sum(0) / present.sum(0).clamp_min(1)


def standard_error(values: torch.Tensor, groups=None) -> torch.Tensor:
    """values [n, *cells] -> [*cells] standard error of the NaN-aware mean (cluster-robust with groups; NaN
    from one unit: a single prompt says nothing about the spread)."""
    sums, counts, shape = _units(values, groups)
    _, se, k = _mean_and_se(sums, counts)
    return se.masked_fill(k < 2, float("nan")).float().reshape(shape)


def _round(x, digits: int):
    x = float(x)
    return round(x, digits) if math.isfinite(x) else None


def summary(values: torch.Tensor, digits: int = 4, n_resamples: int = N_RESAMPLES, seed: int = 0, groups=None) -> dict:
    """{mean, ci_low, ci_high, sign_share, stderr, n_prompts} for values [n, *cells] (nested lists for cells;
    non-finite entries become None: from a single prompt the interval is None, see NO_INTERVAL), with
    n_groups and the cluster interval when `groups` is given."""
    mean, low, high = interval(values, n_resamples, seed, groups=groups)
    share = sign_share(values)

    def out(t):
        if t.ndim == 0:
            return _round(t, digits)
        return [out(row) for row in t]
    result = {"mean": out(mean), "ci_low": out(low), "ci_high": out(high), "sign_share": out(share),
              "stderr": out(standard_error(values, groups)), "n_prompts": int(values.shape[0])}
    if groups is not None:
        result["n_groups"] = len(set(groups))
    return result


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks (0 = smallest) along the last axis; ties broken by position."""
    return x.argsort(-1).argsort(-1).float()


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of a [..., m] with b [m] along the last axis -> [...]."""
    ra, rb = _ranks(a), _ranks(b.expand_as(a))
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    return (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1)).clamp_min(1e-12)


def rank_stability(values: torch.Tensor, k: int = 5, by: str = "abs", n_resamples: int = N_RESAMPLES,
                   seed: int = 0, only_nonzero: bool = True, groups=None) -> dict:
    """How stable the ranking of m items is across prompts. values [n, m] per-prompt scores (NaN: the prompt
    lacks the item, left out as everywhere here). by: "abs" ranks by |mean| (effects of either sign), "value"
    by mean. only_nonzero: rank only the items whose interval excludes 0 (near-zero items reorder by noise and
    would make any top k look unstable); else every item that is not exactly 0 on every prompt (always-zero
    items tie with each other and would make every prompt's rank correlation look perfect).

    -> {top_k: pooled top-K item indices (K = min(k, items ranked)), k: K, set_frequency_by_k: [K] share of
    bootstrap resamples whose top-j set equals the pooled top-j, for j = 1..K, top_k_set_frequency: its
    last entry, in_top_k_frequency: [m] share of resamples where each item is in the top K,
    median_rank_correlation: median over prompts of the Spearman correlation between the prompt's scores
    and the pooled means over the ranked items it has (None with fewer than 2 ranked items), n_ranked,
    ranked: the rule, n_prompts}. None where nothing can be ranked."""
    if by not in ("abs", "value"):
        raise ValueError("by must be 'abs' or 'value'")
    values = values.detach().float().cpu().reshape(values.shape[0], -1)
    n, m = values.shape
    key = (lambda x: x.abs()) if by == "abs" else (lambda x: x)
    pooled, low, high = interval(values, n_resamples, seed, groups=groups)
    ranked = ((low > 0) | (high < 0)) if only_nonzero else ~pooled.isnan() & (values.nan_to_num() != 0).any(0)
    items = ranked.nonzero().flatten()
    k = min(max(1, k), len(items))
    out = {"top_k": [], "k": k, "by": by, "set_frequency_by_k": [], "top_k_set_frequency": None,
           "in_top_k_frequency": [0.0] * m, "median_rank_correlation": None, "n_ranked": len(items),
           "ranked": "items whose 95% interval excludes 0" if only_nonzero else "items not always 0", "n_prompts": n}
    if k == 0:
        return out
    sub = values[:, items]
    order = key(pooled[items]).argsort(descending=True)                       # ranked items, best first
    means = key(bootstrap_means(sub, n_resamples, seed, groups)).nan_to_num(-math.inf)  # [R, m_ranked]
    resampled = means.argsort(-1, descending=True)[:, :k]
    frequencies = []
    for j in range(1, k + 1):
        in_top = torch.zeros(n_resamples, len(items)).scatter_(1, resampled[:, :j], 1.0)
        mask = torch.zeros(len(items)).index_fill_(0, order[:j], 1.0)
        frequencies.append(round(float((in_top == mask).all(-1).float().mean()), 4))
    in_top_all = torch.zeros(m)
    in_top_all[items] = torch.zeros(n_resamples, len(items)).scatter_(1, resampled, 1.0).mean(0)
    correlations = [spearman(key(row[have]), key(pooled[items][have])) for row in sub
                    for have in [~row.isnan()] if int(have.sum()) > 1]
    out.update(top_k=items[order[:k]].tolist(), set_frequency_by_k=frequencies, top_k_set_frequency=frequencies[-1],
               in_top_k_frequency=[round(float(f), 4) for f in in_top_all],
               median_rank_correlation=round(float(torch.stack(correlations).median()), 4)
               if len(items) > 1 and correlations else None)
    return out


def named_summary(values: torch.Tensor, names: list[str], digits: int = 4, seed: int = 0, groups=None) -> list[dict]:
    """One row {name, mean, ci_low, ci_high, sign_share, stderr} per item of values [n, m] (m = len(names)),
    in the order given."""
    s = summary(values.reshape(values.shape[0], -1), digits, seed=seed, groups=groups)
    keys = ("mean", "ci_low", "ci_high", "sign_share", "stderr")
    return [{"name": name, **{key: s[key][i] for key in keys}} for i, name in enumerate(names)]


def named_rank_stability(values: torch.Tensor, names: list[str], k: int = 5, by: str = "abs", seed: int = 0,
                         groups=None) -> dict:
    """rank_stability of values [n, m] with item names in place of indices; in_top_k_frequency is kept for
    the (at most 4k) items that enter the top k most often (bounded output)."""
    out = rank_stability(values, k, by, seed=seed, groups=groups)
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


def ci_text(low, high, spec: str = ".3f") -> str:
    """"[low, high]" for text output; "[no finite interval]" where a bound is None / NaN / infinite (one prompt;
    a ratio whose denominator may be 0)."""
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "[no finite interval]"
    return f"[{format(low, spec)}, {format(high, spec)}]"


def stability_text(s: dict) -> str:
    """One line for a rank_stability result."""
    if not s["top_k"]:
        return f"rank stability: nothing to rank ({s['n_ranked']} {s['ranked']})"
    by_k = ", ".join(f"top-{j} {f:.0%}" for j, f in enumerate(s["set_frequency_by_k"], 1))
    rho = s["median_rank_correlation"]
    return (f"rank stability over {s['n_ranked']} {s['ranked']}: same set in {by_k} of bootstrap resamples; "
            f"median rank correlation of a prompt to the pooled ranking "
            + ("n/a" if rho is None else f"{rho:.2f}"))


# ---------------------------------------------------------------------------------------- coverage
def simulate_coverage(kind: str, n: int, n_sets: int = 2000, seed: int = 0) -> float:
    """Share of n_sets simulated data sets of n prompts whose 95% interval holds the true value. kind:
    "normal" / "lognormal" (the mean, `interval`), "ratio" (recovery: mean(num) / mean(den), `ratio_interval`,
    with num = 0.6 den + noise, den ~ N(1, 0.5^2)), "clustered" / "clustered-naive" (the mean of n groups of 8
    prompts sharing a group effect, resampled by group / by prompt). Vectorised: the data sets are the cells."""
    gen = torch.Generator().manual_seed(seed)
    if kind in ("normal", "lognormal"):
        z = torch.randn(n, n_sets, generator=gen)
        values, truth = (z, 0.0) if kind == "normal" else (z.exp(), math.exp(0.5))
        _, low, high = interval(values, seed=seed + 1)
    elif kind == "ratio":
        den = 1 + 0.5 * torch.randn(n, n_sets, generator=gen)
        num = 0.6 * den + 0.4 * torch.randn(n, n_sets, generator=gen)
        truth = 0.6
        _, low, high = ratio_interval(num, den)
    elif kind in ("clustered", "clustered-naive"):
        size = 8
        effect = torch.randn(n, 1, n_sets, generator=gen).expand(n, size, n_sets)
        values = (effect + 0.5 * torch.randn(n, size, n_sets, generator=gen)).reshape(n * size, n_sets)
        groups = [g for g in range(n) for _ in range(size)] if kind == "clustered" else None
        truth = 0.0
        _, low, high = interval(values, seed=seed + 1, groups=groups)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return float(((low <= truth) & (truth <= high)).float().mean())


COVERAGE_TABLE = {"normal": (3, 5, 10, 20, 50), "lognormal": (3, 5, 10, 20, 50), "ratio": (8, 32),
                  "clustered": (6, 12), "clustered-naive": (6, 12)}


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mechscope.stats",
                                     description="measure the coverage of mechscope's 95%% intervals by simulation")
    parser.add_argument("--coverage", action="store_true", help="print the coverage table")
    parser.add_argument("--sets", type=int, default=2000, help="simulated data sets per cell (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.coverage:
        parser.print_help()
        return 0
    print(f"coverage of the 95% intervals ({args.sets} simulated data sets per cell; n = prompts, or groups)")
    for kind, sizes in COVERAGE_TABLE.items():
        print(f"  {kind:<16}" + "  ".join(f"n={n}: {simulate_coverage(kind, n, args.sets):.3f}" for n in sizes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

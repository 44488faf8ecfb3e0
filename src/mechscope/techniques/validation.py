"""Circuit validation: faithfulness, necessity / completeness, minimality and falsifiability of a set of components.

The universe is every attention head (and, with ablate_mlps, every MLP layer). With m the metric averaged
over the batch:
- m_clean:        nothing ablated
- m_all_ablated:  every component of the universe ablated (the baseline)
- m_circuit_only: everything in the universe but the circuit ablated
- m_circuit_ablated: only the circuit ablated

faithfulness = (m_circuit_only - m_all_ablated) / (m_clean - m_all_ablated): the fraction of the clean
behaviour the circuit recovers on its own, against the floor (m_all_ablated is the empty circuit: 0 for
it, 1 for the whole universe). faithfulness_vs_corrupted = (m_circuit_only - m_corrupted) / (m_clean -
m_corrupted), against the model run on corrupted prompts (the baseline of patching and of Conmy et al.),
when the task has them. necessity = (m_clean - m_circuit_ablated) / (m_clean - m_all_ablated): how far
ablating only the circuit moves the metric toward the floor (its completeness: 1 = nothing outside the
circuit carries the behaviour). minimality[c] = faithfulness(circuit) - faithfulness(circuit without c).
That misses a backup: a component that only matters once another is gone reads ~0. Wang et al.'s
minimality, F(C \ K) - F(C \ (K + {v})) for some K in C \ {v}, is computed with K found greedily
(`greedy_minimality`: add to K the component that most increases |F(C \ K) - F(C \ (K + {v}))| while it
does): on the bundled model's induction circuit the backup L2H2 reads ~0 with K = {} and shows with
K = {2.1}. Falsifiability: a wrong circuit of the same make-up (given, or drawn outside the circuit) must
score low, or the test cannot fail. The ratios work whether the metric rises (logit diff) or falls (loss)
with the behaviour. Random circuits of the same make-up give the baseline to beat.
All runs (clean, baselines, minimality, random circuits) share one reference forward and batch together.
Intervals: each score is a ratio of means of per-prompt values (e.g. mean(circuit - floor) / mean(clean -
floor)), with stats.ratio_interval's 95% Fieller interval over prompts and a delta-method standard error.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import torch

from mechscope import stats
from mechscope.errors import BadInput
from mechscope.techniques.ablation import Component, ablated_metric, all_heads, all_mlps, group_label


@dataclass
class CircuitValidation:
    """Metric values are batch means; minimality: label -> drop in faithfulness when that component is removed.
    intervals: {"faithfulness" | "necessity": {ci_low, ci_high, stderr}, "minimality": {label: {...}}}, from
    bootstrap resamples of the prompts (each ratio recomputed from the resample's means)."""
    circuit: list[str]
    method: str
    clean: float
    all_ablated: float
    circuit_only: float
    circuit_ablated: float
    faithfulness: float
    necessity: float
    minimality: dict[str, float]
    random_circuits: list[dict] = field(default_factory=list)  # {"circuit", "faithfulness", "necessity"}
    intervals: dict = field(default_factory=dict)
    n_prompts: int = 0
    corrupted: float | None = None                 # the metric on corrupted prompts (None: no corrupted prompts)
    faithfulness_vs_corrupted: dict | None = None  # {value, ci_low, ci_high}
    greedy_minimality: dict = field(default_factory=dict)   # label -> {value, K, ci_low, ci_high, value_without_K}
    falsifiability: dict | None = None             # {circuit, faithfulness, ci_low, ci_high, passes}


def universe(model, ablate_mlps: bool) -> list[Component]:
    """Every component that the faithfulness run may ablate: all heads (+ all MLP layers)."""
    return all_heads(model) + (all_mlps(model) if ablate_mlps else [])


def check_circuit(model, circuit: list[Component], ablate_mlps: bool) -> None:
    for c in circuit:
        if c.kind not in ("head", "mlp"):
            raise BadInput(f"circuit component {c.label!r}: a circuit is made of heads (LAYER.HEAD) and MLP layers "
                           f"(mlpL); split an attention layer into its heads (e.g. {c.layer}.*)")
        if c.kind == "mlp" and not ablate_mlps:
            raise BadInput(f"the circuit names {c.label} but MLPs are not ablated; add --ablate-mlps "
                           f"(or drop the MLPs from the circuit)")


def random_circuits(model, circuit: list[Component], n: int, ablate_mlps: bool, seed: int = 0) -> list[list[Component]]:
    """n random sets with as many heads (and MLPs) as `circuit`, drawn from components outside it."""
    rng = random.Random(seed)
    pools = {kind: [c for c in universe(model, ablate_mlps) if c.kind == kind and c not in circuit]
             for kind in ("head", "mlp")}
    counts = {kind: sum(c.kind == kind for c in circuit) for kind in pools}
    for kind, k in counts.items():
        if n and k > len(pools[kind]):
            raise BadInput(f"too few {kind}s outside the circuit to draw random circuits of the same size "
                           f"(use --random 0)")
    return [[c for kind in pools for c in rng.sample(pools[kind], counts[kind])] for _ in range(n)]


def scores(means: torch.Tensor, n_circuit: int) -> torch.Tensor:
    """Faithfulness, necessity and per-component faithfulness without it, from group means [..., n_groups]
    laid out as validate_circuit runs them (clean, everything, circuit only, circuit ablated, circuit minus
    each component, then (circuit only, circuit ablated) per random circuit). -> [..., n_groups - 2]:
    faithfulness, necessity, n_circuit faithfulness-without values, then (faithfulness, necessity) pairs."""
    clean, baseline = means[..., :1], means[..., 1:2]
    recovered = (means[..., 2:] - baseline) / (clean - baseline)        # [..., n_groups - 2]
    out = recovered.clone()
    out[..., 1] = 1 - recovered[..., 1]                                   # necessity
    out[..., 3 + n_circuit::2] = 1 - recovered[..., 3 + n_circuit::2]     # random circuits' necessity
    return out


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> dict:
    """mean(numerator) / mean(denominator) of per-prompt values [batch]: the value, its 95% Fieller interval
    (stats.ratio_interval) and the delta-method standard error sd(num - r den) / (sqrt(n) |mean(den)|)."""
    value, low, high = stats.ratio_interval(numerator, denominator)
    r = float(value)
    n = len(numerator)
    spread = (numerator - r * denominator).float().std() if n > 1 else torch.tensor(float("nan"))
    stderr = float(spread / (n ** 0.5 * denominator.float().mean().abs()))
    return {"value": r, "ci_low": float(low), "ci_high": float(high), "stderr": stderr}


def _one_minus(ratio: dict) -> dict:
    return {"value": 1 - ratio["value"], "ci_low": 1 - ratio["ci_high"], "ci_high": 1 - ratio["ci_low"],
            "stderr": ratio["stderr"]}


def greedy_minimality(run, circuit: list[Component], seed: int = 0) -> dict:
    """Wang et al.'s minimality of each v in circuit with K found greedily (module docstring).
    run(sets) -> {frozenset S: [batch] metric with everything outside S ablated, "clean": ..., "floor": ...}.
    -> {label: {value: F(C \\ K) - F(C \\ (K + {v})), K: labels, value_without_K: the same with K = {},
    ci_low, ci_high}}."""
    whole = frozenset(circuit)

    def faithfulness(values: dict, S: frozenset) -> float:
        clean, floor = values["clean"].mean(), values["floor"].mean()
        return float((values[S].mean() - floor) / (clean - floor))

    def drop(values: dict, K: frozenset, v: Component) -> float:
        return faithfulness(values, whole - K) - faithfulness(values, whole - K - {v})

    out = {}
    for v in circuit:
        K: frozenset = frozenset()
        first = drop(run([whole - {v}, whole]), K, v)
        best = abs(first)
        while len(K) < len(circuit) - 1:
            options = [K | {u} for u in circuit if u != v and u not in K]
            values = run([whole - k for k in options] + [whole - k - {v} for k in options])
            gains = [abs(drop(values, k, v)) for k in options]
            i = max(range(len(options)), key=gains.__getitem__)
            if gains[i] <= best + 1e-6:
                break
            K, best = options[i], gains[i]
        values = run([whole - K, whole - K - {v}])
        result = _ratio(values[whole - K] - values[whole - K - {v}], values["clean"] - values["floor"])
        result.pop("stderr")
        out[v.label] = {**result, "K": [c.label for c in circuit if c in K], "value_without_K": first}
    return out


def validate_circuit(model, tokens, circuit: list[Component], metric: Callable[[torch.Tensor], torch.Tensor],
                     method: str = "mean", ablate_mlps: bool = False, n_random: int = 0, seed: int = 0,
                     corrupted_values: torch.Tensor | None = None, wrong_circuit: list[Component] | None = None,
                     **kwargs) -> CircuitValidation:
    """Faithfulness, necessity, minimality (K = {} and greedy K) and falsifiability of `circuit` on tokens
    ([batch, seq] or rows [seq_i]) under `metric` ([batch]), with 95% bootstrap intervals over the prompts.
    corrupted_values: [batch] the metric on the prompts' corrupted twins (for faithfulness_vs_corrupted);
    wrong_circuit: the known-wrong circuit of the falsifiability check (default: one drawn like the random
    circuits, seed + 1; none when nothing is left outside the circuit).

    kwargs go to `ablated_metric` (reference, donors, per_position, rows_per_forward, skip_bos).
    """
    check_circuit(model, circuit, ablate_mlps)
    everything = universe(model, ablate_mlps)

    def without(keep: list[Component]) -> list[Component]:
        return [c for c in everything if c not in keep]

    randoms = random_circuits(model, circuit, n_random, ablate_mlps, seed)
    groups = [[], everything, without(circuit), list(circuit)]
    groups += [without([k for k in circuit if k != c]) for c in circuit]
    groups += [g for r in randoms for g in (without(r), r)]
    values = ablated_metric(model, tokens, groups, metric, method, seed=seed, **kwargs)   # [n_groups, batch]
    means = values.mean(1)
    clean, baseline = float(means[0]), float(means[1])
    if abs(clean - baseline) < 1e-6 * max(1.0, abs(clean)):
        raise BadInput(f"ablating every component leaves the metric unchanged ({clean:.4g}); faithfulness is "
                       f"undefined: pick a task the model does, or another ablation method")
    k = len(circuit)
    point = scores(means, k).tolist()
    faithful, necessity = point[0], point[1]
    gap = values[0] - values[1]                                   # [batch] clean - floor, every ratio's denominator
    ratios = [_ratio(values[2] - values[1], gap), _one_minus(_ratio(values[3] - values[1], gap))]
    ratios += [_ratio(values[2] - values[4 + i], gap) for i in range(k)]    # minimality: F(C) - F(C \ {c})

    def interval(i: int) -> dict:
        return {key: ratios[i][key] for key in ("ci_low", "ci_high", "stderr")}

    random_rows = [{"circuit": group_label(r), "faithfulness": point[2 + k + 2 * j],
                    "necessity": point[3 + k + 2 * j]} for j, r in enumerate(randoms)]

    cache = {"clean": values[0], "floor": values[1], frozenset(circuit): values[2]}

    def run(sets) -> dict:
        """The metric [batch] with everything outside each set ablated (cached; one forward for the new ones)."""
        new = list(dict.fromkeys(S for S in sets if S not in cache))
        if new:
            got = ablated_metric(model, tokens, [without(list(S)) for S in new], metric, method, seed=seed, **kwargs)
            cache.update(zip(new, got))
        return cache

    if wrong_circuit is None and len(circuit) and all(
            sum(c.kind == kind for c in universe(model, ablate_mlps) if c not in circuit) >= sum(c.kind == kind for c in circuit)
            for kind in ("head", "mlp")):
        wrong_circuit = random_circuits(model, circuit, 1, ablate_mlps, seed + 1)[0]
    falsifiability = None
    if wrong_circuit:
        wrong = frozenset(wrong_circuit)
        got = run([wrong])
        f = _ratio(got[wrong] - got["floor"], got["clean"] - got["floor"])
        falsifiability = {"circuit": [c.label for c in wrong_circuit], "faithfulness": f["value"],
                          "ci_low": f["ci_low"], "ci_high": f["ci_high"],
                          "passes": f["ci_high"] < ratios[0]["ci_low"]}
    vs_corrupted, corrupted = None, None
    if corrupted_values is not None:
        corrupted = float(corrupted_values.float().mean())
        corrupted_values = corrupted_values.float().to(values.device)
        vs_corrupted = _ratio(values[2] - corrupted_values, values[0] - corrupted_values)
        vs_corrupted.pop("stderr")
    return CircuitValidation(
        circuit=[c.label for c in circuit], method=method, clean=clean, all_ablated=baseline,
        circuit_only=float(means[2]), circuit_ablated=float(means[3]), faithfulness=faithful, necessity=necessity,
        minimality={c.label: faithful - f for c, f in zip(circuit, point[2:2 + k])}, random_circuits=random_rows,
        intervals={"faithfulness": interval(0), "necessity": interval(1),
                   "minimality": {c.label: interval(2 + i) for i, c in enumerate(circuit)}},
        n_prompts=int(values.shape[1]), corrupted=corrupted, faithfulness_vs_corrupted=vs_corrupted,
        greedy_minimality=greedy_minimality(run, circuit, seed) if len(circuit) > 1 else {},
        falsifiability=falsifiability)

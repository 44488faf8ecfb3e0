"""Causal tests of SAE features: steer generation along a feature, ablate features with the error term kept, and
attribute a metric to every (position, feature) with one backward pass, checked by exact ablation.

Steering (`steering_sweep`): strength * W_dec[f] is added at the SAE's hook at every position >= from_position
and at every generated position (the rule of `techniques.steering`, so generation with and without the KV
cache gives the same tokens); with the error term kept that is the same as raising the feature's
activation by `strength`. Controls at the same strengths: other live features' decoder directions and
Gaussian random directions, each rescaled to the feature's decoder norm (n_controls of each). The control
features are matched to the feature (`matched_features`: the n features nearest in activation frequency
and magnitude on the corpus, each drawn once), so a feature is compared with features
that fire as often and as strongly, not with rare weak ones. Effects per prompt: the share of generated
tokens in a target set (until EOS), the next-token log-probability mass of the target set at the prompt's
last position, and a fluency cost (the unsteered model's mean next-token loss on the generated tokens);
means with 95% bootstrap intervals over prompts; for the controls the mean and range over the control
directions and the feature's empirical p-value against them (`stats.empirical_p`: (1 + controls at least
as high) / (n + 1); 8 controls can never give p < 0.05, hence 32 by default in the commands).

Ablation (`ablate`): the features' activations are zeroed at chosen positions and the model runs on
x - decode(f) + decode(f_ablated) (sae-lens's `use_error_term=True`), so nothing else changes. The
control ablates as many other features, each matched to one ablated feature on how often (share of
prompts) and how strongly it is active at those positions (`matched_sets`).

Attribution (`attribute`): the first-order estimate of zero-ablating feature i at position p is
-f[p, i] * dm/df[p, i], with dm/df = the gradient at the hook pulled back through the decoder (from one
forward and one backward: with the error term kept the model is unchanged, so the gradient at the hook is
the model's). Exact for a metric linear in the hook's activation; `exact_ablations` measures the true
effect of the top (position, feature) pairs in batched forwards, and `agreement` compares them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mechscope import stats
from mechscope.techniques import sae as saes
from mechscope.techniques.steering import add_vector_edit

CONTROL_KINDS = ("random_feature", "random_direction")


# ------------------------------------------------------------------------------------------- steering
def add_direction(vector: torch.Tensor, from_position: int = 1):
    """An engine edit adding vector [d_in] at every position >= from_position (and at every KV-cache step)."""
    edit = add_vector_edit(vector, from_position)
    return lambda x: edit(saes.flat_heads(x)).reshape(x.shape)


def feature_profile(acts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """acts [n, positions, d_sae] (0 where a position does not count) -> ([d_sae] share of the n rows with the
    feature active somewhere, [d_sae] its mean activation where active, 0 if never)."""
    on = acts > 0
    frequency = on.any(1).float().mean(0)
    magnitude = (acts * on).sum((0, 1)) / on.sum((0, 1)).clamp_min(1)
    return frequency.cpu(), magnitude.float().cpu()


@torch.no_grad()
def corpus_profile(engine, sae, n_tokens: int = 20_000, context: int = 64, batch_size: int = 64):
    """feature_profile over n_tokens of the bundled corpus, every token its own row (frequency = density),
    BOS excluded; the rows of saes.live_features, so live = frequency > 0."""
    rows = saes.corpus_rows(engine, n_tokens, min(context, engine.cfg.n_ctx), seed=12345)
    count, total, tokens = torch.zeros(sae.cfg.d_sae), torch.zeros(sae.cfg.d_sae), 0
    for batch in rows.split(batch_size):
        f = saes.feature_acts(engine, sae, batch.to(engine.cfg.device))[:, 1:].flatten(0, 1).float().cpu()
        count += (f > 0).sum(0)
        total += f.sum(0)
        tokens += len(f)
    return count / tokens, total / count.clamp_min(1)


def matched_features(frequency: torch.Tensor, magnitude: torch.Tensor, feature: int, n: int,
                     exclude: list[int] = (), seed: int = 0) -> list[int]:
    """The n features (fewer if fewer are active) nearest to `feature` in activation frequency and magnitude
    (distance |log frequency ratio| + |log magnitude ratio|), each once, among the features ever active and
    not in exclude, in random order (seeded). frequency, magnitude: [d_sae] (feature_profile)."""
    gen = torch.Generator().manual_seed(seed)
    eligible = frequency > 0
    eligible[feature] = False
    eligible[torch.tensor(list(exclude), dtype=torch.long)] = False
    log_freq, log_mag = frequency.clamp_min(1e-8).log(), magnitude.clamp_min(1e-8).log()
    distance = (log_freq - log_freq[feature]).abs() + (log_mag - log_mag[feature]).abs()
    candidates = eligible.nonzero().flatten()
    pool = candidates[distance[candidates].argsort()[:n]]
    return pool[torch.randperm(len(pool), generator=gen)].tolist()


def matched_sets(frequency: torch.Tensor, magnitude: torch.Tensor, features: list[int], n_sets: int,
                 seed: int = 0) -> list[list[int]]:
    """n_sets control sets for ablating `features` together: set i holds, for each feature, its i-th matched
    feature (matched_features); no feature appears twice in all the sets, none is one of `features`."""
    used, columns = list(features), []
    for j, feature in enumerate(features):
        partners = matched_features(frequency, magnitude, feature, n_sets, used, seed + j)
        used += partners
        columns.append(partners)
    n = min(map(len, columns), default=0)
    return [[column[i] for column in columns] for i in range(n)]


def control_directions(sae, feature: int, n: int, live: torch.Tensor | None = None, seed: int = 0,
                       profile: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """{"random_feature": [n, d_in], "random_direction": [n, d_in]}, every row with W_dec[feature]'s norm.
    profile: (frequency, magnitude) [d_sae] (corpus_profile): the features are matched to `feature`
    (matched_features); without it, drawn without replacement from live ([d_sae] bool, default all)."""
    gen = torch.Generator().manual_seed(seed)
    W_dec = sae.W_dec.detach().float().cpu()
    norm = W_dec[feature].norm()
    if profile is not None:
        others = W_dec[matched_features(*profile, feature, n, seed=seed)]
    else:
        pool = (torch.ones(len(W_dec), dtype=torch.bool) if live is None else live.clone().cpu())
        pool[feature] = False
        candidates = pool.nonzero().flatten()
        others = W_dec[candidates[torch.randperm(len(candidates), generator=gen)[:n]]]
    gaussian = torch.randn(n, W_dec.shape[1], generator=gen)
    return {kind: d / d.norm(dim=1, keepdim=True) * norm for kind, d in
            (("random_feature", others), ("random_direction", gaussian))}


@torch.no_grad()
def steer_measure(engine, hook: str, rows: list[torch.Tensor], vector: torch.Tensor, target_ids: torch.Tensor,
                  max_new_tokens: int = 10, from_position: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """Generate from each prompt (rows: n x [seq_i], batched by length) with vector added at hook.
    -> per prompt ([n] target share, [n] next-token log P(target set), [n] fluency cost, n lists of new ids)."""
    eos = engine.tokenizer.eos_token_id
    device = engine.cfg.device
    target = target_ids.to(device)
    share, mass, cost = torch.zeros(len(rows)), torch.zeros(len(rows)), torch.zeros(len(rows))
    new: list = [None] * len(rows)
    by_length: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_length.setdefault(len(r), []).append(i)
    edit = [(hook, add_direction(vector.to(device), from_position))]
    for length, idx in by_length.items():
        tokens = torch.stack([rows[i] for i in idx]).to(device)
        out = engine.generate(tokens, edits=edit, max_new_tokens=max_new_tokens)
        generated = out[:, length:]
        alive = (generated == eos).cumsum(1) == 0 if eos is not None else torch.ones_like(generated, dtype=torch.bool)
        hits = (torch.isin(generated, target) & alive).sum(1).float()
        share[idx] = (hits / alive.sum(1).clamp_min(1)).cpu()
        logits = engine.run(tokens, edits=edit)[0][:, -1].float()
        mass[idx] = logits.log_softmax(-1)[:, target].logsumexp(-1).cpu()
        base = engine.run(out)[0]                                 # the unsteered model on the steered text
        loss = F.cross_entropy(base[:, length - 1:-1].transpose(1, 2).float(), generated, reduction="none")
        cost[idx] = ((loss * alive).sum(1) / alive.sum(1).clamp_min(1)).cpu()
        for i, ids in zip(idx, generated.tolist()):              # one transfer per batch, not one per row
            new[i] = ids
    return share, mass, cost, new


@dataclass
class SteeringResult:
    """Per strength: the feature's effects (stats.summary over prompts) and the controls' ({mean, low, high} over
    directions)."""
    feature: int
    strengths: list[float]
    effects: list[dict]                 # [n_strengths] {share, log_mass, fluency_cost}: stats.summary dicts
    controls: list[dict]                # [n_strengths] {kind: {metric: {mean, low, high, values, p_value}}}
    decoder_norm: float
    generations: list = field(default_factory=list)   # [n_strengths][prompt] new token ids (the feature)


def steering_sweep(engine, sae, feature: int, rows: list[torch.Tensor], strengths: list[float], target_ids: list[int],
                   max_new_tokens: int = 10, from_position: int = 1, n_controls: int = 32, live=None,
                   seed: int = 0, profile=None) -> SteeringResult:
    """Steer along W_dec[feature] and the controls at every strength (see the module docstring). profile:
    (frequency, magnitude) [d_sae] to match the control features on (corpus_profile); p_value: the feature's
    empirical p against each kind's control means, higher = stronger (fluency cost: lower)."""
    from mechscope.progress import progress

    hook = sae.cfg.metadata.hook_name
    direction = sae.W_dec[feature].detach().float().cpu()
    controls = control_directions(sae, feature, n_controls, live, seed, profile)
    target = torch.tensor(sorted(set(target_ids)))
    effects, control_effects, generations = [], [], []
    names = ("share", "log_mass", "fluency_cost")
    for s in progress(strengths, desc="sae-steer"):
        *values, new = steer_measure(engine, hook, rows, s * direction, target, max_new_tokens, from_position)
        effects.append({k: stats.summary(v, seed=seed) for k, v in zip(names, values)})
        generations.append(new)
        per_kind = {}
        for kind, dirs in controls.items():
            if s == 0:   # every direction is the zero vector: the controls are the unsteered run
                means = torch.stack([v.mean() for v in values]).expand(len(dirs), 3)
            else:
                means = torch.stack([torch.stack([v.mean() for v in steer_measure(
                    engine, hook, rows, s * d, target, max_new_tokens, from_position)[:3]]) for d in dirs])  # [n, 3]
            per_kind[kind] = {k: {"mean": float(means[:, j].mean()), "low": float(means[:, j].min()),
                                  "high": float(means[:, j].max()), "values": means[:, j].tolist(),
                                  "p_value": stats.empirical_p(float(values[j].mean()), means[:, j],
                                                               "negative" if k == "fluency_cost" else "value")}
                              for j, k in enumerate(names)}
        control_effects.append(per_kind)
    return SteeringResult(feature=feature, strengths=list(strengths), effects=effects, controls=control_effects,
                          decoder_norm=float(direction.norm()), generations=generations)


# ------------------------------------------------------------------------------------------- ablation
def zero_features(features: list[int], positions: torch.Tensor | None = None):
    """An SAE feature edit f [batch, seq, d_sae] -> f with `features` zeroed at positions ([batch, seq] or [seq]
    bool; None = everywhere)."""
    def edit(f):
        cols = torch.tensor(features, device=f.device)
        where = torch.ones(f.shape[:2], dtype=torch.bool, device=f.device) if positions is None else \
            positions.to(f.device).expand(f.shape[:2])
        f[..., cols] = f[..., cols].masked_fill(where[..., None], 0.0)
        return f
    return edit


@torch.no_grad()
def ablate(engine, sae, tokens: torch.Tensor, metric, features: list[int], positions: torch.Tensor | None = None):
    """metric [batch] with `features` zeroed at positions ([batch, seq] bool, None = all; error term kept)
    -> (clean [batch], ablated [batch])."""
    hook = sae.cfg.metadata.hook_name
    clean = metric(engine.run(tokens)[0]).float().cpu()
    edit = saes.splice(sae, tokens, engine, edit=zero_features(features, positions))
    return clean, metric(engine.run(tokens, edits=[(hook, edit)])[0]).float().cpu()


# ---------------------------------------------------------------------------------------- attribution
def attribute(engine, sae, tokens: torch.Tensor, metric) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order estimates of zeroing each feature at each position.
    tokens [batch, seq]; metric(logits) -> [batch] -> (estimates [batch, seq, d_sae], activations [batch, seq, d_sae])."""
    hook = sae.cfg.metadata.hook_name
    _, acts, grads = engine.run_with_grads(tokens, metric, read=[hook])
    x, g = saes.sae_input(sae, acts[hook]).to(sae.dtype), saes.sae_input(sae, grads[hook]).to(sae.dtype)
    with torch.enable_grad():
        f = sae.encode(x).detach().requires_grad_(True)
        (grad_f,) = torch.autograd.grad(sae.decode(f), f, grad_outputs=g)
    keep = ~saes.special_mask(engine, tokens)[..., None]
    return (-(f.detach() * grad_f) * keep).float(), (f.detach() * keep).float()


@torch.no_grad()
def exact_ablations(engine, sae, tokens: torch.Tensor, metric, items: list[tuple[int, int]], chunk: int = 64) -> torch.Tensor:
    """The exact change of metric when feature i is zeroed at position p, for each (p, i) in items, each in its
    own copy of the batch (error term kept) -> [n_items, batch]."""
    hook = sae.cfg.metadata.hook_name
    n = len(tokens)
    clean = metric(engine.run(tokens)[0]).float()
    out = []
    for start in range(0, len(items), chunk):
        part = items[start:start + chunk]
        batch = tokens.repeat(len(part), 1)                      # item j occupies rows j*n .. j*n + n - 1
        pos = torch.tensor([p for p, _ in part]).repeat_interleave(n).to(tokens.device)
        feat = torch.tensor([i for _, i in part]).repeat_interleave(n).to(tokens.device)

        def edit(f, pos=pos, feat=feat):
            f[torch.arange(len(f), device=f.device), pos, feat] = 0.0
            return f
        value = metric(engine.run(batch, edits=[(hook, saes.splice(sae, batch, engine, edit=edit))])[0]).float()
        out.append((value.view(len(part), n) - clean).cpu())
    return torch.cat(out)


def agreement(estimate: torch.Tensor, exact: torch.Tensor) -> dict:
    """Pearson correlation, sign agreement and the largest |estimate - exact| of [n] estimates vs exact effects."""
    e, x = estimate.double(), exact.double()
    corr = float(torch.corrcoef(torch.stack([e, x]))[0, 1]) if len(e) > 1 and e.std() > 0 and x.std() > 0 else float("nan")
    return {"pearson": corr, "sign_agreement": float((e.sign() == x.sign()).double().mean()),
            "max_abs_error": float((e - x).abs().max()), "n": len(e)}

"""Activation addition: add strength * v to the residual stream at one layer, and measure what it does against
same-norm random directions, on held-out prompts, with its cost to the language model.

v is the mean difference of `blocks.{layer}.hook_resid_pre` between a positive and a negative prompt set (at
each prompt's last position, or averaged over its positions after BOS), or a given direction.

`steering_sweep` measures, for v and for same-norm control directions, at every strength: n isotropic Gaussian
directions, and (given neutral texts) structured ones, `structured_directions`: the difference of the mean
residuals of two random halves of neutral texts, built the way v is built but from no contrast. Residual
streams are anisotropic, so structured directions move the model about twice as much as Gaussians of the
same norm (the bundled model's sentiment vector at strength 2, 10 of each: SD of the controls' logit diff
1.27 vs 0.49, `mechscope steer --strengths 0,2,4`, controls_by_kind); `placement` puts v against the wider of the two kinds (the larger SD) and gives an empirical
p-value. The effects:
- logit_diff: next-token mean(positive word logits) - mean(negative word logits) at each prompt's end;
- positive_rate / negative_rate: sentiment words per generated token in greedy generations (up to EOS);
  the share positive / (positive + negative) is kept too, but it saturates (5 sentiment words among 300
  tokens can read 1.00);
- lm_loss: the mean next-token loss on neutral texts with the same vector added (the side effect), over
  the predictions steering can change: those made from positions >= max(from_position, 1) (the prediction
  made from BOS never sees v when BOS is not steered, and would only dilute the effect).
Every value is kept per prompt (per text), so intervals are over prompts; `placement` puts v's effect in the
distribution of the control directions' effects (z-score, share of controls it beats, empirical p).

Positions under the KV cache: on the first step an edit sees every prompt position, then one new position per
step. The rule here is "add v at every position >= from_position": on a chunk of several positions (the
prompt, or the whole sequence without the cache) v goes to positions >= from_position; a chunk of one
position is a generated token, always past the prompt, so it gets v too. That makes generation with and
without the KV cache give the same tokens, provided prompts have at least 2 tokens and from_position <= the
prompt length. Default from_position=1 leaves BOS (the attention sink) alone.

Everything goes through the engine API (`engine.run` with edits, `engine.generate(edits=...)`), so the same
function steers on the tl, bridge and nnsight engines. (transformer-lens's own `model.generate(...,
fwd_hooks=...)` ignores the hooks, with a warning: see references/pitfalls.md.)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mechscope import tasks
from mechscope.techniques.probing import residuals_at


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


@torch.no_grad()
def text_residuals(model, rows: list[torch.Tensor], layer: int, position: str = "last") -> torch.Tensor:
    """resid_pre of `layer` per text (rows: n x [seq_i]) at its last position, or averaged over its positions
    >= 1 (position "mean"). -> [n, d_model]"""
    if position == "last":
        return residuals_at(model, rows, [len(r) - 1 for r in rows], [hook_name(layer)])[0]
    flat = [(r, p) for r in rows for p in range(1, len(r))]
    per_position = residuals_at(model, [r for r, _ in flat], [p for _, p in flat], [hook_name(layer)])[0]
    owner = torch.tensor([i for i, r in enumerate(rows) for _ in range(1, len(r))])
    sums = torch.zeros(len(rows), per_position.shape[-1]).index_add_(0, owner, per_position)
    return sums / owner.bincount(minlength=len(rows))[:, None]


@torch.no_grad()
def mean_difference(model, positive: list[torch.Tensor], negative: list[torch.Tensor], layer: int,
                    position: str = "last") -> torch.Tensor:
    """mean(resid | positive) - mean(resid | negative) at `hook_resid_pre` of `layer`.
    positive/negative: lists of [seq_i] token ids; position "last" or "mean" (over positions >= 1) -> [d_model]."""
    return (text_residuals(model, positive, layer, position).mean(0)
            - text_residuals(model, negative, layer, position).mean(0)).to(model.cfg.device)


@torch.no_grad()
def structured_directions(model, texts: list[torch.Tensor], layer: int, vector: torch.Tensor, n: int, seed: int = 0,
                          position: str = "last") -> torch.Tensor:
    """n controls built like a contrast vector from texts with no contrast (rows: m >= 2 neutral texts): each the
    mean residual (text_residuals) of a random half of the texts minus that of the other half, with the norm of
    `vector` [d_model]. -> [n, d_model]"""
    residuals = text_residuals(model, texts, layer, position).float().cpu()               # [m, d_model]
    gen = torch.Generator().manual_seed(seed)
    half = len(texts) // 2
    out = []
    for _ in range(n):
        order = torch.randperm(len(texts), generator=gen)
        out.append(residuals[order[:half]].mean(0) - residuals[order[half:2 * half]].mean(0))
    d = torch.stack(out) if out else torch.zeros(0, residuals.shape[-1])
    return (d * (vector.norm().cpu() / d.norm(dim=-1, keepdim=True).clamp_min(1e-12))).to(vector.device, vector.dtype)


def random_directions_like(vector: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """n Gaussian random directions, each with the norm of `vector` [d_model]. -> [n, d_model]"""
    r = torch.randn((n, vector.shape[-1]), generator=torch.Generator().manual_seed(seed)).to(vector.device, vector.dtype)
    return r * (vector.norm() / r.norm(dim=-1, keepdim=True))


def random_direction_like(vector: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """One Gaussian random direction with the norm of `vector`. [d_model]"""
    return random_directions_like(vector, 1, seed)[0]


def add_vector_edit(vector: torch.Tensor, from_position: int = 1):
    """An engine edit adding `vector` ([d_model], or [batch, d_model] one per row) at every position
    >= from_position of a chunk of several positions, and to every one-position chunk (a KV-cache step)."""
    def edit(resid):  # resid: [batch, positions seen this call, d_model]
        v = vector.to(resid.device, resid.dtype)
        v = v[:, None] if v.ndim == 2 else v
        if resid.shape[1] == 1:
            return resid + v
        return torch.cat([resid[:, :from_position], resid[:, from_position:] + v], dim=1)
    return edit


@torch.no_grad()
def generate(model, tokens: torch.Tensor, layer: int, vector: torch.Tensor, max_new_tokens: int = 10,
             from_position: int = 1, use_past_kv_cache: bool = True) -> torch.Tensor:
    """Greedy generation with `vector` ([d_model] or [batch, d_model]) added at `layer`. tokens: [batch, seq]
    (same length, seq >= 2) -> [batch, seq + max_new_tokens] (rows that emit EOS continue with EOS)."""
    from mechscope.models import as_engine

    return as_engine(model).generate(tokens, edits=[(hook_name(layer), add_vector_edit(vector, from_position))],
                                     max_new_tokens=max_new_tokens, use_kv_cache=use_past_kv_cache)


@torch.no_grad()
def steered_logits(model, rows: list[torch.Tensor], layer: int, vectors: torch.Tensor, from_position: int = 1,
                   last_only: bool = True) -> torch.Tensor:
    """Logits with vectors[i] ([n, d_model], or one [d_model] for all) added to row i (rows: n x [seq_i]).
    -> [n, d_vocab] at each row's last token (last_only), else [n, max_seq, d_vocab] (right-padded)."""
    from mechscope.models import as_engine

    engine = as_engine(model)
    tokens = tasks.padded(engine, rows)[0].to(engine.cfg.device)
    last = torch.tensor([len(r) - 1 for r in rows], device=tokens.device)
    logits, _ = engine.run(tokens, edits=[(hook_name(layer), add_vector_edit(vectors, from_position))],
                           positions=last if last_only else None)
    return logits.float()


def next_token_logits(model, rows: list[torch.Tensor], layer: int, vector: torch.Tensor,
                      from_position: int = 1) -> torch.Tensor:
    """Steered logits at each prompt's last position. rows: n x [seq_i] -> [n, d_vocab]."""
    return steered_logits(model, rows, layer, vector, from_position)


def lm_loss(model, rows: list[torch.Tensor], layer: int, vectors: torch.Tensor, from_position: int = 1) -> torch.Tensor:
    """Mean next-token loss (nats) of each text with vectors[i] added (rows: n x [seq_i], 2 + max(from_position, 1)
    tokens) over the predictions steering can change: those made from positions >= max(from_position, 1)
    (the prediction made from BOS, or from any position before from_position, never sees the vector). -> [n]"""
    logits = steered_logits(model, rows, layer, vectors, from_position, last_only=False)
    tokens = tasks.padded(model, rows)[0].to(logits.device)
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")   # [n, seq - 1]
    lengths = torch.tensor([len(r) for r in rows], device=logits.device)
    made_from = torch.arange(loss.shape[1], device=logits.device)          # loss[:, t] is predicted from position t
    mask = (made_from >= max(from_position, 1)) & (made_from < (lengths[:, None] - 1))
    return ((loss * mask).sum(1) / mask.sum(1)).cpu()


def word_counts(new_tokens: torch.Tensor, positive_ids: torch.Tensor, negative_ids: torch.Tensor,
                eos: int | None) -> torch.Tensor:
    """new_tokens: [batch, new] -> [3, batch]: positive words, negative words and tokens generated, each row
    stopping at its first EOS."""
    alive = torch.ones_like(new_tokens, dtype=torch.bool) if eos is None else (new_tokens == eos).cumsum(1) == 0
    positive = (torch.isin(new_tokens, positive_ids) & alive).sum(1)
    negative = (torch.isin(new_tokens, negative_ids) & alive).sum(1)
    return torch.stack([positive, negative, alive.sum(1)])


@dataclass
class SteeringSweep:
    """Per direction (0 = the steering vector, then the control directions, of the kinds in `kinds`), strength
    and prompt: each tensor is [n_directions, n_strengths, n_prompts] (lm_loss: [..., n_texts]). Rates are NaN
    where a prompt generated nothing before EOS, shares where it generated no sentiment word."""
    strengths: list[float]
    vector_norm: float
    logit_diff: torch.Tensor
    positive_words: torch.Tensor       # counts in the generation, up to EOS
    negative_words: torch.Tensor
    generated: torch.Tensor            # tokens generated before EOS
    lm_loss: torch.Tensor
    generations: list = field(default_factory=list)   # [direction][strength][prompt] -> new token ids (to EOS)
    kinds: list = field(default_factory=list)         # [n_directions]: "steer", then "gaussian" / "structured"

    @property
    def n_random(self) -> int:
        """Control directions of every kind."""
        return self.logit_diff.shape[0] - 1

    def kind_of(self) -> list[str]:
        return self.kinds or ["steer"] + ["gaussian"] * self.n_random

    def _per_token(self, counts: torch.Tensor) -> torch.Tensor:
        return counts / self.generated.where(self.generated > 0, torch.tensor(float("nan")))

    @property
    def positive_rate(self) -> torch.Tensor:
        """Positive words per generated token."""
        return self._per_token(self.positive_words)

    @property
    def negative_rate(self) -> torch.Tensor:
        return self._per_token(self.negative_words)

    @property
    def net_rate(self) -> torch.Tensor:
        """(positive - negative words) per generated token."""
        return self._per_token(self.positive_words - self.negative_words)

    @property
    def positive_share(self) -> torch.Tensor:
        """positive / (positive + negative) words of each prompt's generation (saturates; NaN without any)."""
        both = self.positive_words + self.negative_words
        return self.positive_words / both.where(both > 0, torch.tensor(float("nan")))

    def pooled_positive_share(self) -> torch.Tensor:
        """positive / (positive + negative) words pooled over the prompts (NaN without any: no words is not a
        share of 0). [n_directions, n_strengths]"""
        both = (self.positive_words + self.negative_words).sum(-1)
        return self.positive_words.sum(-1) / both.where(both > 0, torch.tensor(float("nan")))

    def placement(self, name: str, kind: str | None = None) -> list[dict]:
        """Per strength: the steering vector's mean (over prompts) of metric `name` against the control
        directions' means of one kind (default: per strength the kind whose means spread widest, the harder
        test) -> {random_mean, random_std, random_min, random_max, z, beats, p_value, control}: z = (steer -
        mean) / std of the controls; beats = share of controls whose mean is below the vector's (above it for
        lm_loss, where lower is better; ties count half); p_value = stats.empirical_p in the same direction."""
        if kind is None:
            kinds = sorted(set(self.kind_of()[1:]))
            by_kind = {k: self.placement(name, k) for k in kinds}
            return [max((by_kind[k][s] for k in kinds), key=_spread, default={})
                    for s in range(len(self.strengths))]
        from mechscope import stats

        means = getattr(self, name).nanmean(-1)                      # [D, S]
        rows = torch.tensor([k == kind for k in self.kind_of()])
        out = []
        for s in range(means.shape[1]):
            steer, rand = means[0, s], means[rows, s]
            if len(rand) == 0:
                out.append({})
                continue
            std = rand.std() if len(rand) > 1 else torch.tensor(float("nan"))
            below = (rand > steer) if name == "lm_loss" else (rand < steer)
            beats = (below.float() + 0.5 * (rand == steer).float()).mean()
            spread = std > 1e-6 * max(1.0, float(rand.abs().max()))   # identical directions (strength 0): no z
            z = (steer - rand.mean()) / std if spread else torch.tensor(float("nan"))
            p = stats.empirical_p(float(steer), rand, "negative" if name == "lm_loss" else "value")
            out.append({"random_mean": float(rand.mean()), "random_std": float(std), "random_min": float(rand.min()),
                        "random_max": float(rand.max()), "z": float(z), "beats": float(beats), "p_value": p,
                        "control": kind})
        return out


def _spread(placement: dict) -> float:
    std = placement.get("random_std")
    return -1.0 if std is None or std != std else std


@torch.no_grad()
def steering_sweep(model, rows: list[torch.Tensor], layer: int, vector: torch.Tensor, strengths: list[float],
                   positive_ids: list[int], negative_ids: list[int], max_new_tokens: int = 10,
                   from_position: int = 1, n_random: int = 10, seed: int = 0,
                   neutral: list[torch.Tensor] | None = None, batch_size: int = 256,
                   structured: torch.Tensor | None = None) -> SteeringSweep:
    """The sweep described in the module docstring. rows: prompts to steer, n x [seq_i] (2+ tokens each);
    vector: [d_model] (on LayerNorm models centred first, and the control directions too, so that every
    direction's norm is the norm the model sees); neutral: texts for the side-effect loss (rows; none: lm_loss
    is empty); structured: [n_structured, d_model] more controls (structured_directions), after the n_random
    Gaussian ones.
    Prompts of one length, all directions and strengths go through `engine.generate` together in batches
    of up to batch_size rows; strength 0 is run once and shared by every direction."""
    from mechscope.models import as_engine

    engine = as_engine(model)
    device = engine.cfg.device
    vector = vector.to(device).float()
    randoms = random_directions_like(vector, n_random, seed)
    extra = structured.to(device).float() if structured is not None else torch.zeros(0, len(vector), device=device)
    randoms = torch.cat([randoms, extra])
    if (engine.cfg.normalization_type or "").startswith("LN"):
        # LayerNorm removes the mean over d_model: only the centred part of a direction acts, and engines that do
        # not centre the residual stream (Hugging Face) would otherwise give random controls a larger real norm
        vector = vector - vector.mean()
        randoms = randoms - randoms.mean(-1, keepdim=True)
        randoms = randoms * (vector.norm() / randoms.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    directions = torch.cat([vector[None], randoms])                                            # [D, d_model]
    kinds = ["steer"] + ["gaussian"] * n_random + ["structured"] * len(extra)
    D, S = len(directions), len(strengths)
    jobs = [(d, s) for s in range(S) for d in range(D) if strengths[s] != 0 or d == 0]
    job_vectors = torch.stack([strengths[s] * directions[d] for d, s in jobs])               # [J, d_model]
    pos_ids, neg_ids = torch.tensor(positive_ids, device=device), torch.tensor(negative_ids, device=device)
    eos = engine.tokenizer.eos_token_id

    def spread(per_job: torch.Tensor) -> torch.Tensor:
        """[J, n] -> [D, S, n], strength-0 values copied to every direction."""
        out = torch.full((D, S, per_job.shape[-1]), float("nan"))
        for j, (d, s) in enumerate(jobs):
            if strengths[s] == 0:
                out[:, s] = per_job[j]
            else:
                out[d, s] = per_job[j]
        return out

    # next-token logit diff at each prompt's end: one forward per batch of (job, prompt) rows
    n = len(rows)
    diffs = []
    for start in range(0, len(jobs) * n, batch_size):
        idx = torch.arange(start, min(start + batch_size, len(jobs) * n))
        logits = steered_logits(engine, [rows[int(i) % n] for i in idx], layer, job_vectors[idx // n], from_position)
        diffs.append((logits[:, pos_ids].mean(1) - logits[:, neg_ids].mean(1)).cpu())
    logit_diff = spread(torch.cat(diffs).view(len(jobs), n))

    # greedy generations: prompts of one length together, every job's vector on its own rows
    counts = torch.zeros(3, len(jobs), n)
    generations = [[[None] * n for _ in range(S)] for _ in range(D)]
    by_length: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_length.setdefault(len(r), []).append(i)
    for length, prompt_idx in by_length.items():
        prompts = torch.stack([rows[i] for i in prompt_idx]).to(device)
        pairs = [(j, i) for j in range(len(jobs)) for i in range(len(prompt_idx))]
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            out = generate(engine, prompts[[i for _, i in chunk]], layer, job_vectors[[j for j, _ in chunk]],
                           max_new_tokens, from_position)[:, length:]
            c = word_counts(out, pos_ids, neg_ids, eos).float().cpu()
            new = out.tolist()                                   # one transfer per batch, not one per row
            for k, (j, i) in enumerate(chunk):
                counts[:, j, prompt_idx[i]] = c[:, k]
                d, s = jobs[j]
                ids = new[k]
                ids = ids[:ids.index(eos)] if eos in ids else ids
                for dd in (range(D) if strengths[s] == 0 else [d]):
                    generations[dd][s][prompt_idx[i]] = ids

    # side effect: loss on neutral texts with each job's vector
    losses = torch.zeros(len(jobs), 0)
    if neutral:
        m = len(neutral)
        per = []
        for start in range(0, len(jobs) * m, batch_size):
            idx = torch.arange(start, min(start + batch_size, len(jobs) * m))
            per.append(lm_loss(engine, [neutral[int(i) % m] for i in idx], layer, job_vectors[idx // m], from_position))
        losses = torch.cat(per).view(len(jobs), m)
    return SteeringSweep(strengths=list(strengths), vector_norm=float(vector.norm()), logit_diff=logit_diff,
                         positive_words=spread(counts[0]), negative_words=spread(counts[1]), generated=spread(counts[2]),
                         lm_loss=spread(losses), generations=generations, kinds=kinds)

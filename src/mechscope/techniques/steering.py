"""Activation addition: add strength * v to the residual stream at one layer while the model generates.

v is the mean difference of `blocks.{layer}.hook_resid_pre` between a positive and a negative prompt
set (at each prompt's last position, or averaged over its positions after BOS), or a given direction.
The control is a random direction of the same norm, swept over the same strengths.

Generation goes through `with model.hooks(fwd_hooks=[...]): model.generate(...)`. transformer-lens
ignores `model.generate(..., fwd_hooks=...)` (it warns and steers nothing).

Positions under the KV cache: on the first step the hook sees every prompt position, then one new
position per step. The rule here is "add v at every position >= from_position": on a chunk of several
positions (the prompt, or the whole sequence without the cache) v goes to positions >= from_position;
a chunk of one position is a generated token, always past the prompt, so it gets v too. That makes
`use_past_kv_cache=True` and `False` generate the same tokens, provided prompts have at least 2 tokens
and from_position <= the prompt length. Default from_position=1 leaves BOS (the attention sink) alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mechscope.techniques.probing import residuals_at, right_padded


def hook_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


@torch.no_grad()
def mean_difference(model, positive: list[torch.Tensor], negative: list[torch.Tensor], layer: int,
                    position: str = "last") -> torch.Tensor:
    """mean(resid | positive) - mean(resid | negative) at `hook_resid_pre` of `layer`.
    positive/negative: lists of [seq_i] token ids; position "last" or "mean" (over positions >= 1) -> [d_model]."""
    def mean_resid(rows):
        if position == "last":
            return residuals_at(model, rows, [len(r) - 1 for r in rows], [hook_name(layer)])[0].mean(0)
        flat = [(r, p) for r in rows for p in range(1, len(r))]
        per_prompt = residuals_at(model, [r for r, _ in flat], [p for _, p in flat], [hook_name(layer)])[0]
        owner = torch.tensor([i for i, r in enumerate(rows) for _ in range(1, len(r))])
        sums = torch.zeros(len(rows), per_prompt.shape[-1]).index_add_(0, owner, per_prompt)
        return (sums / owner.bincount(minlength=len(rows))[:, None]).mean(0)
    return (mean_resid(positive) - mean_resid(negative)).to(model.cfg.device)


def random_direction_like(vector: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A Gaussian random direction with the same norm as `vector`. [d_model]"""
    r = torch.randn(vector.shape, generator=torch.Generator().manual_seed(seed)).to(vector.device, vector.dtype)
    return r * (vector.norm() / r.norm())


def add_vector_hook(vector: torch.Tensor, from_position: int = 1):
    """A hook adding `vector` [d_model] at every position >= from_position (see the module docstring)."""
    def hook(resid, hook):  # resid: [batch, positions seen this call, d_model]
        v = vector.to(resid.device, resid.dtype)
        if resid.shape[1] == 1:  # a KV-cache step: one generated position, past the prompt
            return resid + v
        return torch.cat([resid[:, :from_position], resid[:, from_position:] + v], dim=1)
    return hook


@torch.no_grad()
def generate(model, tokens: torch.Tensor, layer: int, vector: torch.Tensor, max_new_tokens: int = 10,
             from_position: int = 1, use_past_kv_cache: bool = True) -> torch.Tensor:
    """Greedy generation with `vector` added at `layer`. tokens: [batch, seq] (same length, seq >= 2)
    -> [batch, seq + max_new_tokens] (rows that emit EOS are padded with EOS)."""
    with model.hooks(fwd_hooks=[(hook_name(layer), add_vector_hook(vector, from_position))]):
        return model.generate(tokens, max_new_tokens=max_new_tokens, do_sample=False,
                              use_past_kv_cache=use_past_kv_cache, verbose=False)


@torch.no_grad()
def next_token_logits(model, rows: list[torch.Tensor], layer: int, vector: torch.Tensor,
                      from_position: int = 1) -> torch.Tensor:
    """Steered logits at each prompt's last position. rows: n x [seq_i] -> [n, d_vocab]."""
    tokens = right_padded(rows).to(model.cfg.device)
    logits = model.run_with_hooks(tokens, fwd_hooks=[(hook_name(layer), add_vector_hook(vector, from_position))])
    last = torch.tensor([len(r) - 1 for r in rows], device=logits.device)
    return logits[torch.arange(len(rows), device=logits.device), last].float()


@dataclass
class SteeringResult:
    """Effects per strength ([n_strengths] lists) for the steering vector and the random control."""
    strengths: list[float]
    positive_share: list[float]            # positive / (positive + negative) words generated, pooled
    control_positive_share: list[float]
    positive_rate: list[float]             # positive words / all generated tokens
    control_positive_rate: list[float]
    logit_diff: list[float]                # mean(positive word logits) - mean(negative word logits), next position
    control_logit_diff: list[float]
    vector_norm: float
    generations: dict = field(default_factory=dict)  # {"steer"/"control": [strength][prompt] -> new token ids}


def _word_counts(new_tokens: torch.Tensor, positive_ids: torch.Tensor, negative_ids: torch.Tensor, eos: int | None):
    """new_tokens: [batch, new] -> (positive, negative, total) counts, stopping at the first EOS."""
    alive = torch.ones_like(new_tokens, dtype=torch.bool) if eos is None else (new_tokens == eos).cumsum(1) == 0
    pos = (torch.isin(new_tokens, positive_ids) & alive).sum()
    neg = (torch.isin(new_tokens, negative_ids) & alive).sum()
    return pos, neg, alive.sum()


@torch.no_grad()
def measure(model, rows: list[torch.Tensor], layer: int, vector: torch.Tensor, positive_ids: torch.Tensor,
            negative_ids: torch.Tensor, max_new_tokens: int = 10, from_position: int = 1):
    """Generate from each prompt (rows: n x [seq_i], batched by length) with `vector` added.
    -> (positive share, positive rate, mean next-token logit diff, n lists of new token ids)."""
    eos = model.tokenizer.eos_token_id if model.tokenizer is not None else None
    by_length: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_length.setdefault(len(r), []).append(i)
    counts = torch.zeros(3, device=model.cfg.device)
    new = [None] * len(rows)
    for length, idx in by_length.items():
        generated = generate(model, torch.stack([rows[i] for i in idx]).to(model.cfg.device), layer, vector,
                             max_new_tokens, from_position)[:, length:]
        counts += torch.stack(_word_counts(generated, positive_ids, negative_ids, eos))
        for j, i in enumerate(idx):
            new[i] = generated[j].tolist()
    logits = next_token_logits(model, rows, layer, vector, from_position)
    diff = (logits[:, positive_ids].mean(1) - logits[:, negative_ids].mean(1)).mean()
    return counts[0] / (counts[0] + counts[1]).clamp_min(1), counts[0] / counts[2].clamp_min(1), diff, new


def steering_sweep(model, rows: list[torch.Tensor], layer: int, vector: torch.Tensor, strengths: list[float],
                   positive_ids: list[int], negative_ids: list[int], max_new_tokens: int = 10,
                   from_position: int = 1, control_seed: int = 0) -> SteeringResult:
    """`measure` at every strength, for `vector` [d_model] and for a same-norm random direction."""
    pos_ids = torch.tensor(positive_ids, device=model.cfg.device)
    neg_ids = torch.tensor(negative_ids, device=model.cfg.device)
    runs = {}
    for kind, direction in (("steer", vector), ("control", random_direction_like(vector, control_seed))):
        runs[kind] = [measure(model, rows, layer, s * direction, pos_ids, neg_ids, max_new_tokens, from_position)
                      for s in strengths]
    share, rate, diff = (torch.stack([torch.stack([m[k] for m in runs[kind]]) for kind in ("steer", "control")])
                         .float().tolist() for k in range(3))  # one sync per metric: [2, n_strengths]
    return SteeringResult(strengths=list(strengths), positive_share=share[0], control_positive_share=share[1],
                          positive_rate=rate[0], control_positive_rate=rate[1], logit_diff=diff[0],
                          control_logit_diff=diff[1], vector_norm=float(vector.norm()),
                          generations={kind: [m[3] for m in runs[kind]] for kind in runs})

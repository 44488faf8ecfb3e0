"""Attention-head detection: previous-token, induction, duplicate-token and BOS (attention-sink) scores.

All scores come from one batched forward over N random sequences `[BOS, r, r]` (r: `seq_len` tokens
drawn from the non-special vocabulary), caching only `hook_pattern`.

For a destination d in the second copy (positions L+1..2L, with L = len(r)):
- induction score: attention to d - L + 1, the token *after* the previous occurrence of the current token
  (`pattern.diagonal(offset=1 - L)`); offset -L would be the duplicate-token head;
- duplicate-token score: attention to d - L, the previous occurrence of the current token.
The previous-token score averages attention to d - 1 over all d >= 1; the BOS score, attention to
position 0 over all d >= 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

SCORE_NAMES = ("previous_token", "induction", "duplicate_token", "bos")


@dataclass
class HeadScores:
    """Each score tensor is [n_layers, n_heads]."""
    previous_token: torch.Tensor
    induction: torch.Tensor
    duplicate_token: torch.Tensor
    bos: torch.Tensor
    n_sequences: int = 0
    seq_len: int = 0
    meta: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in SCORE_NAMES}

    def top(self, score: str, k: int = 5) -> list[tuple[int, int, float]]:
        """The k heads with the highest `score` as (layer, head, value)."""
        values = getattr(self, score)
        flat = values.flatten().topk(min(k, values.numel()))
        n_heads = values.shape[1]
        return [(int(i) // n_heads, int(i) % n_heads, float(v)) for v, i in zip(flat.values, flat.indices)]


def non_special_token_ids(model) -> torch.Tensor:
    """Ids of every vocabulary token that is not a special token (BOS/EOS/PAD/UNK). [n_tokens]"""
    special = set(getattr(model.tokenizer, "all_special_ids", []) or [])
    return torch.tensor([i for i in range(model.cfg.d_vocab) if i not in special])


def repeated_random_tokens(model, n_sequences: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """[n_sequences, 1 + 2*seq_len] token ids: BOS, r, r with r drawn from non-special tokens."""
    if seq_len < 2 or 1 + 2 * seq_len > model.cfg.n_ctx:
        raise ValueError(f"seq_len must be in 2..{(model.cfg.n_ctx - 1) // 2} for this model's context "
                         f"of {model.cfg.n_ctx}; got {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    pool = non_special_token_ids(model)
    r = pool[torch.randint(0, len(pool), (n_sequences, seq_len), generator=gen)]
    bos = model.tokenizer.bos_token_id if model.tokenizer.bos_token_id is not None else model.tokenizer.eos_token_id
    return torch.cat([torch.full((n_sequences, 1), bos), r, r], dim=1).to(model.cfg.device)


def scores_from_patterns(patterns: torch.Tensor, seq_len: int) -> dict[str, torch.Tensor]:
    """Scores from attention patterns of `[BOS, r, r]` sequences.

    patterns: [n_layers, batch, n_heads, 2L+1, 2L+1] (dest, src) with L = seq_len -> each score [n_layers, n_heads].
    """
    L = seq_len
    second = torch.arange(L + 1, 2 * L + 1)          # destinations in the second copy
    after_dest = torch.arange(1, 2 * L + 1)          # every destination but BOS
    p = patterns.float()
    return {
        "previous_token": p[..., after_dest, after_dest - 1].mean(dim=(1, 3)),
        "induction": p[..., second, second - L + 1].mean(dim=(1, 3)),
        "duplicate_token": p[..., second, second - L].mean(dim=(1, 3)),
        "bos": p[..., after_dest, 0].mean(dim=(1, 3)),
    }


@torch.no_grad()
def head_scores(model, n_sequences: int = 32, seq_len: int = 20, seed: int = 0) -> HeadScores:
    """Every head's previous-token / induction / duplicate-token / BOS score, in one batched forward."""
    tokens = repeated_random_tokens(model, n_sequences, seq_len, seed)
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    patterns = torch.stack([cache["pattern", layer] for layer in range(model.cfg.n_layers)])
    return HeadScores(**scores_from_patterns(patterns, seq_len), n_sequences=n_sequences, seq_len=seq_len,
                      meta={"seed": seed})


@torch.no_grad()
def attention_patterns(model, tokens: torch.Tensor, heads: list[tuple[int, int]]) -> torch.Tensor:
    """Attention of the given (layer, head)s on one prompt. tokens: [1, seq] -> [n_heads, seq (dest), seq (src)]."""
    layers = sorted({layer for layer, _ in heads})
    _, cache = model.run_with_cache(tokens, names_filter=[f"blocks.{layer}.attn.hook_pattern" for layer in layers])
    return torch.stack([cache["pattern", layer][0, head] for layer, head in heads]).float().cpu()

"""Attention-head detection: previous-token, induction, duplicate-token and BOS (attention-sink) scores, and
attention read-outs from chosen query positions to chosen keys over a prompt set.

All scores come from batched forwards over N random sequences `[BOS, r, r]` (r: `seq_len` tokens drawn
from the non-special vocabulary), reading only `attn.hook_pattern`, one value per sequence (so scores get
intervals over the sequences).

For a destination d in the second copy (positions L+1..2L, with L = len(r)):
- induction score: attention to d - L + 1, the token *after* the previous occurrence of the current token
  (`pattern.diagonal(offset=1 - L)`); offset -L would be the duplicate-token head;
- duplicate-token score: attention to d - L, the previous occurrence of the current token.
The previous-token score averages attention to d - 1 over all d >= 1; the BOS score, attention to
position 0 over all d >= 1. Runs through the engine API (transformer-lens, TransformerBridge, nnsight).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

SCORE_NAMES = ("previous_token", "induction", "duplicate_token", "bos")


def _engine(model):
    from mechscope.models import as_engine

    return as_engine(model)


def pattern_sites(model) -> list[str]:
    engine = _engine(model)
    return [f"blocks.{layer}.attn.hook_pattern" for layer in range(engine.cfg.n_layers)]


@dataclass
class HeadScores:
    """Each score tensor is [n_layers, n_heads] (the mean over sequences); per_sequence[score] is
    [n_sequences, n_layers, n_heads]; mean_pattern [n_layers, n_heads, 2L+1, 2L+1] the pattern averaged over
    the sequences (positions align: BOS, r, r)."""
    previous_token: torch.Tensor
    induction: torch.Tensor
    duplicate_token: torch.Tensor
    bos: torch.Tensor
    n_sequences: int = 0
    seq_len: int = 0
    meta: dict = field(default_factory=dict)
    per_sequence: dict = field(default_factory=dict)
    mean_pattern: torch.Tensor | None = None

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
    engine = _engine(model)
    special = engine.special_token_ids
    return torch.tensor([i for i in range(engine.cfg.d_vocab) if i not in special])


def repeated_random_tokens(model, n_sequences: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """[n_sequences, 1 + 2*seq_len] token ids: BOS, r, r with r drawn from non-special tokens."""
    engine = _engine(model)
    if seq_len < 2 or 1 + 2 * seq_len > engine.cfg.n_ctx:
        raise ValueError(f"seq_len must be in 2..{(engine.cfg.n_ctx - 1) // 2} for this model's context "
                         f"of {engine.cfg.n_ctx}; got {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    pool = non_special_token_ids(engine)
    r = pool[torch.randint(0, len(pool), (n_sequences, seq_len), generator=gen)]
    return torch.cat([torch.full((n_sequences, 1), engine.bos_token_id), r, r], dim=1).to(engine.cfg.device)


def per_sequence_scores(patterns: torch.Tensor, seq_len: int) -> dict[str, torch.Tensor]:
    """Scores of each `[BOS, r, r]` sequence. patterns: [n_layers, batch, n_heads, 2L+1, 2L+1] (dest, src)
    with L = seq_len -> each score [batch, n_layers, n_heads]."""
    L = seq_len
    second = torch.arange(L + 1, 2 * L + 1)          # destinations in the second copy
    after_dest = torch.arange(1, 2 * L + 1)          # every destination but BOS
    p = patterns.float()
    scores = {
        "previous_token": p[..., after_dest, after_dest - 1].mean(-1),
        "induction": p[..., second, second - L + 1].mean(-1),
        "duplicate_token": p[..., second, second - L].mean(-1),
        "bos": p[..., after_dest, 0].mean(-1),
    }
    return {name: s.transpose(0, 1) for name, s in scores.items()}


def scores_from_patterns(patterns: torch.Tensor, seq_len: int) -> dict[str, torch.Tensor]:
    """Scores from attention patterns of `[BOS, r, r]` sequences, averaged over them.

    patterns: [n_layers, batch, n_heads, 2L+1, 2L+1] (dest, src) with L = seq_len -> each score [n_layers, n_heads].
    """
    return {name: s.mean(0) for name, s in per_sequence_scores(patterns, seq_len).items()}


@torch.no_grad()
def head_scores(model, n_sequences: int = 32, seq_len: int = 20, seed: int = 0, batch_size: int = 32) -> HeadScores:
    """Every head's previous-token / induction / duplicate-token / BOS score, `batch_size` sequences a forward."""
    engine = _engine(model)
    tokens = repeated_random_tokens(engine, n_sequences, seq_len, seed)
    names = pattern_sites(engine)
    engine.require(names, "head scores")
    per_seq, pattern_sum = [], 0.0
    for start in range(0, n_sequences, batch_size):
        acts = engine.activations(tokens[start:start + batch_size], names)
        patterns = torch.stack([acts[name].float().cpu() for name in names])   # [L, b, H, S, S]
        per_seq.append(per_sequence_scores(patterns, seq_len))
        pattern_sum = pattern_sum + patterns.sum(1)
    per_sequence = {name: torch.cat([p[name] for p in per_seq]) for name in SCORE_NAMES}
    return HeadScores(**{name: s.mean(0) for name, s in per_sequence.items()}, n_sequences=n_sequences,
                      seq_len=seq_len, meta={"seed": seed}, per_sequence=per_sequence,
                      mean_pattern=pattern_sum / n_sequences)


@torch.no_grad()
def attention_patterns(model, tokens: torch.Tensor, heads: list[tuple[int, int]]) -> torch.Tensor:
    """Attention of the given (layer, head)s on one prompt. tokens: [1, seq] -> [n_heads, seq (dest), seq (src)]."""
    engine = _engine(model)
    layers = sorted({layer for layer, _ in heads})
    acts = engine.activations(tokens, [f"blocks.{layer}.attn.hook_pattern" for layer in layers])
    return torch.stack([acts[f"blocks.{layer}.attn.hook_pattern"][0, head] for layer, head in heads]).float().cpu()


@torch.no_grad()
def attention_readout(model, tokens: torch.Tensor, queries, keys: dict, batch_size: int = 64) -> torch.Tensor:
    """Every head's attention from one query position per prompt to named key positions.

    tokens: [n, seq] (right-padded is fine: keys <= queries are real positions); queries: [n] token index;
    keys: {name: [n] token index} -> [n, n_layers, n_heads, n_keys] in the order of `keys`."""
    engine = _engine(model)
    names = pattern_sites(engine)
    engine.require(names, "attention read-outs")
    queries = torch.as_tensor(queries).cpu()
    key_index = torch.stack([torch.as_tensor(v).cpu() for v in keys.values()], -1)    # [n, n_keys]
    out = []
    for start in range(0, len(tokens), batch_size):
        rows = slice(start, start + batch_size)
        acts = engine.activations(tokens[rows], names)
        b = torch.arange(len(tokens[rows]))
        q, k = queries[rows], key_index[rows]
        per_layer = []
        for name in names:
            pattern = acts[name].float().cpu()                                      # [b, H, dest, src]
            from_query = pattern[b, :, q]                                           # [b, H, src]
            per_layer.append(from_query.gather(-1, k[:, None, :].expand(-1, pattern.shape[1], -1)))
        out.append(torch.stack(per_layer, 1))                                       # [b, L, H, n_keys]
    return torch.cat(out)

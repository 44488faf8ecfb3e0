"""Metrics on logits that the techniques share. Every function works on a batch and returns [batch].

logits: [batch, seq, d_vocab] or already-selected [batch, d_vocab]; `pos` picks the position
(an int, or a [batch] tensor of per-row last positions for padded batches).
"""
from __future__ import annotations

import torch


def at_position(logits: torch.Tensor, pos: int | torch.Tensor = -1) -> torch.Tensor:
    """[batch, d_vocab] logits at `pos` (int, or [batch] index per row)."""
    if logits.ndim == 2:
        return logits
    if isinstance(pos, int):
        return logits[:, pos]
    return logits[torch.arange(logits.shape[0], device=logits.device), pos.to(logits.device)]


def logit_diff(logits: torch.Tensor, answer: torch.Tensor | int, wrong: torch.Tensor | int,
               pos: int | torch.Tensor = -1) -> torch.Tensor:
    """logit[answer] - logit[wrong] at `pos`, in float32 (a difference of half-precision logits loses digits).
    answer/wrong: int or [batch] ids -> [batch]."""
    lg = at_position(logits, pos).float()
    rows = torch.arange(lg.shape[0], device=lg.device)
    return lg[rows, torch.as_tensor(answer, device=lg.device)] - lg[rows, torch.as_tensor(wrong, device=lg.device)]


def answer_logit(logits: torch.Tensor, answer: torch.Tensor | int, pos: int | torch.Tensor = -1) -> torch.Tensor:
    """logit[answer] at `pos`, in float32 -> [batch]."""
    lg = at_position(logits, pos).float()
    return lg[torch.arange(lg.shape[0], device=lg.device), torch.as_tensor(answer, device=lg.device)]


def answer_prob(logits: torch.Tensor, answer: torch.Tensor | int, pos: int | torch.Tensor = -1) -> torch.Tensor:
    lg = at_position(logits, pos).float()
    return lg.softmax(-1)[torch.arange(lg.shape[0], device=lg.device), torch.as_tensor(answer, device=lg.device)]


def kl_to_reference(logits: torch.Tensor, reference_logits: torch.Tensor, pos: int | torch.Tensor = -1) -> torch.Tensor:
    """KL(reference || logits) at `pos`, in nats -> [batch]. reference_logits broadcast over the batch."""
    logp = at_position(logits, pos).float().log_softmax(-1)
    ref = at_position(reference_logits, pos).float().log_softmax(-1)
    return (ref.exp() * (ref - logp)).sum(-1)


def normalized(value: torch.Tensor, corrupted: torch.Tensor | float, clean: torch.Tensor | float) -> torch.Tensor:
    """(value - corrupted) / (clean - corrupted): 0 = corrupted behaviour, 1 = clean behaviour."""
    return (value - corrupted) / (clean - corrupted)

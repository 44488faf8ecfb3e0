"""The measurements behind MODEL_CARD.md: IOI, facts, induction (+ its heads and their ablation), sentiment.

`python -m mechscope.toy.card` (or `mechscope model-card [--backend tl|bridge|nnsight]`) prints them; the
tests assert the card's thresholds on the shipped weights, and the technique tests use the heads found here
as ground truth. Everything runs through the engine API, so each engine measures the same card.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from mechscope.techniques.heads import head_scores, repeated_random_tokens
from mechscope.toy import corpus


def _engine(model):
    from mechscope.models import as_engine

    return as_engine(model)


def _next_token_logits(model, prompts: list[str], rows_per_forward: int = 128) -> torch.Tensor:
    """[n_prompts, d_vocab] logits at each prompt's last token (right-padded batches)."""
    from mechscope import tasks

    engine = _engine(model)
    rows = [engine.to_tokens(p)[0] for p in prompts]
    out = []
    for start in range(0, len(rows), rows_per_forward):
        tokens, lengths = tasks.padded(engine, rows[start:start + rows_per_forward])
        out.append(engine.run(tokens, positions=lengths - 1)[0].float().cpu())
    return torch.cat(out)


def _token_id(model, word: str) -> int:
    from mechscope import inputs

    return inputs.single_token(_engine(model), word)


@torch.no_grad()
def ioi(model, n: int = 200, seed: int = 0) -> dict:
    """Top-1 accuracy and mean logit difference (IO - S) on held-out (template, name pair) combinations."""
    rng = random.Random(seed)
    items = [corpus.ioi_prompt(rng, held_out=True) for _ in range(n)]
    logits = _next_token_logits(model, [p for p, _, _ in items])
    io = torch.tensor([_token_id(model, x) for _, x, _ in items])
    s = torch.tensor([_token_id(model, x) for _, _, x in items])
    rows = torch.arange(n)
    return {"n": n, "accuracy": float((logits.argmax(-1) == io).float().mean()),
            "mean_logit_diff": float((logits[rows, io] - logits[rows, s]).mean())}


@torch.no_grad()
def facts(model) -> dict:
    prompts = corpus.fact_prompts()
    logits = _next_token_logits(model, [p for p, _ in prompts])
    answers = torch.tensor([_token_id(model, a) for _, a in prompts])
    correct = logits.argmax(-1) == answers
    return {"n": len(prompts), "accuracy": float(correct.float().mean()),
            "wrong": [p for (p, _), ok in zip(prompts, correct) if not ok]}


def copy_losses(model, tokens: torch.Tensor, seq_len: int, edits=()) -> tuple[float, float]:
    """Mean next-token loss on the first and the second copy of `[BOS, r, r]` (first token of each copy excluded),
    with engine edits [(site, fn)] held during the forward."""
    logits, _ = _engine(model).run(tokens, edits=list(edits))
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), tokens[:, 1:], reduction="none")  # [b, 2L]
    L = seq_len
    # loss[:, t] predicts token t+1; first copy = tokens 2..L, second copy = tokens L+2..2L
    return float(loss[:, 1:L].mean()), float(loss[:, L + 1:].mean())


def _ablation(index: int | None, value: torch.Tensor | None):
    """An edit writing 0 (value None) or value into one head of attn.hook_z [batch, pos, n_heads, d_head]
    (index: the head) or into all of hook_mlp_out [batch, pos, d_model] (index None)."""
    def edit(z):
        z = z.clone()
        part = (slice(None), slice(None)) if index is None else (slice(None), slice(None), index)
        z[part] = 0.0 if value is None else value.to(z.dtype)
        return z
    return edit


# the other parts of the induction circuit (below), ablated the same way as the induction head
CIRCUIT_PARTS = {"L0H1": ("blocks.0.attn.hook_z", 1), "L1H2": ("blocks.1.attn.hook_z", 2),
                 "L2H2": ("blocks.2.attn.hook_z", 2), "MLP0": ("blocks.0.hook_mlp_out", None)}


def _ablation_increase(engine, per_len, site: str, index: int | None, kind: str) -> float:
    """Second-copy loss increase from zero / mean ablation (the mean over all positions of the same
    sequences), averaged over the lengths of `per_len`."""
    increases = []
    for L, toks, _, second in per_len:
        value = None
        if kind == "mean":
            _, acts = engine.run(toks, read=[site])
            value = acts[site][:, :, index].mean(dim=(0, 1)) if index is not None else acts[site].mean(dim=(0, 1))
        _, second_ablated = copy_losses(engine, toks, L, [(site, _ablation(index, value))])
        increases.append(second_ablated - second)
    return sum(increases) / len(increases)


@torch.no_grad()
def induction(model, n_sequences: int = 64, seed: int = 0) -> dict:
    """Copy losses for r of 10..20 words, the top previous-token / induction heads, and ablating the latter
    (zero, or its mean over all positions of the same sequences); the other circuit parts ablated the same way."""
    engine = _engine(model)
    per_len = []
    for L in (10, 15, 20):
        toks = repeated_random_tokens(engine, n_sequences, L, seed=seed + L)
        per_len.append((L, toks, *copy_losses(engine, toks, L)))
    scores = head_scores(engine, n_sequences=n_sequences, seq_len=20, seed=seed)
    prev_layer, prev_head, prev_score = scores.top("previous_token", 1)[0]
    ind_layer, ind_head, ind_score = scores.top("induction", 1)[0]
    site = f"blocks.{ind_layer}.attn.hook_z"
    ablated = {kind: _ablation_increase(engine, per_len, site, ind_head, kind) for kind in ("zero", "mean")}
    parts = {name: {kind: _ablation_increase(engine, per_len, s, i, kind) for kind in ("zero", "mean")}
             for name, (s, i) in CIRCUIT_PARTS.items()}
    return {
        "first_copy_loss": sum(x[2] for x in per_len) / len(per_len),
        "second_copy_loss": sum(x[3] for x in per_len) / len(per_len),
        "previous_token_head": [prev_layer, prev_head], "previous_token_score": prev_score,
        "induction_head": [ind_layer, ind_head], "induction_score": ind_score,
        "ablation_loss_increase": ablated,
        "circuit_ablation_loss_increase": parts,
        "top_induction_heads": scores.top("induction", 4),
        "top_previous_token_heads": scores.top("previous_token", 4),
    }


def sentiment_prompts(positive: bool) -> list[str]:
    openers = corpus.POSITIVE_OPENERS if positive else corpus.NEGATIVE_OPENERS
    return [f"{o} it ' s {i}" for o in openers for i in corpus.INTENSIFIERS]


@torch.no_grad()
def sentiment(model) -> dict:
    """Fraction of positive / negative prompts whose top next word is a positive / negative word."""
    pos_ids = {_token_id(model, w) for w in corpus.POSITIVE_WORDS}
    neg_ids = {_token_id(model, w) for w in corpus.NEGATIVE_WORDS}
    out = {}
    for positive, wanted in ((True, pos_ids), (False, neg_ids)):
        top = _next_token_logits(model, sentiment_prompts(positive)).argmax(-1).tolist()
        out["positive" if positive else "negative"] = sum(t in wanted for t in top) / len(top)
    return out


def measure(model) -> dict:
    engine = _engine(model)
    return {"ioi": ioi(engine), "facts": facts(engine), "induction": induction(engine), "sentiment": sentiment(engine)}


def main() -> None:
    import json

    from mechscope.models import load_model

    print(json.dumps(measure(load_model("mechscope-toy")), indent=2))


if __name__ == "__main__":
    main()

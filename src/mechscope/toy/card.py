"""The measurements behind MODEL_CARD.md: IOI, facts, induction (+ its heads and their ablation), sentiment.

`python -m mechscope.toy.card` (or `mechscope model-card`) prints them; the tests assert the card's
thresholds on the shipped weights, and the technique tests use the heads found here as ground truth.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from mechscope.techniques.heads import head_scores, repeated_random_tokens
from mechscope.toy import corpus


def _next_token_logits(model, prompts: list[str]) -> torch.Tensor:
    """[n_prompts, d_vocab] logits at each prompt's last token; prompts of equal length share a forward."""
    rows = [model.to_tokens(p)[0] for p in prompts]
    out = torch.empty(len(rows), model.cfg.d_vocab)
    for length in {len(r) for r in rows}:
        index = [i for i, r in enumerate(rows) if len(r) == length]
        out[index] = model(torch.stack([rows[i] for i in index]))[:, -1].float().cpu()
    return out


def _token_id(model, word: str) -> int:
    return model.to_single_token(word)


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


def copy_losses(model, tokens: torch.Tensor, seq_len: int, fwd_hooks=()) -> tuple[float, float]:
    """Mean next-token loss on the first and the second copy of `[BOS, r, r]` (first token of each copy excluded)."""
    logits = model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks))
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), tokens[:, 1:], reduction="none")  # [b, 2L]
    L = seq_len
    # loss[:, t] predicts token t+1; first copy = tokens 2..L, second copy = tokens L+2..2L
    return float(loss[:, 1:L].mean()), float(loss[:, L + 1:].mean())


def _head_ablation_hook(head: int, value: torch.Tensor | None):
    def hook(z, hook):
        z[:, :, head] = 0.0 if value is None else value
        return z
    return hook


@torch.no_grad()
def induction(model, n_sequences: int = 64, seed: int = 0) -> dict:
    """Copy losses for r of 10..20 words, the top previous-token / induction heads, and ablating the latter."""
    per_len = []
    for L in (10, 15, 20):
        toks = repeated_random_tokens(model, n_sequences, L, seed=seed + L)
        per_len.append((L, toks, *copy_losses(model, toks, L)))
    scores = head_scores(model, n_sequences=n_sequences, seq_len=20, seed=seed)
    prev_layer, prev_head, prev_score = scores.top("previous_token", 1)[0]
    ind_layer, ind_head, ind_score = scores.top("induction", 1)[0]
    hook_name = f"blocks.{ind_layer}.attn.hook_z"
    ablated = {}
    for kind in ("zero", "mean"):
        increases = []
        for L, toks, _, second in per_len:
            value = None
            if kind == "mean":
                _, cache = model.run_with_cache(toks, names_filter=hook_name)
                value = cache[hook_name][:, :, ind_head].mean(dim=(0, 1))
            _, second_ablated = copy_losses(model, toks, L, [(hook_name, _head_ablation_hook(ind_head, value))])
            increases.append(second_ablated - second)
        ablated[kind] = sum(increases) / len(increases)
    return {
        "first_copy_loss": sum(x[2] for x in per_len) / len(per_len),
        "second_copy_loss": sum(x[3] for x in per_len) / len(per_len),
        "previous_token_head": [prev_layer, prev_head], "previous_token_score": prev_score,
        "induction_head": [ind_layer, ind_head], "induction_score": ind_score,
        "ablation_loss_increase": ablated,
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
    return {"ioi": ioi(model), "facts": facts(model), "induction": induction(model), "sentiment": sentiment(model)}


def main() -> None:
    import json

    from mechscope.models import load_model

    print(json.dumps(measure(load_model("mechscope-toy")), indent=2))


if __name__ == "__main__":
    main()

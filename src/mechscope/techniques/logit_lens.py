"""Logit lens: read every intermediate residual stream through the final norm and the unembedding.

The residual stream is read at resid_pre / resid_mid of every layer and at the final resid_post
(`cache.accumulated_resid(incl_mid=True)` order: "0_pre", "0_mid", "1_pre", ..., "final_post"; no resid_mid
on attention-only and parallel-block models). Each entry goes through the engine's `readout`: the *whole*
final norm (its own centring and scale per entry, its weight and bias where not folded), the unembedding
(W_U, b_U) and any logit soft cap, so the "final_post" entry reproduces the model's logits exactly.
`target_logit` is the centred logit (logit[t] - the mean logit over the vocabulary, after any soft cap): a raw
logit differs between engines by a constant per position (mechscope.engines.base); probabilities, ranks and
logit differences do not.
Runs through the engine API (transformer-lens, TransformerBridge, nnsight alike).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _engine(model):
    from mechscope.models import as_engine

    return as_engine(model)


def _has_resid_mid(engine) -> bool:
    return engine.has_site("blocks.0.hook_resid_mid")


def resid_hook_names(model) -> list[str]:
    """The sites behind `residual_stack`, in its order (no resid_mid in attn-only / parallel-block models)."""
    engine = _engine(model)
    kinds = ("pre", "mid") if _has_resid_mid(engine) else ("pre",)
    n_layers = engine.cfg.n_layers
    return [f"blocks.{layer}.hook_resid_{kind}" for layer in range(n_layers) for kind in kinds] + \
        [f"blocks.{n_layers - 1}.hook_resid_post"]


def stack_labels(model) -> list[str]:
    """["0_pre", "0_mid", ..., "final_post"]: the labels transformer-lens' accumulated_resid uses."""
    engine = _engine(model)
    kinds = ("pre", "mid") if _has_resid_mid(engine) else ("pre",)
    return [f"{layer}_{kind}" for layer in range(engine.cfg.n_layers) for kind in kinds] + ["final_post"]


@torch.no_grad()
def residual_stack(model, tokens: torch.Tensor, positions=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(stack [n, batch, seq, d_model], logits [batch, seq, d_vocab]) for tokens [batch, seq]; n = len(stack_labels).
    With positions ([batch] token index per row): (stack [n, batch, d_model], logits [batch, d_vocab]) there."""
    engine = _engine(model)
    names = resid_hook_names(engine)
    logits, acts = engine.run(tokens, read=names, positions=positions)
    if positions is None:
        return torch.stack([acts[name] for name in names]), logits
    rows = torch.arange(len(tokens))
    positions = torch.as_tensor(positions)
    return torch.stack([acts[name][rows.to(acts[name].device), positions.to(acts[name].device)]
                        for name in names]), logits


def lens_logits(model, resid: torch.Tensor) -> torch.Tensor:
    """[..., d_model] residual streams -> [..., d_vocab] logits through the final norm, unembedding and soft cap."""
    engine = _engine(model)
    return engine.readout(resid.reshape(-1, resid.shape[-1])).reshape(*resid.shape[:-1], -1)


@dataclass
class LogitLens:
    """The lens on one prompt: n stack entries (`labels`, 2*n_layers + 1 with resid_mid), seq positions."""
    labels: list[str]
    str_tokens: list[str]            # [seq]
    position: int                    # the position of top_k and the targets (non-negative)
    top1_prob: torch.Tensor          # [n, seq] probability of the lens' top token at each entry and position
    top1_token: list[list[str]]      # [n][seq] that token's text
    top_k: list[list[tuple[str, float]]]  # [n][k] (token, probability) at `position`
    target_ids: list[int]
    target_rank: torch.Tensor        # [n, n_targets] rank (0 = top) at `position`
    target_prob: torch.Tensor        # [n, n_targets]
    target_logit: torch.Tensor       # [n, n_targets] centred: logit - mean logit over the vocabulary
    model_logits: torch.Tensor       # [seq, d_vocab] the model's own logits
    lens_final: torch.Tensor         # [seq, d_vocab] the lens at "final_post" (equals model_logits)

    def top1_from(self, target: int) -> str | None:
        """Label of the first entry from which target column `target` stays the top token to the end."""
        first = None
        for i in reversed(range(len(self.labels))):
            if int(self.target_rank[i, target]) != 0:
                break
            first = self.labels[i]
        return first


def _ranks(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """logits [..., d_vocab], ids [...] or [..., t] -> rank of each id (0 = top; ties count in its favour)."""
    target = logits.gather(-1, ids)
    return (logits[..., None, :] > target[..., None]).sum(-1)


@torch.no_grad()
def logit_lens(model, tokens: torch.Tensor, targets: list[int] = (), position: int = -1, k: int = 5) -> LogitLens:
    """The logit lens on tokens [1, seq]: top tokens at every entry and position, and targets' rank/prob/logit."""
    engine = _engine(model)
    stack, model_logits = residual_stack(engine, tokens)
    logits = lens_logits(engine, stack[:, 0]).float().cpu()   # [n, seq, d_vocab]
    probs = logits.softmax(-1)
    top1 = probs.max(-1)                                     # [n, seq]
    position = position % tokens.shape[1]
    at_pos = probs[:, position]                              # [n, d_vocab]
    top = at_pos.topk(min(k, at_pos.shape[-1]))
    ids = torch.tensor(list(targets), dtype=torch.long)
    lg = logits[:, position]
    to_str = engine.to_single_str_token
    return LogitLens(
        labels=stack_labels(engine), str_tokens=engine.to_str_tokens(tokens[0]), position=position,
        top1_prob=top1.values,
        top1_token=[[to_str(int(i)) for i in row] for row in top1.indices.tolist()],
        top_k=[[(to_str(int(i)), float(p)) for p, i in zip(pv, iv)] for pv, iv in zip(top.values, top.indices)],
        target_ids=list(targets), target_rank=_ranks(lg, ids.expand(len(lg), -1)), target_prob=at_pos[:, ids],
        target_logit=lg[:, ids] - lg.mean(-1, keepdim=True), model_logits=model_logits[0].float().cpu(), lens_final=logits[-1])


@dataclass
class AnswerLens:
    """The lens on a prompt set at one position per prompt (END): n prompts, e entries (`labels`)."""
    labels: list[str]
    rank: torch.Tensor               # [n, e] the answer's rank (0 = top)
    prob: torch.Tensor               # [n, e] its probability
    logit_diff: torch.Tensor | None  # [n, e] logit(answer) - logit(wrong), None without wrongs
    top_token: torch.Tensor          # [n, e] the lens' top token id
    final_error: float               # max |lens at final_post - the model's logits| over the prompts

    def top1(self) -> torch.Tensor:
        """[n, e] 1.0 where the answer is the lens' top token."""
        return (self.rank == 0).float()


@torch.no_grad()
def answer_lens(model, tokens: torch.Tensor, positions, answers, wrongs=None, rows_per_forward: int = 64) -> AnswerLens:
    """The lens at positions ([n] index per row) of tokens [n, seq] (right-padded is fine), following each row's
    answer (and wrong) token: per prompt and entry the rank, probability and logit difference."""
    engine = _engine(model)
    positions = torch.as_tensor(positions).reshape(-1).cpu()
    answers = torch.as_tensor(answers).reshape(-1).expand(len(tokens)).cpu()
    wrongs = None if wrongs is None else torch.as_tensor(wrongs).reshape(-1).expand(len(tokens)).cpu()
    parts, error = [], 0.0
    for start in range(0, len(tokens), rows_per_forward):
        rows = slice(start, start + rows_per_forward)
        stack, model_logits = residual_stack(engine, tokens[rows], positions[rows].to(tokens.device))
        logits = lens_logits(engine, stack.transpose(0, 1)).float().cpu()      # [b, e, d_vocab]
        error = max(error, float((logits[:, -1] - model_logits.float().cpu()).abs().max()))
        a = answers[rows][:, None, None].expand(-1, logits.shape[1], 1)
        diff = None
        if wrongs is not None:
            w = wrongs[rows][:, None, None].expand(-1, logits.shape[1], 1)
            diff = (logits.gather(-1, a) - logits.gather(-1, w))[..., 0]
        parts.append((_ranks(logits, a)[..., 0], logits.softmax(-1).gather(-1, a)[..., 0], diff, logits.argmax(-1)))
    rank, prob, diff, top = zip(*parts)
    return AnswerLens(labels=stack_labels(engine), rank=torch.cat(rank), prob=torch.cat(prob),
                      logit_diff=None if wrongs is None else torch.cat(diff), top_token=torch.cat(top),
                      final_error=error)

"""Logit lens: read every intermediate residual stream through the final LayerNorm and the unembedding.

The residual stream is read at resid_pre / resid_mid of every layer and at the final resid_post
(`cache.accumulated_resid(incl_mid=True)` order: "0_pre", "0_mid", "1_pre", ..., "final_post").
Each entry gets the *whole* final LayerNorm (`model.ln_final`: its own centring and scale, and on an
unfolded model its trained weight and bias) and then `model.unembed` (W_U and b_U), so the
"final_post" entry reproduces the model's logits exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _has_resid_mid(model) -> bool:
    return not model.cfg.attn_only and not model.cfg.parallel_attn_mlp


def resid_hook_names(model) -> list[str]:
    """The hooks behind `residual_stack`, in its order (no resid_mid in attn-only / parallel-block models)."""
    kinds = ("pre", "mid") if _has_resid_mid(model) else ("pre",)
    names = [f"blocks.{layer}.hook_resid_{kind}" for layer in range(model.cfg.n_layers) for kind in kinds]
    return names + [f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]


def stack_labels(model) -> list[str]:
    """["0_pre", "0_mid", ..., "final_post"]: the labels transformer-lens' accumulated_resid uses."""
    kinds = ("pre", "mid") if _has_resid_mid(model) else ("pre",)
    return [f"{layer}_{kind}" for layer in range(model.cfg.n_layers) for kind in kinds] + ["final_post"]


@torch.no_grad()
def residual_stack(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(stack [n, batch, seq, d_model], logits [batch, seq, d_vocab]) for tokens [batch, seq]; n = len(stack_labels)."""
    names = resid_hook_names(model)
    logits, cache = model.run_with_cache(tokens, names_filter=names)
    return torch.stack([cache[name] for name in names]), logits


def lens_logits(model, resid: torch.Tensor) -> torch.Tensor:
    """[..., seq, d_model] residual streams -> [..., seq, d_vocab] logits through ln_final and unembed."""
    ln_final = getattr(model, "ln_final", None)  # absent when the model has no normalization
    shape = resid.shape
    x = resid.reshape(-1, shape[-2], shape[-1])
    if ln_final is not None:
        x = ln_final(x)
    return model.unembed(x).reshape(*shape[:-1], -1)


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
    target_logit: torch.Tensor       # [n, n_targets]
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


@torch.no_grad()
def logit_lens(model, tokens: torch.Tensor, targets: list[int] = (), position: int = -1, k: int = 5) -> LogitLens:
    """The logit lens on tokens [1, seq]: top tokens at every entry and position, and targets' rank/prob/logit."""
    stack, model_logits = residual_stack(model, tokens)
    logits = lens_logits(model, stack[:, 0]).float()        # [n, seq, d_vocab]
    probs = logits.softmax(-1)
    top1 = probs.max(-1)                                     # [n, seq]
    position = position % tokens.shape[1]
    at_pos = probs[:, position]                              # [n, d_vocab]
    top = at_pos.topk(min(k, at_pos.shape[-1]))
    ids = torch.tensor(list(targets), dtype=torch.long, device=logits.device)
    lg = logits[:, position]
    target_logit = lg[:, ids]                                # [n, n_targets]
    target_rank = (lg[:, None, :] > target_logit[:, :, None]).sum(-1)
    to_str = model.to_single_str_token
    return LogitLens(
        labels=stack_labels(model), str_tokens=model.to_str_tokens(tokens[0]), position=position,
        top1_prob=top1.values.cpu(),
        top1_token=[[to_str(int(i)) for i in row] for row in top1.indices.tolist()],
        top_k=[[(to_str(int(i)), float(p)) for p, i in zip(pv, iv)] for pv, iv in zip(top.values, top.indices)],
        target_ids=list(targets), target_rank=target_rank.cpu(), target_prob=at_pos[:, ids].cpu(),
        target_logit=target_logit.cpu(), model_logits=model_logits[0].float().cpu(), lens_final=logits[-1].cpu())

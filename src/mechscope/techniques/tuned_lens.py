"""Tuned lens (Belrose et al. 2023): one affine translator per residual-stream entry, trained so that
ln_final + unembed of the translated stream matches the model's final next-token distribution.

    translated(h) = h + h @ weight + bias      (weight = 0, bias = 0 at init: the logit lens)

Training minimises the sum over entries of KL(final || translated), averaged over token positions
(BOS excluded), with Adam on residual streams computed once (gradients only for the translators, none
reach the model). The last entry ("final_post") is the model's output and keeps the identity. The
tuned-lens package's own training code does not run with the installed torchdata, hence this small loop.
Residuals and the read-out come from the engine API, so it trains on transformer-lens, the bridge or nnsight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mechscope.errors import BadInput
from mechscope.techniques.logit_lens import lens_logits, residual_stack, stack_labels


@dataclass
class TunedLens:
    labels: list[str]        # n entries with a translator (every stack entry but "final_post")
    weight: torch.Tensor     # [n, d_model, d_model]
    bias: torch.Tensor       # [n, d_model]
    losses: list[float] = field(default_factory=list)  # training loss per step (sum over entries of mean KL)

    def translate(self, stack: torch.Tensor) -> torch.Tensor:
        """stack [n + 1, ..., d_model] (all entries, final last) -> the same with entries 0..n-1 translated."""
        h = stack[:-1]
        shape = h.shape
        flat = h.reshape(shape[0], -1, shape[-1])
        out = flat + flat @ self.weight.to(flat.dtype) + self.bias.to(flat.dtype)[:, None]
        return torch.cat([out.reshape(shape), stack[-1:]])

    def save(self, path) -> None:
        from safetensors.torch import save_file

        from mechscope.runs import share

        save_file({"weight": self.weight.contiguous(), "bias": self.bias.contiguous()}, str(path),
                  metadata={"labels": ",".join(self.labels)})
        share(Path(path))  # safetensors writes 0600

    @classmethod
    def load(cls, path) -> "TunedLens":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            labels = f.metadata()["labels"].split(",")
            return cls(labels=labels, weight=f.get_tensor("weight"), bias=f.get_tensor("bias"))


def corpus_tokens(model, text: str, seq_len: int = 64) -> torch.Tensor:
    """[rows, seq_len] token ids: the text tokenized once, cut into rows of seq_len - 1 tokens, BOS first."""
    from mechscope.models import as_engine

    engine = as_engine(model)
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = len(ids) // (seq_len - 1)
    body = torch.tensor(ids[: rows * (seq_len - 1)], dtype=torch.long).reshape(rows, seq_len - 1)
    return torch.cat([torch.full((rows, 1), engine.bos_token_id), body], dim=1).to(engine.cfg.device)


@torch.no_grad()
def token_streams(model, tokens: torch.Tensor, batch_rows: int = 32) -> torch.Tensor:
    """[n_entries, rows * (seq - 1), d_model] residual streams at every non-BOS position of tokens [rows, seq]."""
    parts = [residual_stack(model, tokens[i:i + batch_rows])[0][:, :, 1:] for i in range(0, len(tokens), batch_rows)]
    stack = torch.cat(parts, dim=1)
    return stack.reshape(stack.shape[0], -1, stack.shape[-1])


def _kl(final_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(final || lens) over the last dim. final_logits [..., V], logits [n, ..., V] -> [n, ...]."""
    ref = final_logits.float().log_softmax(-1)
    return (ref.exp() * (ref - logits.float().log_softmax(-1))).sum(-1)


# bytes of logits (and their log-softmax copies) one chunk of token positions may take, over every stack entry
LOGIT_BUDGET = 2**29


def tokens_per_chunk(model, n_entries: int, budget: int = LOGIT_BUDGET) -> int:
    """Token positions whose [n_entries, positions, d_vocab] float32 logits, about four copies alive (logits,
    log-softmax, the KL's terms; autograd's when training), fit in `budget` bytes (at least 1)."""
    from mechscope.models import as_engine

    return max(1, budget // (16 * n_entries * as_engine(model).cfg.d_vocab))


def train_tuned_lens(model, tokens: torch.Tensor, steps: int = 300, lr: float = 1e-3, batch_tokens: int = 512,
                     seed: int = 0, chunk_tokens: int | None = None) -> TunedLens:
    """Translators for every entry of the residual stack, trained on tokens [rows, seq]. Deterministic
    for a given seed on a given device. Each step's batch_tokens positions run in chunks of chunk_tokens
    (default: tokens_per_chunk, a memory budget), gradients summed: the same step as one chunk."""
    stream = token_streams(model, tokens)                    # [n + 1, N, d_model]
    chunk = chunk_tokens or tokens_per_chunk(model, stream.shape[0])
    n, d = stream.shape[0] - 1, stream.shape[-1]
    weight = torch.zeros(n, d, d, device=stream.device, requires_grad=True)
    bias = torch.zeros(n, d, device=stream.device, requires_grad=True)
    lens = TunedLens(labels=stack_labels(model)[:-1], weight=weight, bias=bias)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []                                              # on the device: read once, after the last step
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, stream.shape[1], (batch_tokens,), generator=gen).to(stream.device)
            weight.grad, bias.grad, loss = torch.zeros_like(weight), torch.zeros_like(bias), 0.0
            for part in idx.split(chunk):
                batch = stream[:, part]                              # [n + 1, B, d_model]
                logits = lens_logits(model, lens.translate(batch))  # [n + 1, B, d_vocab]
                part_loss = _kl(logits[-1].detach(), logits[:-1]).sum(-1).sum() / batch_tokens
                grads = torch.autograd.grad(part_loss, [weight, bias])   # the model gets no .grad
                weight.grad += grads[0]
                bias.grad += grads[1]
                loss += part_loss.detach()
            optimizer.step()
            losses.append(loss)
    lens.losses = torch.stack(losses).tolist() if losses else []
    diverged = [step for step, value in enumerate(lens.losses, 1) if not math.isfinite(value)]
    if diverged:
        raise BadInput(f"training diverged: the loss is {lens.losses[diverged[0] - 1]} at step {diverged[0]}; "
                       f"lower --lr (the default is 1e-2)")
    last = lens.losses[-max(1, steps // 10):]  # the last tenth of the steps, against step 1 (the logit lens)
    if steps >= 10 and sum(last) / len(last) > lens.losses[0]:
        raise BadInput(f"training diverged: the loss rose from {lens.losses[0]:.4g} (step 1) to "
                       f"{sum(last) / len(last):.4g} (the last {len(last)} steps); lower --lr (the default is 1e-2)")
    lens.weight, lens.bias = weight.detach(), bias.detach()
    return lens


@torch.no_grad()
def kl_per_entry(model, tokens: torch.Tensor, lens: TunedLens | None = None,
                 batch_tokens: int | None = None) -> torch.Tensor:
    """[n + 1] mean KL(final || lens) in nats per stack entry on tokens [rows, seq] (BOS positions excluded);
    the logit lens when `lens` is None. The last entry ("final_post") is 0 for both. batch_tokens positions
    per chunk (default: tokens_per_chunk; a fixed 2048 took ~10 GB of logits per tensor on GPT-2 small)."""
    stream = token_streams(model, tokens)
    batch_tokens = batch_tokens or tokens_per_chunk(model, stream.shape[0])
    total = torch.zeros(stream.shape[0], device=stream.device)
    for i in range(0, stream.shape[1], batch_tokens):
        batch = stream[:, i:i + batch_tokens]
        logits = lens_logits(model, lens.translate(batch) if lens is not None else batch)
        total += _kl(logits[-1], logits).sum(-1)
    return (total / stream.shape[1]).cpu()

"""Path patching (Wang et al. 2022): the effect of sender heads on receivers through one path only.

A target run t (usually the clean input) and a source run s (usually the corrupted one); metric m(logits) -> [batch].
Each batch row is one path (a sender set and a receiver set), on every engine (engine.run with edits):
 1. run t and s once, reading every head's output (hook_z), and the MLP outputs of t;
 2. run t with the row's sender heads' z taken from s and every other head's z frozen to its value in t
    (MLP outputs frozen to t too with freeze_mlps=True; by default they recompute, as in Wang et al.);
    read the receivers' q / k / v (hook_q / hook_k / hook_v of the receiver heads);
 3. run t again replacing only the receivers' q / k / v by the step-2 values (everything downstream of the
    receivers recomputes); measure m.
effect = m(step 3) - m(t). Replacing hook_q[:, :, h] is the same as patching head h's query input
(q = LN(resid) W_Q + b_Q; rotary embeddings act after hook_q), so set_use_split_qkv_input is not needed.

Receivers "logits" (Wang et al.'s definition): step 2 alone, measured at the logits: the senders' change
reaches the final residual directly and through the MLPs, which recompute (frozen with freeze_mlps=True);
every other head is frozen. Receivers "logits-direct": the direct path only (every MLP frozen too), i.e.
the senders' output change added to the final residual, then the final norm and the unembedding; the same
as "logits" with freeze_mlps=True.

Shapes: tokens [n_prompts, pos]; per_prompt [n_rows, n_prompts]; effects [n_rows] (mean over prompts; NaN
for a row with no path, i.e. every sender at or after every receiver's layer).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from mechscope.errors import BadInput

Metric = Callable[[torch.Tensor], torch.Tensor]  # logits [batch, pos, d_vocab] -> [batch]
Head = tuple[int, int]
Receiver = tuple[int, int, str]  # (layer, head, "q" | "k" | "v")
SWEEPS = ("senders", "receivers", "none")
LOGITS = ("logits", "logits-direct")


@dataclass
class PathPatchResult:
    """per_prompt[i, j] = metric with path i patched - metric of the target run, on prompt j;
    effects[i] its mean over prompts."""
    per_prompt: torch.Tensor
    rows: list[tuple[list[Head], list[Receiver] | str]]
    target: torch.Tensor                 # [n_prompts] metric of the target run
    source: torch.Tensor                 # [n_prompts] metric of the source run
    freeze_mlps: bool
    meta: dict = field(default_factory=dict)

    @property
    def effects(self) -> torch.Tensor:
        return self.per_prompt.mean(1)

    @property
    def target_metric(self) -> float:
        return self.target.mean().item()

    @property
    def source_metric(self) -> float:
        return self.source.mean().item()

    @property
    def fraction(self) -> torch.Tensor:
        """effects / (source - target): 1 = the path carries the whole source-vs-target difference."""
        return self.effects / (self.source_metric - self.target_metric)

    @property
    def fraction_per_prompt(self) -> torch.Tensor:
        """[n_rows, n_prompts] each prompt's effect / its own (source - target)."""
        return self.per_prompt / (self.source - self.target)


def _masks(cfg, rows, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """senders [n_rows, n_layers, n_heads] and receivers [n_rows, 3 (q, k, v), n_layers, n_heads] (None: logits)."""
    send = torch.zeros(len(rows), cfg.n_layers, cfg.n_heads, dtype=torch.bool, device=device)
    recv = None if rows[0][1] in LOGITS else torch.zeros(len(rows), 3, cfg.n_layers, cfg.n_heads,
                                                         dtype=torch.bool, device=device)
    for i, (senders, receivers) in enumerate(rows):
        for layer, head in senders:
            send[i, layer, head] = True
        for layer, head, component in ([] if recv is None else receivers):
            recv[i, "qkv".index(component), layer, head] = True
    return send, recv


def _freezing_edits(t_acts, s_acts, send, n, layers, freeze_mlps) -> list:
    """Edits for rows r * n + j (path r on prompt j): every head's z at `layers` frozen to the target's, the
    row's senders' to the source's; MLP outputs frozen to the target's when freeze_mlps."""
    n_rows = send.shape[0]

    def heads(layer):
        name = f"blocks.{layer}.attn.hook_z"
        mask = send[:, layer].repeat_interleave(n, 0)[:, None, :, None]                # [rows, 1, head, 1]
        source, target = s_acts[name].repeat(n_rows, 1, 1, 1), t_acts[name].repeat(n_rows, 1, 1, 1)
        return name, lambda z: torch.where(mask, source, target).to(z.dtype)

    edits = [heads(layer) for layer in layers]
    if freeze_mlps:
        edits += [(f"blocks.{layer}.hook_mlp_out", lambda out, name=f"blocks.{layer}.hook_mlp_out":
                   t_acts[name].repeat(n_rows, 1, 1).to(out.dtype)) for layer in layers]
    return edits


@torch.no_grad()
def path_patch(model, target_tokens: torch.Tensor, source_tokens: torch.Tensor, senders: Sequence[Head],
               receivers: Sequence[Receiver] | str, metric: Metric, sweep: str = "senders",
               freeze_mlps: bool = False, max_batch: int = 64) -> PathPatchResult:
    """Path patching from `senders` to `receivers`: (layer, head, "q"|"k"|"v") list, "logits" (Wang et al.)
    or "logits-direct" (the direct path only).

    model: an engine (or a HookedTransformer / TransformerBridge / nnsight model).
    sweep="senders": one path per sender head (all receivers together); "receivers": one path per receiver
    (all senders together); "none": one path, all senders to all receivers.
    target_tokens, source_tokens: [n_prompts, pos]; metric(logits [rows, pos, d_vocab]) -> [rows] with row
    r * n_prompts + j on prompt j; max_batch: rows x prompts per forward call.
    """
    from mechscope.models import as_engine

    engine = as_engine(model)
    cfg = engine.cfg
    if sweep not in SWEEPS:
        raise BadInput(f"sweep must be one of {SWEEPS}")
    to_logits = isinstance(receivers, str)
    if to_logits and receivers not in LOGITS:
        raise BadInput(f"receivers must be a list of (layer, head, component), 'logits' or 'logits-direct', "
                       f"not {receivers!r}")
    if to_logits and sweep == "receivers":
        raise BadInput("sweep='receivers' needs receiver heads, not logits")
    if not to_logits and cfg.n_key_value_heads not in (None, cfg.n_heads) and any(c in "kv" for _, _, c in receivers):
        raise BadInput("k / v receivers are shared by several heads on grouped-query models; use q receivers")
    if receivers == "logits-direct":
        freeze_mlps = True
    freeze_mlps = freeze_mlps and not cfg.attn_only
    receivers = receivers if to_logits else [tuple(r) for r in receivers]
    senders = [tuple(s) for s in senders]
    if sweep == "senders":
        rows = [([s], receivers) for s in senders]
    elif sweep == "receivers":
        rows = [(senders, [r]) for r in receivers]
    else:
        rows = [(senders, receivers)]

    n_layers, n = cfg.n_layers, target_tokens.shape[0]
    last = n_layers if to_logits else max(layer for layer, _, _ in receivers)  # heads after it need no freezing
    frozen = range(last)
    z_names = [f"blocks.{layer}.attn.hook_z" for layer in frozen]
    mlp_names = [f"blocks.{layer}.hook_mlp_out" for layer in frozen] if freeze_mlps else []
    received = [] if to_logits else sorted({f"blocks.{layer}.attn.hook_{c}" for layer, _, c in receivers})
    engine.require(z_names + mlp_names + received, "path patching")
    t_logits, t_acts = engine.run(target_tokens, read=z_names + mlp_names)
    s_logits, s_acts = engine.run(source_tokens, read=z_names)
    target_value, source_value = metric(t_logits).float(), metric(s_logits).float()

    def has_path(row):
        end = n_layers if row[1] in LOGITS else max(layer for layer, _, _ in row[1])
        return len(row[0]) > 0 and min(layer for layer, _ in row[0]) < end

    per_prompt = torch.full((len(rows), n), float("nan"))
    live = [i for i, row in enumerate(rows) if has_path(row)]
    for chunk in torch.tensor(live, dtype=torch.long).split(max(1, max_batch // n)):
        send, recv = _masks(cfg, [rows[i] for i in chunk], target_tokens.device)
        tokens = target_tokens.repeat(len(chunk), 1)
        edits = _freezing_edits(t_acts, s_acts, send, n, frozen, freeze_mlps)
        if to_logits:
            logits, _ = engine.run(tokens, edits=edits)
        else:
            inputs = engine.activations(tokens, received, edits)

            def patch_receivers(name):
                mask = recv[:, "qkv".index(name[-1]), int(name.split(".")[1])].repeat_interleave(n, 0)
                return name, lambda x: torch.where(mask[:, None, :, None], inputs[name].to(x.dtype), x)
            logits, _ = engine.run(tokens, edits=[patch_receivers(name) for name in received])
        values = metric(logits).float().view(len(chunk), n)
        per_prompt[chunk] = (values - target_value).cpu()
    return PathPatchResult(per_prompt=per_prompt, rows=rows, target=target_value.cpu(), source=source_value.cpu(),
                           freeze_mlps=freeze_mlps, meta={"sweep": sweep, "n_prompts": n, "engine": engine.name})


# ------------------------------------------------------------------------------------------- induction task
def induction_task(model, n_sequences: int = 16, seq_len: int = 10, seed: int = 0):
    """Clean [BOS, r, r], corrupted [BOS, r', r] (first copy re-drawn, so copying fails) and a metric.

    Returns (clean [n, 2L+1], corrupted [n, 2L+1], metric): the mean log-probability of the correct next token
    over the second copy (positions L+1..2L-1 predict tokens L+2..2L; higher = better copying) -> [batch].
    """
    from mechscope.techniques.heads import repeated_random_tokens

    clean = repeated_random_tokens(model, n_sequences, seq_len, seed=seed)
    other = repeated_random_tokens(model, n_sequences, seq_len, seed=seed + 1)
    corrupted = clean.clone()
    corrupted[:, 1:seq_len + 1] = other[:, 1:seq_len + 1]
    targets = clean[:, seq_len + 2:]                                  # [n, L-1]

    def metric(logits):
        logprobs = logits[:, seq_len + 1:-1].float().log_softmax(-1)   # [batch, L-1, d_vocab]
        rows = targets.repeat(logits.shape[0] // targets.shape[0], 1)
        return logprobs.gather(-1, rows[..., None])[..., 0].mean(-1)
    return clean, corrupted, metric

"""Ablation: overwrite components' activations and measure how a metric changes.

Components and the transformer-lens hook each one lives in:
- head "L.H":        blocks.L.attn.hook_z    [batch, seq, n_heads, d_head], unit H on dim 2
- attention "attnL": blocks.L.hook_attn_out  [batch, seq, d_model]
- MLP "mlpL":        blocks.L.hook_mlp_out   [batch, seq, d_model]
- neuron "mlpL.N":   blocks.L.mlp.hook_post  [batch, seq, d_mlp], unit N on dim 2

Methods (the value written over a component's activation a, at every position):
- zero:     0. A head's z = 0 still leaves the layer's bias b_O in attn_out; an attn/MLP layer's 0 is exact.
- mean:     the mean of a over the reference tokens (batch and positions, or per position).
- resample: a on another prompt: row donors[b] of the reference (one donor per row, shared by all components).
- noise:    a + std * N(0, 1), std = the standard deviation of a over the reference (one number per component).

The reference statistics come from one cached forward over the reference tokens (only the needed hooks).
Each group (a set of components ablated together) gets its own copy of the batch, so many groups run in
one forward; the empty group is the clean run.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from mechscope.errors import BadInput

METHODS = ("zero", "mean", "resample", "noise")
HOOK_NAMES = {"head": "blocks.{}.attn.hook_z", "attn": "blocks.{}.hook_attn_out",
              "mlp": "blocks.{}.hook_mlp_out", "neuron": "blocks.{}.mlp.hook_post"}


@dataclass(frozen=True)
class Component:
    kind: str                  # "head", "attn", "mlp" or "neuron"
    layer: int
    index: int | None = None   # the head or neuron; None for a whole layer

    @property
    def hook_name(self) -> str:
        return HOOK_NAMES[self.kind].format(self.layer)

    @property
    def label(self) -> str:
        return {"head": f"{self.layer}.{self.index}", "attn": f"attn{self.layer}", "mlp": f"mlp{self.layer}",
                "neuron": f"mlp{self.layer}.{self.index}"}[self.kind]


def all_heads(model) -> list[Component]:
    return [Component("head", l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]


def all_mlps(model) -> list[Component]:
    return [Component("mlp", l) for l in range(model.cfg.n_layers)]


def parse_components(model, spec: str) -> list[Component]:
    """'1.2, attn0, mlp1, mlp1.42, 1.*, heads, mlps, attns' -> components, each checked against the model."""
    cfg = model.cfg
    out = []
    for item in [s for s in re.split(r"[,\s]+", spec.strip().lower()) if s]:
        if item in ("heads", "mlps", "attns"):
            out += {"heads": all_heads(model), "mlps": all_mlps(model),
                    "attns": [Component("attn", l) for l in range(cfg.n_layers)]}[item]
            continue
        m = re.fullmatch(r"(?:l?(\d+)[.h:](\d+|\*))|(?:(attn|mlp)(\d+)(?:\.(\d+))?)", item)
        if not m:
            raise BadInput(f"cannot read component {item!r}: write a head as LAYER.HEAD (1.2, or 1.* for a layer's "
                           f"heads), a layer as attn1 / mlp1, a neuron as mlp1.42")
        layer = int(m.group(1) if m.group(1) is not None else m.group(4))
        if layer >= cfg.n_layers:
            raise BadInput(f"layer {layer} in {item!r} is out of range: this model has layers 0..{cfg.n_layers - 1}")
        if m.group(2) == "*":
            out += [Component("head", layer, h) for h in range(cfg.n_heads)]
        elif m.group(2) is not None:
            if int(m.group(2)) >= cfg.n_heads:
                raise BadInput(f"head {item!r} is out of range: each layer has heads 0..{cfg.n_heads - 1}")
            out.append(Component("head", layer, int(m.group(2))))
        elif m.group(5) is not None:
            if cfg.attn_only or m.group(3) != "mlp" or int(m.group(5)) >= cfg.d_mlp:
                raise BadInput(f"neuron {item!r} is out of range: write mlpLAYER.NEURON, NEURON in 0..{cfg.d_mlp - 1}")
            out.append(Component("neuron", layer, int(m.group(5))))
        else:
            if m.group(3) == "mlp" and cfg.attn_only:
                raise BadInput(f"{item!r}: this model has no MLP layers (attention only)")
            out.append(Component(m.group(3), layer))
    if not out:
        raise BadInput("no components given: write e.g. 1.2,0.3,mlp1 (heads LAYER.HEAD, layers attnL / mlpL)")
    return list(dict.fromkeys(out))  # drop repeats, keep order


def parse_groups(model, spec: str) -> list[list[Component]]:
    """Comma-separated rows; '+' joins components into one set ablated together.

    '0.1,1.2,0.1+1.2,mlp1' -> [[0.1], [1.2], [0.1, 1.2], [mlp1]]; a row without '+' that names several
    components ('heads', '1.*') becomes one row per component.
    """
    groups = []
    for term in [t for t in re.split(r"[,\s]+", spec.strip()) if t]:
        if "+" in term:
            groups.append(parse_components(model, term.replace("+", ",")))
        else:
            groups += [[c] for c in parse_components(model, term)]
    if not groups:
        raise BadInput("no components given: write e.g. 1.2,0.3,mlp1 (heads LAYER.HEAD, layers attnL / mlpL)")
    return groups


def group_label(group: list[Component]) -> str:
    return "+".join(c.label for c in group) or "(none)"


def second_copy_loss(logits: torch.Tensor, tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Mean next-token loss on the second copy of `[BOS, r, r]` (its first token excluded). -> [batch]

    logits: [batch, 1 + 2L, d_vocab]; tokens: [batch, 1 + 2L]; seq_len: L.
    """
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), tokens[:, 1:], reduction="none")  # [b, 2L]
    return loss[:, seq_len + 1:].mean(-1)  # loss[:, t] predicts token t + 1: tokens L+2..2L


def _unit(t: torch.Tensor, c: Component) -> torch.Tensor:
    """The component's slice of a [batch, seq, ...] tensor."""
    return t if c.index is None else t[:, :, c.index]


def reference_values(model, reference: torch.Tensor, hook_names: set[str], method: str,
                     donors: torch.Tensor | None = None, per_position: bool = False) -> dict[str, torch.Tensor]:
    """What `method` writes, per hook, from one cached forward over reference tokens [n_ref, seq].

    mean -> [1, 1 or seq, ...]; noise -> the std per unit, [1, 1, n_units, 1] for hook_z, [1, 1, d_mlp] for
    hook_post, [1, 1, 1] for *_out; resample -> the donor rows' activations [batch, seq, ...]; zero -> {}.
    """
    if method == "zero" or not hook_names:
        return {}
    _, cache = model.run_with_cache(reference, names_filter=lambda name: name in hook_names)
    values = {}
    for name in hook_names:
        act = cache[name]
        if method == "mean":
            values[name] = act.float().mean(0 if per_position else (0, 1), keepdim=True).to(act.dtype)
        elif method == "noise":
            dims = [d for d in range(act.ndim) if d != 2] if name.endswith(("hook_z", "hook_post")) else None
            values[name] = act.float().std(dim=dims, keepdim=True).to(act.dtype)
        else:
            values[name] = act[donors]
    return values


def other_rows(n: int, seed: int = 0) -> torch.Tensor:
    """[n] donor rows: for each row b, a random row other than b (for resampling within one batch)."""
    if n < 2:
        raise BadInput("resample ablation needs at least 2 prompts (each row takes another prompt's activations)")
    gen = torch.Generator().manual_seed(seed)
    return (torch.arange(n) + torch.randint(1, n, (n,), generator=gen)) % n


@torch.no_grad()
def ablated_metric(model, tokens: torch.Tensor, groups: list[list[Component]],
                   metric: Callable[[torch.Tensor], torch.Tensor], method: str = "mean",
                   reference: torch.Tensor | None = None, donors: torch.Tensor | None = None,
                   per_position: bool = False, seed: int = 0, rows_per_forward: int | None = None) -> torch.Tensor:
    """The metric with each group of components ablated. -> [n_groups, batch] (float32, on CPU)

    tokens: [batch, seq]; metric(logits [batch, seq, d_vocab]) -> [batch]; an empty group is the clean run.
    reference: [n_ref, seq'] tokens for mean / noise / resample statistics (default: `tokens`);
    donors: [batch] rows of `reference` that resample takes from (default: random other rows, seeded).
    rows_per_forward: batch rows per forward (default: up to 512, fewer when the logits would pass ~512 MB).
    """
    if method not in METHODS:
        raise BadInput(f"unknown ablation method {method!r}; use one of {', '.join(METHODS)}")
    reference = tokens if reference is None else reference
    batch = tokens.shape[0]
    if method == "resample":
        if reference.shape[1] != tokens.shape[1]:
            raise BadInput("resample ablation needs reference prompts with the same number of tokens as the prompts")
        if donors is None:
            donors = other_rows(batch, seed) if reference is tokens else \
                torch.randint(0, reference.shape[0], (batch,), generator=torch.Generator().manual_seed(seed))
    if per_position and reference.shape[1] != tokens.shape[1]:
        raise BadInput("per-position means need reference prompts with the same number of tokens as the prompts")
    hook_names = {c.hook_name for group in groups for c in group}
    values = reference_values(model, reference, hook_names, method, donors, per_position)
    gen = torch.Generator(device=tokens.device).manual_seed(seed)

    def replacement(current: torch.Tensor, c: Component) -> torch.Tensor:
        if method == "zero":
            return torch.zeros_like(current)
        if method == "noise":
            noise = torch.randn(current.shape, generator=gen, device=current.device, dtype=current.dtype)
            return current + _unit(values[c.hook_name], c) * noise
        return _unit(values[c.hook_name], c)

    def make_hook(chunk: list[list[Component]]):
        def hook(act, hook):
            for i, group in enumerate(chunk):
                rows = act[i * batch:(i + 1) * batch]
                for c in group:
                    if c.hook_name == hook.name:
                        if c.index is None:
                            rows[:] = replacement(rows, c)
                        else:
                            rows[:, :, c.index] = replacement(rows[:, :, c.index], c)
            return act
        return hook

    if rows_per_forward is None:
        rows_per_forward = min(512, 2**27 // (tokens.shape[1] * model.cfg.d_vocab))
    per_chunk = max(1, rows_per_forward // batch)
    out = []
    for start in range(0, len(groups), per_chunk):
        chunk = groups[start:start + per_chunk]
        names = {c.hook_name for group in chunk for c in group}
        logits = model.run_with_hooks(tokens.repeat(len(chunk), 1),
                                      fwd_hooks=[(name, make_hook(chunk)) for name in names])
        out += [metric(logits[i * batch:(i + 1) * batch]).float().cpu() for i in range(len(chunk))]
    return torch.stack(out)


def ablation_edits(model, components: list[Component], method: str = "mean", reference: torch.Tensor | None = None,
                   skip_bos: bool = True) -> list:
    """Engine edits that hold `components` ablated in any run (e.g. to re-run DLA or patching with them
    removed: the backup test). method "zero", or "mean" over reference tokens [n_ref, seq] (all positions,
    BOS excluded when skip_bos), one value per component broadcast to every position. -> [(site, fn)]"""
    from mechscope.models import as_engine

    engine = as_engine(model)
    if method not in ("zero", "mean"):
        raise BadInput(f"components held ablated take --ablation zero or mean, not {method!r}")
    sites = sorted({c.hook_name for c in components})
    engine.require(sites, "ablation")
    means = {}
    if method == "mean":
        if reference is None:
            raise BadInput("mean ablation needs reference prompts (the distribution the mean is taken over)")
        with torch.no_grad():
            _, acts = engine.run(reference, read=sites)
        means = {site: acts[site][:, 1 if skip_bos and reference.shape[1] > 1 else 0:].float().mean((0, 1))
                 for site in sites}

    def edit(site):
        here = [c for c in components if c.hook_name == site]

        def fn(act):
            act = act.clone()
            for c in here:
                value = 0.0 if method == "zero" else means[site].to(act.dtype)
                if c.index is None:
                    act[:] = value if method == "zero" else value.expand_as(act)
                else:
                    act[:, :, c.index] = value if method == "zero" else value[c.index]
            return act
        return fn
    return [(site, edit(site)) for site in sites]


@dataclass
class AblationResult:
    """clean: [batch] metric without ablation; ablated: [n_groups, batch] with each group ablated."""
    labels: list[str]
    method: str
    clean: torch.Tensor
    ablated: torch.Tensor

    @property
    def effect(self) -> torch.Tensor:
        """[n_groups] mean change of the metric (ablated - clean)."""
        return (self.ablated - self.clean).mean(1)

    @property
    def stderr(self) -> torch.Tensor:
        """[n_groups] standard error of the effect over the batch (0 for a batch of one)."""
        diff = self.ablated - self.clean
        return diff.std(1) / math.sqrt(diff.shape[1]) if diff.shape[1] > 1 else torch.zeros(diff.shape[0])

    def rows(self) -> list[dict]:
        return [{"component": label, "method": self.method, "effect": float(e), "stderr": float(s),
                 "ablated_metric": float(a), "clean_metric": float(self.clean.mean())}
                for label, e, s, a in zip(self.labels, self.effect, self.stderr, self.ablated.mean(1))]


def ablate(model, tokens: torch.Tensor, groups: list[list[Component]],
           metric: Callable[[torch.Tensor], torch.Tensor], method: str = "mean", **kwargs) -> AblationResult:
    """Each group ablated on its own (one batch copy per group, shared reference statistics).

    tokens: [batch, seq]; kwargs go to `ablated_metric` (reference, donors, per_position, seed, rows_per_forward).
    """
    values = ablated_metric(model, tokens, [[]] + list(groups), metric, method, **kwargs)
    return AblationResult([group_label(g) for g in groups], method, values[0], values[1:])


def head_grid(model, result: AblationResult) -> torch.Tensor:
    """[n_layers, n_heads] effect of each single head in `result` (NaN where a head was not ablated alone)."""
    grid = torch.full((model.cfg.n_layers, model.cfg.n_heads), float("nan"))
    for label, effect in zip(result.labels, result.effect):
        m = re.fullmatch(r"(\d+)\.(\d+)", label)
        if m:
            grid[int(m.group(1)), int(m.group(2))] = effect
    return grid

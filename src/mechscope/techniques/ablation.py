"""Ablation: overwrite components' activations and measure how a metric changes (on any engine).

Components and the site (transformer-lens hook name) each one lives in:
- head "L.H":        blocks.L.attn.hook_z    [batch, seq, n_heads, d_head], unit H on dim 2
- attention "attnL": blocks.L.hook_attn_out  [batch, seq, d_model]
- MLP "mlpL":        blocks.L.hook_mlp_out   [batch, seq, d_model]
- neuron "mlpL.N":   blocks.L.mlp.hook_post  [batch, seq, d_mlp], unit N on dim 2

Methods (the value written over a component's activation a, at every position):
- zero:     0. A head's z = 0 still leaves the layer's bias b_O in attn_out; an attn/MLP layer's 0 is exact.
- mean:     the mean of a over the reference prompts' positions, BOS excluded (skip_bos; BOS is an
            attention sink whose activations are far from every other position's), or one mean per position.
- resample: a on another prompt: row donors[b] of the reference (by default a random other prompt of the
            same token length; one donor per row, shared by all components).
- noise:    a + std * N(0, 1), std = the standard deviation of a over the reference positions (BOS excluded),
            one number per head / neuron / layer.

The reference statistics come from one forward over the reference prompts (reading only the needed sites).
Each group (a set of components ablated together) gets its own copy of the batch, so many groups run in
one forward; the empty group is the clean run. Everything goes through the engine API (`engine.run` with
reads and edits), so the same numbers come out on the tl, bridge and nnsight engines.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from mechscope import stats
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
    seen = set()
    for group in groups:  # a row twice (2.1 and again in 'heads') would be counted twice in every statistic
        if tuple(group) in seen:
            raise BadInput(f"--components lists {group_label(group)} twice (e.g. by itself and in heads / 1.*); "
                           f"list each once")
        seen.add(tuple(group))
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


def as_batch(engine, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [n, seq], lengths [n]) from a [n, seq] tensor or a list of n rows [seq_i] (right-padded,
    tasks.padded; with causal attention padding never changes an earlier position)."""
    from mechscope import tasks

    if isinstance(tokens, torch.Tensor):
        return tokens, torch.full((tokens.shape[0],), tokens.shape[1])
    return tasks.padded(engine, list(tokens))


def statistics_mask(lengths: torch.Tensor, seq: int, skip_bos: bool = True) -> torch.Tensor:
    """[n, seq] True at the positions reference statistics are taken over: each row's own tokens, BOS
    (position 0) excluded when skip_bos (an attention sink whose activations are far from the others)."""
    pos = torch.arange(seq)
    start = 1 if skip_bos and seq > 1 else 0
    return (pos >= start) & (pos < lengths[:, None])


def reference_values(model, reference, sites: set[str], method: str, donors: torch.Tensor | None = None,
                     per_position: bool = False, skip_bos: bool = True) -> dict[str, torch.Tensor]:
    """What `method` writes, per site, from one forward over `reference` ([n_ref, seq] tokens or n_ref rows).

    mean -> [1, 1, ...] over every reference position (BOS excluded when skip_bos), or [1, seq, ...] per
    position (per_position); noise -> the std per unit over the same positions, [1, 1, n_heads, 1] for
    hook_z, [1, 1, d_mlp] for hook_post, [1, 1, 1] for *_out; resample -> the donor rows' activations
    [batch, seq, ...]; zero -> {}.
    """
    from mechscope.models import as_engine

    if method == "zero" or not sites:
        return {}
    engine = as_engine(model)
    tokens, lengths = as_batch(engine, reference)
    with torch.no_grad():
        acts = engine.activations(tokens, sorted(sites))
    mask = statistics_mask(lengths, tokens.shape[1], skip_bos).to(tokens.device)
    values = {}
    for site in sites:
        act = acts[site]
        if method == "resample":
            values[site] = act[donors]
        elif method == "mean" and per_position:
            values[site] = act.float().mean(0, keepdim=True).to(act.dtype)
        elif method == "mean":
            values[site] = act[mask].float().mean(0)[None, None].to(act.dtype)
        else:  # noise: one std per head / neuron, or one for a whole layer's output
            x = act[mask].float()                                   # [n_positions, ...]
            dims = [0, 2] if site.endswith("hook_z") else [0] if site.endswith("hook_post") else None
            std = x.std(dim=dims) if dims is not None else x.std()
            values[site] = std.reshape(1, 1, *std.shape, *([1] if site.endswith("hook_z") else [])).to(act.dtype)
    return values


def other_rows(n: int, seed: int = 0) -> torch.Tensor:
    """[n] donor rows: for each row b, a random row other than b (for resampling within one batch)."""
    if n < 2:
        raise BadInput("resample ablation needs at least 2 prompts (each row takes another prompt's activations)")
    gen = torch.Generator().manual_seed(seed)
    return (torch.arange(n) + torch.randint(1, n, (n,), generator=gen)) % n


def same_length_donors(lengths: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """[n] donor rows: for each row, a random other row of the same token length (so every position of the
    donor is a real token)."""
    donors = torch.empty(len(lengths), dtype=torch.long)
    for length in lengths.unique():
        rows = (lengths == length).nonzero().flatten()
        if len(rows) < 2:
            raise BadInput(f"resample ablation needs at least 2 prompts of each token length (each takes another "
                           f"prompt's activations); only one prompt has {int(length)} tokens: add prompts of that "
                           f"length, or use --method mean")
        donors[rows] = rows[other_rows(len(rows), seed + int(length))]
    return donors


@torch.no_grad()
def ablated_metric(model, tokens, groups: list[list[Component]], metric: Callable[[torch.Tensor], torch.Tensor],
                   method: str = "mean", reference=None, donors: torch.Tensor | None = None,
                   per_position: bool = False, seed: int = 0, rows_per_forward: int | None = None,
                   skip_bos: bool = True, at: torch.Tensor | None = None) -> torch.Tensor:
    """The metric with each group of components ablated. -> [n_groups, batch] (float32, on CPU)

    tokens: [batch, seq], or a list of rows [seq_i] of different lengths (right-padded here; the metric then
    reads each row at its own positions); metric(logits [batch, seq, d_vocab]) -> [batch]; an empty group is
    the clean run. reference: tokens or rows for mean / noise / resample statistics (default: `tokens`;
    BOS excluded from the mean and std when skip_bos); donors: [batch] rows of `reference` that resample
    takes from (default: random other rows of the same length, seeded).
    rows_per_forward: batch rows per forward (default: up to 512, fewer when the logits would pass ~512 MB).
    at: [batch, seq] bool, the positions ablated (default: every position); the statistics still come from
    every reference position.
    """
    from mechscope.models import as_engine

    engine = as_engine(model)
    if method not in METHODS:
        raise BadInput(f"unknown ablation method {method!r}; use one of {', '.join(METHODS)}")
    own_reference = reference is None
    reference = tokens if own_reference else reference
    tokens, lengths = as_batch(engine, tokens)
    ref_tokens, ref_lengths = as_batch(engine, reference)
    batch = tokens.shape[0]
    if method == "mean" and own_reference and batch == 1:
        raise BadInput("mean ablation of a single prompt with no reference would take the mean over that prompt's own "
                       "positions (close to a no-op); pass reference prompts (--reference, repeatable), or several "
                       "prompts (--prompts FILE, --task)")
    if per_position and len(set(lengths.tolist())) > 1:
        raise BadInput("per-position means need prompts of one token length (one template); drop --per-position")
    if not own_reference and (method == "resample" or per_position) and \
            set(ref_lengths.tolist()) | set(lengths.tolist()) != {tokens.shape[1]}:
        what = "resample ablation" if method == "resample" else "per-position means"
        raise BadInput(f"{what} need reference prompts with the same number of tokens as the prompts")
    if method == "resample" and donors is None:
        donors = same_length_donors(lengths, seed) if own_reference else \
            torch.randint(0, ref_tokens.shape[0], (batch,), generator=torch.Generator().manual_seed(seed))
    sites = {c.hook_name for group in groups for c in group}
    engine.require(sorted(sites), "ablation")
    values = reference_values(engine, reference, sites, method, donors, per_position, skip_bos)
    gen = torch.Generator().manual_seed(seed)  # noise drawn on the CPU: the same draws on every device and dtype

    def replacement(current: torch.Tensor, c: Component) -> torch.Tensor:
        if method == "zero":
            return torch.zeros_like(current)
        if method == "noise":
            noise = torch.randn(current.shape, generator=gen).to(current.device, current.dtype)
            return current + _unit(values[c.hook_name], c) * noise
        return _unit(values[c.hook_name], c).expand_as(current)

    def where(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """new at the positions `at` (all when None), old elsewhere."""
        if at is None:
            return new
        mask = at.to(new.device)[:, : new.shape[1]].reshape(*at.shape[:1], new.shape[1], *[1] * (new.ndim - 2))
        return torch.where(mask, new, old)

    def make_edit(site: str, chunk: list[list[Component]]):
        def edit(act):
            act = act.clone()
            for i, group in enumerate(chunk):
                rows = act[i * batch:(i + 1) * batch]       # a view: writes go into act
                for c in group:
                    if c.hook_name == site:
                        if c.index is None:
                            rows[:] = where(replacement(rows, c), rows)
                        else:
                            rows[:, :, c.index] = where(replacement(rows[:, :, c.index], c), rows[:, :, c.index])
            return act
        return edit

    if rows_per_forward is None:
        rows_per_forward = min(512, 2**27 // (tokens.shape[1] * engine.cfg.d_vocab))
    per_chunk = max(1, rows_per_forward // batch)
    out = []
    for start in range(0, len(groups), per_chunk):
        chunk = groups[start:start + per_chunk]
        names = sorted({c.hook_name for group in chunk for c in group})
        logits, _ = engine.run(tokens.repeat(len(chunk), 1), edits=[(name, make_edit(name, chunk)) for name in names])
        out += [metric(logits[i * batch:(i + 1) * batch]).float().cpu() for i in range(len(chunk))]
    return torch.stack(out)


def ablation_edits(model, components: list[Component], method: str = "mean", reference: torch.Tensor | None = None,
                   skip_bos: bool = True, lengths: torch.Tensor | None = None) -> list:
    """Engine edits that hold `components` ablated in any run (e.g. to re-run DLA or patching with them
    removed: the backup test). method "zero", or "mean" over reference tokens [n_ref, seq] (all positions,
    BOS excluded when skip_bos; with lengths [n_ref], only each row's first lengths[i] positions, so right
    padding stays out), one value per component broadcast to every position. -> [(site, fn)]"""
    from mechscope.models import as_engine

    engine = as_engine(model)
    if method not in ("zero", "mean"):
        raise BadInput(f"components held ablated take --ablation zero or mean, not {method!r}")
    sites = sorted({c.hook_name for c in components})
    engine.require(sites, "ablation")
    if method == "mean" and reference is None:
        raise BadInput("mean ablation needs reference prompts (the distribution the mean is taken over)")
    if lengths is not None and reference is not None:  # right-padded rows: only each row's own tokens count
        reference = [row[:int(n)] for row, n in zip(reference, lengths)]
    means = reference_values(engine, reference, set(sites), method, skip_bos=skip_bos)

    def edit(site):
        here = [c for c in components if c.hook_name == site]

        def fn(act):
            act = act.clone()
            for c in here:
                value = torch.zeros((), dtype=act.dtype, device=act.device) if method == "zero" else \
                    _unit(means[site], c).to(act.dtype)
                if c.index is None:
                    act[:] = value
                else:
                    act[:, :, c.index] = value
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
    def differences(self) -> torch.Tensor:
        """[batch, n_groups] per-prompt change of the metric (ablated - clean)."""
        return (self.ablated - self.clean).T

    @property
    def effect(self) -> torch.Tensor:
        """[n_groups] mean change of the metric (ablated - clean)."""
        return self.differences.mean(0)

    @property
    def stderr(self) -> torch.Tensor:
        """[n_groups] standard error of the effect over the prompts (NaN for one prompt)."""
        return stats.standard_error(self.differences)

    def summary(self, seed: int = 0, prompt_groups=None) -> dict:
        """mechscope.stats.summary of the per-prompt effects: {mean, ci_low, ci_high, sign_share, stderr} as
        [n_groups] lists (95% interval over prompts, or over prompt_groups: one key per prompt, a template),
        n_prompts."""
        return stats.summary(self.differences, seed=seed, groups=prompt_groups)

    def rows(self, seed: int = 0, prompt_groups=None) -> list[dict]:
        s = self.summary(seed, prompt_groups)
        return [{"component": label, "method": self.method, "effect": float(e), "stderr": s["stderr"][i],
                 "ci_low": s["ci_low"][i], "ci_high": s["ci_high"][i], "sign_share": s["sign_share"][i],
                 "ablated_metric": float(a), "clean_metric": float(self.clean.mean())}
                for i, (label, e, a) in enumerate(zip(self.labels, self.effect, self.ablated.mean(1)))]


def ablate(model, tokens: torch.Tensor, groups: list[list[Component]],
           metric: Callable[[torch.Tensor], torch.Tensor], method: str = "mean", **kwargs) -> AblationResult:
    """Each group ablated on its own (one batch copy per group, shared reference statistics).

    tokens: [batch, seq] or rows [seq_i]; kwargs go to `ablated_metric` (reference, donors, per_position, seed,
    rows_per_forward, skip_bos, at).
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

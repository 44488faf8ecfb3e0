"""Activation patching, exact, on every engine.

Patching copies one activation from a *source* run into a *target* run and scores the target's output:
- denoising (default): source = clean, target = corrupted. "Is this activation enough to restore the
  clean behaviour?" Recovery 1 = fully restored, 0 = no effect.
- noising: source = corrupted, target = clean. "Is this activation necessary?" Recovery stays 1 where the
  patch changes nothing and falls towards 0 (or below) where the activation matters.
Recovery is (patched - corrupted) / (clean - corrupted) in both modes. Over a prompt set, a cell's
recovery is a ratio of means over the prompts that have that cell (a padded prompt lacks the positions
past its end): mean(patched - corrupted) / mean(clean - corrupted), both over the same prompts; its 95%
interval is Fieller's for a ratio of means (`cell_summary`, `stats.ratio_interval`).

Components (transformer-lens hook names, the engines' sites; positions are token positions):
    resid_pre / resid_mid / resid_post / attn_out / mlp_out   blocks.{l}.hook_*, [batch, pos, d_model]
    z / q / k / v                                             blocks.{l}.attn.hook_*, [batch, pos, head, d_head]
    pattern                                                   blocks.{l}.attn.hook_pattern, [batch, head, dest, src]
`z` is a head's output (transformer-lens' "attn_head_out"); `pattern` "by position" patches one
destination row. k / v have n_key_value_heads heads on grouped-query models.

Two implementations compute the same numbers as transformer_lens.patching (one patched forward per cell):
- tl engine: the suffix-only engine of mechscope.engines.hooked_sweep (restarts at the patched layer,
  runs only positions after the patch, logits at the read position only; resid_pre / resid_post / z pack
  every cell's suffix into one matrix per block, and a logit-difference metric unembeds two columns only);
- every engine (bridge, nnsight; `implementation="generic"` on tl): `engine.run` with edits. The cells of
  all layers go through the model as batch rows (chunked to a memory budget), one edit per site writing
  each row's cell; logits are read at the metric's positions only; a cell whose source and target
  activations are equal (every position before the first differing token) is the target's own value,
  filled in without a forward.

Agreement per dtype: in float32 the two implementations (and transformer_lens.patching) agree cell for cell to
1e-4. In half precision they compute in different orders, so each rounds differently: on the bundled model's IOI
set (16 prompts; resid_pre, z, attn_out) the suffix-only and generic sweeps differ per prompt by up to 0.023
(float16) and 0.156 (bfloat16, about one bfloat16 step at logits of 16-32) in logit difference, and each is as
far from float32's (float16 0.03 per prompt, 0.007 on cell means; bfloat16 0.28 and 0.07). HALF_AGREEMENT holds
the tolerances tests/test_devices.py checks (about twice those).

Padded batches: right-padded tokens with `lengths` (pair_batch builds them). The metric reads each
prompt's last real token; cells at a prompt's padding positions are NaN in `per_prompt`. Prompt sets of
different lengths are compared by named positions (`PatchResult.at_positions`: IO, S1, S2, END, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from mechscope import inputs, metrics, stats
from mechscope.engines import hooked_sweep
from mechscope.engines.base import Engine
from mechscope.errors import BadInput
from mechscope.progress import progress

COMPONENTS = {
    "resid_pre": "blocks.{}.hook_resid_pre",
    "resid_mid": "blocks.{}.hook_resid_mid",
    "resid_post": "blocks.{}.hook_resid_post",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "z": "blocks.{}.attn.hook_z",
    "q": "blocks.{}.attn.hook_q",
    "k": "blocks.{}.attn.hook_k",
    "v": "blocks.{}.attn.hook_v",
    "pattern": "blocks.{}.attn.hook_pattern",
}
HEAD_COMPONENTS = ("z", "q", "k", "v", "pattern")
MODES = ("denoise", "noise")
IMPLEMENTATIONS = ("auto", "generic")


# ---------------------------------------------------------------------------------------------- metrics
@dataclass
class Metric:
    """How a patched run is scored.

    score(logits, prompt, clean_logits) -> [n]: logits [n, d_vocab] at each row's read position (float32),
    prompt [n] the index of the prompt each row belongs to, clean_logits [n_prompts, d_vocab] the clean
    run's logits at the read positions. logit_pair: (answer [n], wrong [n]) token ids when the score is
    logit[answer] - logit[wrong] (a linear metric): the tl engine then unembeds those two columns only.
    """
    name: str
    score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    logit_pair: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, logits, prompt, clean_logits):
        return self.score(logits, prompt, clean_logits)


# per-prompt / cell-mean logit-difference tolerances between implementations, and against float32, per dtype
HALF_AGREEMENT = {"float32": (1e-4, 1e-4), "float16": (0.06, 0.015), "bfloat16": (0.5, 0.15)}


def logit_diff_metric(answer, wrong) -> Metric:
    """logit[answer] - logit[wrong]; answer / wrong: one id or [n_prompts] ids."""
    answer, wrong = torch.as_tensor(answer).reshape(-1), torch.as_tensor(wrong).reshape(-1)

    def score(logits, prompt, clean_logits):
        a, w = answer.to(logits.device), wrong.to(logits.device)
        return metrics.logit_diff(logits, a[prompt % len(a)], w[prompt % len(w)])
    return Metric("logit_diff", score, (answer, wrong))


def answer_prob_metric(answer) -> Metric:
    """softmax probability of the answer token; answer: one id or [n_prompts] ids."""
    answer = torch.as_tensor(answer).reshape(-1)

    def score(logits, prompt, clean_logits):
        a = answer.to(logits.device)
        return metrics.answer_prob(logits, a[prompt % len(a)])
    return Metric("answer_prob", score)


def kl_to_clean_metric() -> Metric:
    """KL(clean || patched) at the read position, in nats (0 = the clean distribution)."""
    def score(logits, prompt, clean_logits):
        return metrics.kl_to_reference(logits, clean_logits[prompt])
    return Metric("kl_to_clean", score)


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class PairBatch:
    """Right-padded clean / corrupted token ids [n, seq], lengths [n], answer / wrong ids [n], and named
    positions {name: [n] token index} (END = each prompt's last token; the task's names, e.g. IO, S1, S2)."""
    clean: torch.Tensor
    corrupted: torch.Tensor
    lengths: torch.Tensor
    answer: torch.Tensor
    wrong: torch.Tensor
    positions: dict = field(default_factory=dict)

    @property
    def same_layout(self) -> bool:
        """True when every prompt has the same length and its named positions at the same indices (one
        template): then position columns mean the same thing in every prompt."""
        return bool((self.lengths == self.lengths[0]).all()) and \
            all(bool((index == index[0]).all()) for index in self.positions.values())


def _prompt_set(pairs):
    """A tasks.PromptSet from a PromptSet or a list of {"clean", "corrupted", "answer", "wrong"} dicts."""
    from mechscope import tasks

    if isinstance(pairs, tasks.PromptSet):
        return pairs
    if not pairs:
        raise BadInput("no prompt pairs given; pass --clean/--corrupted, --task or a --pairs file with one pair per line")
    prompts = []
    for i, pair in enumerate(pairs):
        missing = [key for key in ("clean", "corrupted", "answer", "wrong") if not pair.get(key)]
        if missing:
            raise BadInput(f"pair {i} lacks {', '.join(missing)}: each pair needs clean, corrupted, answer, wrong")
        prompts.append(tasks.Prompt(pair["clean"], answer=pair["answer"], wrong=pair["wrong"],
                                    corrupted=pair["corrupted"], positions=pair.get("positions") or {}))
    names = tuple(dict.fromkeys(name for p in prompts for name in p.positions if name != tasks.END))
    return tasks.PromptSet("pairs", prompts, names + (tasks.END,))


def pair_batch(model, pairs) -> PairBatch:
    """Tokenise pairs (a tasks.PromptSet with corrupted twins, or {"clean", "corrupted", "answer", "wrong"}
    dicts); each pair's two prompts must have the same number of tokens (BadInput otherwise); pairs of
    different lengths are right-padded."""
    from mechscope import tasks
    from mechscope.models import as_engine

    engine = as_engine(model)
    prompt_set = _prompt_set(pairs)
    if not len(prompt_set):
        raise BadInput("the prompt set is empty")
    clean_rows, positions = prompt_set.tokens(engine)
    corrupted_rows, _ = prompt_set.tokens(engine, corrupted=True)
    for i, (c, k, p) in enumerate(zip(clean_rows, corrupted_rows, prompt_set.prompts)):
        if len(c) != len(k):
            raise BadInput(f"pair {i}: clean and corrupted prompts must have the same number of tokens "
                           f"(clean: {len(c)}, corrupted: {len(k)}); clean = {engine.to_str_tokens(c)}, "
                           f"corrupted = {engine.to_str_tokens(k)}")
        if not p.answer or not p.wrong:
            raise BadInput(f"pair {i} needs an answer and a wrong answer (one token each)")
    answer = [inputs.single_token(engine, p.answer) for p in prompt_set.prompts]
    wrong = [inputs.single_token(engine, p.wrong) for p in prompt_set.prompts]
    inputs.distinct_answers(answer, wrong)
    clean, lengths = tasks.padded(engine, clean_rows)
    corrupted, _ = tasks.padded(engine, corrupted_rows)
    device = engine.cfg.device
    return PairBatch(clean.to(device), corrupted.to(device), lengths.to(device), torch.tensor(answer, device=device),
                     torch.tensor(wrong, device=device), {k: v.to(device) for k, v in positions.items()})


# ---------------------------------------------------------------------------------------------- result
@dataclass
class PatchResult:
    """values: the metric after each patch, mean over prompts (NaN-aware), shaped by `axes`:
    [n_layers] (all positions), [n_layers, pos], [n_layers, n_heads] or [n_layers, n_heads, pos].
    per_prompt: [n_prompts, *values.shape] (NaN where a prompt lacks the cell). clean / corrupted:
    [n_prompts] metric of the unpatched runs. meta["position_names"]: the columns' names after at_positions."""
    values: torch.Tensor
    per_prompt: torch.Tensor
    clean: torch.Tensor
    corrupted: torch.Tensor
    component: str
    mode: str
    metric: str
    axes: tuple[str, ...]
    meta: dict = field(default_factory=dict)

    def _per_cell(self, per_prompt_value: torch.Tensor) -> torch.Tensor:
        """[n_prompts] -> [n_prompts, *cells], NaN where the prompt lacks the cell."""
        value = per_prompt_value.view(-1, *[1] * (self.per_prompt.ndim - 1)).expand_as(self.per_prompt)
        return torch.where(self.per_prompt.isnan(), torch.full_like(value, float("nan")), value)

    @property
    def target(self) -> torch.Tensor:
        """[n_prompts] the unpatched target run's metric (corrupted when denoising, clean when noising)."""
        return self.corrupted if self.mode == "denoise" else self.clean

    @property
    def recovery(self) -> torch.Tensor:
        """Per cell: mean(patched - corrupted) / mean(clean - corrupted) over the prompts that have the cell
        (1 = clean, 0 = corrupted)."""
        corrupted = self._per_cell(self.corrupted).nanmean(0)
        return (self.values - corrupted) / (self._per_cell(self.clean).nanmean(0) - corrupted)

    def effect_per_prompt(self, normalise: bool = True) -> torch.Tensor:
        """[n_prompts, *cells] what each patch changes on each prompt: patched - target, divided by that
        prompt's (clean - corrupted) when normalise (a change of recovery)."""
        effect = self.per_prompt - self._per_cell(self.target)
        return effect / self._per_cell(self.clean - self.corrupted) if normalise else effect

    def at_positions(self, positions: dict) -> "PatchResult":
        """The result at named positions: positions {name: [n_prompts] token index} -> the position axis
        becomes one column per name, each prompt's value gathered at its own index."""
        if "pos" not in self.axes:
            return self
        per_prompt = gather_positions(self.per_prompt, positions)
        return replace(self, values=per_prompt.nanmean(0), per_prompt=per_prompt,
                       meta=dict(self.meta, position_names=list(positions)))


def gather_positions(per_prompt: torch.Tensor, positions: dict, axis: int = -1) -> torch.Tensor:
    """per_prompt [n_prompts, ..., pos, ...] -> the same with `axis` (the position axis) holding one entry per
    named position, each prompt's value taken at its own index. positions: {name: [n_prompts] index}."""
    index = torch.stack([torch.as_tensor(v).cpu() for v in positions.values()], -1)    # [n, k]
    moved = per_prompt.movedim(axis, -1)
    index = index.view(index.shape[0], *[1] * (moved.ndim - 2), index.shape[1])
    return moved.gather(-1, index.expand(*moved.shape[:-1], index.shape[-1])).movedim(-1, axis)


def cell_summary(result: PatchResult, recovery: bool = True, k: int = 5, seed: int = 0, groups=None) -> dict:
    """Per-cell uncertainty over the prompts (resampling whole `groups` of prompts when given) -> {mean, ci_low,
    ci_high, sign_share, p_value: [*cells] tensors, stability: stats.rank_stability of the cells by |effect|
    (top 1..k of the cells whose interval excludes 0)}. recovery: summarise result.recovery (a ratio of means,
    Fieller's interval: stats.ratio_interval), else result.values (stats.interval). sign_share: the share of
    prompts whose effect (patched - target) has the sign of the mean effect (for recovery: the sign of the
    prompt's term in the ratio of means); p_value: of "the patch changes nothing" (mean effect 0), unadjusted."""
    raw = result.effect_per_prompt(normalise=False)  # ranks of the pooled ratio = ranks of the pooled numerator
    if recovery:
        numerator = result.per_prompt - result._per_cell(result.corrupted)
        mean, low, high = stats.ratio_interval(numerator, result._per_cell(result.clean - result.corrupted),
                                               groups=groups)
    else:
        mean, low, high = stats.interval(result.per_prompt, seed=seed, groups=groups)
    return {"mean": mean, "ci_low": low, "ci_high": high, "sign_share": stats.sign_share(raw),
            "p_value": stats.p_value(raw, groups),
            "stability": stats.rank_stability(raw.reshape(len(raw), -1), k=k, seed=seed, groups=groups)}


ratio_interval = stats.ratio_interval  # the ratio of means and its interval live in stats (kept here for callers)


def effect_change(base: PatchResult, ablated: PatchResult, recovery: bool = True, seed: int = 0, groups=None) -> dict:
    """How each cell's effect changes with components held ablated (the backup test of Wang et al.): per
    prompt, (patched - target) with the ablation minus without; with `recovery` in units of the unablated
    (clean - corrupted) gap: mean(change) / mean(gap), a ratio of means like `recovery` (per_prompt: each
    prompt's change over its own gap). -> {per_prompt [n, *cells], mean, ci_low, ci_high, sign_share (of the
    change), p_value (unadjusted, of "no change"): [*cells]}."""
    change = ablated.effect_per_prompt(normalise=False) - base.effect_per_prompt(normalise=False)
    out = {"sign_share": stats.sign_share(change), "p_value": stats.p_value(change, groups)}
    if not recovery:
        mean, low, high = stats.interval(change, seed=seed, groups=groups)
        return {"per_prompt": change, "mean": mean, "ci_low": low, "ci_high": high, **out}
    gap = base._per_cell(base.clean - base.corrupted)
    mean, low, high = stats.ratio_interval(change, gap, groups=groups)
    return {"per_prompt": change / gap, "mean": mean, "ci_low": low, "ci_high": high, **out}


# ---------------------------------------------------------------------------------------------- the sweep
def _merge_edits(edits) -> list:
    """One edit per site: several edits of a site are applied in the order given."""
    by_site: dict[str, list] = {}
    for site, fn in edits:
        by_site.setdefault(site, []).append(fn)

    def chain(fns):
        def fn(act):
            for f in fns:
                act = f(act)
            return act
        return fn
    return [(site, fns[0] if len(fns) == 1 else chain(fns)) for site, fns in by_site.items()]


def _changed_cells(source: torch.Tensor, target: torch.Tensor, site: str, by_position: bool) -> torch.Tensor:
    """[n_cells] (head-major) whether a cell's source and target activations differ for any prompt.
    source, target: [n_prompts, *shape] one site's activations."""
    differs = (source != target).any(0)
    pos_axis, head_axis = hooked_sweep.site_axes(site)
    if head_axis is None:                       # [pos, d_model]
        grid = differs.any(-1)[None]            # [1, pos]
    elif pos_axis == 1:                         # pattern [head, dest, src]
        grid = differs.any(-1)                  # [head, dest]
    else:                                       # [pos, head, d_head]
        grid = differs.any(-1).T                # [head, pos]
    return (grid if by_position else grid.any(-1, keepdim=True)).flatten()


def _patch_edit(mask: torch.Tensor, source: torch.Tensor, n_prompts: int) -> Callable:
    """An edit writing source [n_prompts, *shape] where mask [n_rows_cells, *shape(1s)] is set, on rows
    ordered cell-major (row = cell * n_prompts + prompt)."""
    def fn(act):
        act = act.unflatten(0, (mask.shape[0], n_prompts))
        return torch.where(mask[:, None], source[None].to(act.dtype), act).flatten(0, 1)
    return fn


@torch.no_grad()
def _generic_sweep(engine, source, target, site, metric, read, layers, by_position, clean, edits,
                   batch_size) -> hooked_sweep.Sweep:
    """The sweep over engine.run (any engine); the same result layout as hooked_sweep.sweep."""
    n_prompts, seq = source.shape
    device = source.device
    names = [site.format(layer) for layer in layers]
    # an engine that skips blocks starts each patched run at the patched layer, from the target's residual there
    restart = type(engine).run_from is not Engine.run_from
    starts = [f"blocks.{layer}.hook_resid_pre" for layer in layers] if restart else []
    source_logits, source_acts = engine.run(source, read=names, edits=_merge_edits(edits), positions=read)
    target_logits, target_acts = engine.run(target, read=list(dict.fromkeys(names + starts)),
                                            edits=_merge_edits(edits), positions=read)
    source_logits, target_logits = source_logits.float(), target_logits.float()
    clean_logits = source_logits if clean == "source" else target_logits
    prompt = torch.arange(n_prompts, device=device)
    target_value = metric(target_logits, prompt, clean_logits)

    _, head_axis = hooked_sweep.site_axes(site)
    n_heads = source_acts[names[0]].shape[1 + head_axis] if head_axis is not None else 1
    n_pos = seq if by_position else 1
    cell_head = torch.arange(n_heads, device=device).repeat_interleave(n_pos)
    cell_pos = torch.arange(n_pos, device=device).repeat(n_heads)
    todo = []  # (layer index, cell) of every cell whose source and target activations differ
    for li, name in enumerate(names):
        cells = _changed_cells(source_acts[name], target_acts[name], site, by_position).nonzero()[:, 0]
        todo.append(torch.stack([torch.full_like(cells, li), cells], 1))
    todo = torch.cat(todo).to(device)                                                  # [n_run, 2]
    batch_size = batch_size or hooked_sweep.default_batch_size(engine.cfg, seq, source_acts[names[0]].dtype)
    out = target_value.repeat(len(layers), n_heads * n_pos, 1)                         # [layers, cells, prompts]
    cells_per_run = max(1, batch_size // n_prompts)
    chunks = ([c for li in range(len(layers)) for c in todo[todo[:, 0] == li].split(cells_per_run)] if restart
              else list(todo.split(cells_per_run)))                                   # restart: one layer a run
    for chunk in progress(chunks, desc=f"patching {site.format('*')}"):
        patches = []
        for li in chunk[:, 0].unique().tolist():
            rows = (chunk[:, 0] == li).nonzero()[:, 0]
            cells = chunk[rows, 1]
            act = source_acts[names[li]]
            mask = hooked_sweep.cell_mask(site, act.shape[1:], len(rows), cell_pos[cells] if by_position else None,
                                          cell_head[cells] if head_axis is not None else None, device)
            full = torch.zeros(len(chunk), *mask.shape[1:], dtype=torch.bool, device=device)
            full[rows] = mask
            patches.append((names[li], _patch_edit(full, act, n_prompts)))
        rows_read = read.repeat(len(chunk))
        if restart:
            start = f"blocks.{layers[int(chunk[0, 0])]}.hook_resid_pre"
            resid = target_acts[start].repeat(len(chunk), 1, 1)   # read after the held edits at `start`: already in
            held = [(site, fn) for site, fn in edits if site != start]
            logits, _ = engine.run_from(layers[int(chunk[0, 0])], resid, target.repeat(len(chunk), 1),
                                        edits=_merge_edits(held + patches), positions=rows_read)
        else:
            logits, _ = engine.run(target.repeat(len(chunk), 1), edits=_merge_edits(list(edits) + patches),
                                   positions=rows_read)
        values = metric(logits.float(), prompt.repeat(len(chunk)), clean_logits).view(len(chunk), n_prompts)
        out[chunk[:, 0], chunk[:, 1]] = values.to(out.dtype)
    return hooked_sweep.Sweep(out, source_logits, target_logits, n_heads, n_pos,
                              meta={"cells_run": len(todo), "batch_size": batch_size,
                                    "implementation": f"generic ({engine.name})",
                                    "restarts_at_patched_layer": restart})


def patch_sweep(model, clean_tokens: torch.Tensor, corrupted_tokens: torch.Tensor, component: str,
                metric: Metric, mode: str = "denoise", by_position: bool = True,
                lengths: torch.Tensor | None = None, layers: list[int] | None = None,
                batch_size: int | None = None, suffix_groups: int | None = None, edits=(),
                implementation: str = "auto") -> PatchResult:
    """Patch `component` at every layer (and position, and head), one cell at a time, exactly.

    model: an engine (or a HookedTransformer / TransformerBridge / nnsight model).
    clean_tokens, corrupted_tokens: [n_prompts, seq] (right-padded when `lengths` [n_prompts] is given).
    layers: the layers to sweep (default all; `values` then has one row per listed layer).
    batch_size: rows (cells x prompts) per forward call (default: from a memory budget).
    suffix_groups: (tl) how many position groups run suffix-only (default: the cheapest estimate).
    edits: engine edits held in every run, e.g. techniques.ablation.ablation_edits (the same on every row).
    implementation: "auto" (suffix-only on tl, generic elsewhere) or "generic" (engine.run on any engine).
    Returns a PatchResult whose values are [layers], [layers, pos], [layers, heads] or [layers, heads, pos].
    """
    from mechscope.models import as_engine

    engine = as_engine(model)
    if component not in COMPONENTS:
        raise BadInput(f"unknown component {component!r}; use one of {', '.join(COMPONENTS)}")
    if mode not in MODES:
        raise BadInput(f"unknown mode {mode!r}; use denoise (patch clean into corrupted) or noise (the reverse)")
    if implementation not in IMPLEMENTATIONS:
        raise BadInput(f"unknown implementation {implementation!r}; use one of {', '.join(IMPLEMENTATIONS)}")
    if clean_tokens.shape != corrupted_tokens.shape:
        raise BadInput(f"clean and corrupted tokens must have the same shape (clean {tuple(clean_tokens.shape)}, "
                       f"corrupted {tuple(corrupted_tokens.shape)}); pair prompts of the same token length")
    n_prompts, seq = clean_tokens.shape
    device = clean_tokens.device
    lengths = torch.full((n_prompts,), seq, device=device) if lengths is None else lengths.to(device)
    read = lengths - 1
    layers = list(range(engine.cfg.n_layers)) if layers is None else [inputs.layer(engine, layer) for layer in layers]
    site = COMPONENTS[component]
    engine.require([site.format(layer) for layer in layers], f"patching {component}")
    source, target = (clean_tokens, corrupted_tokens) if mode == "denoise" else (corrupted_tokens, clean_tokens)
    clean = "source" if mode == "denoise" else "target"
    if engine.name == "tl" and implementation == "auto":
        sweep = hooked_sweep.sweep(engine.model, source, target, site, metric, read, layers, by_position, clean,
                                   edits, batch_size, suffix_groups, getattr(metric, "logit_pair", None))
    else:
        sweep = _generic_sweep(engine, source, target, site, metric, read, layers, by_position, clean, edits,
                               batch_size)
    clean_logits = sweep.source_logits if clean == "source" else sweep.target_logits
    prompt = torch.arange(n_prompts, device=device)
    source_value = metric(sweep.source_logits, prompt, clean_logits)
    target_value = metric(sweep.target_logits, prompt, clean_logits)

    per_prompt = sweep.values.permute(2, 0, 1).float()                 # [prompts, layers, cells]
    if by_position:
        cell_pos = torch.arange(sweep.n_pos, device=device).repeat(sweep.n_heads)
        pad = cell_pos[None, :] >= lengths[:, None]                    # [prompts, cells]
        per_prompt = per_prompt.masked_fill(pad[:, None, :], float("nan"))
    heads = component in HEAD_COMPONENTS
    shape = [len(layers)] + ([sweep.n_heads] if heads else []) + ([sweep.n_pos] if by_position else [])
    per_prompt = per_prompt.reshape(n_prompts, *shape).cpu()
    axes = ("layer",) + (("head",) if heads else ()) + (("pos",) if by_position else ())
    clean_value, corrupted_value = (source_value, target_value) if mode == "denoise" else (target_value, source_value)
    return PatchResult(values=per_prompt.nanmean(0), per_prompt=per_prompt, clean=clean_value.float().cpu(),
                       corrupted=corrupted_value.float().cpu(), component=component, mode=mode, metric=metric.name,
                       axes=axes, meta={"layers": layers, **sweep.meta})

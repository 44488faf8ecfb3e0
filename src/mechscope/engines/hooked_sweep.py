"""The fast exact patching sweep of the transformer-lens engine (a HookedTransformer's own blocks).

It computes exactly what transformer_lens.patching computes (one patched forward per cell), but recomputes
only what a patch can change:
- the source run and the target run are run once each, caching only the hooks needed;
- a patch at layer l starts from the target's cached residual entering block l (block l + 1 for
  resid_post) and runs blocks l..L-1 only; patches inside block l are applied by a hook there;
- all cells (positions x heads) of one layer go through the blocks as one batch, chunked to a memory
  budget; the logits are computed at the metric's read position only (each prompt's last token);
- a patch at position p cannot change positions < p (causal attention): the cells are split into a few
  groups of positions, and a group whose first position is p0 runs only positions >= p0, reading the
  prefix's keys and values from the target's cache;
- cells before the first position where source and target tokens differ patch identical activations:
  they are the target's own value, filled in without a forward;
- nothing is moved to the host until the sweep ends.

Self-contained: it knows sites (transformer-lens hook names) and a metric callable, not the patching
technique (mechscope.techniques.patching), which calls `sweep` on the tl engine. `site_axes` and
`cell_mask` describe which part of an activation a cell patches; the technique's generic path uses them too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

MEMORY_BUDGET = 2**29  # bytes of activations per batched call (the default batch size follows from it)
MAX_GROUPS = 8         # at most this many suffix-only position groups per layer
CALL_COST_TOKENS = 64  # the fixed cost of one batched call through the blocks, in tokens of work
HEAD_SITES = ("attn.hook_z", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern")

# metric(logits [rows, d_vocab] float32, prompt [rows] index of each row's prompt, clean_logits [n_prompts, d_vocab])
Score = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Sweep:
    """values [n_layers, n_cells, n_prompts]: the metric after patching each cell (cells head-major:
    cell = head * n_pos + pos); source_logits / target_logits [n_prompts, d_vocab] at the read positions."""
    values: torch.Tensor
    source_logits: torch.Tensor
    target_logits: torch.Tensor
    n_heads: int
    n_pos: int
    meta: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- geometry
def site_axes(site: str) -> tuple[int, int | None]:
    """(position axis, head axis) of a site's activation without its batch axis."""
    if site.endswith("attn.hook_pattern"):
        return 1, 0   # [head, dest, src]: a cell is a destination row
    if site.endswith(HEAD_SITES):
        return 0, 1   # [pos, head, d_head]
    return 0, None    # [pos, d_model]


def cell_mask(site: str, shape: torch.Size, n_cells: int, pos: torch.Tensor | None, head: torch.Tensor | None,
              device) -> torch.Tensor:
    """Bool mask [n_cells, *shape] (size 1 on the axes a cell does not select) of what each cell patches.
    shape: the activation's shape without batch; pos / head: [n_cells] indices, or None for all."""
    pos_axis, head_axis = site_axes(site)
    mask = torch.ones(n_cells, *[1] * len(shape), dtype=torch.bool, device=device)
    for axis, index in ((pos_axis, pos), (head_axis, head)):
        if index is not None:
            view = [1] * len(shape)
            view[axis] = shape[axis]
            along = torch.arange(shape[axis], device=device).view(1, *view)
            mask = mask & (along == index.view(-1, *[1] * len(shape)))
    return mask


# ---------------------------------------------------------------------------------------------- runs
def final_logits(model) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function [n, d_model] final residual -> [n, d_vocab] logits: ln_final, unembed, soft cap, as
    model.forward. The unembed's transposed copy (transformer-lens makes one on every call: 154 MB for
    GPT-2) is made once here."""
    weight = model.unembed.W_U.T.contiguous()
    cap = model.cfg.output_logits_soft_cap

    def readout(resid):
        x = model.ln_final(resid[:, None])[:, 0] if model.cfg.normalization_type is not None else resid
        logits = torch.nn.functional.linear(x, weight, model.unembed.b_U)
        return cap * torch.tanh(logits / cap) if cap is not None and cap > 0 else logits
    return readout


def _hooks(edits: Sequence[tuple[str, Callable]]) -> list:
    """transformer-lens hooks from engine edits (site, fn(activation) -> activation)."""
    return [(site, lambda act, hook, fn=fn: fn(act)) for site, fn in edits]


def cached_run(model, tokens: torch.Tensor, read: torch.Tensor, names: list[str], readout=None, edits=()):
    """One forward caching `names`, with logits at `read` only. tokens [n, seq], read [n] positions ->
    (logits [n, d_vocab] float32, {name: activation}). readout: final_logits(model), if already made."""
    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    with model.hooks(fwd_hooks=_hooks(edits)):
        _, cache = model.run_with_cache(tokens, names_filter=list(names) + [final], return_type=None,
                                        attention_mask=torch.ones_like(tokens))
    cache = dict(cache.items())
    rows = torch.arange(len(tokens), device=tokens.device)
    logits = (readout or final_logits(model))(cache[final][rows, read.to(tokens.device)])
    return logits.float(), cache


def _kv_entry(keys, values):
    """A frozen cache entry that gives block attention the prefix's keys / values [n, p0, kv_heads, d_head]."""
    try:
        from transformer_lens import TransformerLensKeyValueCacheEntry as Entry
    except ImportError:  # transformer-lens 2.x
        from transformer_lens.past_key_value_caching import HookedTransformerKeyValueCacheEntry as Entry
    return Entry(past_keys=keys, past_values=values, frozen=True)


def _resid_entering(cache: dict, block: int, n_layers: int) -> torch.Tensor:
    """The residual stream entering `block` ([n, seq, d_model]); block n_layers = the final residual."""
    if block < n_layers:
        return cache[f"blocks.{block}.hook_resid_pre"]
    return cache[f"blocks.{n_layers - 1}.hook_resid_post"]


def _run_cells(model, site: str, layer: int, src: torch.Tensor, target: dict, read: torch.Tensor,
               p0: int, n_cells: int, pos: torch.Tensor | None, head: torch.Tensor | None, metric: Score,
               clean_logits: torch.Tensor, readout: Callable, edits) -> torch.Tensor:
    """Score n_cells patches of one layer in one batched call -> [n_cells, n_prompts].

    src: the source activation at this layer's site [n_prompts, ...]; target: the target run's cache;
    p0: the first position run (positions < p0 come from the cache); pos / head: [n_cells] or None."""
    n_layers, n_prompts = model.cfg.n_layers, len(read)
    pos_axis, _ = site_axes(site)
    name = site.format(layer)
    start = layer + 1 if site.endswith("hook_resid_post") else layer
    src = src.narrow(pos_axis + 1, p0, src.shape[pos_axis + 1] - p0)
    mask = cell_mask(site, src.shape[1:], n_cells, None if pos is None else pos - p0, head, src.device)

    def patch(act, hook=None):  # act [n_cells * n_prompts, ...]
        act = act.unflatten(0, (n_cells, n_prompts))
        return torch.where(mask[:, None], src[None], act).flatten(0, 1)

    resid = _resid_entering(target, start, n_layers)[:, p0:].repeat(n_cells, 1, 1)
    hooks = _hooks(edits)
    if site.endswith(("hook_resid_pre", "hook_resid_post")):
        resid = patch(resid)
    else:
        hooks.append((name, patch))
    pos_embed = None
    if model.cfg.positional_embedding_type == "shortformer":
        pos_embed = target["hook_pos_embed"][:, p0:].repeat(n_cells, 1, 1)
    with model.hooks(fwd_hooks=hooks):
        for i in range(start, n_layers):
            past = None
            if p0 > 0:
                past = _kv_entry(target[f"blocks.{i}.attn.hook_k"][:, :p0].repeat(n_cells, 1, 1, 1),
                                 target[f"blocks.{i}.attn.hook_v"][:, :p0].repeat(n_cells, 1, 1, 1))
            resid = model.blocks[i](resid, past_kv_cache_entry=past, shortformer_pos_embed=pos_embed)
    rows = torch.arange(len(resid), device=resid.device)
    logits = readout(resid[rows, (read - p0).repeat(n_cells)]).float()
    prompt = torch.arange(n_prompts, device=logits.device).repeat(n_cells)
    return metric(logits, prompt, clean_logits).view(n_cells, n_prompts)


# ---------------------------------------------------------------------------------------------- cost model
def _position_groups(positions: list[int], n_groups: int) -> list[list[int]]:
    """Split sorted positions into n_groups contiguous groups of near-equal size."""
    n_groups = max(1, min(n_groups, len(positions)))
    bounds = [round(i * len(positions) / n_groups) for i in range(n_groups + 1)]
    return [positions[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def _cheapest_groups(positions: list[int], rows_per_position: int, seq: int) -> list[list[int]]:
    """The grouping (1..MAX_GROUPS groups) with the least estimated work: the tokens run (a group starting at
    p0 runs rows x (seq - p0) tokens) plus CALL_COST_TOKENS for every extra call through the blocks."""
    def cost(groups):
        return sum(len(g) * rows_per_position * (seq - g[0]) + CALL_COST_TOKENS for g in groups)
    return min((_position_groups(positions, n) for n in range(1, MAX_GROUPS + 1)), key=cost)


def default_batch_size(cfg, seq_len: int, dtype=None) -> int:
    """Rows (patched prompt copies) per batched call that keep a block's activations near MEMORY_BUDGET.
    cfg: any config with d_model, d_mlp, n_heads (transformer-lens or mechscope's ModelConfig)."""
    per_row = seq_len * (4 * cfg.d_model + 2 * (cfg.d_mlp or 0) + 2 * cfg.n_heads * seq_len)
    size = torch.tensor([], dtype=dtype or cfg.dtype).element_size()
    return max(1, MEMORY_BUDGET // (per_row * size))


# ---------------------------------------------------------------------------------------------- the sweep
@torch.no_grad()
def sweep(model, source: torch.Tensor, target: torch.Tensor, site: str, metric: Score, read: torch.Tensor,
          layers: list[int], by_position: bool = True, clean: str = "source", edits=(),
          batch_size: int | None = None, suffix_groups: int | None = None) -> Sweep:
    """Patch the source activation at `site` ("blocks.{}.hook_resid_pre", "blocks.{}.attn.hook_z", ...) into
    the target run at every layer of `layers` (x position if by_position, x head for head sites), exactly.

    model: a HookedTransformer; source, target: [n_prompts, seq] tokens (right-padded rows are read at
    `read` [n_prompts], each row's last real position); clean: which run's logits the metric compares to
    ("source" when denoising). edits: engine edits held in every run (e.g. components ablated); they must act
    the same on every row and see whole sequences (so suffix-only runs are off with edits).
    batch_size: rows (cells x prompts) per call (default: from MEMORY_BUDGET); suffix_groups: position
    groups run suffix-only (default: the cheapest estimate; 1 = every cell runs all positions)."""
    cfg = model.cfg
    n_prompts, seq = source.shape
    device = source.device
    # suffix-only runs read the prefix's keys from hook_k: not where keys change after it (q/k norm, clipping)
    causal = cfg.attention_dir == "causal"
    prefix_ok = causal and by_position and not edits and getattr(cfg, "clip_qkv", None) is None and \
        cfg.original_architecture not in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")
    target_names = [f"blocks.{i}.hook_resid_pre" for i in range(cfg.n_layers)]
    if cfg.positional_embedding_type == "shortformer":
        target_names += ["hook_pos_embed"]
    if prefix_ok:  # the keys / values of positions before a run's first position
        target_names += [f"blocks.{i}.attn.hook_{kv}" for i in range(cfg.n_layers) for kv in "kv"]
    readout = final_logits(model)
    source_logits, source_cache = cached_run(model, source, read, [site.format(i) for i in layers], readout, edits)
    target_logits, target_cache = cached_run(model, target, read, target_names, readout, edits)
    clean_logits = source_logits if clean == "source" else target_logits
    prompt = torch.arange(n_prompts, device=device)
    target_value = metric(target_logits, prompt, clean_logits)

    # the cells of one layer: heads (if any) x positions (if by_position), head-major
    pos_axis, head_axis = site_axes(site)
    n_heads = source_cache[site.format(layers[0])].shape[1 + head_axis] if head_axis is not None else 1
    n_pos = seq if by_position else 1
    cell_head = torch.arange(n_heads, device=device).repeat_interleave(n_pos)
    cell_pos = torch.arange(n_pos, device=device).repeat(n_heads)

    # positions before the first differing token hold identical activations in both runs (causality)
    differs = (source != target).any(0).nonzero()
    first = int(differs[0]) if causal and by_position and len(differs) else 0
    run_positions = list(range(first, n_pos))
    if not prefix_ok or suffix_groups == 1:
        groups = [run_positions]
    elif suffix_groups:
        groups = _position_groups(run_positions, suffix_groups)
    else:
        groups = _cheapest_groups(run_positions, n_heads * n_prompts, seq)
    max_p0 = int(read.min())  # a prompt's own last position must be run
    batch_size = batch_size or default_batch_size(cfg, seq)
    cells_per_call = max(1, batch_size // n_prompts)
    chunks = []  # (first position run, cell indices [n]) for every batched call of a layer
    for group in groups:
        in_group = torch.isin(cell_pos, torch.tensor(group, device=device)).nonzero()[:, 0]
        chunks += [(min(group[0], max_p0) if prefix_ok else 0, chunk) for chunk in in_group.split(cells_per_call)]

    from mechscope.progress import progress

    out = target_value.repeat(len(layers), n_heads * n_pos, 1)  # [layers, cells, prompts]
    for li, layer in enumerate(progress(layers, desc=f"patching {site.format('*')}")):
        src = source_cache[site.format(layer)]
        for p0, chunk in chunks:
            values = _run_cells(model, site, layer, src, target_cache, read, p0, len(chunk),
                                cell_pos[chunk] if by_position else None,
                                cell_head[chunk] if head_axis is not None else None,
                                metric, clean_logits, readout, edits)
            out[li, chunk] = values.to(out.dtype)
    return Sweep(out, source_logits, target_logits, n_heads, n_pos,
                 meta={"first_differing_position": first, "position_groups": len(groups), "batch_size": batch_size,
                       "implementation": "suffix-only (tl)"})

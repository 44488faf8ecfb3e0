"""The fast exact patching sweep of the transformer-lens engine (a HookedTransformer's own blocks).

It computes exactly what transformer_lens.patching computes (one patched forward per cell), but recomputes
only what a patch can change:
- the source run and the target run are one batched forward, caching only the hooks needed;
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

Two implementations. The packed path (resid_pre, resid_post, z; `packed_supported` architectures; no edits)
puts the suffix rows of every cell (cell p: positions p..T-1 of every prompt) into one [rows, d_model] matrix
and runs each block once on the rows of all cells started at or before it, with the blocks' weights used
directly: one matmul per weight per block, attention once per start position (prefix keys / values from the
target cache), and for a logit difference two unembedding columns per cell (`logit_pair_readout`). The
per-layer path (`_run_cells`: every site, edits, any architecture) batches one layer's cells through the
blocks' own forward with hooks, in a few suffix-only position groups.

Self-contained: it knows sites (transformer-lens hook names) and a metric callable, not the patching
technique (mechscope.techniques.patching), which calls `sweep` on the tl engine. `site_axes` and
`cell_mask` describe which part of an activation a cell patches; the technique's generic path uses them too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from transformer_lens.utilities.activation_functions import apply_softcap

from mechscope.progress import progress

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
    model.forward (without the transposed copy of W_U that transformer-lens makes on every call: 154 MB for
    GPT-2)."""
    cap = model.cfg.output_logits_soft_cap

    def readout(resid):
        x = model.ln_final(resid[:, None])[:, 0] if model.cfg.normalization_type is not None else resid
        logits = torch.addmm(model.unembed.b_U, x, model.unembed.W_U)
        return cap * torch.tanh(logits / cap) if cap is not None and cap > 0 else logits
    return readout


def logit_pair_readout(model, answer: torch.Tensor, wrong: torch.Tensor) -> Callable:
    """A function (final residual [n, d_model], prompt [n]) -> [n] logit[answer] - logit[wrong] that computes
    those two logits only (ln_final, two unembedding columns, soft cap), not the vocabulary.
    answer / wrong: [n_prompts] token ids (one per prompt; a single id is broadcast)."""
    cap = model.cfg.output_logits_soft_cap

    def logit(x, ids):
        out = torch.einsum("nd,dn->n", x, model.unembed.W_U[:, ids]) + model.unembed.b_U[ids]
        return cap * torch.tanh(out / cap) if cap is not None and cap > 0 else out

    def readout(resid, prompt):
        x = model.ln_final(resid[:, None])[:, 0] if model.cfg.normalization_type is not None else resid
        a, w = answer.to(resid.device), wrong.to(resid.device)
        return (logit(x, a[prompt % len(a)]) - logit(x, w[prompt % len(w)])).float()
    return readout


def _hooks(edits: Sequence[tuple[str, Callable]]) -> list:
    """transformer-lens hooks from engine edits (site, fn(activation) -> activation)."""
    return [(site, lambda act, hook, fn=fn: fn(act)) for site, fn in edits]


def cached_runs(model, source: torch.Tensor, target: torch.Tensor, read: torch.Tensor, source_names: list[str],
                target_names: list[str], readout: Callable, edits=()):
    """The source and target runs as one batched forward (the weights are streamed once), caching the names
    each needs, with logits at `read` only. source, target: [n, seq] tokens, read [n] positions ->
    (source logits, target logits: [n, d_vocab] float32, source cache, target cache: {name: activation})."""
    n_prompts = len(source)
    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    tokens = torch.cat([source, target])
    with model.hooks(fwd_hooks=_hooks(edits)):
        _, cache = model.run_with_cache(tokens, names_filter=sorted({*source_names, *target_names, final}),
                                        return_type=None, attention_mask=torch.ones_like(tokens))
    rows = torch.arange(len(tokens), device=tokens.device)
    logits = readout(cache[final][rows, read.to(tokens.device).repeat(2)]).float()
    source_cache = {name: cache[name][:n_prompts] for name in source_names}
    target_cache = {name: cache[name][n_prompts:] for name in {*target_names, final}}
    return logits[:n_prompts], logits[n_prompts:], source_cache, target_cache


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


def row_bytes(cfg, seq_len: int, dtype=None) -> int:
    """Bytes of one row's activations in one block (residual-width, MLP and attention-pattern tensors).
    cfg: any config with d_model, d_mlp, n_heads, dtype (transformer-lens or mechscope's ModelConfig)."""
    per_row = seq_len * (4 * cfg.d_model + 2 * (cfg.d_mlp or 0) + 2 * cfg.n_heads * seq_len)
    return per_row * torch.tensor([], dtype=dtype or cfg.dtype).element_size()


def default_batch_size(cfg, seq_len: int, dtype=None) -> int:
    """Rows (patched prompt copies) per batched call that keep a block's activations near MEMORY_BUDGET."""
    return max(1, MEMORY_BUDGET // row_bytes(cfg, seq_len, dtype))


# ---------------------------------------------------------------------------------------------- the packed path
# Every cell's suffix (positions p..T-1 of every prompt) is one block of rows of a single [rows, d_model] matrix;
# each block of the model runs once on the rows of all cells that start at or before it (one matmul per weight),
# attention runs per start position with the prefix's keys / values from the target cache, and the logits are
# read at each row's read position only. It uses the blocks' weights directly (no hooks), so it covers only what
# it implements (below) and falls back to `_run_cells` elsewhere.
PACKED_SITES = ("hook_resid_pre", "hook_resid_post", "attn.hook_z")
# transformer-lens normalises q and k of these after hook_k, chosen by architecture name (in the attention's
# forward), not through use_qk_norm
QK_NORM_BY_NAME = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")
# The architectures whose transformer-lens blocks do nothing by name that the packed path leaves out: their blocks
# follow the config flags that packed_supported checks (tests/test_patching_architectures.py runs packed against
# the generic path on each that transformer-lens loads from a local config). None / mechscope-toy: a model built
# from a HookedTransformerConfig (the flags alone).
PACKED_ARCHITECTURES = frozenset({
    None, "mechscope-toy", "GPT2LMHeadModel", "GPTNeoForCausalLM", "GPTJForCausalLM", "GPTNeoXForCausalLM",
    "OPTForCausalLM", "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM",
    "PhiForCausalLM", "Phi3ForCausalLM", "Gemma2ForCausalLM"})


def keys_are_cached(cfg) -> bool:
    """Whether attention uses the keys hook_k (hook_rot_k with rotary) caches: no q/k norm or clipping after it.
    Suffix-only runs and the packed path read the prefix's keys from that cache."""
    return (getattr(cfg, "clip_qkv", None) is None and not getattr(cfg, "use_qk_norm", False)
            and cfg.original_architecture not in QK_NORM_BY_NAME)


def packed_supported(cfg, site: str, edits) -> bool:
    """Whether the packed path computes this sweep exactly: what it implements is causal pre-norm blocks (LN / RMS,
    parallel or sequential, post-sublayer norms), standard or rotary positions, grouped-query heads, local windows,
    soft caps, keys as cached (`keys_are_cached`), on PACKED_ARCHITECTURES."""
    return (site.endswith(PACKED_SITES) and not edits and cfg.attention_dir == "causal"
            and cfg.original_architecture in PACKED_ARCHITECTURES and keys_are_cached(cfg)
            and cfg.positional_embedding_type in ("standard", "rotary")
            and not any(getattr(cfg, flag, False) for flag in (
                "use_logn_attn", "use_dynamic_ntk_rope", "use_attention_sinks", "load_in_4bit",
                "use_split_qkv_input", "use_attn_in", "ungroup_grouped_query_attention", "use_hook_mlp_in")))


def user_hooks(model) -> list[str]:
    """The hook points where hooks are attached to the model (model.add_hook, permanent or not) or a module is
    spliced in place of a hook point (sae-lens's add_sae): the packed path would skip them, and suffix-only runs
    would show them only part of each sequence."""
    from transformer_lens.hook_points import HookPoint

    names = [name for name, point in model.hook_dict.items() if point.fwd_hooks or point._forward_hooks]
    return names + [name for name, module in model.named_modules()
                    if name.rpartition(".")[2].startswith("hook_") and not isinstance(module, HookPoint)]


@dataclass
class Cells:
    """The cells of a packed run, ordered by start block then position. start [C]: the first block a cell
    runs in full (its patch layer; +1 for resid_post); pos [C]: its first patched position (its rows are
    positions pos..T-1 of every prompt); head [C] or None; only_pos: whether a cell patches position pos alone
    (by position) or every position >= pos (all positions)."""
    start: torch.Tensor
    pos: torch.Tensor
    head: torch.Tensor | None
    only_pos: bool

    def rows(self, n_prompts: int, seq: int):
        """(cell [R], prompt [R], pos [R]) of every packed row: cell-major, then prompt, then position."""
        lengths = (seq - self.pos).repeat_interleave(n_prompts)                     # [C * n]
        pair = torch.arange(len(lengths), device=lengths.device).repeat_interleave(lengths)
        first = torch.cumsum(lengths, 0) - lengths
        pos = torch.arange(len(pair), device=lengths.device) - first[pair] + self.pos[pair // n_prompts]
        return pair // n_prompts, pair % n_prompts, pos


def _qkv_weights(attn):
    """(w_qkv [(n_heads + 2 n_kv) d_head, d_model], b_qkv [...]) of one block's attention, as F.linear weights (q, k,
    v heads stacked): a copy, made when the block runs and freed after it (every block's copy held for a sweep:
    3 x 4096^2 x 32 layers x 2 bytes = 3.2 GB on a 7B Llama in bfloat16)."""
    w_k, b_k = getattr(attn, "_W_K", attn.W_K), getattr(attn, "_b_K", attn.b_K)
    w_v, b_v = getattr(attn, "_W_V", attn.W_V), getattr(attn, "_b_V", attn.b_V)
    w_qkv = torch.cat([w.permute(0, 2, 1).reshape(-1, w.shape[1]) for w in (attn.W_Q, w_k, w_v)])
    return w_qkv, torch.cat([attn.b_Q.flatten(), b_k.flatten(), b_v.flatten()])


def _rotate(attn, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """transformer-lens' rotary embedding of x [R, heads, d_head] at absolute positions pos [R]."""
    dim = attn.cfg.rotary_dim
    x_rot, x_pass = x[..., :dim], x[..., dim:]
    cos, sin = attn.rotary_cos[pos][:, None], attn.rotary_sin[pos][:, None]
    return torch.cat([x_rot * cos + attn.rotate_every_two(x_rot) * sin, x_pass], -1)


def _attention(attn, q, k, v, first_pos: torch.Tensor, prefix_k, prefix_v, n_prompts: int, seq: int):
    """Causal attention of the packed rows -> z [R, n_heads, d_head].

    q [R, n_heads, d_head], k / v [R, n_kv, d_head]: the rows' own (rotated) queries, keys, values;
    prefix_k / prefix_v [n_prompts, seq, n_kv, d_head]: the target run's keys / values at this layer, which
    give each cell the positions before its first; first_pos [C]: the first position of each cell whose rows
    q holds (cell-major, then prompt, then position). One batched product per first position p."""
    cfg = attn.cfg
    z = torch.empty_like(q)
    cell_rows = (seq - first_pos) * n_prompts
    first_row = torch.cumsum(cell_rows, 0) - cell_rows
    repeat = q.shape[1] // k.shape[1]
    fused = q.dtype == torch.float32 and not cfg.attn_scores_soft_cap
    for p in first_pos.unique().tolist():
        in_p = (first_pos == p).nonzero()[:, 0]                                           # [c]
        n_rows = seq - p
        index = (first_row[in_p, None] + torch.arange(n_rows * n_prompts, device=q.device)).flatten()
        shape = (len(in_p) * n_prompts, n_rows)
        q_p = q[index].unflatten(0, shape)                                                 # [c n, T-p, h, dh]
        k_p = torch.cat([prefix_k[:, :p].repeat(len(in_p), 1, 1, 1), k[index].unflatten(0, shape)], 1)
        v_p = torch.cat([prefix_v[:, :p].repeat(len(in_p), 1, 1, 1), v[index].unflatten(0, shape)], 1)
        if repeat > 1:
            k_p, v_p = k_p.repeat_interleave(repeat, 2), v_p.repeat_interleave(repeat, 2)
        query = torch.arange(p, seq, device=q.device)[:, None]
        key = torch.arange(seq, device=q.device)[None]
        mask = key <= query                                                               # [T-p, T]
        if attn.attn_type == "local":
            mask = mask & (key > query - cfg.window_size)
        q_p, k_p, v_p = q_p.transpose(1, 2), k_p.transpose(1, 2), v_p.transpose(1, 2)   # [c n, h, ., dh]
        if fused:  # one kernel: scores, mask (transformer-lens' IGNORE is -inf), softmax, values
            z_p = torch.nn.functional.scaled_dot_product_attention(q_p, k_p, v_p, attn_mask=mask,
                                                                   scale=1 / float(attn.attn_scale))
        else:
            scores = apply_softcap(q_p @ k_p.transpose(-1, -2) / attn.attn_scale, cfg.attn_scores_soft_cap)
            pattern = torch.softmax(torch.where(mask, scores, attn.IGNORE), -1)          # [c n, h, T-p, T]
            z_p = pattern.to(v_p.dtype) @ v_p
        z[index] = z_p.transpose(1, 2).flatten(0, 1)
    return z


FUSED_ACTIVATIONS = {"gelu_new": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
                     "gelu_pytorch_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
                     "gelu": torch.nn.functional.gelu, "relu": torch.nn.functional.relu, "silu": torch.nn.functional.silu}


def _norm(module, x: torch.Tensor) -> torch.Tensor:
    """A transformer-lens norm module on rows x [R, d_model]: LayerNorm / LayerNormPre as one fused
    F.layer_norm in float32 (the same arithmetic as transformer-lens' five passes), others through the module."""
    from transformer_lens.components import LayerNorm, LayerNormPre

    if x.dtype == torch.float32 and isinstance(module, (LayerNorm, LayerNormPre)):
        weight, bias = (module.w, module.b) if isinstance(module, LayerNorm) else (None, None)
        return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, module.eps)
    return module(x[None])[0]


def _mlp(block, x: torch.Tensor) -> torch.Tensor:
    """The block's MLP on normalised rows x [R, d_model]: a plain MLP with its activation as one fused kernel
    (gelu_new = tanh-approximate gelu), others (gated, LN activations) through the module."""
    from transformer_lens.components import MLP

    mlp = block.mlp
    act = FUSED_ACTIVATIONS.get(block.cfg.act_fn)
    if type(mlp) is not MLP or act is None:
        return mlp(x[None])[0]
    return torch.addmm(mlp.b_out, act(torch.addmm(mlp.b_in, x, mlp.W_in)), mlp.W_out)


def _attention_in(block, x: torch.Tensor, pos: torch.Tensor):
    """Queries, keys, values [R, heads, d_head] of packed residual rows x [R, d_model] at positions pos [R]."""
    attn, cfg = block.attn, block.cfg
    w_qkv, b_qkv = _qkv_weights(attn)
    qkv = torch.nn.functional.linear(_norm(block.ln1, x), w_qkv, b_qkv)
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    q, k, v = qkv.split([cfg.n_heads * cfg.d_head, n_kv * cfg.d_head, n_kv * cfg.d_head], -1)
    q, k, v = (t.unflatten(-1, (-1, cfg.d_head)) for t in (q, k, v))
    if cfg.positional_embedding_type == "rotary":
        q, k = _rotate(attn, q, pos), _rotate(attn, k, pos)
    return q, k, v


def _block_out(block, resid: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The block's output rows [R, d_model] from its input rows resid [R, d_model] and the heads' outputs
    z [R, n_heads, d_head] (attention output projection, the residual adds, the MLP)."""
    cfg, W_O = block.cfg, block.attn.W_O
    attn_out = torch.addmm(block.attn.b_O, z.flatten(1), W_O.reshape(-1, W_O.shape[-1]))  # W_O as it is: no copy
    if cfg.use_normalization_before_and_after:
        attn_out = _norm(block.ln1_post, attn_out)
    if cfg.attn_only:
        return resid + attn_out
    mid = resid + attn_out
    mlp_out = _mlp(block, _norm(block.ln2, resid if cfg.parallel_attn_mlp else mid))
    if cfg.use_normalization_before_and_after:
        mlp_out = _norm(block.ln2_post, mlp_out)
    return mid + mlp_out


def _entry_rows(site: str, block: int, cells: Cells, rows, source: dict, target: dict, n_layers: int):
    """The new cells' rows entering `block` (the cells whose start is `block`).
    -> (resid [r, d_model] the residual entering the block, z [r, n_heads, d_head] or None): for a residual site
    the target's residual with the source's written at the patched positions; for z the target's residual and
    the target's head outputs with the cell's head written from the source."""
    cell, prompt, pos = rows
    patched = pos == cells.pos[cell] if cells.only_pos else torch.ones_like(pos, dtype=torch.bool)
    if site.endswith("attn.hook_z"):
        z = target[site.format(block)][prompt, pos]                                      # [r, h, dh]
        head = torch.arange(z.shape[1], device=z.device) == cells.head[cell][:, None]  # [r, h]
        z = torch.where((patched[:, None] & head)[..., None], source[site.format(block)][prompt, pos], z)
        return target[f"blocks.{block}.hook_resid_pre"][prompt, pos], z
    layer = block - 1 if site.endswith("hook_resid_post") else block
    resid = _resid_entering(target, block, n_layers)[prompt, pos]
    return torch.where(patched[:, None], source[site.format(layer)][prompt, pos], resid), None


def _run_packed(model, site: str, cells: Cells, source: dict, target: dict, read: torch.Tensor,
                score: Callable) -> torch.Tensor:
    """Run one chunk of cells (sorted by start) through the blocks as packed rows -> values [C, n_prompts].
    source / target: the two runs' caches; read [n_prompts]: read positions;
    score(final resid [C * n_prompts, d_model], prompt [C * n_prompts]) -> [C * n_prompts] values."""
    cfg = model.cfg
    n_layers, n_prompts, seq = cfg.n_layers, len(read), target["blocks.0.hook_resid_pre"].shape[1]
    rows = cells.rows(n_prompts, seq)
    ends = [0] + torch.cumsum((seq - cells.pos) * n_prompts, 0).tolist()  # cell c's rows: ends[c]:ends[c + 1]
    starts = cells.start.tolist()
    enters_with_z = site.endswith("attn.hook_z")
    k_name = "hook_rot_k" if cfg.positional_embedding_type == "rotary" else "hook_k"
    resid = target["blocks.0.hook_resid_pre"].new_empty(0, cfg.d_model)
    for block in range(starts[0], n_layers + 1):
        entered = sum(s <= block for s in starts)             # cells [0, entered) run from here on
        new = tuple(t[len(resid):ends[entered]] for t in rows)
        new_resid, new_z = _entry_rows(site, block, cells, new, source, target, n_layers) if len(new[0]) \
            else (resid[:0], None)
        if not enters_with_z:
            resid = torch.cat([resid, new_resid])
        if block == n_layers:
            break
        layer, attending = model.blocks[block], len(resid)
        q, k, v = _attention_in(layer, resid, rows[2][:attending])
        z = _attention(layer.attn, q, k, v, cells.pos[:sum(e <= attending for e in ends[1:])],
                       target[f"blocks.{block}.attn.{k_name}"], target[f"blocks.{block}.attn.hook_v"], n_prompts, seq)
        if new_z is not None:
            resid, z = torch.cat([resid, new_resid]), torch.cat([z, new_z])
        resid = _block_out(layer, resid, z)
    first_row = torch.tensor(ends[:-1], device=read.device)[:, None]
    suffix = seq - cells.pos[:, None]
    read_row = first_row + torch.arange(n_prompts, device=read.device) * suffix \
        + torch.clamp(read[None] - cells.pos[:, None], min=0)                              # [C, n]
    prompt = torch.arange(n_prompts, device=read.device).repeat(len(starts))
    return score(resid[read_row.flatten()], prompt).view(len(starts), n_prompts)


# ---------------------------------------------------------------------------------------------- the sweep
def _packed_cells(site: str, layers: list[int], n_heads: int, n_pos: int, first: int, by_position: bool,
                  device) -> tuple[Cells, torch.Tensor]:
    """The cells to run (those at or after the first differing position), sorted by start block then position
    -> (Cells, their indices [C] into the [layers x (heads x positions)] grid of the result)."""
    start_offset = 1 if site.endswith("hook_resid_post") else 0
    layer_index, head, pos = torch.meshgrid(torch.arange(len(layers), device=device),
                                            torch.arange(n_heads, device=device),
                                            torch.arange(n_pos, device=device), indexing="ij")
    start = torch.tensor(layers, device=device)[layer_index] + start_offset
    pos = pos if by_position else torch.full_like(pos, first)
    grid = torch.arange(start.numel(), device=device).view(start.shape)
    keep = (pos >= first).flatten() if by_position else torch.ones(start.numel(), dtype=torch.bool, device=device)
    start, pos, head, grid = (t.flatten()[keep] for t in (start, pos, head, grid))
    order = torch.argsort(start * (n_pos + 1) + pos, stable=True)
    cells = Cells(start[order], pos[order], head[order] if site.endswith(HEAD_SITES) else None, by_position)
    return cells, grid[order]


def _packed_chunks(cells: Cells, n_prompts: int, seq: int, max_rows: int, max_cells: int) -> list[slice]:
    """Consecutive runs of cells whose packed rows (n_prompts x suffix length each) fit max_rows, at most
    max_cells cells each."""
    chunks, begin, rows = [], 0, 0
    for c, length in enumerate(((seq - cells.pos) * n_prompts).tolist()):
        if c > begin and (rows + length > max_rows or c - begin >= max_cells):
            chunks.append(slice(begin, c))
            begin, rows = c, 0
        rows += length
    return chunks + [slice(begin, len(cells.pos))]


def packed_rows_budget(cfg, seq: int, dtype) -> int:
    """Packed rows per chunk that keep a block's activations near MEMORY_BUDGET."""
    per_row = 6 * cfg.d_model + 2 * (cfg.d_mlp or 0) + 2 * cfg.n_heads * seq
    return max(seq, MEMORY_BUDGET // (per_row * torch.tensor([], dtype=dtype).element_size()))


@torch.no_grad()
def sweep(model, source: torch.Tensor, target: torch.Tensor, site: str, metric: Score, read: torch.Tensor,
          layers: list[int], by_position: bool = True, clean: str = "source", edits=(),
          batch_size: int | None = None, suffix_groups: int | None = None,
          logit_pair: tuple[torch.Tensor, torch.Tensor] | None = None) -> Sweep:
    """Patch the source activation at `site` ("blocks.{}.hook_resid_pre", "blocks.{}.attn.hook_z", ...) into
    the target run at every layer of `layers` (x position if by_position, x head for head sites), exactly.

    model: a HookedTransformer; source, target: [n_prompts, seq] tokens (right-padded rows are read at
    `read` [n_prompts], each row's last real position); clean: which run's logits the metric compares to
    ("source" when denoising). edits: engine edits held in every run (e.g. components ablated); they must act
    the same on every row and see whole sequences (so suffix-only runs are off with edits).
    batch_size: rows (cells x prompts) per call (default: from MEMORY_BUDGET); suffix_groups: position
    groups run suffix-only (default: the cheapest estimate; 1 = every cell runs all positions).
    logit_pair: (answer [n_prompts], wrong [n_prompts]) when the metric is logit[answer] - logit[wrong]: the
    packed path then computes those two logits per cell, not the vocabulary (the metric still scores the
    source and target runs).

    Two implementations: the packed path (`_run_packed`: resid_pre / resid_post / z on the architectures of
    `packed_supported`, no edits) and `_run_cells` (every site, edits, any architecture)."""
    cfg = model.cfg
    n_prompts, seq = source.shape
    device = source.device
    causal = cfg.attention_dir == "causal"
    hooked = user_hooks(model)  # run like edits: every cell through the blocks' own forward, whole sequences
    meta = {"note": f"hooks attached to the model at {', '.join(hooked[:3])}{' ...' if len(hooked) > 3 else ''}: "
                    f"every cell runs whole sequences through the blocks"} if hooked else {}
    # suffix-only runs read the prefix's keys from hook_k: not where keys change after it (q/k norm, clipping)
    prefix_ok = causal and by_position and not edits and not hooked and keys_are_cached(cfg)
    target_names = [f"blocks.{i}.hook_resid_pre" for i in range(cfg.n_layers)]
    if cfg.positional_embedding_type == "shortformer":
        target_names += ["hook_pos_embed"]
    packed = packed_supported(cfg, site, edits) and not hooked
    k_name = "rot_k" if packed and cfg.positional_embedding_type == "rotary" else "k"
    if prefix_ok or packed:  # the keys / values of positions before a run's first position
        target_names += [f"blocks.{i}.attn.hook_{kv}" for i in range(cfg.n_layers) for kv in (k_name, "v")]
    if packed and site.endswith("attn.hook_z"):
        target_names += [site.format(i) for i in layers]
    readout = final_logits(model)
    source_logits, target_logits, source_cache, target_cache = cached_runs(
        model, source, target, read, [site.format(i) for i in layers], target_names, readout, edits)
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
    first = int(differs[0]) if causal and (by_position or packed) and len(differs) else 0
    out = target_value.repeat(len(layers), n_heads * n_pos, 1)  # [layers, cells, prompts]
    if packed:
        _sweep_packed(model, site, layers, n_heads, n_pos, first, by_position, source_cache, target_cache, read,
                      metric, clean_logits, readout, logit_pair, batch_size, out)
        return Sweep(out, source_logits, target_logits, n_heads, n_pos,
                     meta={"first_differing_position": first, "implementation": "packed suffixes (tl)"})
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
                       "implementation": "suffix-only (tl)", **meta})


def _sweep_packed(model, site, layers, n_heads, n_pos, first, by_position, source_cache, target_cache, read, metric,
                  clean_logits, readout, logit_pair, batch_size, out) -> None:
    """Fill out [layers, heads x positions, prompts] with every cell at or after `first` by the packed path."""
    n_prompts, seq = target_cache["blocks.0.hook_resid_pre"].shape[:2]
    if logit_pair is not None:
        score = logit_pair_readout(model, *logit_pair)
    else:
        def score(resid, prompt):
            return metric(readout(resid).float(), prompt, clean_logits)
    cells, index = _packed_cells(site, layers, n_heads, n_pos, first, by_position, read.device)
    max_rows = packed_rows_budget(model.cfg, seq, target_cache["blocks.0.hook_resid_pre"].dtype)
    max_cells = max(1, batch_size // n_prompts) if batch_size else len(index)
    flat = out.view(-1, n_prompts)
    for chunk in progress(_packed_chunks(cells, n_prompts, seq, max_rows, max_cells),
                          desc=f"patching {site.format('*')}"):
        part = Cells(cells.start[chunk], cells.pos[chunk], None if cells.head is None else cells.head[chunk],
                     cells.only_pos)
        values = _run_packed(model, site, part, source_cache, target_cache, read, score)
        after_read = part.pos[:, None] > read[None]   # the patch comes after the read position: the target's value
        flat[index[chunk]] = torch.where(after_read, flat[index[chunk]], values.to(out.dtype))

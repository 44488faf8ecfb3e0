"""Activation patching with a fast exact engine.

Patching copies one activation from a *source* run into a *target* run and scores the target's output:
- denoising (default): source = clean, target = corrupted. "Is this activation enough to restore the
  clean behaviour?" Recovery 1 = fully restored, 0 = no effect.
- noising: source = corrupted, target = clean. "Is this activation necessary?" Recovery stays 1 where the
  patch changes nothing and falls towards 0 (or below) where the activation matters.
Recovery is always (patched - corrupted) / (clean - corrupted), in both modes.

Components (transformer-lens hook names; positions are token positions, heads are attention heads):
    resid_pre / resid_mid / resid_post / attn_out / mlp_out   blocks.{l}.hook_*, [batch, pos, d_model]
    z / q / k / v                                             blocks.{l}.attn.hook_*, [batch, pos, head, d_head]
    pattern                                                   blocks.{l}.attn.hook_pattern, [batch, head, dest, src]
`z` is a head's output (transformer-lens' "attn_head_out"); `pattern` "by position" patches one
destination row. k / v have n_key_value_heads heads on grouped-query models.

The engine computes exactly what transformer_lens.patching computes (one patched forward per cell),
but recomputes only what a patch can change:
- the source run and the target run are run once each, caching only the hooks needed;
- a patch at layer l starts from the target's cached residual entering block l (block l + 1 for
  resid_post) and runs blocks l..L-1 only; patches inside block l are applied by a hook there;
- all cells (positions x heads) of one layer go through the blocks as one batch, chunked to a memory
  budget; the logits are computed at the metric's read position only (each prompt's last token);
- a patch at position p cannot change positions < p (causal attention): the cells are split into a few
  groups of positions, and a group whose first position is p0 runs only positions >= p0, reading the
  prefix's keys and values from the target's cache;
- cells before the first position where clean and corrupted tokens differ patch identical activations:
  they are the target's own value, filled in without a forward;
- nothing is moved to the host until the sweep ends.

Padded batches: right-padded tokens with `lengths` (pair_batch builds them). The metric reads each
prompt's last real token; cells at a prompt's padding positions are NaN in `per_prompt`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from mechscope import inputs, metrics
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
MEMORY_BUDGET = 2**29  # bytes of activations per batched call (the default batch size follows from it)
MAX_GROUPS = 8         # at most this many suffix-only position groups per layer
CALL_COST_TOKENS = 64  # the fixed cost of one batched call through the blocks, in tokens of work


# ---------------------------------------------------------------------------------------------- metrics
@dataclass
class Metric:
    """How a patched run is scored.

    score(logits, prompt, clean_logits) -> [n]: logits [n, d_vocab] at each row's read position (float32),
    prompt [n] the index of the prompt each row belongs to, clean_logits [n_prompts, d_vocab] the clean
    run's logits at the read positions.
    """
    name: str
    score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

    def __call__(self, logits, prompt, clean_logits):
        return self.score(logits, prompt, clean_logits)


def logit_diff_metric(answer, wrong) -> Metric:
    """logit[answer] - logit[wrong]; answer / wrong: one id or [n_prompts] ids."""
    answer, wrong = torch.as_tensor(answer).reshape(-1), torch.as_tensor(wrong).reshape(-1)

    def score(logits, prompt, clean_logits):
        a, w = answer.to(logits.device), wrong.to(logits.device)
        return metrics.logit_diff(logits, a[prompt % len(a)], w[prompt % len(w)])
    return Metric("logit_diff", score)


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
    """Right-padded clean / corrupted token ids [n, seq], lengths [n], answer / wrong ids [n]."""
    clean: torch.Tensor
    corrupted: torch.Tensor
    lengths: torch.Tensor
    answer: torch.Tensor
    wrong: torch.Tensor


def pair_batch(model, pairs: list[dict]) -> PairBatch:
    """Tokenise {"clean", "corrupted", "answer", "wrong"} pairs; each pair's two prompts must have the same
    number of tokens (BadInput otherwise); pairs of different lengths are right-padded."""
    if not pairs:
        raise BadInput("no prompt pairs given; pass --clean/--corrupted or a --pairs file with one pair per line")
    rows = []
    for i, pair in enumerate(pairs):
        missing = [key for key in ("clean", "corrupted", "answer", "wrong") if not pair.get(key)]
        if missing:
            raise BadInput(f"pair {i} lacks {', '.join(missing)}: each pair needs clean, corrupted, answer, wrong")
        clean, corrupted = inputs.paired_tokens(model, pair["clean"], pair["corrupted"])
        rows.append((clean[0], corrupted[0], inputs.single_token(model, pair["answer"]),
                     inputs.single_token(model, pair["wrong"])))
    lengths = torch.tensor([len(r[0]) for r in rows])
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    clean = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
    corrupted = clean.clone()
    for i, (c, k, _, _) in enumerate(rows):
        clean[i, :len(c)], corrupted[i, :len(k)] = c, k
    device = model.cfg.device
    return PairBatch(clean.to(device), corrupted.to(device), lengths.to(device),
                     torch.tensor([r[2] for r in rows], device=device), torch.tensor([r[3] for r in rows], device=device))


# ---------------------------------------------------------------------------------------------- result
@dataclass
class PatchResult:
    """values: the metric after each patch, mean over prompts (NaN-aware), shaped by `axes`:
    [n_layers] (all positions), [n_layers, pos], [n_layers, n_heads] or [n_layers, n_heads, pos].
    per_prompt: [n_prompts, *values.shape]. clean / corrupted: [n_prompts] metric of the unpatched runs.
    recovery: (values - corrupted) / (clean - corrupted) with the prompt means (1 = clean, 0 = corrupted)."""
    values: torch.Tensor
    per_prompt: torch.Tensor
    clean: torch.Tensor
    corrupted: torch.Tensor
    component: str
    mode: str
    metric: str
    axes: tuple[str, ...]
    meta: dict = field(default_factory=dict)

    @property
    def recovery(self) -> torch.Tensor:
        return metrics.normalized(self.values, self.corrupted.mean(), self.clean.mean())


# ---------------------------------------------------------------------------------------------- engine
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


def cached_run(model, tokens: torch.Tensor, read: torch.Tensor, names: list[str], readout=None):
    """One forward caching `names`, with logits at `read` only. tokens [n, seq], read [n] positions ->
    (logits [n, d_vocab] float32, {name: activation}). readout: final_logits(model), if already made."""
    final = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    _, cache = model.run_with_cache(tokens, names_filter=list(names) + [final], return_type=None,
                                    attention_mask=torch.ones_like(tokens))
    cache = dict(cache.items())
    rows = torch.arange(len(tokens), device=tokens.device)
    logits = (readout or final_logits(model))(cache[final][rows, read.to(tokens.device)])
    return logits.float(), cache


def _axes(component: str) -> tuple[int, int | None]:
    """(position axis, head axis) of the component's activation without its batch axis."""
    if component == "pattern":
        return 1, 0
    if component in HEAD_COMPONENTS:
        return 0, 1
    return 0, None


def _cell_mask(component: str, shape: torch.Size, n_cells: int, pos: torch.Tensor | None,
               head: torch.Tensor | None, device) -> torch.Tensor:
    """Bool mask [n_cells, *shape] (size 1 on the axes a cell does not select) of what each cell patches.
    shape: the activation's shape without batch; pos / head: [n_cells] indices, or None for all."""
    pos_axis, head_axis = _axes(component)
    mask = torch.ones(n_cells, *[1] * len(shape), dtype=torch.bool, device=device)
    for axis, index in ((pos_axis, pos), (head_axis, head)):
        if index is not None:
            view = [1] * len(shape)
            view[axis] = shape[axis]
            along = torch.arange(shape[axis], device=device).view(1, *view)
            mask = mask & (along == index.view(-1, *[1] * len(shape)))
    return mask


def _run_cells(model, component: str, layer: int, src: torch.Tensor, target: dict, read: torch.Tensor,
               p0: int, n_cells: int, pos: torch.Tensor | None, head: torch.Tensor | None, metric: Metric,
               clean_logits: torch.Tensor, readout: Callable) -> torch.Tensor:
    """Score n_cells patches of one layer in one batched call -> [n_cells, n_prompts].

    src: the source activation of this layer [n_prompts, ...]; target: the target run's cache;
    p0: the first position run (positions < p0 come from the cache); pos / head: [n_cells] or None;
    readout: final_logits(model)."""
    n_layers, n_prompts = model.cfg.n_layers, len(read)
    pos_axis, _ = _axes(component)
    start = layer + 1 if component == "resid_post" else layer
    src = src.narrow(pos_axis + 1, p0, src.shape[pos_axis + 1] - p0)
    mask = _cell_mask(component, src.shape[1:], n_cells, None if pos is None else pos - p0, head, src.device)

    def patch(act, hook=None):  # act [n_cells * n_prompts, ...]
        act = act.unflatten(0, (n_cells, n_prompts))
        return torch.where(mask[:, None], src[None], act).flatten(0, 1)

    resid = _resid_entering(target, start, n_layers)[:, p0:].repeat(n_cells, 1, 1)
    hooks = []
    if component in ("resid_pre", "resid_post"):
        resid = patch(resid)
    else:
        hooks = [(COMPONENTS[component].format(layer), patch)]
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


def default_batch_size(model, seq_len: int) -> int:
    """Rows (patched prompt copies) per batched call that keep a block's activations near MEMORY_BUDGET."""
    cfg = model.cfg
    per_row = seq_len * (4 * cfg.d_model + 2 * (cfg.d_mlp or 0) + 2 * cfg.n_heads * seq_len)
    return max(1, MEMORY_BUDGET // (per_row * torch.tensor([], dtype=cfg.dtype).element_size()))


@torch.no_grad()
def patch_sweep(model, clean_tokens: torch.Tensor, corrupted_tokens: torch.Tensor, component: str,
                metric: Metric, mode: str = "denoise", by_position: bool = True,
                lengths: torch.Tensor | None = None, layers: list[int] | None = None,
                batch_size: int | None = None, suffix_groups: int | None = None) -> PatchResult:
    """Patch `component` at every layer (and position, and head), one cell at a time, exactly.

    clean_tokens, corrupted_tokens: [n_prompts, seq] (right-padded when `lengths` [n_prompts] is given).
    layers: the layers to sweep (default all; `values` then has one row per listed layer).
    batch_size: rows (cells x prompts) per forward call (default: from MEMORY_BUDGET).
    suffix_groups: how many position groups run suffix-only (default: the cheapest estimate; 1 = each
    layer's cells run every position in one group).
    Returns a PatchResult whose values are [layers], [layers, pos], [layers, heads] or [layers, heads, pos].
    """
    if component not in COMPONENTS:
        raise BadInput(f"unknown component {component!r}; use one of {', '.join(COMPONENTS)}")
    if mode not in MODES:
        raise BadInput(f"unknown mode {mode!r}; use denoise (patch clean into corrupted) or noise (the reverse)")
    if clean_tokens.shape != corrupted_tokens.shape:
        raise BadInput(f"clean and corrupted tokens must have the same shape (clean {tuple(clean_tokens.shape)}, "
                       f"corrupted {tuple(corrupted_tokens.shape)}); pair prompts of the same token length")
    cfg = model.cfg
    n_prompts, seq = clean_tokens.shape
    device = clean_tokens.device
    lengths = torch.full((n_prompts,), seq, device=device) if lengths is None else lengths.to(device)
    read = lengths - 1
    layers = list(range(cfg.n_layers)) if layers is None else [inputs.layer(model, layer) for layer in layers]
    source, target = (clean_tokens, corrupted_tokens) if mode == "denoise" else (corrupted_tokens, clean_tokens)

    # suffix-only runs read the prefix's keys from hook_k: not where keys change after it (q/k norm, clipping)
    causal = cfg.attention_dir == "causal"
    prefix_ok = causal and by_position and getattr(cfg, "clip_qkv", None) is None and \
        cfg.original_architecture not in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")
    target_names = [f"blocks.{i}.hook_resid_pre" for i in range(cfg.n_layers)]
    if cfg.positional_embedding_type == "shortformer":
        target_names += ["hook_pos_embed"]
    if prefix_ok:  # the keys / values of positions before a run's first position
        target_names += [f"blocks.{i}.attn.hook_{kv}" for i in range(cfg.n_layers) for kv in "kv"]
    readout = final_logits(model)
    source_logits, source_cache = cached_run(model, source, read, [COMPONENTS[component].format(i) for i in layers],
                                             readout)
    target_logits, target_cache = cached_run(model, target, read, target_names, readout)
    clean_logits = source_logits if mode == "denoise" else target_logits
    prompt = torch.arange(n_prompts, device=device)
    source_value = metric(source_logits, prompt, clean_logits)
    target_value = metric(target_logits, prompt, clean_logits)

    # the cells of one layer: heads (if any) x positions (if by_position), head-major
    n_heads = 1
    if component in HEAD_COMPONENTS:
        n_heads = source_cache[COMPONENTS[component].format(layers[0])].shape[1 + _axes(component)[1]]
    n_pos = seq if by_position else 1
    cell_head = torch.arange(n_heads, device=device).repeat_interleave(n_pos)
    cell_pos = torch.arange(n_pos, device=device).repeat(n_heads)

    # positions before the first differing token hold identical activations in both runs (causality)
    differs = (clean_tokens != corrupted_tokens).any(0).nonzero()
    first = int(differs[0]) if causal and len(differs) else 0
    first = first if by_position else 0
    run_positions = list(range(first, n_pos))
    if not prefix_ok or suffix_groups == 1:
        groups = [run_positions]
    elif suffix_groups:
        groups = _position_groups(run_positions, suffix_groups)
    else:
        groups = _cheapest_groups(run_positions, n_heads * n_prompts, seq)
    max_p0 = int(read.min())  # a prompt's own last position must be run
    batch_size = batch_size or default_batch_size(model, seq)
    cells_per_call = max(1, batch_size // n_prompts)
    chunks = []  # (first position run, cell indices [n]) for every batched call of a layer
    for group in groups:
        in_group = torch.isin(cell_pos, torch.tensor(group, device=device)).nonzero()[:, 0]
        chunks += [(min(group[0], max_p0) if prefix_ok else 0, chunk) for chunk in in_group.split(cells_per_call)]

    out = target_value.repeat(len(layers), n_heads * n_pos, 1)  # [layers, cells, prompts]
    for li, layer in enumerate(progress(layers, desc=f"patching {component}")):
        src = source_cache[COMPONENTS[component].format(layer)]
        for p0, chunk in chunks:
            values = _run_cells(model, component, layer, src, target_cache, read, p0, len(chunk),
                                cell_pos[chunk] if by_position else None,
                                cell_head[chunk] if component in HEAD_COMPONENTS else None,
                                metric, clean_logits, readout)
            out[li, chunk] = values.to(out.dtype)

    per_prompt = out.permute(2, 0, 1).float()                    # [prompts, layers, cells]
    if by_position:
        pad = cell_pos[None, :] >= lengths[:, None]             # [prompts, cells]
        per_prompt = per_prompt.masked_fill(pad[:, None, :], float("nan"))
    shape = [len(layers)] + ([n_heads] if component in HEAD_COMPONENTS else []) + ([n_pos] if by_position else [])
    per_prompt = per_prompt.reshape(n_prompts, *shape).cpu()
    axes = ("layer",) + (("head",) if component in HEAD_COMPONENTS else ()) + (("pos",) if by_position else ())
    clean_value, corrupted_value = (source_value, target_value) if mode == "denoise" else (target_value, source_value)
    return PatchResult(values=per_prompt.nanmean(0), per_prompt=per_prompt, clean=clean_value.float().cpu(),
                       corrupted=corrupted_value.float().cpu(), component=component, mode=mode, metric=metric.name,
                       axes=axes, meta={"layers": layers, "first_differing_position": first,
                                        "position_groups": len(groups), "batch_size": batch_size})

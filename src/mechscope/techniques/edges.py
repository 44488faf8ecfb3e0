"""Edge-level circuit discovery: EAP and EAP-IG scores for every edge, checked by exact edge patching.

The model as a graph (Syed et al. 2023; Hanna et al. 2024; Conmy et al. 2023):
    senders    "input" (blocks.0.hook_resid_pre: token + position embeddings), each head "L{l}H{h}" (its
               output z[..., h, :] @ W_O[h]), each MLP "MLP{l}" (hook_mlp_out)
    receivers  each head's query, key and value input "L{l}H{h}.q|k|v" (blocks.l.hook_q_input ...: the head's
               own copy of the residual stream, before ln1), each MLP's input "MLP{l}" (hook_mlp_in), "logits"
               (the last block's hook_resid_post, before the final norm)
    edges      every sender upstream of a receiver, through the residual stream.

Edge patching (exact): a receiver's input is the sum of its senders' outputs (plus biases), so removing
edge s -> r replaces s's contribution to r's input by s's output in the corrupted run, and nothing else:
    input_r := input_r - sum over removed s -> r of (out_s - out_s_corrupted)
with out_s the sender's output in this (patched) run; everything downstream recomputes. Every row of a batch
can remove a different edge set, so any number of circuits is evaluated in one batched forward after one
corrupted forward. All edges kept = the clean run; none kept = the corrupted run (the floor).

Scores (first-order estimates of removing one edge, m(edge removed) - m(clean)):
    EAP     (out_s_corrupted - out_s_clean) . dm/d input_r            gradient on the clean run
    EAP-IG  the same with dm/d input_r averaged over `steps` runs whose token embeddings are interpolated
            from corrupted to clean (alpha = 1/steps .. 1; the last is the clean run, so EAP comes free):
            one batched forward + backward of steps x n_prompts rows, plus the corrupted forward.
Summed over positions; per prompt [n_prompts, n_edges].

Needs the per-head input sites (engines/base.py INPUT_KINDS): the transformer-lens engine has them
(use_split_qkv_input), the nnsight engine derives them (each head's projection recomputed from its own copy of
the block input); the bridge is refused in one line (engine.require). Grouped-query models are refused (k / v
inputs are shared).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from mechscope.errors import BadInput

Metric = Callable[[torch.Tensor], torch.Tensor]  # logits [rows, pos, d_vocab] -> [rows], row r * n + j on prompt j
METHODS = ("eap", "eap-ig")


# ------------------------------------------------------------------------------------------------ the graph
@dataclass(frozen=True)
class Graph:
    """senders / receivers: names in forward order; edges: (sender index, receiver index) pairs."""
    n_layers: int
    n_heads: int
    senders: list[str]
    receivers: list[str]
    edges: list[tuple[int, int]]

    @property
    def names(self) -> list[str]:
        """"sender -> receiver" per edge."""
        return [f"{self.senders[s]} -> {self.receivers[r]}" for s, r in self.edges]

    def index(self, name: str) -> int:
        """The edge index of "sender -> receiver" (KeyError if absent)."""
        return self.names.index(name)

    def adjacency(self) -> torch.Tensor:
        """[n_senders, n_receivers] edge index, -1 where there is no edge."""
        out = torch.full((len(self.senders), len(self.receivers)), -1, dtype=torch.long)
        for i, (s, r) in enumerate(self.edges):
            out[s, r] = i
        return out

    def node_of_receiver(self, r: int) -> int | None:
        """The sender index of the node a receiver belongs to (None for logits)."""
        name = self.receivers[r]
        return None if name == "logits" else self.senders.index(name.split(".")[0])


def build_graph(cfg) -> Graph:
    """The edge graph of a model config (transformer-lens field names). Parallel attention / MLP blocks: an
    MLP does not read its own layer's heads."""
    if cfg.n_key_value_heads not in (None, cfg.n_heads):
        raise BadInput("edge discovery needs a key and value input per head; this model shares them between "
                       "heads (grouped-query attention)")
    senders, order = ["input"], [(-1, 1)]            # (layer, 0 = attention / 1 = MLP): where an output appears
    receivers, reads = [], []                        # reads: outputs before (layer, stage) are upstream
    for layer in range(cfg.n_layers):
        for h in range(cfg.n_heads):
            receivers += [f"L{layer}H{h}.{c}" for c in "qkv"]
            reads += [(layer, 0)] * 3
        for h in range(cfg.n_heads):
            senders.append(f"L{layer}H{h}")
            order.append((layer, 0))
        if not cfg.attn_only:
            receivers.append(f"MLP{layer}")
            reads.append((layer, 0) if cfg.parallel_attn_mlp else (layer, 1))
            senders.append(f"MLP{layer}")
            order.append((layer, 1))
    receivers.append("logits")
    reads.append((cfg.n_layers, 0))
    edges = [(s, r) for r, at in enumerate(reads) for s, where in enumerate(order) if where < at]
    return Graph(cfg.n_layers, cfg.n_heads, senders, receivers, edges)


def _sender_sites(graph: Graph, attn_only: bool) -> list[str]:
    return (["blocks.0.hook_resid_pre"] + [f"blocks.{l}.attn.hook_z" for l in range(graph.n_layers)]
            + ([] if attn_only else [f"blocks.{l}.hook_mlp_out" for l in range(graph.n_layers)]))


def _receiver_sites(graph: Graph, attn_only: bool) -> list[str]:
    sites = [f"blocks.{l}.hook_{c}_input" for l in range(graph.n_layers) for c in "qkv"]
    sites += [] if attn_only else [f"blocks.{l}.hook_mlp_in" for l in range(graph.n_layers)]
    return sites + [f"blocks.{graph.n_layers - 1}.hook_resid_post"]


def _sender_slices(graph: Graph) -> dict[str, slice]:
    """sender site -> the sender indices its output fills."""
    out = {"blocks.0.hook_resid_pre": slice(0, 1)}
    for i, name in enumerate(graph.senders):
        if name.endswith("H0"):
            out[f"blocks.{name[1:-2]}.attn.hook_z"] = slice(i, i + graph.n_heads)
        elif name.startswith("MLP"):
            out[f"blocks.{name[3:]}.hook_mlp_out"] = slice(i, i + 1)
    return out


def _receiver_slices(graph: Graph) -> dict[str, slice]:
    """site -> the receiver indices of its input ([..., n_heads, d_model] q / k / v sites: one per head)."""
    index = {name: i for i, name in enumerate(graph.receivers)}
    out = {}
    for layer in range(graph.n_layers):
        for c in "qkv":
            first = index[f"L{layer}H0.{c}"]
            out[f"blocks.{layer}.hook_{c}_input"] = slice(first, first + 3 * graph.n_heads, 3)
        if f"MLP{layer}" in index:
            out[f"blocks.{layer}.hook_mlp_in"] = slice(index[f"MLP{layer}"], index[f"MLP{layer}"] + 1)
    out[f"blocks.{graph.n_layers - 1}.hook_resid_post"] = slice(len(graph.receivers) - 1, len(graph.receivers))
    return out


def _outputs(engine, site: str, act: torch.Tensor) -> torch.Tensor:
    """A sender site's activation -> [batch, pos, n_senders_at_site, d_model] their outputs."""
    if site.endswith("hook_z"):
        layer = int(site.split(".")[1])
        return torch.einsum("bphe,hed->bphd", act, engine.W_O(layer).detach().to(act.dtype))
    return act[:, :, None]


def _as_heads(x: torch.Tensor, site: str) -> torch.Tensor:
    """A receiver site's activation viewed [batch, pos, n_receivers_at_site, d_model]."""
    return x if site.endswith("_input") else x[:, :, None]


def require_sites(engine, graph: Graph) -> None:
    """BadInput (one line) when the engine lacks a site edge patching needs (the tl and nnsight engines have them)."""
    engine.require(_sender_sites(graph, engine.cfg.attn_only) + _receiver_sites(graph, engine.cfg.attn_only),
                   "edge discovery (per-head q / k / v inputs; the tl and nnsight engines offer them)")


# ------------------------------------------------------------------------------------------------ scores
@dataclass
class EdgeScores:
    """Per-prompt first-order estimates of m(edge removed) - m(clean): eap, eap_ig [n_prompts, n_edges]."""
    graph: Graph
    eap: torch.Tensor
    eap_ig: torch.Tensor
    clean: torch.Tensor                 # [n_prompts] metric of the clean run
    corrupted: torch.Tensor             # [n_prompts] metric of the corrupted run
    steps: int
    corrupted_outputs: dict = field(repr=False, default_factory=dict)  # sender site -> [n, pos, k, d_model]

    def mean(self, method: str) -> torch.Tensor:
        """[n_edges] the mean estimate over prompts of `method` ("eap" or "eap-ig")."""
        return (self.eap if method == "eap" else self.eap_ig).mean(0)


def steps_per_chunk(cfg, n_prompts: int, seq: int, n_receivers: int) -> int:
    """EAP-IG steps per forward + backward (n_prompts rows each) that keep it near hooked_sweep.MEMORY_BUDGET: a
    row's activations and their gradients in every layer, and its receiver gradients [seq, n_receivers, d_model]
    in float32; at least 1."""
    from mechscope.engines.hooked_sweep import MEMORY_BUDGET, row_bytes

    per_row = 2 * cfg.n_layers * row_bytes(cfg, seq) + seq * n_receivers * cfg.d_model * 4
    return max(1, MEMORY_BUDGET // (n_prompts * per_row))


def edge_scores(engine, clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric, steps: int = 5,
                graph: Graph | None = None, chunk_steps: int | None = None) -> EdgeScores:
    """EAP and EAP-IG scores of every edge from one corrupted forward and a batched forward + backward of
    steps x n_prompts rows, chunk_steps steps at a time (default: steps_per_chunk, a memory budget; each row's
    gradient is its own, so the chunks give the same scores). clean, corrupted: [n, pos] token ids (same shape)."""
    if steps < 1:
        raise BadInput("--steps must be at least 1")
    graph = graph or build_graph(engine.cfg)
    require_sites(engine, graph)
    attn_only, n = engine.cfg.attn_only, len(clean)
    senders, receivers = _sender_sites(graph, attn_only), _receiver_sites(graph, attn_only)
    with torch.no_grad():
        c_logits, c_acts = engine.run(corrupted, read=senders + ["hook_embed"])
    corrupted_value = metric(c_logits).float()
    corrupted_outputs = {s: _outputs(engine, s, c_acts[s]).detach() for s in senders}
    alphas = torch.arange(1, steps + 1, device=clean.device, dtype=torch.float32) / steps   # [steps]
    base = c_acts["hook_embed"]
    per_call = chunk_steps or steps_per_chunk(engine.cfg, n, clean.shape[1], len(graph.receivers))
    s_idx = torch.tensor([s for s, _ in graph.edges], device=clean.device)
    r_idx = torch.tensor([r for _, r in graph.edges], device=clean.device)

    def score(g):  # g [n, pos, R, d] -> [n, n_edges]
        full = torch.einsum("npsd,nprd->nsr", delta, g)
        return full[:, s_idx, r_idx].cpu()

    eap, eap_ig = None, 0
    for end in range(steps, 0, -per_call):   # the last step (alpha = 1, the clean run) first: it gives delta
        chunk = alphas[max(0, end - per_call):end]
        k = len(chunk)

        def interpolate(embed, chunk=chunk):  # rows i * n + j: step i of the chunk, prompt j
            a = chunk.repeat_interleave(n).to(embed.dtype)[:, None, None]
            start = base.repeat(len(chunk), 1, 1).to(embed.dtype)
            return start + a * (embed - start)
        value, acts, grads = engine.run_with_grads(clean.repeat(k, 1), metric,
                                                   read=(senders if eap is None else []) + receivers,
                                                   edits=[("hook_embed", interpolate)])
        if eap is None:
            clean_value = value.float().view(k, n)[-1]
            delta = clean.new_zeros(n, clean.shape[1], len(graph.senders), engine.cfg.d_model, dtype=torch.float32)
            for site, where in _sender_slices(graph).items():
                last = acts[site].view(k, n, *acts[site].shape[1:])[-1]                           # the clean run
                delta[:, :, where] = (corrupted_outputs[site] - _outputs(engine, site, last)).float()
        grad = delta.new_zeros(k * n, clean.shape[1], len(graph.receivers), engine.cfg.d_model)
        for site, where in _receiver_slices(graph).items():
            grad[:, :, where] = _as_heads(grads[site], site).float()
        grad = grad.view(k, n, *grad.shape[1:])                                               # [k, n, pos, R, d]
        if eap is None:
            eap = score(grad[-1])
        eap_ig = eap_ig + score(grad.sum(0))
    return EdgeScores(graph, eap=eap, eap_ig=eap_ig / steps, clean=clean_value.cpu(),
                      corrupted=corrupted_value.cpu(), steps=steps, corrupted_outputs=corrupted_outputs)


# ------------------------------------------------------------------------------------------------ exact
@torch.no_grad()
def evaluate(engine, clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric, keep: torch.Tensor,
             graph: Graph | None = None, corrupted_outputs: dict | None = None, max_batch: int = 512) -> torch.Tensor:
    """Exact edge patching: the metric with every edge outside each circuit removed (its sender's output
    replaced by the corrupted run's in that receiver's input only).

    keep: [n_circuits, n_edges] bool (True = the edge is in the circuit). -> [n_circuits, n_prompts] metric.
    One forward per max_batch rows (circuits x prompts), after one corrupted forward (skipped when
    corrupted_outputs, from EdgeScores, is given)."""
    graph = graph or build_graph(engine.cfg)
    require_sites(engine, graph)
    attn_only, n = engine.cfg.attn_only, len(clean)
    senders, receivers = _sender_sites(graph, attn_only), _receiver_sites(graph, attn_only)
    if corrupted_outputs is None:
        c_acts = engine.activations(corrupted, senders)
        corrupted_outputs = {s: _outputs(engine, s, c_acts[s]) for s in senders}
    r_slices = _receiver_slices(graph)
    adjacency = graph.adjacency().to(keep.device)
    removed = torch.zeros(len(keep), len(graph.receivers), len(graph.senders), device=keep.device)
    has = adjacency.T >= 0
    removed[:, has] = (~keep[:, adjacency.T[has]]).float()                      # [C, R, S]
    out = torch.empty(len(keep), n)
    per_call = max(1, max_batch // n)
    for start in range(0, len(keep), per_call):
        chunk = removed[start:start + per_call]
        c = len(chunk)
        deltas, filled = None, 0    # deltas [C, S, n * pos * d]: sender outputs minus the corrupted ones

        def record(site):  # senders fire in graph order, so deltas fill the sender indices in turn
            def fn(act):
                nonlocal deltas, filled
                cor = corrupted_outputs[site]                                     # [n, pos, k, d]
                delta = _outputs(engine, site, act).view(c, *cor.shape) - cor.to(act.dtype)
                k = delta.shape[3]
                if deltas is None:
                    deltas = act.new_zeros(c, len(graph.senders), delta[0].numel() // k)
                deltas[:, filled:filled + k] = delta.permute(0, 3, 1, 2, 4).reshape(c, k, -1)
                filled += k
                return act
            return site, fn

        def patch(site):
            def fn(act):
                mask = chunk[:, r_slices[site], :filled].to(act.device, act.dtype)       # [C, k, S']
                fix = (mask @ deltas[:, :filled]).view(c, -1, n, *act.shape[1:2], act.shape[-1])  # [C, k, n, pos, d]
                fix = fix.permute(0, 2, 3, 1, 4).reshape(c * n, act.shape[1], -1, act.shape[-1])
                return act - (fix if site.endswith("_input") else fix[:, :, 0])
            return site, fn
        edits = [record(s) for s in senders] + [patch(r) for r in receivers]
        logits, _ = engine.run(clean.repeat(c, 1), edits=edits)
        out[start:start + c] = metric(logits).float().view(c, n).cpu()
    return out



# ------------------------------------------------------------------------------------------------ circuits
def connected(graph: Graph, keep: torch.Tensor) -> torch.Tensor:
    """keep [C, n_edges] bool -> the edges on some path input -> ... -> logits of kept edges. The others change
    nothing under edge patching (a sender none of whose inputs is kept writes its corrupted output; a receiver
    that reaches the logits only through removed edges is read by nobody), so pruning them is exact."""
    adjacency = graph.adjacency().to(keep.device)                                # [S, R]
    node = torch.tensor([-1 if graph.node_of_receiver(r) is None else graph.node_of_receiver(r)
                         for r in range(len(graph.receivers))], device=keep.device)
    kept = torch.zeros(len(keep), *adjacency.shape, dtype=torch.bool, device=keep.device)
    has = adjacency >= 0
    kept[:, has] = keep[:, adjacency[has]]                                       # [C, S, R]
    n_s = len(graph.senders)
    reached = torch.zeros(len(keep), n_s, dtype=torch.bool, device=keep.device)  # from the input
    reached[:, 0] = True
    for s in range(1, n_s):
        into = node == s
        reached[:, s] = (kept[:, :, into] & reached[:, :, None]).flatten(1).any(1)
    alive = torch.zeros(len(keep), len(graph.receivers), dtype=torch.bool, device=keep.device)  # reach the logits
    alive[:, node == -1] = True
    for s in reversed(range(n_s)):
        leads = (kept[:, s] & alive).any(1)
        alive[:, node == s] = leads[:, None]
    on_path = kept & reached[:, :, None] & alive[:, None, :]
    s_idx, r_idx = torch.tensor(graph.edges, device=keep.device).T
    return on_path[:, s_idx, r_idx]


def top_edges(scores: torch.Tensor, sizes, graph: Graph) -> torch.Tensor:
    """scores [n_edges] -> [len(sizes), n_edges] bool: the top-k edges by |score| (ties: first edge first),
    pruned to those on a path to the logits."""
    order = scores.abs().argsort(descending=True, stable=True)
    keep = torch.zeros(len(sizes), len(scores), dtype=torch.bool)
    for i, k in enumerate(sizes):
        keep[i, order[:k]] = True
    return connected(graph, keep)


def random_edges(n_edges: int, sizes, seed: int = 0) -> torch.Tensor:
    """[len(sizes), n_edges] bool: k edges drawn at random (seeded), not pruned."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.zeros(len(sizes), n_edges, dtype=torch.bool)
    for i, k in enumerate(sizes):
        keep[i, torch.randperm(n_edges, generator=gen)[:k]] = True
    return keep


def faithfulness(values: torch.Tensor, clean: torch.Tensor, floor: torch.Tensor):
    """values [C, n] exact metric of C circuits; clean, floor [n] (all edges, no edges) -> (mean, low, high) [C]:
    (mean m(circuit) - mean m(floor)) / (mean m(clean) - mean m(floor)), its 95% Fieller interval over prompts
    (stats.ratio_interval)."""
    from mechscope import stats

    numerator = (values - floor).T                                               # [n, C]
    denominator = (clean - floor)[:, None].expand_as(numerator)
    return stats.ratio_interval(numerator, denominator)


def curve_sizes(n_edges: int, points: int = 12) -> list[int]:
    """0, n_edges and log-spaced sizes between (about `points` in all)."""
    grid = torch.logspace(0, torch.log10(torch.tensor(float(n_edges))), max(points - 1, 2)).round().long().tolist()
    return sorted({0, n_edges, *grid})


# ------------------------------------------------------------------------------------------------ discovery
@dataclass
class Discovery:
    """A discovered circuit, evaluated exactly. Faithfulness values are (mean, low, high) floats."""
    scores: EdgeScores
    method: str
    circuit: torch.Tensor               # [n_edges] bool, the circuit (connected to the logits)
    faithfulness: tuple                 # of the circuit (exact edge patching)
    completeness: tuple                 # of the full model less the circuit's edges (near 0: nothing left)
    clean: float                        # exact metric, all edges kept (= the clean run)
    floor: float                        # exact metric, no edge kept (= the corrupted run)
    curve: dict                         # sizes [k], and per method "eap" / "eap-ig" / "random": {edges, mean, low, high}
    checked: list[int]                  # edge indices whose exact single-edge effect was measured
    exact: torch.Tensor                 # [len(checked), n_prompts] m(edge removed) - m(clean)
    agreement: dict                     # per method: spearman, top_k_overlap, k, n_edges
    n_prompts: int


def single_edge_effects(engine, clean, corrupted, metric, indices, scores: EdgeScores, max_batch: int = 512):
    """Exact m(edge removed) - m(clean) of each edge in indices, every other edge kept -> [len(indices), n]."""
    keep = torch.ones(len(indices), len(scores.graph.edges), dtype=torch.bool)
    keep[torch.arange(len(indices)), torch.as_tensor(indices, dtype=torch.long)] = False
    values = evaluate(engine, clean, corrupted, metric, keep, scores.graph, scores.corrupted_outputs, max_batch)
    return values - scores.clean


def edges_to_check(scores: EdgeScores, budget: int, seed: int = 0) -> list[int]:
    """All edges when there are at most `budget`; else the top budget // 3 by |EAP-IG| and by |EAP| and random
    others up to `budget` (seeded), in edge order."""
    n = len(scores.graph.edges)
    if n <= budget:
        return list(range(n))
    chosen = set(scores.mean("eap-ig").abs().argsort(descending=True)[:budget // 3].tolist())
    chosen |= set(scores.mean("eap").abs().argsort(descending=True)[:budget // 3].tolist())
    rest = [i for i in torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist() if i not in chosen]
    return sorted(chosen | set(rest[:budget - len(chosen)]))


def agreement(estimate: torch.Tensor, exact: torch.Tensor, k: int = 10) -> dict:
    """estimate, exact [m] mean effects of the same edges -> {spearman (signed values), top_k_overlap (share of
    the top k by |exact| that are in the top k by |estimate|), k, n_edges}."""
    from mechscope import stats

    k = min(k, len(exact))
    top = lambda x: set(x.abs().argsort(descending=True, stable=True)[:k].tolist())  # noqa: E731
    rho = float(stats.spearman(estimate.float(), exact.float())) if len(exact) > 1 else float("nan")
    return {"spearman": rho, "top_k_overlap": len(top(estimate) & top(exact)) / max(k, 1), "k": k,
            "n_edges": len(exact)}


def discover(engine, clean: torch.Tensor, corrupted: torch.Tensor, metric: Metric, method: str = "eap-ig",
             steps: int = 5, target: float | None = 0.9, n_edges: int | None = None, check: int = 100,
             points: int = 12, seed: int = 0, max_batch: int = 512) -> Discovery:
    """Score every edge (EAP and EAP-IG), pick a circuit by `method`'s ranking (the top n_edges, or the fewest
    top edges whose exact faithfulness reaches `target`, by bisection between curve points), and evaluate it,
    the faithfulness curves of EAP, EAP-IG and random edge sets, and the estimates' agreement with exact
    single-edge effects of `check` edges, all by exact edge patching."""
    if method not in METHODS:
        raise BadInput(f"method must be one of {METHODS}")
    if (target is None) == (n_edges is None):
        raise BadInput("give a faithfulness target or a number of edges, not both")
    if target is not None and not 0 < target <= 1:
        raise BadInput("--target must be in (0, 1]")
    graph = build_graph(engine.cfg)
    if n_edges is not None and not 1 <= n_edges <= len(graph.edges):
        raise BadInput(f"--edges must be in 1..{len(graph.edges)} (this model's edge count)")
    scores = edge_scores(engine, clean, corrupted, metric, steps, graph)
    run = lambda keep: evaluate(engine, clean, corrupted, metric, keep, graph, scores.corrupted_outputs,  # noqa: E731
                                max_batch)
    total = len(graph.edges)
    sizes = curve_sizes(total, points)
    masks = {"eap": top_edges(scores.mean("eap"), sizes, graph), "eap-ig": top_edges(scores.mean("eap-ig"), sizes, graph),
             "random": random_edges(total, sizes, seed)}
    values = run(torch.cat(list(masks.values())))                               # [3 * len(sizes), n]
    floor, full = values[0], values[len(sizes) - 1]                              # eap's size-0 and all-edge rows
    curve = {"sizes": sizes}
    for i, (name, keep) in enumerate(masks.items()):
        mean, low, high = faithfulness(values[i * len(sizes):(i + 1) * len(sizes)], full, floor)
        curve[name] = {"edges": keep.sum(1).tolist(), "mean": mean.tolist(), "low": low.tolist(), "high": high.tolist()}

    ranked = scores.mean(method)
    if n_edges is not None:
        k = n_edges
    else:
        reached = [i for i, f in enumerate(curve[method]["mean"]) if f >= target]
        hi = sizes[reached[0]]
        lo = sizes[reached[0] - 1] if reached[0] > 0 else 0
        while hi - lo > 1:                                                       # fewest top edges reaching it
            mid = (lo + hi) // 2
            f = faithfulness(run(top_edges(ranked, [mid], graph)), full, floor)[0].item()
            lo, hi = (mid, hi) if f < target else (lo, mid)
        k = hi
    circuit = top_edges(ranked, [k], graph)[0]
    both = run(torch.stack([circuit, ~circuit]))
    f = faithfulness(both, full, floor)
    checked = edges_to_check(scores, check, seed)
    exact = single_edge_effects(engine, clean, corrupted, metric, checked, scores, max_batch)
    gap = (floor - full).mean()
    exact_mean = exact.mean(1) / gap
    agree = {m: agreement(scores.mean(m)[checked] / gap, exact_mean) for m in METHODS}
    return Discovery(scores=scores, method=method, circuit=circuit,
                     faithfulness=tuple(float(x[0]) for x in f), completeness=tuple(float(x[1]) for x in f),
                     clean=full.mean().item(), floor=floor.mean().item(), curve=curve, checked=checked, exact=exact,
                     agreement=agree, n_prompts=len(clean))

"""QK / OV circuits through the embedding and unembedding, copying scores, and K/Q/V composition.

Conventions (transformer-lens, row vectors: x @ W):
- full OV circuit of head (l, h):  W_E W_V W_O W_U    [d_vocab (source token), d_vocab (output logit)]
- full QK circuit of head (l, h):  W_E W_Q W_K^T W_E^T [d_vocab (query token), d_vocab (key token)]
Both stay factored (`FactoredMatrix`, inner size d_head): nothing d_vocab x d_vocab is built unless
`full_matrix` is called. They read the token embedding directly: positional embeddings, biases, the
LayerNorm scale and (for layers > 0) everything earlier layers write are left out, as in Elhage et al. 2021.
`effective_embedding(model, layer)` replaces W_E by what the layer's heads actually read for each token
(ln1 of the residual stream after [BOS, token]), which matters for heads after layer 0.

Copying scores come from the eigenvalues of the full OV circuit (`FactoredMatrix.eigenvalues`, the
d_head non-zero ones):
- `eig_ratio` = Re(sum lambda) / sum |lambda|, the statistic of Elhage et al. 2021 (in [-1, 1]; 1 = copying);
- `positive_fraction` = fraction of eigenvalues with Re(lambda) > 0 (in [0, 1]).

Composition of an earlier head A into a later head B (Elhage et al. 2021), for W_OV^A = W_V^A W_O^A:
- Q: ||W_OV^A W_QK^B||_F / (||W_OV^A||_F ||W_QK^B||_F), W_QK^B = W_Q^B W_K^B^T (A writes what B's query reads)
- K: same with W_QK^B^T (A writes what B's key reads); V: with W_OV^B.
Computed from d_head x d_head Gram matrices (float64), no d_model x d_model product;
equal to `model.all_composition_scores(mode)`. Pairs with layer_B <= layer_A are 0, as there.

These read transformer-lens's processed weights (W_E, W_Q, ..., `OV` / `QK` FactoredMatrix): they run on a
HookedTransformer and on a TransformerBridge in compatibility mode (`weight_model`), not on nnsight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformer_lens import FactoredMatrix

from mechscope.engines.base import unembed_float

MODES = ("Q", "K", "V")


NO_WEIGHTS = ("circuits read transformer-lens weights (W_E, OV, QK, composition); the {engine} engine has none: "
              "use --backend tl or --backend bridge")


def weight_model(model):
    """The transformer-lens object whose weights the circuits read (HookedTransformer, or TransformerBridge in
    compatibility mode) from an engine or a raw model; BadInput on the nnsight engine."""
    from mechscope.errors import BadInput
    from mechscope.models import as_engine

    engine = as_engine(model)
    if engine.name not in ("tl", "bridge"):
        raise BadInput(NO_WEIGHTS.format(engine=engine.name))
    return engine.model


def _layer_circuit(model, layer: int, which: str) -> FactoredMatrix:
    """model.OV[layer] / model.QK[layer] ([n_heads, d_model, d_model], factored) from that layer's weights
    alone: transformer-lens' model-level property stacks every layer's weights on each call."""
    from transformer_lens.components import AbstractAttention

    attn = model.blocks[layer].attn
    return getattr(attn, which) if isinstance(attn, AbstractAttention) else getattr(model, which)[layer]


def _float(fm: FactoredMatrix) -> FactoredMatrix:
    return FactoredMatrix(fm.A.float(), fm.B.float())


@torch.no_grad()
def effective_embedding(model, layer: int, batch_size: int = 512) -> torch.Tensor:
    """[d_vocab, d_model] what the heads of `layer` read for each token: ln1 of the residual stream at position 1
    of `[BOS, token]` (token + position embedding + everything earlier layers add). Special tokens' rows are 0."""
    from mechscope.models import as_engine
    from mechscope.techniques.heads import non_special_token_ids

    engine = as_engine(model)
    ln1 = weight_model(engine).blocks[layer].ln1
    tokens = non_special_token_ids(engine).to(engine.cfg.device)
    site = f"blocks.{layer}.hook_resid_pre"
    out = torch.zeros(engine.cfg.d_vocab, engine.cfg.d_model, device=engine.cfg.device)
    for start in range(0, len(tokens), batch_size):
        ids = tokens[start:start + batch_size]
        batch = torch.stack([torch.full_like(ids, engine.bos_token_id), ids], dim=1)
        acts = engine.activations(batch, [site])
        out[ids] = ln1(acts[site][:, 1:2])[:, 0].float()
    return out


@torch.no_grad()
def ov_circuit(model, layer: int, head: int | None = None, embedding: torch.Tensor | None = None) -> FactoredMatrix:
    """Full OV circuit E W_V W_O W_U of one head [d_vocab, d_vocab], or of every head of `layer`
    [n_heads, d_vocab, d_vocab]; factored, float32. E = W_E unless `embedding` [d_vocab, d_model] is given."""
    model = weight_model(model)
    ov = _layer_circuit(model, layer, "OV")
    ov = ov if head is None else ov[head]
    embed = model.W_E if embedding is None else embedding
    ov = embed.float() @ _float(ov)                                    # (E A) B, A' [.., d_vocab, d_head]
    return FactoredMatrix(ov.A, unembed_float(ov.B, model.W_U))         # B W_U: no float32 copy of the whole W_U


@torch.no_grad()
def qk_circuit(model, layer: int, head: int | None = None, embedding: torch.Tensor | None = None) -> FactoredMatrix:
    """Full QK circuit E W_Q W_K^T E^T (query token, key token) of one head [d_vocab, d_vocab], or of every
    head of `layer` [n_heads, d_vocab, d_vocab]; factored, float32. E = W_E unless `embedding` is given."""
    model = weight_model(model)
    qk = _layer_circuit(model, layer, "QK")
    qk = qk if head is None else qk[head]
    embed = (model.W_E if embedding is None else embedding).float()
    return embed @ _float(qk) @ embed.T


@dataclass
class CopyingScores:
    """Both tensors are [n_layers, n_heads]; see the module docstring for the definitions."""
    eig_ratio: torch.Tensor
    positive_fraction: torch.Tensor


@torch.no_grad()
def eigenvalue_copying(circuit: FactoredMatrix) -> tuple[torch.Tensor, torch.Tensor]:
    """(eig_ratio, positive_fraction) of a factored matrix [..., n, n] -> each [...]."""
    eig = torch.linalg.eigvals(_float(circuit).BA.cpu())  # [..., mdim] complex; on the CPU (no eig on MPS)
    return eig.sum(-1).real / eig.abs().sum(-1), (eig.real > 0).float().mean(-1)


@torch.no_grad()
def copying_scores(model, effective: bool = False) -> CopyingScores:
    """Copying scores of every head's full OV circuit, one layer at a time (memory: n_heads * d_vocab * d_head);
    `effective` reads tokens through `effective_embedding` of each layer instead of W_E."""
    model = weight_model(model)
    per_layer = [eigenvalue_copying(ov_circuit(model, layer, embedding=effective_embedding(model, layer)
                                               if effective else None))
                 for layer in range(model.cfg.n_layers)]
    return CopyingScores(eig_ratio=torch.stack([r for r, _ in per_layer]).cpu(),
                         positive_fraction=torch.stack([f for _, f in per_layer]).cpu())


@torch.no_grad()
def top_tokens(circuit: FactoredMatrix, rows: torch.Tensor, allowed: torch.Tensor, k: int = 5):
    """Top-k columns of the given rows of one head's circuit [d_vocab, d_vocab], among the `allowed` column ids.

    rows: [n] token ids -> (values [n, k], column token ids [n, k]).
    """
    values = (circuit.A[rows.to(circuit.A.device)].float() @ circuit.B.float())[:, allowed.to(circuit.B.device)]
    top = values.topk(min(k, len(allowed)), dim=-1)
    return top.values.cpu(), allowed[top.indices.cpu()]


@torch.no_grad()
def self_copy_fractions(circuit: FactoredMatrix, tokens: torch.Tensor, chunk: int = 1024) -> dict[str, float]:
    """Fraction of source tokens whose own logit is the top-1 / in the top-5 of their OV row (among `tokens`).

    circuit: one head's full OV circuit [d_vocab, d_vocab]; tokens: [n] ids (rows and columns considered).
    Rows are built `chunk` at a time, never the whole d_vocab x d_vocab matrix.
    """
    tokens = tokens.to(circuit.A.device)
    ranks = []
    for start in range(0, len(tokens), chunk):
        ids = tokens[start:start + chunk]
        rows = (circuit.A[ids].float() @ circuit.B.float())[:, tokens]          # [chunk, n]
        own = rows[torch.arange(len(ids)), torch.arange(start, start + len(ids))]
        ranks.append((rows > own[:, None]).sum(-1))                           # 0 = own logit is the top
    ranks = torch.cat(ranks)
    return {"top1": float((ranks == 0).float().mean()), "top5": float((ranks < 5).float().mean())}


@torch.no_grad()
def full_matrix(circuit: FactoredMatrix, max_bytes: float) -> torch.Tensor:
    """The product A @ B of a factored circuit, refused (ValueError) when it would exceed `max_bytes` in float32."""
    size = 4 * torch.Size(circuit.shape).numel()
    if size > max_bytes:
        raise ValueError(f"the full matrix {tuple(circuit.shape)} needs {size / 1e9:.2f} GB (limit {max_bytes / 1e9:.2f} GB)")
    return _float(circuit).AB


def _gram(weight: torch.Tensor) -> torch.Tensor:
    """W^T W of [L, H, d_model, d_head] -> [L, H, d_head, d_head] (float64, one layer at a time):
    ||W X||_F^2 = tr(X^T W^T W X)."""
    return torch.stack([w.double().transpose(-1, -2) @ w.double() for w in weight])


def _factors(W_Q, W_K, W_V, W_O, mode: str):
    """The receiving head's (middle, trailing) d_model x d_head factors: right matrix = middle @ trailing^T."""
    return {"Q": (W_Q, W_K), "K": (W_K, W_Q), "V": (W_V, W_O.transpose(-1, -2))}[mode]


def _composition(W_Q, W_K, W_V, W_O, mode: str) -> torch.Tensor:
    """Scores of every head A into every head B in a later layer: weights [L, H, d_model, d_head]
    (W_O: [L, H, d_head, d_model]) -> [L, H, L, H] (float32), 0 where layer_B <= layer_A.

    ||W_V^A M W_t^B^T||_F^2 with M = W_O^A W_m^B [d_head, d_head] is sum((G_V^A M) * (M G_t^B)), G = W^T W.
    Memory: one writing head at a time, L * H * d_head^2 float64 values.
    """
    middle, trailing = _factors(W_Q, W_K, W_V, W_O, mode)
    g_v, g_o = _gram(W_V), _gram(W_O.transpose(-1, -2))
    g_m, g_t = _gram(middle), _gram(trailing)
    left_sq = (g_v * g_o).sum(dim=(-2, -1))                # ||W_V W_O||^2 = tr(G_V G_O)   [L, H]
    right_sq = (g_m * g_t).sum(dim=(-2, -1))               # ||W_m W_t^T||^2               [L, H]
    n_layers, n_heads = W_O.shape[:2]
    scores = torch.zeros(n_layers, n_heads, n_layers, n_heads, dtype=torch.float64, device=W_O.device)
    for layer in range(n_layers - 1):
        later = slice(layer + 1, n_layers)
        for head in range(n_heads):
            link = torch.einsum("dm,lkme->lkde", W_O[layer, head].double(), middle[later].double())  # M: [l, H, dh, dh]
            product_sq = ((g_v[layer, head] @ link) * (link @ g_t[later])).sum(dim=(-2, -1))
            scores[layer, head, later] = product_sq / left_sq[layer, head] / right_sq[later]
    return scores.clamp(min=0).sqrt().float()


def later_layer_mask(n_layers: int, n_heads: int) -> torch.Tensor:
    """[L, H, L, H] True where head B's layer is after head A's."""
    layers = torch.arange(n_layers)
    return (layers[:, None] < layers[None, :])[:, None, :, None].expand(n_layers, n_heads, n_layers, n_heads)


@dataclass
class CompositionScores:
    """scores: [n_layers, n_heads (A, writer), n_layers, n_heads (B, reader)], 0 where layer_B <= layer_A.
    baseline: the mean score of Gaussian weights of the same shapes; baseline_std: its spread over seeds."""
    mode: str
    scores: torch.Tensor
    baseline: float
    baseline_std: float

    @property
    def excess(self) -> torch.Tensor:
        """scores - baseline on valid pairs, 0 elsewhere. [L, H, L, H]"""
        mask = later_layer_mask(*self.scores.shape[:2])
        return torch.where(mask, self.scores - self.baseline, torch.zeros_like(self.scores))

    def top(self, k: int = 5) -> list[tuple[int, int, int, int, float]]:
        """The k pairs with the highest score - baseline as (layer_A, head_A, layer_B, head_B, excess)."""
        mask = later_layer_mask(*self.scores.shape[:2])
        excess = torch.where(mask, self.excess, torch.full_like(self.scores, -torch.inf))
        flat = excess.flatten().topk(min(k, int(mask.sum())))
        out = []
        for v, i in zip(flat.values, flat.indices):
            la, ha, lb, hb = torch.unravel_index(i, excess.shape)
            out.append((int(la), int(ha), int(lb), int(hb), float(v)))
        return out


def random_baseline(d_model: int, d_head: int, mode: str, n_seeds: int = 5, n_heads: int = 8) -> tuple[float, float]:
    """(mean, std over seeds) of the composition score of Gaussian heads with these shapes.

    Each seed draws two layers of `n_heads` heads and averages the n_heads^2 scores from layer 0 into layer 1."""
    means = []
    for seed in range(n_seeds):
        gen = torch.Generator().manual_seed(seed)
        W_Q, W_K, W_V = (torch.randn(2, n_heads, d_model, d_head, generator=gen) for _ in range(3))
        W_O = torch.randn(2, n_heads, d_head, d_model, generator=gen)
        means.append(_composition(W_Q, W_K, W_V, W_O, mode)[0, :, 1, :].mean())
    means = torch.stack(means)
    return float(means.mean()), float(means.std()) if n_seeds > 1 else 0.0


@torch.no_grad()
def composition_scores(model, mode: str, n_seeds: int = 5) -> CompositionScores:
    """Q-, K- or V-composition scores of every pair of heads (A in an earlier layer than B), with a random baseline."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    model = weight_model(model)
    # float64 on the CPU (MPS has no float64; the weights are read once, the products are d_head x d_head)
    scores = _composition(*(w.detach().cpu() for w in (model.W_Q, model.W_K, model.W_V, model.W_O)), mode)
    mean, std = random_baseline(model.cfg.d_model, model.cfg.d_head, mode, n_seeds)
    return CompositionScores(mode=mode, scores=scores, baseline=mean, baseline_std=std)

"""Direct logit attribution (DLA): how much each component writes directly to a logit (difference).

At a position, the final residual stream is a sum of parts: the embedding part (`blocks.0.hook_resid_pre`:
the token embedding, plus the learned positions on models that add them to the residual, reported on their
own as pos_embed) + every attention layer (its heads + b_O) + every MLP layer (its neurons + b_out).
Shortformer models (transformer-lens's attn-only-Nl) add positions only to queries and keys, rotary models
inside attention: there pos_embed is 0, because no position vector is in the residual. The logit is

    logit[t] = norm(resid) @ W_U[:, t] + b_U[t],   norm(x) = (x - centre) / scale * w + b

(LayerNorm centres, RMSNorm does not; Gemma's (1 + w) is the engine's `final_norm.weight`). The final norm
is linear once its scale is frozen at the value this forward pass computed, so each part c contributes
c @ read with read = centre(w * W_U[:, t]) / scale, and the parts plus the constant term (b @ W_U[:, t] +
b_U[t], "unembed bias": the final norm's bias folded into the unembedding bias, as transformer-lens folds it,
so that the term is the same on an engine that keeps the norm's bias and on one that folded it) sum to the
logit exactly. Tutorial code drops the scale, or w and b on models whose norm is not folded: then the parts
do not sum to the logit. With a wrong answer B, every term is taken for W_U[:, A] - W_U[:, B] (a logit
difference).

With one answer the quantity is the centred logit, logit[A] - mean over the vocabulary of the logits (before
a soft cap for the parts, after it for `metric`): every term is taken for W_U[:, A] - mean_v W_U[:, v] and
b_U[A] - mean(b_U). A raw logit is not the same number on every engine (transformer-lens centres the
unembedding when it folds the final norm, Hugging Face does not); the centred one is, and a logit
difference is unchanged by it (mechscope.engines.base).

A head's part is z_h @ W_O[h] @ read (`attn.hook_z`; on nnsight the output projection's input split by
heads). On models with a norm after each sublayer (Gemma 2: hook_attn_out is after that norm) the heads'
and neurons' parts go through that RMS norm with its scale frozen (an element-wise gain), so they still
sum to their layer. After a final logit soft cap (Gemma 2) the parts sum to the logit difference before
the cap (`readout`), which is the model's logit difference passed through the cap.

Everything runs through the engine API, so it is the same on transformer-lens, TransformerBridge and nnsight.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields

import torch

from mechscope.engines.base import vocab_mean


@dataclass
class DLA:
    """Contributions at one position per row (the last, or `positions`). L layers, H heads, d_mlp neurons."""
    metric: torch.Tensor        # [batch] the model's (centred) logit or logit difference from its own forward pass
    readout: torch.Tensor       # [batch] the final residual through the frozen final norm (= metric before a soft cap)
    embed: torch.Tensor         # [batch]
    pos_embed: torch.Tensor     # [batch] (0 where positions are not added to the residual)
    attn: torch.Tensor          # [batch, L] whole attention layer output (heads + b_O)
    heads: torch.Tensor         # [batch, L, H]
    attn_bias: torch.Tensor     # [batch, L] b_O
    mlp: torch.Tensor           # [batch, L] whole MLP output (neurons + b_out)
    neurons: torch.Tensor       # [batch, L, d_mlp] (d_mlp = 0 when not read)
    unembed_bias: torch.Tensor  # [batch] the constant term: b_U + final norm bias @ W_U, along the direction
    read: torch.Tensor          # [batch, d_model] a plain residual part c contributes c @ read

    def total(self) -> torch.Tensor:
        """[batch] sum of the parts; equals `readout` (and `metric` without a soft cap) up to float error."""
        return self.embed + self.pos_embed + self.attn.sum(-1) + self.mlp.sum(-1) + self.unembed_bias

    @classmethod
    def cat(cls, parts: list["DLA"]) -> "DLA":
        """Rows of several results, in order."""
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def select(self, rows) -> "DLA":
        return type(self)(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def components(self) -> tuple[list[str], torch.Tensor]:
        """(names, values [batch, m]) of every row of `table` but neurons: embed, pos_embed, each layer's
        attn / b_O / mlp, each head, and the constant term (unembed bias). Layers overlap their heads."""
        names, columns = ["embed", "pos_embed"], [self.embed, self.pos_embed]
        n_layers, n_heads = self.heads.shape[1:]
        for layer in range(n_layers):
            names += [f"L{layer} attn", f"L{layer} attn b_O", f"L{layer} mlp"]
            columns += [self.attn[:, layer], self.attn_bias[:, layer], self.mlp[:, layer]]
            names += [f"L{layer}H{h}" for h in range(n_heads)]
            columns += list(self.heads[:, layer].unbind(-1))
        names.append("unembed bias")
        columns.append(self.unembed_bias)
        return names, torch.stack(columns, -1).float()

    def layer_parts(self) -> tuple[list[str], torch.Tensor]:
        """(names, values [batch, 2 + 2L]): the parts that do not overlap and (with the constant term) sum
        to the total: embed, pos_embed, then each layer's attn and mlp."""
        n_layers = self.attn.shape[1]
        names = ["embed", "pos_embed"] + [f"L{layer} {kind}" for layer in range(n_layers) for kind in ("attn", "mlp")]
        per_layer = torch.stack([self.attn, self.mlp], -1).reshape(len(self.attn), -1)
        return names, torch.cat([self.embed[:, None], self.pos_embed[:, None], per_layer], -1).float()

    def head_names(self) -> list[str]:
        n_layers, n_heads = self.heads.shape[1:]
        return [f"L{layer}H{h}" for layer in range(n_layers) for h in range(n_heads)]

    def table(self, n_neurons: int = 10) -> list[dict]:
        """Rows {name, kind, layer, index, value} averaged over the batch, sorted by |value|, with the top
        `n_neurons` neurons by |value|. Layer rows overlap their heads / neurons: do not add across kinds."""
        names, values = self.components()
        means = values.mean(0)
        rows = [{"name": name, **_kind(name), "value": float(v)} for name, v in zip(names, means)]
        neurons = self.neurons.float().mean(0)
        flat = neurons.flatten()
        for i in flat.abs().topk(min(n_neurons, flat.numel())).indices.tolist():
            layer, n = divmod(i, neurons.shape[1])
            rows.append({"name": f"L{layer}N{n}", "kind": "neuron", "layer": layer, "index": n, "value": float(flat[i])})
        return sorted(rows, key=lambda r: -abs(r["value"]))


_MODEL_WIDE = {"embed": "embed", "pos_embed": "pos_embed", "unembed bias": "unembed_bias"}


def _kind(name: str) -> dict:
    """{kind, layer, index} of a component name ("L1H2" -> head 1 2, "L0 attn b_O" -> attn_bias 0 None)."""
    if name in _MODEL_WIDE:
        return {"kind": _MODEL_WIDE[name], "layer": None, "index": None}
    m = re.fullmatch(r"L(\d+)H(\d+)", name)
    if m:
        return {"kind": "head", "layer": int(m.group(1)), "index": int(m.group(2))}
    layer, kind = re.fullmatch(r"L(\d+) (.+)", name).groups()
    return {"kind": {"attn": "attn", "attn b_O": "attn_bias", "mlp": "mlp"}[kind], "layer": int(layer), "index": None}


def adds_positions(engine) -> bool:
    """Whether learned position vectors are added to the residual stream (not shortformer / rotary / alibi)."""
    return engine.cfg.positional_embedding_type == "standard" and engine.has_site("hook_pos_embed")


def sites(model, neurons: bool = True) -> list[str]:
    """Everything DLA reads (mlp.hook_post only when `neurons` and the engine offers it)."""
    from mechscope.models import as_engine

    engine = as_engine(model)
    cfg = engine.cfg
    names = ["blocks.0.hook_resid_pre", f"blocks.{cfg.n_layers - 1}.hook_resid_post"]
    names += ["hook_pos_embed"] if adds_positions(engine) else []
    for layer in range(cfg.n_layers):
        names += [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_attn_out"]
        if not cfg.attn_only:
            names.append(f"blocks.{layer}.hook_mlp_out")
            if neurons and engine.has_site(f"blocks.{layer}.mlp.hook_post"):
                names.append(f"blocks.{layer}.mlp.hook_post")
    return names


def _post_norm_gain(out: torch.Tensor, pre: torch.Tensor, dtype=torch.float32) -> torch.Tensor | None:
    """None when a sublayer writes `pre` itself ([batch, d_model], the sum of its heads / neurons and bias);
    else the element-wise gain out / pre of the RMS norm between them (its scale frozen; Gemma 2). dtype: the
    model's activations' (out and pre arrive in float32): in half precision they differ by rounding alone by
    ~2e-3 of |out| in bfloat16, ~2e-4 in float16 (the toy); a post-norm changes them by order 1."""
    tol = 1e-3 if dtype == torch.float32 else 16 * torch.finfo(dtype).eps
    if (out - pre).norm() <= tol * out.norm().clamp_min(1e-12):
        return None
    return torch.where(pre != 0, out / pre, torch.zeros_like(pre))


def _project(x: torch.Tensor, weight: torch.Tensor, equation: str) -> torch.Tensor:
    """einsum(equation, x, weight) on the weight's device, in float32: x (float32, on the CPU: one row per prompt)
    goes there and the small result comes back; one layer's weight is upcast there, never copied to the host."""
    return torch.einsum(equation, x.to(weight.device), weight.float()).cpu()


def _rows_per_forward(engine, seq: int, neurons: bool) -> int:
    """Rows per forward so that the activations read stay near 512 MB."""
    c = engine.cfg
    per_row = seq * 4 * (c.d_model * (3 + 2 * c.n_layers) + c.n_layers * c.n_heads * c.d_head
                         + (c.n_layers * c.d_mlp if neurons else 0))
    return max(1, 2**29 // max(per_row, 1))


@torch.no_grad()
def dla(model, tokens: torch.Tensor, answer, wrong=None, positions=None, edits=(), neurons: bool = True,
        rows_per_forward: int | None = None) -> DLA:
    """Direct logit attribution in tokens [batch, seq] (right-padded rows are fine) at `positions` ([batch]
    token index per row, default the last) to the centred logit of answer ([batch] or int), or to
    logit[answer] - logit[wrong] (see the module docstring).
    `edits` ([(site, fn)], e.g. techniques.ablation.ablation_edits) are held during the forward."""
    from mechscope.models import as_engine

    engine = as_engine(model)
    batch, seq = tokens.shape
    positions = torch.full((batch,), seq - 1) if positions is None else torch.as_tensor(positions).reshape(-1).cpu()
    answer = torch.as_tensor(answer).reshape(-1).expand(batch).cpu()
    wrong = None if wrong is None else torch.as_tensor(wrong).reshape(-1).expand(batch).cpu()
    step = rows_per_forward or _rows_per_forward(engine, seq, neurons)
    parts = []
    for start in range(0, batch, step):
        rows = slice(start, start + step)
        parts.append(_dla(engine, tokens[rows], answer[rows], None if wrong is None else wrong[rows],
                          positions[rows], edits, neurons))
    return DLA.cat(parts)


def _dla(engine, tokens, answer, wrong, positions, edits, neurons) -> DLA:
    cfg = engine.cfg
    names = sites(engine, neurons)
    logits, acts = engine.run(tokens, read=names, edits=edits, positions=positions.to(tokens.device))
    batch = len(tokens)
    rows = torch.arange(batch)
    dtype = acts["blocks.0.hook_attn_out"].dtype

    def at(name):  # [batch, ...] at each row's position, float32 on the CPU
        act = acts[name]
        return act[rows.to(act.device), positions.to(act.device)].float().cpu()

    W_U = engine.W_U
    direction = W_U[:, answer.to(W_U.device)].T.float().cpu()               # [batch, d_model]
    b_U = engine.b_U.float().cpu()
    unembed_bias = b_U[answer]
    logits = logits.float()
    metric = logits[rows.to(logits.device), answer.to(logits.device)].cpu()
    if wrong is not None:
        direction = direction - W_U[:, wrong.to(W_U.device)].T.float().cpu()
        unembed_bias = unembed_bias - b_U[wrong]
        metric = metric - logits[rows.to(logits.device), wrong.to(logits.device)].cpu()
    else:  # the centred logit: the same on every engine
        direction = direction - vocab_mean(W_U).cpu()  # no float32 copy of the whole W_U
        unembed_bias = unembed_bias - b_U.mean()
        metric = metric - logits.mean(-1).cpu()

    norm = engine.final_norm
    resid = at(f"blocks.{cfg.n_layers - 1}.hook_resid_post")
    if norm.bias is not None:  # folded into the constant term, as transformer-lens folds it into b_U
        unembed_bias = unembed_bias + direction @ norm.bias.float().cpu()
    read = direction * norm.weight.float().cpu() if norm.weight is not None else direction
    if norm.centres:
        read = read - read.mean(-1, keepdim=True)
    read = read / norm.scale(resid)                                          # scale: [batch, 1]
    dot = lambda x: (x * read).sum(-1)  # noqa: E731  [batch, d_model] -> [batch]

    pos_embed = dot(at("hook_pos_embed")) if adds_positions(engine) else torch.zeros(batch)
    heads, attn, attn_bias, mlp, neuron_parts = [], [], [], [], []
    post_norm = False
    for layer in range(cfg.n_layers):
        out = at(f"blocks.{layer}.hook_attn_out")
        per_head = _project(at(f"blocks.{layer}.attn.hook_z"), engine.W_O(layer), "bhk,hkd->bhd")
        b_O = engine.b_O(layer).float().cpu()
        gain = _post_norm_gain(out, per_head.sum(1) + b_O, dtype)
        post_norm |= gain is not None
        head_read = read if gain is None else read * gain
        heads.append(torch.einsum("bhd,bd->bh", per_head, head_read))
        attn_bias.append(head_read @ b_O)
        attn.append(dot(out))
        if cfg.attn_only:
            mlp.append(torch.zeros(batch))
            neuron_parts.append(torch.zeros(batch, 0))
            continue
        out = at(f"blocks.{layer}.hook_mlp_out")
        mlp.append(dot(out))
        site = f"blocks.{layer}.mlp.hook_post"
        if site not in acts:
            neuron_parts.append(torch.zeros(batch, 0))
            continue
        post, W_out = at(site), engine.W_out(layer)                         # [batch, d_mlp], [d_mlp, d_model]
        # post-norm models (detected at the attention) have no MLP bias: the gain is out / (post @ W_out)
        neuron_read = read if not post_norm else read * _post_norm_gain(out, _project(post, W_out, "bn,nd->bd"), dtype)
        neuron_parts.append(post * _project(neuron_read, W_out, "bd,nd->bn"))
    embed = dot(at("blocks.0.hook_resid_pre")) - pos_embed
    return DLA(metric=metric, readout=dot(resid) + unembed_bias, embed=embed, pos_embed=pos_embed,
               attn=torch.stack(attn, 1), heads=torch.stack(heads, 1), attn_bias=torch.stack(attn_bias, 1),
               mlp=torch.stack(mlp, 1), neurons=torch.stack(neuron_parts, 1), unembed_bias=unembed_bias, read=read)


def with_ablated(model, tokens, answer, wrong, components, method: str = "mean", positions=None,
                 lengths=None, clean: DLA | None = None) -> tuple[DLA, DLA]:
    """(clean, ablated): DLA (no neurons) on tokens [n, seq] as it is (or `clean`, already computed) and with
    `components` (techniques.ablation Components) held ablated: "zero", or "mean" over the same prompts (BOS
    and right padding excluded; lengths [n] = each row's real length). Components whose direct effect grows
    when others are removed are backups (Wang et al. 2022's backup name movers)."""
    from mechscope.techniques.ablation import ablation_edits

    edits = ablation_edits(model, components, method, reference=tokens, lengths=lengths)
    clean = clean if clean is not None else dla(model, tokens, answer, wrong, positions, neurons=False)
    return clean, dla(model, tokens, answer, wrong, positions, edits=edits, neurons=False)


def direct_effect_change(clean: DLA, ablated: DLA) -> tuple[torch.Tensor, torch.Tensor]:
    """(change [n, m] for the columns of `components()`, rescale [n]). The ablated run has its own final-norm
    scale, which alone multiplies every residual part by rescale = clean scale / ablated scale; change is each
    part of the ablated run at the clean run's scale minus its clean value (the constant term does not scale), so a
    component whose input did not change has change 0 and a backup that writes more has change > 0."""
    names, before = clean.components()
    _, after = ablated.components()
    rescale = ablated.read.norm(dim=-1) / clean.read.norm(dim=-1)
    scales = torch.tensor([name != "unembed bias" for name in names])
    return torch.where(scales, after / rescale[:, None], after) - before, rescale

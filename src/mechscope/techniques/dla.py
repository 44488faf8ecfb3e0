"""Direct logit attribution (DLA): how much each component writes directly to a logit (difference).

At the last position the final residual stream is a sum of parts: embed + pos_embed + every attention
layer (its heads + b_O) + every MLP layer (its neurons + b_out). The logit is

    logit[t] = ln_final(resid) @ W_U[:, t] + b_U[t],   ln_final(x) = (x - mean x) / scale * w + b

and the final LayerNorm is linear once its scale is frozen at the value this forward pass computed
(`ln_final.hook_scale`), so each part c contributes  centre(c) / scale * w @ W_U[:, t]  and the parts
plus the two bias terms (b @ W_U[:, t], and b_U[t]) sum to the logit exactly. Tutorial code drops
the scale, or w and b on models whose LayerNorm is not folded: then the parts do not sum to the logit.
With a wrong answer B, every term is taken for W_U[:, A] - W_U[:, B] (a logit difference).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DLA:
    """Contributions at the last position. batch rows; L layers, H heads, d_mlp neurons."""
    metric: torch.Tensor        # [batch] the model's logit (difference) from its own forward pass
    embed: torch.Tensor         # [batch]
    pos_embed: torch.Tensor     # [batch] (0 for models without learned positions)
    attn: torch.Tensor          # [batch, L] whole attention layer output (heads + b_O)
    heads: torch.Tensor         # [batch, L, H]
    attn_bias: torch.Tensor     # [batch, L] b_O
    mlp: torch.Tensor           # [batch, L] whole MLP output (neurons + b_out)
    neurons: torch.Tensor       # [batch, L, d_mlp]
    ln_bias: torch.Tensor       # [batch] ln_final.b @ direction (0 when LayerNorm is folded)
    unembed_bias: torch.Tensor  # [batch] b_U term
    read: torch.Tensor          # [batch, d_model] any part c contributes c @ read (LN centring, w, scale folded in)

    def total(self) -> torch.Tensor:
        """[batch] sum of the parts; equals `metric` up to float error."""
        return (self.embed + self.pos_embed + self.attn.sum(-1) + self.mlp.sum(-1)
                + self.ln_bias + self.unembed_bias)

    def table(self, n_neurons: int = 10) -> list[dict]:
        """Rows {name, kind, layer, index, value} averaged over the batch, sorted by |value|, with the top
        `n_neurons` neurons by |value|. Layer rows overlap their heads / neurons: do not add across kinds."""
        attn, heads, attn_bias, mlp, neurons = (t.float().mean(0) for t in (
            self.attn, self.heads, self.attn_bias, self.mlp, self.neurons))
        rows = [("embed", "embed", None, None, self.embed), ("pos_embed", "pos_embed", None, None, self.pos_embed),
                ("ln_final bias", "ln_bias", None, None, self.ln_bias),
                ("unembed bias", "unembed_bias", None, None, self.unembed_bias)]
        rows = [(name, kind, layer, index, v.float().mean()) for name, kind, layer, index, v in rows]
        for layer in range(attn.shape[0]):
            rows += [(f"L{layer} attn", "attn", layer, None, attn[layer]),
                     (f"L{layer} attn b_O", "attn_bias", layer, None, attn_bias[layer]),
                     (f"L{layer} mlp", "mlp", layer, None, mlp[layer])]
            rows += [(f"L{layer}H{h}", "head", layer, h, heads[layer, h]) for h in range(heads.shape[1])]
        flat = neurons.flatten()
        for i in flat.abs().topk(min(n_neurons, flat.numel())).indices.tolist():
            layer, n = divmod(i, neurons.shape[1])
            rows.append((f"L{layer}N{n}", "neuron", layer, n, flat[i]))
        table = [{"name": name, "kind": kind, "layer": layer, "index": index, "value": float(v)}
                 for name, kind, layer, index, v in rows]
        return sorted(table, key=lambda r: -abs(r["value"]))


def _final_ln(model):
    """(weight or None, bias or None, centres?) of the final normalization."""
    ln = getattr(model, "ln_final", None)
    centres = model.cfg.normalization_type in ("LN", "LNPre") and not model.cfg.final_rms
    return getattr(ln, "w", None), getattr(ln, "b", None), centres


def hook_names(model) -> list[str]:
    """Everything DLA reads from the cache."""
    names = ["hook_embed", "hook_pos_embed", "ln_final.hook_scale"]
    for layer in range(model.cfg.n_layers):
        names += [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_attn_out"]
        if not model.cfg.attn_only:
            names += [f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.mlp.hook_post"]
    return names


@torch.no_grad()
def dla(model, tokens: torch.Tensor, answer: torch.Tensor | int, wrong: torch.Tensor | int | None = None) -> DLA:
    """Direct logit attribution at the last position of tokens [batch, seq] to answer ([batch] or int)
    or to logit[answer] - logit[wrong]."""
    batch, L = tokens.shape[0], model.cfg.n_layers
    logits, cache = model.run_with_cache(tokens, names_filter=hook_names(model))
    last = lambda name: cache[name][:, -1].float()  # noqa: E731  [batch, ...] at the last position
    answer = torch.as_tensor(answer, device=tokens.device).expand(batch)
    rows = torch.arange(batch, device=tokens.device)
    W_U = model.W_U.float()
    direction = W_U[:, answer].T                                       # [batch, d_model]
    bias = model.b_U.float()[answer]                                   # [batch]
    metric = logits[rows, -1, answer].float()
    if wrong is not None:
        wrong = torch.as_tensor(wrong, device=tokens.device).expand(batch)
        direction = direction - W_U[:, wrong].T
        bias = bias - model.b_U.float()[wrong]
        metric = metric - logits[rows, -1, wrong].float()

    w, b, centres = _final_ln(model)
    ln_bias = direction @ b.float() if b is not None else torch.zeros(batch, device=direction.device)
    # the direction a residual-stream vector is read along: centring and w moved onto the direction
    read = direction * w.float() if w is not None else direction
    if centres:
        read = read - read.mean(-1, keepdim=True)
    if "ln_final.hook_scale" in cache:
        read = read / last("ln_final.hook_scale")                     # scale: [batch, 1]
    dot = lambda x: (x * read).sum(-1)  # noqa: E731  [batch, d_model] -> [batch]

    heads, attn, attn_bias, mlp, neurons = [], [], [], [], []
    for layer in range(L):
        W_O = model.W_O[layer].float()                                 # [H, d_head, d_model]
        per_head = torch.einsum("bhk,hkd,bd->bh", last(f"blocks.{layer}.attn.hook_z"), W_O, read)
        heads.append(per_head)
        attn.append(dot(last(f"blocks.{layer}.hook_attn_out")))
        attn_bias.append(read @ model.b_O[layer].float())
        if model.cfg.attn_only:
            mlp.append(torch.zeros(batch, device=read.device))
            neurons.append(torch.zeros(batch, 0, device=read.device))
        else:
            mlp.append(dot(last(f"blocks.{layer}.hook_mlp_out")))
            neurons.append(last(f"blocks.{layer}.mlp.hook_post") * (read @ model.W_out[layer].float().T))
    pos_embed = dot(last("hook_pos_embed")) if "hook_pos_embed" in cache else torch.zeros(batch, device=read.device)
    return DLA(metric=metric.cpu(), embed=dot(last("hook_embed")).cpu(), pos_embed=pos_embed.cpu(),
               attn=torch.stack(attn, 1).cpu(), heads=torch.stack(heads, 1).cpu(),
               attn_bias=torch.stack(attn_bias, 1).cpu(), mlp=torch.stack(mlp, 1).cpu(),
               neurons=torch.stack(neurons, 1).cpu(), ln_bias=ln_bias.cpu(), unembed_bias=bias.cpu(),
               read=read.cpu())

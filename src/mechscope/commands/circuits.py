"""QK and OV circuits through the embedding and unembedding, copying scores, and K/Q/V composition.

    mechscope circuits                                  # every head; top tokens of the 3 best copying heads
    mechscope circuits --heads 1.2,0.3 --tokens mary,paris,dog --top-k 5
    mechscope circuits --embedding effective            # tokens as the head's layer sees them (layers > 0)
    mechscope circuits --heads 1.2 --save-full          # also write the d_vocab x d_vocab matrices

Per head (all heads): copying scores from the eigenvalues of E W_V W_O W_U (E = W_E, or with
--embedding effective what the head's layer reads for each token) -- eig_ratio =
Re(sum lambda) / sum |lambda| (Elhage et al. 2021, 1 = pure copying) and positive_fraction = share of
eigenvalues with positive real part. Per chosen head: the tokens each source token's OV circuit
promotes most, the key tokens each query token's QK circuit scores highest, and the share of tokens
that copy themselves (own logit top-1 / top-5). Per pair of heads A (earlier layer) -> B: Q-, K- and
V-composition ||W_OV^A W^B||_F / (||W_OV^A||_F ||W^B||_F) minus the same score for Gaussian weights.
Writes copying.csv, copying_*.png, composition.csv, composition_{Q,K,V}.png. Reads transformer-lens weights:
--backend tl or bridge (nnsight is refused).
"""
from mechscope import inputs

HELP = "QK / OV circuits, copying scores, K/Q/V composition"

DEFAULT_TOKENS = "Mary,John,Paris,dog,store"


def add_arguments(parser):
    parser.add_argument("--heads", help="heads for the top-token tables, LAYER.HEAD[,...] (default: the 3 heads "
                        "with the highest eig_ratio copying score)")
    parser.add_argument("--tokens", default=DEFAULT_TOKENS, help="comma-separated words, each one token: OV source "
                        "tokens and QK query tokens (default: %(default)s)")
    parser.add_argument("--embedding", choices=("raw", "effective"), default="raw",
                        help="token vectors the circuits start from: raw = W_E (Elhage et al.), effective = what "
                        "the head's layer reads for each token after BOS (ln1 of the residual stream; better for "
                        "layers > 0) (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=5, help="tokens per row (default: %(default)s)")
    parser.add_argument("--baseline-seeds", type=int, default=5,
                        help="seeds of the random composition baseline (default: %(default)s)")
    parser.add_argument("--save-full", action="store_true", help="also write the chosen heads' full d_vocab x d_vocab "
                        "OV and QK circuits to full_circuits.safetensors")
    parser.add_argument("--max-gb", type=inputs.finite_float, default=1.0, help="memory limit for --save-full (default: %(default)s)")


def _rows_for(model, circuit, tokens, allowed, k):
    """{token: [[top token, value], ...]} for each row token of one head's circuit."""
    from mechscope.techniques.circuits import top_tokens

    values, ids = top_tokens(circuit, tokens, allowed, k)
    return {model.to_single_str_token(int(t)): [[model.to_single_str_token(int(i)), round(float(v), 3)]
                                               for v, i in zip(vs, row)] for t, vs, row in zip(tokens, values, ids)}


def _check_args(args, model):
    """-> (token ids [n], chosen heads or None), raising BadInput for anything the user can fix."""
    import torch

    from mechscope import inputs
    from mechscope.errors import BadInput

    if args.top_k < 1:
        raise BadInput("--top-k must be at least 1")
    inputs.top_k(args.top_k, model.cfg.d_vocab, "--top-k", "tokens in this model's vocabulary")
    if not args.max_gb > 0:
        raise BadInput("--max-gb must be a positive number of gigabytes")
    if args.baseline_seeds < 2:
        raise BadInput("--baseline-seeds must be at least 2 (the baseline reports a spread over seeds)")
    if args.baseline_seeds > 1000:
        raise BadInput("--baseline-seeds must be at most 1000")
    if model.cfg.n_layers < 2:
        raise BadInput("composition needs at least 2 layers; this model has 1")
    words = [w.strip() for w in args.tokens.split(",") if w.strip()]
    if not words:
        raise BadInput("--tokens is empty: pass comma-separated words, e.g. mary,paris")
    tokens = torch.tensor([inputs.single_token(model, w) for w in words])
    heads = inputs.parse_heads(model, args.heads) if args.heads is not None else None
    if heads and args.save_full:
        needed = len(heads) * 2 * 4 * model.cfg.d_vocab ** 2
        if needed > args.max_gb * 1e9:
            raise BadInput(f"--save-full needs {needed / 1e9:.3g} GB for {len(heads)} heads (d_vocab "
                           f"{model.cfg.d_vocab}), more than --max-gb {args.max_gb:g}; raise --max-gb or pass "
                           f"fewer --heads")
    return tokens, heads


def _copying(ctx, copying) -> list[dict]:
    """copying.csv + two layer x head heatmaps; returns the 3 heads with the highest eig_ratio."""
    from mechscope import plotting, runs

    L, H = copying.eig_ratio.shape
    runs.write_csv(ctx.run_dir / "copying.csv",
                   [[la, h, f"{float(copying.eig_ratio[la, h]):.6f}", f"{float(copying.positive_fraction[la, h]):.6f}"]
                    for la in range(L) for h in range(H)], header=["layer", "head", "eig_ratio", "positive_fraction"])
    labels = dict(row_labels=[f"L{la}" for la in range(L)], col_labels=[f"H{h}" for h in range(H)],
                  xlabel="head", ylabel="layer")
    embedding = ctx.args.embedding
    plotting.heatmap(copying.eig_ratio, ctx.run_dir / "copying_eig_ratio.png",
                     title=f"OV copying, {embedding} embedding: Re(sum eig) / sum |eig|", **labels)
    plotting.heatmap(copying.positive_fraction, ctx.run_dir / "copying_positive_fraction.png", diverging=False,
                     title=f"OV copying, {embedding} embedding: fraction of eigenvalues with Re > 0", **labels)
    top = copying.eig_ratio.flatten().topk(min(3, L * H)).indices.tolist()
    return [{"head": f"L{i // H}H{i % H}", "eig_ratio": round(float(copying.eig_ratio.flatten()[i]), 4),
             "positive_fraction": round(float(copying.positive_fraction.flatten()[i]), 4)} for i in top]


def _head_tables(ctx, heads, tokens) -> dict:
    """Top OV outputs / QK keys of each token and self-copy fractions per chosen head (+ full matrices on request)."""
    from mechscope.techniques import circuits
    from mechscope.techniques.heads import non_special_token_ids

    model, args = circuits.weight_model(ctx.engine), ctx.args
    allowed = non_special_token_ids(model)
    tables, full = {}, {}
    for layer, head in heads:
        embedding = circuits.effective_embedding(model, layer) if args.embedding == "effective" else None
        ov, qk = circuits.ov_circuit(model, layer, head, embedding), circuits.qk_circuit(model, layer, head, embedding)
        name = f"L{layer}H{head}"
        tables[name] = {"ov_top_outputs": _rows_for(model, ov, tokens, allowed, args.top_k),
                        "qk_top_keys": _rows_for(model, qk, tokens, allowed, args.top_k),
                        "self_copy": circuits.self_copy_fractions(ov, allowed)}
        if args.save_full:
            full[f"ov.{name}"] = circuits.full_matrix(ov, args.max_gb * 1e9).contiguous().cpu()
            full[f"qk.{name}"] = circuits.full_matrix(qk, args.max_gb * 1e9).contiguous().cpu()
    if full:
        from safetensors.torch import save_file
        save_file(full, str(ctx.run_dir / "full_circuits.safetensors"))
    return tables


def _composition(ctx) -> dict:
    """composition.csv (every valid pair, 3 modes) + one heatmap per mode; returns baseline, top pairs, scores."""
    from mechscope import plotting, runs
    from mechscope.techniques import circuits

    model = circuits.weight_model(ctx.engine)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    rows = []
    labels = [f"L{la}H{h}" for la in range(L) for h in range(H)]
    out = {}
    for mode in circuits.MODES:
        comp = circuits.composition_scores(model, mode, n_seeds=ctx.args.baseline_seeds)
        for la, ha, lb, hb in circuits.later_layer_mask(L, H).nonzero().tolist():
            s = float(comp.scores[la, ha, lb, hb])
            rows.append([mode, la, ha, lb, hb, f"{s:.6f}", f"{comp.baseline:.6f}", f"{s - comp.baseline:.6f}"])
        excess = comp.excess[:-1, :, 1:, :].reshape((L - 1) * H, (L - 1) * H)   # writers 0..L-2, readers 1..L-1
        plotting.heatmap(excess, ctx.run_dir / f"composition_{mode}.png", labels[:-H], labels[H:],
                         title=f"{mode}-composition minus random baseline ({comp.baseline:.3f})",
                         xlabel="reading head B (later layer)", ylabel="writing head A", colorbar_label="score - baseline")
        out[mode] = {"baseline": round(comp.baseline, 4), "baseline_std": round(comp.baseline_std, 5),
                     "top_pairs": [{"A": f"L{a}H{b}", "B": f"L{c}H{d}", "excess": round(v, 4),
                                    "score": round(v + comp.baseline, 4)} for a, b, c, d, v in comp.top(5)],
                     "scores": comp.scores}
    runs.write_csv(ctx.run_dir / "composition.csv", rows,
                   header=["mode", "layer_a", "head_a", "layer_b", "head_b", "score", "baseline", "excess"])
    return out


def run(ctx):
    from mechscope.errors import BadInput
    from mechscope.techniques import circuits

    if ctx.args.backend == "nnsight":   # refuse before loading a model that would be refused
        raise BadInput(circuits.NO_WEIGHTS.format(engine="nnsight"))
    model = circuits.weight_model(ctx.engine)
    tokens, heads = _check_args(ctx.args, model)
    copying = circuits.copying_scores(model, effective=ctx.args.embedding == "effective")
    top_copying = _copying(ctx, copying)
    if heads is None:
        n_heads = model.cfg.n_heads
        heads = [(i // n_heads, i % n_heads) for i in copying.eig_ratio.flatten().topk(len(top_copying)).indices.tolist()]
    tables = _head_tables(ctx, heads, tokens)
    composition = _composition(ctx)

    summary = {
        "embedding": ctx.args.embedding,
        "copying_top_heads": top_copying,
        "composition": {m: {k: v for k, v in c.items() if k != "scores"} for m, c in composition.items()},
        "heads": {name: {"self_copy": t["self_copy"],
                         "ov_top_outputs": {tok: [w for w, _ in r] for tok, r in t["ov_top_outputs"].items()},
                         "qk_top_keys": {tok: [w for w, _ in r] for tok, r in t["qk_top_keys"].items()}}
                  for name, t in tables.items()},
        "files": ["copying.csv", "copying_eig_ratio.png", "copying_positive_fraction.png", "composition.csv"]
                 + [f"composition_{m}.png" for m in circuits.MODES]
                 + (["full_circuits.safetensors"] if ctx.args.save_full else []),
    }
    text = "\n".join(
        ["copying (eig_ratio/positive_fraction): " + ", ".join(
            f"{c['head']} {c['eig_ratio']:.2f}/{c['positive_fraction']:.2f}" for c in top_copying)]
        + [f"{m}-composition (baseline {c['baseline']:.3f}): " + ", ".join(
            f"{p['A']}->{p['B']} {p['excess']:+.3f}" for p in c["top_pairs"][:3]) for m, c in composition.items()]
        + [f"{name} OV: " + "; ".join(f"{tok} -> {' '.join(ws[:3])}" for tok, ws in t["ov_top_outputs"].items())
           + f" | copies itself top-1 {t['self_copy']['top1']:.2f}" for name, t in summary["heads"].items()])
    return {"summary": summary, "text": text, "heads": tables, "composition": composition,
            "copying": {"eig_ratio": copying.eig_ratio, "positive_fraction": copying.positive_fraction}}


def headline(summary: dict) -> str:
    """The finding in one sentence: the top copying head and the strongest composition, from the weights."""
    from mechscope.findings import num

    text = "from the weights"
    if summary["copying_top_heads"]:
        c = summary["copying_top_heads"][0]
        text += f": {c['head']} copies most (OV eigenvalue ratio {num(c['eig_ratio'])})"
    strongest = max(((m, c["top_pairs"][0], c) for m, c in summary["composition"].items() if c.get("top_pairs")),
                    key=lambda item: item[1]["excess"] or 0, default=None)
    if strongest:
        m, p, c = strongest
        text += (f"; strongest composition {m}: {p['A']} -> {p['B']} {num(p['score'], 3)} against a random "
                 f"baseline {num(c['baseline'], 3)} (sd {num(c['baseline_std'], 4)})")
    return text + f" ({summary['embedding']} embedding)"

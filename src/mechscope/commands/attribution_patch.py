"""Attribution patching (AtP): a gradient estimate of every activation patch (clean into corrupted) from two
forwards and one backward, for the residual stream, attention / MLP outputs by position, heads (all positions
and by position; q / k / v with --sites qkv) and MLP neurons. The metric is the logit difference
answer - wrong at the last token; an estimate is metric(corrupted + clean patch) - metric(corrupted).

AtP is a linear approximation: it misses effects through saturated softmaxes and big jumps (false negatives).
So by default on small models (--compare-exact auto) every grid is also patched exactly (the `patch` engine)
and the agreement is reported (Pearson r, top-k overlap) with a scatter plot; the top-k neurons are
checked exactly in one batched forward. --atp-star recomputes attention patterns exactly for q / k patches
(AtP*, Kramár et al. 2024).

    mechscope attribution-patch                               # IOI example
    mechscope attribution-patch --clean "The Louvre is in the city of" --corrupted "The Colosseum is in the city of" \\
        --answer paris --wrong rome --sites resid,heads
    mechscope attribution-patch --sites all --atp-star --compare-exact on

Writes one heatmap PNG and CSV per grid, neurons.png (top neurons), agreement.png (AtP vs exact).
"""
HELP = "attribution patching (AtP): gradient estimates of every patch"

EXACT_AUTO_MAX_PARAMS = 2e8  # --compare-exact auto: exact sweeps up to about GPT-2 medium


def add_arguments(parser):
    from mechscope.commands.patch import add_pair_arguments

    add_pair_arguments(parser)
    parser.add_argument("--sites", default="resid,attn_out,mlp_out,heads,neurons",
                        help="comma-separated: resid attn_out mlp_out heads qkv neurons, or all (default: %(default)s)")
    parser.add_argument("--atp-star", action="store_true", help="AtP* for q / k: recompute attention patterns exactly")
    parser.add_argument("--compare-exact", default="auto", choices=("auto", "on", "off"),
                        help="also patch exactly and report the agreement; auto = on for models up to "
                             f"{EXACT_AUTO_MAX_PARAMS:.0e} parameters (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=10, help="cells / neurons listed and compared (default: %(default)s)")


def _sites(spec: str) -> list[str]:
    from mechscope.inputs import names_from_list
    from mechscope.techniques.attribution_patching import SITES

    return names_from_list(spec, SITES, "site")


def _grid(name: str, values, tokens: list[str]):
    """2-D view [rows, cols] of a score grid with row / column labels."""
    n_layers = values.shape[0]
    if name == "neurons":
        return None
    if values.ndim == 3:  # [layer, pos, head] -> rows layer.head, columns positions
        return (values.permute(0, 2, 1).reshape(-1, values.shape[1]),
                [f"L{l}H{h}" for l in range(n_layers) for h in range(values.shape[2])], tokens)
    if name.startswith("head_"):
        return values, [f"L{l}" for l in range(n_layers)], [f"H{h}" for h in range(values.shape[1])]
    return values, [f"L{l}" for l in range(n_layers)], tokens


def run(ctx):
    import csv

    import torch

    from mechscope import metrics, plotting
    from mechscope.commands.patch import pairs_from_args
    from mechscope.errors import BadInput
    from mechscope.techniques import attribution_patching as atp
    from mechscope.techniques import patching

    args = ctx.args
    if args.top_k < 1:
        raise BadInput("--top-k must be at least 1")
    sites = _sites(args.sites)
    pairs = pairs_from_args(args)
    model = ctx.model
    batch = patching.pair_batch(model, pairs)
    read = batch.lengths - 1
    try:
        result = atp.attribution_patch(model, batch.clean, batch.corrupted,
                                       lambda logits: metrics.logit_diff(logits, batch.answer, batch.wrong, pos=read),
                                       sites=sites, atp_star=args.atp_star)
    except ValueError as e:  # AtP* on a model it does not apply to
        raise BadInput(f"{e}; drop --atp-star") from None
    compare = args.compare_exact == "on" or (args.compare_exact == "auto"
                                             and model.cfg.n_params <= EXACT_AUTO_MAX_PARAMS)
    exact_metric = patching.logit_diff_metric(batch.answer, batch.wrong)
    exact = atp.exact_effects(model, batch.clean, batch.corrupted, exact_metric, list(result.scores),
                              lengths=batch.lengths) if compare else {}

    tokens = [f"{i} {t}" for i, t in enumerate(model.to_str_tokens(batch.clean[0, :int(batch.lengths[0])]))]
    tokens += [str(i) for i in range(len(tokens), batch.clean.shape[1])]
    summary = {"metric": "logit diff (answer - wrong) at the last token", "n_pairs": len(pairs),
               "clean_metric": round(result.clean_metric, 4), "corrupted_metric": round(result.corrupted_metric, 4),
               "atp_star": args.atp_star, "compared_exact": compare, "grids": {}}
    lines, scatter, full = [], {}, {}
    for name, values in result.scores.items():
        view = _grid(name, values, tokens)
        if view is None:
            continue
        grid, rows, cols = view
        png = plotting.heatmap(grid, ctx.run_dir / f"{name}.png", row_labels=rows, col_labels=cols,
                               title=f"AtP {name}: estimated change of the logit diff", colorbar_label="AtP estimate")
        with open(ctx.run_dir / f"{name}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([""] + cols)
            writer.writerows([[r] + [f"{v:.6g}" for v in row] for r, row in zip(rows, grid.tolist())])
        top = grid.abs().flatten().topk(min(args.top_k, grid.numel())).indices.tolist()
        entry = {"shape": list(values.shape), "plot": png.name,
                 "top": [{"row": rows[i // grid.shape[1]], "col": cols[i % grid.shape[1]],
                          "atp": round(float(grid.flatten()[i]), 4)} for i in top]}
        line = f"{name}: top " + ", ".join(f"{t['row']}/{t['col']} {t['atp']:.3f}" for t in entry["top"][:3])
        if name in exact:
            entry["agreement"] = atp.agreement(values, exact[name], args.top_k)
            exact_view = _grid(name, exact[name], tokens)[0].flatten()
            for t, i in zip(entry["top"], top):
                t["exact"] = round(float(exact_view[i]), 4)
            scatter[name] = (exact[name].flatten(), values.flatten())
            line += f"; vs exact r = {entry['agreement']['pearson_r']:.3f}, top-{entry['agreement']['top_k']} " \
                    f"overlap {entry['agreement']['top_k_overlap']:.2f}"
        summary["grids"][name] = dict(entry, top=entry["top"][:5])
        full[name] = dict(entry, values=values, exact=exact.get(name), row_labels=rows, col_labels=cols)
        lines.append(line)

    if "neurons" in result.scores:
        neurons = result.scores["neurons"]
        top = neurons.abs().flatten().topk(min(args.top_k, neurons.numel())).indices.tolist()
        units = [(i // neurons.shape[1], i % neurons.shape[1]) for i in top]
        labels = [f"L{l}N{u}" for l, u in units]
        plotting.bars(neurons.flatten()[top], labels, ctx.run_dir / "neurons.png",
                      title="AtP: top MLP neurons (all positions patched)", xlabel="AtP estimate")
        entry = {"shape": list(neurons.shape), "plot": "neurons.png",
                 "top": [{"neuron": lab, "atp": round(float(neurons.flatten()[i]), 4)} for lab, i in zip(labels, top)]}
        if compare:
            checked = atp.exact_neuron_effects(model, batch.clean, batch.corrupted, exact_metric, units, batch.lengths)
            for t, value in zip(entry["top"], checked.tolist()):
                t["exact"] = round(value, 4)
            scatter["neurons (top-k)"] = (checked, neurons.flatten()[top])
        summary["grids"]["neurons"] = dict(entry, top=entry["top"][:5])
        full["neurons"] = dict(entry, values=neurons)
        lines.append("neurons: top " + ", ".join(
            f"{t['neuron']} {t['atp']:.3f}" + (f" (exact {t['exact']:.3f})" if "exact" in t else "")
            for t in entry["top"][:3]))
    if scatter:
        plotting.scatter_agreement(scatter, ctx.run_dir / "agreement.png", title="AtP vs exact patching",
                                   xlabel="exact effect", ylabel="AtP estimate")
        summary["agreement_plot"] = "agreement.png"
    text = (f"AtP{'*' if args.atp_star else ''}: logit diff clean {result.clean_metric:.3f}, corrupted "
            f"{result.corrupted_metric:.3f}, {len(pairs)} pair(s)\n" + "\n".join(lines))
    return {"summary": summary, "grids": full, "pairs": pairs, "text": text}

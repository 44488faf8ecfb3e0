"""Attribution patching (AtP): a gradient estimate of every activation patch (clean into corrupted) from two
forwards and one backward, for the residual stream, attention / MLP outputs by position, heads (all positions
and by position; q / k / v with --sites qkv) and MLP neurons. The metric is the logit difference
answer - wrong at the last token; an estimate is metric(corrupted + clean patch) - metric(corrupted).

AtP is a linear approximation: it misses effects through saturated softmaxes and big jumps (false negatives).
So by default on small models (--compare-exact auto) every grid is also patched exactly (the `patch` engine)
and the agreement is reported (Pearson r, top-k overlap) with a scatter plot; the top-k neurons are
checked exactly in one batched forward. --atp-star recomputes attention patterns exactly for q / k patches
(AtP*, Kramár et al. 2024; --backend tl). Over a prompt set (--task ioi|facts, --pairs FILE) the summary
gives each top cell's mean estimate with a 95% bootstrap interval (resampling templates where prompts share
one) and sign share, the rank stability of the top 1..--stability-k cells, and the agreement with exact patching both for the mean grid and per prompt (mean Pearson r with its
interval); prompts of different lengths are compared at named positions (IO, S1, S2, END, ...).

    mechscope attribution-patch                               # IOI example
    mechscope attribution-patch --task ioi --n 32             # a prompt set: intervals, per-prompt agreement
    mechscope attribution-patch --clean "The Louvre is in the city of" --corrupted "The Colosseum is in the city of" \\
        --answer paris --wrong rome --sites resid,heads
    mechscope attribution-patch --sites all --atp-star --compare-exact on

Writes one heatmap PNG and CSV per grid, neurons.png (top neurons), neurons.csv (every neuron's mean
estimate) and neurons_per_prompt.safetensors ([prompts, layers, d_mlp]; kept out of result.json, which it
would make megabytes on a real model), agreement.png (AtP vs exact).
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
    parser.add_argument("--stability-k", type=int, default=5,
                        help="rank stability of the top 1..K cells (among those whose interval excludes 0) "
                             "(default: %(default)s)")


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


def _named(per_prompt: dict, positions: dict) -> dict:
    """Grids by position gathered at each prompt's named positions (axis 2 of [n, layers, pos, ...])."""
    from mechscope.techniques.attribution_patching import BY_POSITION
    from mechscope.techniques.patching import gather_positions

    return {name: gather_positions(v, positions, axis=2) if name in BY_POSITION else v for name, v in per_prompt.items()}


def run(ctx):
    import torch

    from mechscope import metrics, plotting, runs, stats
    from mechscope.commands.patch import number, pair_records, position_columns, prompt_pairs, rounded
    from mechscope.errors import BadInput
    from mechscope.techniques import attribution_patching as atp
    from mechscope.techniques import patching

    args = ctx.args
    if args.top_k < 1:
        raise BadInput("--top-k must be at least 1")
    if args.stability_k < 1:
        raise BadInput("--stability-k must be at least 1")
    sites = _sites(args.sites)
    if args.atp_star and "qkv" not in sites:
        raise BadInput("--atp-star corrects the q / k estimates: it needs qkv in --sites (e.g. --sites all)")
    engine = ctx.engine
    prompt_set = prompt_pairs(args, engine)
    batch = patching.pair_batch(engine, prompt_set)
    read = batch.lengths - 1
    groups = prompt_set.groups  # the unit intervals and rank stability resample (a template; None: each prompt)

    def metric(logits, rows):  # rows: the prompts of a chunk
        return metrics.logit_diff(logits, batch.answer[rows], batch.wrong[rows], pos=read[rows])
    result = atp.attribution_patch(engine, batch.clean, batch.corrupted, metric, sites=sites,
                                   atp_star=args.atp_star, lengths=batch.lengths)
    compare = args.compare_exact == "on" or (args.compare_exact == "auto"
                                             and engine.cfg.n_params <= EXACT_AUTO_MAX_PARAMS)
    exact_metric = patching.logit_diff_metric(batch.answer, batch.wrong)
    exact = atp.exact_effects(engine, batch.clean, batch.corrupted, exact_metric, list(result.scores),
                              lengths=batch.lengths, per_prompt=True) if compare else {}
    aligned, tokens = position_columns(engine, batch)
    estimates = result.per_prompt
    if aligned:
        estimates, exact = _named(estimates, batch.positions), _named(exact, batch.positions)

    summary = {"metric": "logit diff (answer - wrong) at the last token", "engine": engine.name,
               "n_pairs": len(batch.clean), "n_groups": len(set(groups)) if groups else len(batch.clean),
               "prompts": prompt_set.name,
               "columns": "named positions" if aligned else "token positions",
               "clean_metric": rounded(result.clean.mean()), "corrupted_metric": rounded(result.corrupted.mean()),
               "atp_star": result.atp_star, "compared_exact": compare, "grids": {}}
    lines, scatter, full = [], {}, {}
    for name, per_prompt in estimates.items():
        if name == "neurons":
            continue
        mean, low, high = stats.interval(per_prompt, seed=args.seed, groups=groups)
        share = stats.sign_share(per_prompt)
        grid, rows, cols = _grid(name, mean, tokens)
        flat = {key: _grid(name, value, tokens)[0].flatten() for key, value in (("low", low), ("high", high),
                                                                                ("share", share))}
        png = plotting.heatmap(grid, ctx.run_dir / f"{name}.png", row_labels=rows, col_labels=cols,
                               title=f"AtP {name}: estimated change of the logit diff (mean of {len(per_prompt)})",
                               colorbar_label="AtP estimate")
        runs.write_csv(ctx.run_dir / f"{name}.csv", [[r] + [f"{v:.6g}" for v in row] for r, row in zip(rows, grid.tolist())],
                       header=[""] + cols)
        top = torch.nan_to_num(grid.abs(), nan=-1.0).flatten().topk(min(args.top_k, grid.numel())).indices.tolist()
        stability = stats.rank_stability(per_prompt.reshape(len(per_prompt), -1), k=args.stability_k,
                                         seed=args.seed, groups=groups)
        entry = {"shape": list(mean.shape), "plot": png.name,
                 "top": [{"row": rows[i // grid.shape[1]], "col": cols[i % grid.shape[1]],
                          "atp": rounded(grid.flatten()[i]), "ci": [rounded(flat["low"][i]), rounded(flat["high"][i])],
                          "sign_share": rounded(flat["share"][i], 3)} for i in top],
                 "stability": {key: stability[key] for key in ("k", "set_frequency_by_k", "top_k_set_frequency",
                                                              "median_rank_correlation", "n_ranked")}}
        line = f"{name}: top " + ", ".join(f"{t['row']}/{t['col']} {number(t['atp'])}" for t in entry["top"][:3])
        if name in exact:
            exact_mean = exact[name].nanmean(0)
            entry["agreement"] = atp.agreement(mean, exact_mean, args.top_k)
            entry["agreement_per_prompt"] = atp.agreement_over_prompts(per_prompt, exact[name], args.top_k, args.seed,
                                                                       groups)
            exact_view = _grid(name, exact_mean, tokens)[0].flatten()
            for t, i in zip(entry["top"], top):
                t["exact"] = rounded(exact_view[i])
            scatter[name] = (exact_mean.flatten(), mean.flatten())
            r = entry["agreement_per_prompt"]["pearson_r"]
            line += (f"; vs exact r = {entry['agreement']['pearson_r']:.3f} (per prompt {r['mean']:.3f} "
                     f"{stats.ci_text(r['ci_low'], r['ci_high'])}), top-{entry['agreement']['top_k']} "
                     f"overlap {entry['agreement']['top_k_overlap']:.2f}")
        summary["grids"][name] = dict(entry, top=entry["top"][:5])
        full[name] = dict(entry, values=grid, per_prompt=per_prompt, exact=exact.get(name), row_labels=rows,
                          col_labels=cols)
        lines.append(line)

    if "neurons" in result.scores:
        neurons, per_prompt = result.scores["neurons"], result.per_prompt["neurons"]
        top = neurons.abs().flatten().topk(min(args.top_k, neurons.numel())).indices.tolist()
        units = [(i // neurons.shape[1], i % neurons.shape[1]) for i in top]
        labels = [f"L{l}N{u}" for l, u in units]
        plotting.bars(neurons.flatten()[top], labels, ctx.run_dir / "neurons.png",
                      title="AtP: top MLP neurons (all positions patched)", xlabel="AtP estimate")
        mean, low, high = stats.interval(per_prompt.flatten(1)[:, top], seed=args.seed, groups=groups)
        entry = {"shape": list(neurons.shape), "plot": "neurons.png",
                 "top": [{"neuron": lab, "atp": rounded(m), "ci": [rounded(lo), rounded(hi)]}
                         for lab, m, lo, hi in zip(labels, mean, low, high)]}
        if compare:
            checked = atp.exact_neuron_effects(engine, batch.clean, batch.corrupted, exact_metric, units,
                                               batch.lengths, per_prompt=True)                    # [k, n]
            for t, value in zip(entry["top"], checked.mean(1).tolist()):
                t["exact"] = rounded(torch.tensor(value))
            if len(units) > 1:
                entry["agreement_per_prompt"] = atp.agreement_over_prompts(per_prompt.flatten(1)[:, top],
                                                                           checked.T, args.top_k, args.seed, groups)
            scatter["neurons (top-k)"] = (checked.mean(1), neurons.flatten()[top])
        summary["grids"]["neurons"] = dict(entry, top=entry["top"][:5])
        runs.write_csv(ctx.run_dir / "neurons.csv", ([layer, unit, f"{v:.6g}"] for layer, row in
                                                     enumerate(neurons.tolist()) for unit, v in enumerate(row)),
                       header=["layer", "neuron", "atp"])
        from safetensors.torch import save_file

        save_file({"atp": per_prompt.float().contiguous().cpu()}, str(ctx.run_dir / "neurons_per_prompt.safetensors"))
        full["neurons"] = dict(entry, values="neurons.csv", per_prompt="neurons_per_prompt.safetensors")
        lines.append("neurons: top " + ", ".join(
            f"{t['neuron']} {number(t['atp'])}" + (f" (exact {number(t['exact'])})" if "exact" in t else "")
            for t in entry["top"][:3]))
    if scatter:
        plotting.scatter_agreement(scatter, ctx.run_dir / "agreement.png", title="AtP vs exact patching",
                                   xlabel="exact effect", ylabel="AtP estimate")
        summary["agreement_plot"] = "agreement.png"
    text = (f"AtP{'*' if result.atp_star else ''} on {engine.name}: logit diff clean {result.clean_metric:.3f}, "
            f"corrupted {result.corrupted_metric:.3f}, {len(batch.clean)} pair(s) ({prompt_set.name})\n"
            + "\n".join(lines))
    return {"summary": summary, "grids": full, "pairs": pair_records(prompt_set, batch), "text": text}


def headline(summary: dict) -> str:
    """The finding in one sentence: the largest AtP estimate over the grids, with its exact effect and agreement."""
    from mechscope.commands.patch import cell_name
    from mechscope.findings import ci, count, num

    n = count(summary["n_pairs"], "pair") + (f", {summary['prompts']}" if summary["prompts"] != "pair" else "")
    grids = [(name, g) for name, g in summary["grids"].items() if g["top"] and g["top"][0]["atp"] is not None]
    if not grids:
        return f"AtP: no defined estimate ({n})"
    name, g = max(grids, key=lambda item: abs(item[1]["top"][0]["atp"]))
    top = g["top"][0]
    where = top.get("neuron") or cell_name(top["row"], top["col"])
    text = f"AtP's largest estimate: {where} ({name}) changes the logit difference by {num(top['atp'], signed=True)}{ci(top['ci'], signed=True)}"
    if "exact" in top:
        text += f" (exact patching: {num(top['exact'], signed=True)})"
    if "agreement" in g:
        text += f"; AtP vs exact over the {name} grid r = {num(g['agreement']['pearson_r'], 3)}"
    return text + f" ({n})"

"""Direct logit attribution: what embed, pos_embed, every attention layer and head, every MLP layer and its
top neurons write directly to the answer's logit (or to answer - wrong), on one prompt or a prompt set.

    mechscope dla                      # IOI: "When Mary and John went to the store, John gave a drink to", mary - john
    mechscope dla --prompt "The Eiffel Tower is in the city of" --answer paris --wrong rome
    mechscope dla --prompt "..."       # answer = the model's top prediction
    mechscope dla --task ioi --n 128   # a prompt set: means with 95% bootstrap intervals, rank stability
    mechscope dla --prompts my.jsonl   # {"prompt", "answer", "wrong"?} per line (answer: the top prediction if absent)
    mechscope dla --task ioi --with-ablated 1.2,2.1 --ablation mean   # backup test: whose direct effect changes?

The final norm's scale (and, on models whose norm is not folded, its weight; its bias is its own row) is
applied to every part, so the parts sum to the model's logit (difference): the summary reports both and
their largest difference over the prompts. Each prompt is read at its last token (END).

--with-ablated: the ablated run has its own final-norm scale, which alone moves every part by the factor
final_norm_rescale (clean scale / ablated scale). "change" (with its interval) is each component's direct
effect in the ablated run at the clean run's scale minus the clean one, i.e. what it writes along the
answer direction, rescaling removed; raw_change keeps the rescaling. A backup is a component whose change
is clearly positive. A component's change is "changed" at a Benjamini-Hochberg adjusted p < 0.05 over the
components tested (false discovery rate 5%; p from Student's t on the per-prompt changes; the number of
tests is reported; one prompt: no test). Components that are or contain a held one are flagged
(held_ablated) and left out of "changed" and of the tests. Intervals: a studentized bootstrap over prompts,
or over groups of prompts (--task: a template, a subject) where prompts share one.

Files: dla.csv (the mean table), dla_per_prompt.csv (every prompt x component), dla_top.png (the largest
rows, with 95% intervals over prompts), dla_heads.png (layer x head, mean). With --with-ablated:
dla_backup.csv (each component's direct effect clean, ablated, change with interval) and dla_backup_heads.png.
"""
HELP = "direct logit attribution to embeddings, heads, MLPs and neurons"

DEFAULT_PROMPT = "When Mary and John went to the store, John gave a drink to"
DEFAULT_ANSWER, DEFAULT_WRONG = "Mary", "John"  # capitalised: real vocabularies (" Mary") and the bundled one
FDR = 0.05  # --with-ablated: Benjamini-Hochberg false discovery rate over the components tested


def add_arguments(parser):
    from mechscope.commands import prompt_sets

    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompt", help=f"the prompt (default: {DEFAULT_PROMPT!r}, answer Mary, wrong John)")
    prompt_sets.add_arguments(parser, source, ("ioi", "facts"))
    parser.add_argument("--answer", help="with --prompt: the answer token (default: the model's top prediction)")
    parser.add_argument("--wrong", help="with --prompt: a wrong token: attribute logit[answer] - logit[wrong]")
    parser.add_argument("--neurons", type=int, default=10, help="top MLP neurons in the table (default: %(default)s)")
    parser.add_argument("--top", type=int, default=20, help="rows in the summary and bar plot (default: %(default)s)")
    parser.add_argument("--stability-k", "--top-k", dest="top_k", type=int, default=3,
                        help="rank stability of the top 1..K heads / layers (among those whose interval excludes 0) "
                             "over prompts (default: %(default)s)")
    parser.add_argument("--with-ablated", metavar="COMPONENTS",
                        help="re-run DLA with these held ablated (heads 1.2, layers attn1 / mlp1, comma-separated) "
                             "and report whose direct effect changes (the backup test)")
    parser.add_argument("--ablation", choices=("mean", "zero"), default="mean",
                        help="how --with-ablated ablates: mean over the prompts (BOS excluded) or zero "
                             "(default: %(default)s)")


def _prompt_set(ctx):
    """The PromptSet to attribute: --task / --prompts, or the single --prompt (default: the IOI example)."""
    from mechscope import tasks
    from mechscope.commands import prompt_sets
    from mechscope.errors import BadInput

    args = ctx.args
    ps = prompt_sets.load(ctx)
    if ps is not None:
        if args.answer is not None or args.wrong is not None:
            raise BadInput("--answer / --wrong go with --prompt; a prompt set carries an answer (and wrong) per prompt")
        return ps
    if args.prompt is None and args.answer is None and args.wrong is None:
        return tasks.PromptSet("prompt", [tasks.Prompt(DEFAULT_PROMPT, DEFAULT_ANSWER, DEFAULT_WRONG)])
    prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
    if args.wrong is not None and args.answer is None:
        raise BadInput("--wrong needs --answer (the logit difference is answer - wrong)")
    return tasks.PromptSet("prompt", [tasks.Prompt(prompt, args.answer, args.wrong)])


def _write_csv(path, header: list[str], rows) -> None:
    from mechscope.runs import write_csv

    write_csv(path, rows, header=header)


def _per_prompt_csv(path, ps, result, answers, wrongs, to_str) -> None:
    names, values = result.components()
    rows = [[i, p.text, to_str(int(answers[i])), to_str(int(wrongs[i])) if wrongs is not None else "",
             f"{float(result.metric[i]):.6f}", f"{float(result.total()[i]):.6f}", *(f"{v:.6f}" for v in row.tolist())]
            for i, (p, row) in enumerate(zip(ps.prompts, values))]
    _write_csv(path, ["prompt_index", "prompt", "answer", "wrong", "metric", "sum_of_parts", *names], rows)


def _backup(ctx, tokens, lengths, positions, answers, wrongs, clean, metric_name, groups) -> dict:
    """DLA with --with-ablated held ablated: every component's change in direct effect, with intervals."""
    import torch

    from mechscope import plotting, stats
    from mechscope.techniques.ablation import parse_components
    from mechscope.techniques.dla import direct_effect_change, with_ablated

    engine, args = ctx.engine, ctx.args
    components = parse_components(engine, args.with_ablated)
    clean, ablated = with_ablated(engine, tokens, answers, wrongs, components, args.ablation, positions, lengths,
                                  clean=clean)
    names, before = clean.components()
    _, after = ablated.components()
    change, rescale = direct_effect_change(clean, ablated)
    held = {f"L{c.layer}H{c.index}" if c.kind == "head" else f"L{c.layer} {c.kind}" for c in components}
    held_or_holding = held | {f"L{c.layer} {'attn' if c.kind == 'head' else 'mlp'}" for c in components
                              if c.kind in ("head", "neuron")}
    raw = (after - before).mean(0)
    tested = torch.tensor([name not in held_or_holding for name in names])
    p = stats.p_value(change, groups).masked_fill(~tested, float("nan"))
    adjusted = stats.adjust(p, "bh")
    rows = [dict(r, clean=round(float(b), 4), ablated=round(float(a), 4), raw_change=round(float(c), 4),
                 p=stats._round(pi, 6), p_adjusted=stats._round(qi, 6), held_ablated=r["name"] in held_or_holding)
            for r, b, a, c, pi, qi in zip(stats.named_summary(change, names, groups=groups), before.mean(0),
                                          after.mean(0), raw, p, adjusted)]
    _write_csv(ctx.run_dir / "dla_backup.csv", ["component", "clean", "ablated", "raw_change", "change", "ci_low",
                                                "ci_high", "p", "p_adjusted", "sign_share", "held_ablated"],
               [[r["name"], r["clean"], r["ablated"], r["raw_change"], r["mean"], r["ci_low"], r["ci_high"],
                 r["p"], r["p_adjusted"], r["sign_share"], r["held_ablated"]] for r in rows])
    grid = (ablated.heads / rescale[:, None, None] - clean.heads).mean(0)
    plotting.heatmap(grid, ctx.run_dir / "dla_backup_heads.png", row_labels=[f"L{la}" for la in range(grid.shape[0])],
                     col_labels=[f"H{h}" for h in range(grid.shape[1])], xlabel="head", ylabel="layer",
                     title=f"change in direct effect on {metric_name} with {args.with_ablated} {args.ablation}-ablated",
                     colorbar_label="ablated - clean")
    excludes_zero = [r for r in rows if r["p_adjusted"] is not None and r["p_adjusted"] < FDR]
    excludes_zero.sort(key=lambda r: -abs(r["mean"]))
    n_tests = int((~p.isnan()).sum())
    keep = ("mean", "ci_low", "ci_high", "sign_share")
    metric_change = stats.summary(ablated.metric - clean.metric, groups=groups)
    rescale_summary = stats.summary(rescale, groups=groups)
    return {"ablated": sorted(held), "method": args.ablation,
            "metric_change": {k: metric_change[k] for k in keep},
            "final_norm_rescale": {k: rescale_summary[k] for k in keep[:3]},
            "changed": [{k: r[k] for k in ("name", "clean", "ablated", "raw_change", "mean", "ci_low", "ci_high",
                                           "p", "p_adjusted", "sign_share")}
                        for r in excludes_zero[:args.top]],
            "n_changed": len(excludes_zero), "n_tests": n_tests,
            "multiplicity": f"Benjamini-Hochberg over {n_tests} components (false discovery rate {FDR:.0%}); p from "
                            f"Student's t on the per-prompt changes" if n_tests else
                            "no test: one prompt (or group) has no spread; pass more prompts (--task, --prompts)",
            "files": ["dla_backup.csv", "dla_backup_heads.png"]}


def soft_capped(result, dtype) -> bool:
    """Whether the parts sum to the logits before a soft cap rather than to the logits (the readout misses the
    model's value by more than the dtype's rounding: 1e-3 relative in float32, 4 eps in half precision, where the
    toy's rounding alone reaches 0.6 eps in bfloat16)."""
    import torch

    rel = 1e-3 if dtype in (None, torch.float32) else 4 * torch.finfo(dtype).eps
    return float((result.readout - result.metric).abs().max()) > rel * float(result.metric.abs().max()) + 1e-4


def run(ctx):
    from mechscope import plotting, stats, tasks
    from mechscope.commands import prompt_sets
    from mechscope.errors import BadInput
    from mechscope.techniques.dla import dla

    args, engine = ctx.args, ctx.engine
    if args.neurons < 0 or args.top < 1 or args.top_k < 1:
        raise BadInput("--neurons must be >= 0, --top and --top-k >= 1")
    ps = _prompt_set(ctx)
    tokens, lengths, where, answers, wrongs = prompt_sets.batch(engine, ps)
    positions = where[tasks.END]
    to_str = engine.to_single_str_token
    result = dla(engine, tokens, answers, wrongs, positions, neurons=args.neurons > 0)

    single = len(ps) == 1
    answer_word = to_str(int(answers[0])) if single else None
    wrong_word = to_str(int(wrongs[0])) if single and wrongs is not None else None
    if single:
        metric_name = f"logit({answer_word}) - logit({wrong_word})" if wrongs is not None \
            else f"centred logit({answer_word})"
    else:
        metric_name = "logit(answer) - logit(wrong)" if wrongs is not None else "centred logit(answer)"
    table = result.table(n_neurons=args.neurons)
    _write_csv(ctx.run_dir / "dla.csv", ["name", "kind", "layer", "index", "value"],
               [[r["name"], r["kind"], r["layer"], r["index"], r["value"]] for r in table])
    _per_prompt_csv(ctx.run_dir / "dla_per_prompt.csv", ps, result, answers, wrongs, to_str)

    names, values = result.components()
    groups = ps.groups
    rows_by_name = {r["name"]: r for r in stats.named_summary(values, names, groups=groups)}
    top = [r for r in table if r["kind"] != "neuron" or single][:args.top]
    intervals = None if single else ([rows_by_name[r["name"]]["ci_low"] for r in top],
                                     [rows_by_name[r["name"]]["ci_high"] for r in top])
    plotting.bars([r["value"] for r in top], [r["name"] for r in top], ctx.run_dir / "dla_top.png",
                  title=f"direct logit attribution to {metric_name}" + ("" if single else f" ({len(ps)} prompts, 95% CI)"),
                  xlabel="contribution", interval=intervals)
    heads = result.heads.float().mean(0)
    plotting.heatmap(heads, ctx.run_dir / "dla_heads.png", row_labels=[f"L{la}" for la in range(heads.shape[0])],
                     col_labels=[f"H{h}" for h in range(heads.shape[1])],
                     title=f"per-head direct contribution to {metric_name}" + ("" if single else " (mean)"),
                     xlabel="head", ylabel="layer", colorbar_label="contribution")

    metric, total = result.metric, result.total()
    head_rows = sorted((r for r in table if r["kind"] == "head"), key=lambda r: -r["value"])
    summary = {"prompt": ps.prompts[0].text if single else None, "prompt_set": None if single else ps.name,
               "n_prompts": len(ps), "answer": answer_word, "wrong": wrong_word, "metric": metric_name,
               "model_value": round(float(metric.mean()), 5), "sum_of_parts": round(float(total.mean()), 5),
               "sum_error": float((metric - total).abs().max()),
               "top": [(r["name"], round(r["value"], 4)) for r in top],
               "top_heads": [(r["name"], round(r["value"], 4)) for r in head_rows[:5]],
               "files": ["dla.csv", "dla_per_prompt.csv", "dla_top.png", "dla_heads.png"]}
    if soft_capped(result, engine.cfg.dtype):
        summary["before_soft_cap"] = round(float(result.readout.mean()), 5)
        summary["note"] = "the logits are soft-capped: the parts sum to the logit difference before the cap"
    if not single:
        keep = ("name", "mean", "ci_low", "ci_high", "sign_share")
        summary["model_value_interval"] = {k: v for k, v in stats.summary(metric, groups=groups).items()
                                           if k in keep[1:]}
        summary["components"] = [{k: rows_by_name[r["name"]][k] for k in keep} for r in top]
        summary["top_heads"] = [{k: rows_by_name[r["name"]][k] for k in keep} for r in head_rows[:5]]
        layer_names, layer_values = result.layer_parts()
        summary["rank_stability"] = {
            "heads": stats.named_rank_stability(result.heads.flatten(1), result.head_names(), args.top_k, groups=groups),
            "layers": stats.named_rank_stability(layer_values, layer_names, args.top_k, groups=groups)}
    if args.with_ablated:
        summary["backup"] = _backup(ctx, tokens, lengths, positions, answers, wrongs, result, metric_name, groups)
        summary["files"] += summary["backup"].pop("files")

    where_text = repr(ps.prompts[0].text) if single else f"{len(ps)} prompts of {ps.name}"
    text = [f"DLA to {metric_name} at the last token of {where_text}: model {float(metric.mean()):.4f}, "
            f"sum of parts {float(total.mean()):.4f}" + ("" if single else " (means)")]
    for name, value in summary["top"]:
        r = rows_by_name.get(name)
        ci = "" if single or r is None else f"  [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] sign {r['sign_share']:.2f}"
        text.append(f"  {name:>16} {value:+.4f}{ci}")
    if not single:
        rs = summary["rank_stability"]["heads"]
        text.append(f"top-{rs['k']} heads {rs['top_k']}; heads' " + stats.stability_text(rs))
    if args.with_ablated:
        b = summary["backup"]
        text.append(f"with {', '.join(b['ablated'])} {b['method']}-ablated: metric change {b['metric_change']['mean']:+.3f}, "
                    f"final-norm rescale x{b['final_norm_rescale']['mean']:.3f}; {b['n_changed']} components' direct "
                    f"effects change ({b['multiplicity']}, adjusted p < {FDR}):")
        text += [f"  {r['name']:>16} {r['clean']:+.3f} -> {r['ablated']:+.3f}  change at the clean norm scale "
                 f"{r['mean']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}]" for r in b["changed"][:10]]
    return {"summary": summary, "text": "\n".join(text), "table": table}


def headline(summary: dict) -> str:
    """The finding in one sentence: the largest direct contribution to the metric."""
    from mechscope.findings import count, num

    label, value = summary["top"][0] if summary["top"] else ("nothing", None)
    return (f"{label} contributes {num(value, signed=True)} of the {summary['metric']} {num(summary['model_value'])} "
            f"directly (parts sum to the model's value within {summary['sum_error']:.1g}; "
            f"{count(summary['n_prompts'], 'prompt')})")

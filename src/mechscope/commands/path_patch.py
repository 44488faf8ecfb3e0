"""Path patching (Wang et al. 2022): how much of a behaviour flows from sender heads to receiver heads through
their queries, keys or values (or to the logits), with every other path frozen.

Receivers: LAYER.HEAD:COMPONENTS items, e.g. 2.1:k or 2.1:qk,2.3:q (components q, k, v; default qkv);
`logits` (Wang et al.'s definition: every other head frozen, the MLPs recompute, so a sender reaches the
logits directly and through the MLPs; --freeze-mlps freezes them too); or `logits-direct` (the direct path
only, every MLP frozen: the same as logits --freeze-mlps). Senders: heads LAYER.HEAD (default: every head in
a layer before the last receiver). The target run is the clean input, the senders' outputs come from the
corrupted one; an effect is metric(path patched) - metric(clean), so a path that carries the behaviour has an
effect near (corrupted - clean), i.e. a fraction near 1.

Prompts: the IOI example, --clean --corrupted --answer --wrong, --pairs FILE, or --task ioi|facts (a prompt
set; logit diff at each prompt's last token), or --task induction: clean [BOS, r, r], corrupted [BOS, r', r]
(the first copy re-drawn), metric = mean log-prob of the correct token over the second copy. Over several
prompts the summary gives each path's mean effect with a 95% bootstrap interval and the share of prompts
with its sign, and (sender / receiver sweeps) the rank stability of the top paths.

    mechscope path-patch --task induction --receivers 2.1:k            # which heads feed the induction head L2H1's keys
    mechscope path-patch --task ioi --receivers logits --sweep senders   # every head's effect on the logits
    mechscope path-patch --receivers 2.0:q,2.1:q --senders 1.2 --sweep receivers --freeze-mlps

Writes effects.png (sender sweep: layer x head; otherwise bars), effects.csv and per_prompt.csv.
"""
HELP = "path patching: sender heads -> receiver heads (q/k/v) or logits"


def add_arguments(parser):
    from mechscope.commands.patch import add_pair_arguments

    parser.add_argument("--receivers", required=True,
                        help="LAYER.HEAD:COMPONENTS items (e.g. 2.1:k,2.3:qv; components q k v, default qkv), "
                             "logits (Wang et al.: MLPs recompute) or logits-direct (direct path only)")
    parser.add_argument("--senders", default="all",
                        help="heads LAYER.HEAD,... (default: every head before the last receiver layer)")
    parser.add_argument("--sweep", default="senders", choices=("senders", "receivers", "none"),
                        help="one path per sender, per receiver, or one path for all (default: %(default)s)")
    parser.add_argument("--freeze-mlps", action="store_true",
                        help="freeze MLP outputs to the clean run too (default: they recompute, as in Wang et al.)")
    add_pair_arguments(parser, tasks=("ioi", "facts", "induction"))
    parser.add_argument("--seq-len", type=int, default=10, help="induction: length of r (default: %(default)s)")
    parser.add_argument("--stability-k", type=int, default=5,
                        help="rank stability of the top 1..K paths (among those whose interval excludes 0) "
                             "(default: %(default)s)")


def _receivers(model, spec: str):
    import re

    from mechscope import inputs
    from mechscope.errors import BadInput
    from mechscope.techniques.path_patching import LOGITS

    if spec.strip().lower() in LOGITS:
        return spec.strip().lower()
    out = []
    for item in [s for s in re.split(r"[,\s]+", spec.strip()) if s]:
        head, _, components = item.partition(":")
        components = components.lower() or "qkv"
        if set(components) - set("qkv"):
            raise BadInput(f"receiver {item!r}: components must be letters of qkv, e.g. 2.1:k or 2.1:qv")
        (layer, index), = inputs.parse_heads(model, head)
        out += [(layer, index, c) for c in dict.fromkeys(components)]
    if not out:
        raise BadInput("no receivers given: write LAYER.HEAD:COMPONENTS (e.g. 2.1:k), logits or logits-direct")
    return out


def _task(engine, args):
    """(clean [n, pos], corrupted [n, pos], metric(logits [rows * n, ...]) -> [rows * n], metric name, prompts)."""
    from mechscope import metrics
    from mechscope.commands.patch import check_n, pair_records, prompt_pairs
    from mechscope.errors import BadInput
    from mechscope.techniques import patching
    from mechscope.techniques.path_patching import induction_task

    if args.task == "induction":
        check_n(args.n)
        if args.pairs or args.clean or args.corrupted:
            raise BadInput("--task induction builds its own sequences; drop --pairs / --clean / --corrupted")
        if not 2 <= args.seq_len <= (engine.cfg.n_ctx - 1) // 2:
            raise BadInput(f"--seq-len must be in 2..{(engine.cfg.n_ctx - 1) // 2} for this model")
        clean, corrupted, metric = induction_task(engine, args.n, args.seq_len, seed=args.seed)
        return clean, corrupted, metric, "second-copy mean log-prob of the correct token", None
    prompt_set = prompt_pairs(args, engine)
    batch = patching.pair_batch(engine, prompt_set)
    n = len(batch.clean)

    def metric(logits):  # rows r * n + j belong to prompt j
        repeat = len(logits) // n
        return metrics.logit_diff(logits, batch.answer.repeat(repeat), batch.wrong.repeat(repeat),
                                  pos=(batch.lengths - 1).repeat(repeat))
    return (batch.clean, batch.corrupted, metric, "logit diff (answer - wrong) at the last token",
            pair_records(prompt_set, batch))


def run(ctx):
    import torch

    from mechscope import inputs, plotting, runs, stats
    from mechscope.commands.patch import number, rounded
    from mechscope.errors import BadInput
    from mechscope.techniques.path_patching import LOGITS, path_patch

    args = ctx.args
    engine = ctx.engine
    cfg = engine.cfg
    if args.stability_k < 1:
        raise BadInput("--stability-k must be at least 1")
    receivers = _receivers(engine, args.receivers)
    to_logits = receivers in LOGITS
    last = cfg.n_layers if to_logits else max(layer for layer, _, _ in receivers)
    if args.senders.strip().lower() == "all":
        senders = [(layer, head) for layer in range(last) for head in range(cfg.n_heads)]
    else:
        senders = inputs.parse_heads(engine, args.senders)
    if not senders or min(layer for layer, _ in senders) >= last:
        raise BadInput(f"no sender is before the last receiver layer ({last}): a head can only reach later layers")
    if to_logits and args.sweep == "receivers":
        raise BadInput("--sweep receivers needs receiver heads; with --receivers logits use --sweep senders or none")
    if cfg.n_key_value_heads not in (None, cfg.n_heads) and not to_logits and any(c in "kv" for _, _, c in receivers):
        raise BadInput("this model shares keys / values between heads (grouped-query attention): use q receivers")
    clean, corrupted, metric, metric_name, pairs = _task(engine, args)
    result = path_patch(engine, clean, corrupted, senders, receivers, metric, sweep=args.sweep,
                        freeze_mlps=args.freeze_mlps)

    def label(heads):
        return heads if isinstance(heads, str) else "+".join(f"L{l}H{h}" + (f":{c[0]}" if c else "") for l, h, *c in heads)
    labels = [label(row[0] if args.sweep == "senders" else row[1]) if args.sweep != "none"
              else f"{label(row[0])} -> {label(row[1])}" for row in result.rows]
    groups = [r["group"] if r["group"] is not None else f"#{i}" for i, r in enumerate(pairs)] \
        if pairs and any(r["group"] is not None for r in pairs) else None  # prompts sharing a template: one unit
    mean, low, high = stats.interval(result.per_prompt.T, seed=args.seed, groups=groups)           # [rows]
    share = stats.sign_share(result.per_prompt.T)
    fraction = result.fraction
    if args.sweep == "senders":
        grid = torch.full((cfg.n_layers, cfg.n_heads), float("nan"))
        for (layer, head), value in zip(senders, mean.tolist()):
            grid[layer, head] = value
        plotting.heatmap(grid, ctx.run_dir / "effects.png", row_labels=[f"L{l}" for l in range(cfg.n_layers)],
                         col_labels=[f"H{h}" for h in range(cfg.n_heads)], xlabel="sender head", ylabel="layer",
                         title=f"path patching -> {label(receivers)}", colorbar_label=f"change of {metric_name}")
    else:
        plotting.bars(mean, labels, ctx.run_dir / "effects.png", title="path patching",
                      xlabel=f"change of {metric_name}")
    runs.write_csv(ctx.run_dir / "effects.csv",
                   [[lab, f"{e:.6g}", f"{lo:.6g}", f"{hi:.6g}", f"{s:.3g}", f"{fr:.6g}"] for lab, e, lo, hi, s, fr
                    in zip(labels, mean.tolist(), low.tolist(), high.tolist(), share.tolist(), fraction.tolist())],
                   header=["path", "effect", "ci_low", "ci_high", "sign_share", "fraction"])
    runs.write_csv(ctx.run_dir / "per_prompt.csv", [[lab, j, f"{v:.6g}"] for lab, row in
                                                    zip(labels, result.per_prompt.tolist()) for j, v in enumerate(row)],
                   header=["path", "prompt", "effect"])
    order = torch.nan_to_num(mean.abs(), nan=-1.0).argsort(descending=True).tolist()
    top = [{"path": labels[i], "effect": rounded(mean[i]), "ci": [rounded(low[i]), rounded(high[i])],
            "sign_share": rounded(share[i], 3), "fraction": rounded(fraction[i])} for i in order[:10]]
    summary = {"metric": metric_name, "engine": engine.name, "n_prompts": len(clean),
               "clean_metric": rounded(result.target.mean()), "corrupted_metric": rounded(result.source.mean()),
               "receivers": label(receivers), "sweep": args.sweep, "freeze_mlps": result.freeze_mlps, "top": top,
               "plot": "effects.png"}
    live = ~result.effects.isnan()
    if args.sweep != "none" and live.sum() > 1:
        stability = stats.rank_stability(result.per_prompt[live].T, k=args.stability_k, seed=args.seed,
                                         groups=groups)
        names = [lab for lab, ok in zip(labels, live.tolist()) if ok]
        summary["stability"] = {"top_k": [names[i] for i in stability["top_k"]],
                                "set_frequency_by_k": stability["set_frequency_by_k"],
                                "top_k_set_frequency": stability["top_k_set_frequency"],
                                "median_rank_correlation": stability["median_rank_correlation"]}
    text = (f"path patching -> {label(receivers)} on {engine.name} ({metric_name}, {len(clean)} prompt(s)): "
            f"clean {result.target_metric:.3f}, corrupted {result.source_metric:.3f}\n" + "\n".join(
                f"  {t['path']}: {number(t['effect'], '+.3f')}" + (f" [{t['ci'][0]}, {t['ci'][1]}]" if len(clean) > 1
                                                                    else "")
                + f" (fraction {number(t['fraction'], '+.2f')} of corrupted - clean)" for t in top))
    return {"summary": summary, "effects": result.effects, "per_prompt": result.per_prompt, "labels": labels,
            "pairs": pairs, "text": text}


def headline(summary: dict) -> str:
    """The finding in one sentence: the path with the largest effect on the metric."""
    from mechscope.findings import ci, count, num

    n = count(summary["n_prompts"], "prompt")
    top = next((t for t in summary["top"] if t["effect"] is not None), None)
    if top is None:
        return f"path patching into {summary['receivers']}: no defined effect ({n})"
    path = {"senders": f"the path {top['path']} -> {summary['receivers']}",
            "receivers": f"the path into {top['path']}"}.get(summary["sweep"], f"the path {top['path']}")
    return (f"patching {path} changes the {summary['metric']} by "
            f"{num(top['effect'], signed=True)}{ci(top['ci'], signed=True)}, {num(top['fraction'])} of the clean - "
            f"corrupted change (clean {num(summary['clean_metric'])}, corrupted {num(summary['corrupted_metric'])}; {n})")

"""Path patching (Wang et al. 2022): how much of a behaviour flows from sender heads to receiver heads through
their queries, keys or values (or straight to the logits), with every other path frozen.

Receivers: LAYER.HEAD:COMPONENTS items, e.g. 2.1:k or 2.1:qk,2.3:q (components q, k, v; default qkv), or
`logits` (the direct path from the senders to the final residual). Senders: heads LAYER.HEAD (default: every
head in a layer before the last receiver). The target run is the clean input, the senders' outputs come
from the corrupted one; an effect is metric(path patched) - metric(clean), so a path that carries the
behaviour has an effect near (corrupted - clean), i.e. a fraction near 1.

Tasks: the IOI example / your --clean --corrupted --answer --wrong (logit diff at the last token), or
--task induction: clean [BOS, r, r], corrupted [BOS, r', r] (the first copy re-drawn), metric = mean log-prob
of the correct token over the second copy.

    mechscope path-patch --task induction --receivers 1.2:k            # which heads feed the induction head's keys
    mechscope path-patch --receivers logits --sweep senders              # direct effect of every head (IOI example)
    mechscope path-patch --receivers 2.0:q,2.1:q --senders 1.2 --sweep receivers --freeze-mlps

Writes effects.png (sender sweep: layer x head; otherwise bars) and effects.csv.
"""
HELP = "path patching: sender heads -> receiver heads (q/k/v) or logits"


def add_arguments(parser):
    parser.add_argument("--receivers", required=True,
                        help="LAYER.HEAD:COMPONENTS items (e.g. 2.1:k,2.3:qv; components q k v, default qkv) or logits")
    parser.add_argument("--senders", default="all",
                        help="heads LAYER.HEAD,... (default: every head before the last receiver layer)")
    parser.add_argument("--sweep", default="senders", choices=("senders", "receivers", "none"),
                        help="one path per sender, per receiver, or one path for all (default: %(default)s)")
    parser.add_argument("--freeze-mlps", action="store_true",
                        help="freeze MLP outputs to the clean run too (default: they recompute, as in Wang et al.)")
    parser.add_argument("--task", default="prompts", choices=("prompts", "induction"),
                        help="prompts: the IOI example or --clean/--corrupted/--pairs; induction: repeated random "
                             "tokens (default: %(default)s)")
    parser.add_argument("--clean", help="clean prompt (default: an IOI sentence)")
    parser.add_argument("--corrupted", help="corrupted prompt with the same number of tokens")
    parser.add_argument("--answer", help="the clean answer (one token; default for IOI: mary)")
    parser.add_argument("--wrong", help="the corrupted answer (one token; default for IOI: john)")
    parser.add_argument("--pairs", help="JSON / JSONL file of {clean, corrupted, answer, wrong} pairs")
    parser.add_argument("--n", type=int, default=16, help="induction: number of sequences (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=10, help="induction: length of r (default: %(default)s)")


def _receivers(model, spec: str):
    import re

    from mechscope import inputs
    from mechscope.errors import BadInput

    if spec.strip().lower() == "logits":
        return "logits"
    out = []
    for item in [s for s in re.split(r"[,\s]+", spec.strip()) if s]:
        head, _, components = item.partition(":")
        components = components.lower() or "qkv"
        if set(components) - set("qkv"):
            raise BadInput(f"receiver {item!r}: components must be letters of qkv, e.g. 2.1:k or 2.1:qv")
        (layer, index), = inputs.parse_heads(model, head)
        out += [(layer, index, c) for c in dict.fromkeys(components)]
    if not out:
        raise BadInput("no receivers given: write LAYER.HEAD:COMPONENTS (e.g. 2.1:k) or logits")
    return out


def _task(model, args):
    """(clean [n, pos], corrupted [n, pos], metric(logits [rows * n, ...]) -> [rows * n], metric name)."""
    from mechscope import metrics
    from mechscope.commands.patch import pairs_from_args
    from mechscope.errors import BadInput
    from mechscope.techniques import patching
    from mechscope.techniques.path_patching import induction_task

    if args.task == "induction":
        if not 1 <= args.n <= 100_000 or not 2 <= args.seq_len <= (model.cfg.n_ctx - 1) // 2:
            raise BadInput(f"--n must be in 1..100000 and --seq-len in 2..{(model.cfg.n_ctx - 1) // 2} for this model")
        clean, corrupted, metric = induction_task(model, args.n, args.seq_len, seed=args.seed)
        return clean, corrupted, metric, "second-copy mean log-prob of the correct token"
    batch = patching.pair_batch(model, pairs_from_args(args))
    n = len(batch.clean)

    def metric(logits):  # rows r * n + j belong to prompt j
        repeat = len(logits) // n
        return metrics.logit_diff(logits, batch.answer.repeat(repeat), batch.wrong.repeat(repeat),
                                  pos=(batch.lengths - 1).repeat(repeat))
    return batch.clean, batch.corrupted, metric, "logit diff (answer - wrong) at the last token"


def run(ctx):
    import csv

    import torch

    from mechscope import inputs, plotting
    from mechscope.errors import BadInput
    from mechscope.techniques.path_patching import path_patch

    args = ctx.args
    model = ctx.model
    cfg = model.cfg
    receivers = _receivers(model, args.receivers)
    last = cfg.n_layers if receivers == "logits" else max(layer for layer, _, _ in receivers)
    if args.senders.strip().lower() == "all":
        senders = [(layer, head) for layer in range(last) for head in range(cfg.n_heads)]
    else:
        senders = inputs.parse_heads(model, args.senders)
    if not senders or min(layer for layer, _ in senders) >= last:
        raise BadInput(f"no sender is before the last receiver layer ({last}): a head can only reach later layers")
    if receivers == "logits" and args.sweep == "receivers":
        raise BadInput("--sweep receivers needs receiver heads; with --receivers logits use --sweep senders or none")
    if cfg.n_key_value_heads not in (None, cfg.n_heads) and receivers != "logits" \
            and any(c in "kv" for _, _, c in receivers):
        raise BadInput("this model shares keys / values between heads (grouped-query attention): use q receivers")
    clean, corrupted, metric, metric_name = _task(model, args)
    result = path_patch(model, clean, corrupted, senders, receivers, metric, sweep=args.sweep,
                        freeze_mlps=args.freeze_mlps)

    def label(heads):
        return "+".join(f"L{l}H{h}" + (f":{c[0]}" if c else "") for l, h, *c in heads) if heads != "logits" else "logits"
    labels = [label(row[0] if args.sweep == "senders" else row[1]) if args.sweep != "none"
              else f"{label(row[0])} -> {label(row[1])}" for row in result.rows]
    if args.sweep == "senders":
        grid = torch.full((cfg.n_layers, cfg.n_heads), float("nan"))
        for (layer, head), value in zip(senders, result.effects.tolist()):
            grid[layer, head] = value
        plotting.heatmap(grid, ctx.run_dir / "effects.png", row_labels=[f"L{l}" for l in range(cfg.n_layers)],
                         col_labels=[f"H{h}" for h in range(cfg.n_heads)], xlabel="sender head", ylabel="layer",
                         title=f"path patching -> {label(receivers)}", colorbar_label=f"change of {metric_name}")
    else:
        plotting.bars(result.effects, labels, ctx.run_dir / "effects.png", title="path patching",
                      xlabel=f"change of {metric_name}")
    with open(ctx.run_dir / "effects.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "effect", "fraction"])
        writer.writerows([[lab, f"{e:.6g}", f"{fr:.6g}"] for lab, e, fr in
                          zip(labels, result.effects.tolist(), result.fraction.tolist())])
    order = torch.nan_to_num(result.effects.abs(), nan=-1.0).argsort(descending=True).tolist()
    top = [{"path": labels[i], "effect": round(float(result.effects[i]), 4),
            "fraction": round(float(result.fraction[i]), 4)} for i in order[:10]]
    summary = {"metric": metric_name, "clean_metric": round(result.target_metric, 4),
               "corrupted_metric": round(result.source_metric, 4), "receivers": label(receivers),
               "sweep": args.sweep, "freeze_mlps": args.freeze_mlps, "top": top, "plot": "effects.png"}
    text = (f"path patching -> {label(receivers)} ({metric_name}): clean {result.target_metric:.3f}, corrupted "
            f"{result.source_metric:.3f}\n" + "\n".join(
                f"  {t['path']}: {t['effect']:+.3f} (fraction {t['fraction']:+.2f} of corrupted - clean)" for t in top))
    return {"summary": summary, "effects": result.effects, "labels": labels, "text": text}

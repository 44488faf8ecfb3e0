"""Activation patching: copy one activation from a source run into a target run, for every layer
(x position, x head), and score the output. Exact (the same numbers as transformer_lens.patching),
with an engine that reruns only the blocks after the patch, batches the cells of a layer, and computes
logits at the answer position only.

    mechscope patch                                   # IOI example: resid_pre, attn_out, mlp_out by position
    mechscope patch --clean "The Louvre is in the city of" --corrupted "The Colosseum is in the city of" \\
        --answer paris --wrong rome --component resid_pre,z
    mechscope patch --pairs pairs.jsonl --component z --all-positions --mode noise

--pairs: a JSON list or JSONL file of {"clean", "corrupted", "answer", "wrong"} objects; the two prompts
of a pair must have the same number of tokens; pairs may differ in length (they are right-padded and
each is read at its own last token). --mode denoise patches clean into corrupted (is it sufficient?),
noise patches corrupted into clean (is it necessary?). --metric recovery (default) reports
(patched - corrupted) / (clean - corrupted) of the logit difference: 1 = clean, 0 = corrupted.
Writes one heatmap PNG and one CSV per component (rows: layers, or layer.head; columns: positions
labelled with the first prompt's tokens, or heads).
"""
HELP = "activation patching sweeps (resid, attn/mlp out, heads) with a fast exact engine"

IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
METRICS = ("recovery", "logit_diff", "prob", "kl")


def add_pair_arguments(parser):
    """--clean/--corrupted/--answer/--wrong or --pairs: shared with attribution-patch (read by pairs_from_args)."""
    parser.add_argument("--clean", help="clean prompt (default: an IOI sentence)")
    parser.add_argument("--corrupted", help="corrupted prompt with the same number of tokens")
    parser.add_argument("--answer", help="the clean answer (one token; default for IOI: mary)")
    parser.add_argument("--wrong", help="the corrupted answer (one token; default for IOI: john)")
    parser.add_argument("--pairs", help="JSON / JSONL file of {clean, corrupted, answer, wrong} pairs (instead of --clean ...)")


def add_arguments(parser):
    add_pair_arguments(parser)
    parser.add_argument("--component", default="resid_pre,attn_out,mlp_out",
                        help="comma-separated: resid_pre resid_mid resid_post attn_out mlp_out z q k v pattern, "
                             "or all (default: %(default)s)")
    parser.add_argument("--all-positions", action="store_true", help="patch every position at once (default: one position at a time)")
    parser.add_argument("--mode", default="denoise", choices=("denoise", "noise"),
                        help="denoise: clean into corrupted; noise: corrupted into clean (default: %(default)s)")
    parser.add_argument("--metric", default="recovery", choices=METRICS, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, help="patched rows per forward call (default: from a memory budget)")


def _read_pairs(path: str) -> list[dict]:
    import json

    from mechscope.errors import BadInput
    from mechscope.inputs import read_text

    text = read_text(path, "pairs file")
    try:
        data = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise BadInput(f"{path} is not JSON / JSONL ({e.msg}, line {e.lineno}); write one "
                       f'{{"clean": ..., "corrupted": ..., "answer": ..., "wrong": ...}} per line') from None
    if not all(isinstance(d, dict) for d in data):
        raise BadInput(f"{path}: every pair must be an object with clean, corrupted, answer, wrong")
    return data


def pairs_from_args(args) -> list[dict]:
    """The prompt pairs of --pairs FILE, or of --clean/--corrupted/--answer/--wrong (default: IOI); shared by
    attribution-patch and path-patch."""
    from mechscope.errors import BadInput

    if args.pairs:
        if args.clean or args.corrupted:
            raise BadInput("pass either --pairs FILE or --clean/--corrupted, not both")
        return _read_pairs(args.pairs)
    if not args.clean and not args.corrupted:
        return [{"clean": IOI_CLEAN, "corrupted": IOI_CORRUPTED, "answer": args.answer or "mary",
                 "wrong": args.wrong or "john"}]
    if not (args.clean and args.corrupted and args.answer and args.wrong):
        raise BadInput("--clean needs --corrupted, --answer and --wrong (the clean and the corrupted answer tokens)")
    return [{"clean": args.clean, "corrupted": args.corrupted, "answer": args.answer, "wrong": args.wrong}]


def _components(spec: str) -> list[str]:
    from mechscope.inputs import names_from_list
    from mechscope.techniques.patching import COMPONENTS

    return names_from_list(spec, COMPONENTS, "component")


def _labels(model, tokens, n_heads: int, result) -> tuple[list[str], list[str]]:
    """Row and column labels of the 2-D view of result.values."""
    layers = result.meta["layers"]
    tokens_ = [f"{i} {t}" for i, t in enumerate(model.to_str_tokens(tokens))]
    if result.axes == ("layer", "head", "pos"):
        return [f"L{l}H{h}" for l in layers for h in range(n_heads)], tokens_
    if result.axes == ("layer", "head"):
        return [f"L{l}" for l in layers], [f"H{h}" for h in range(n_heads)]
    return [f"L{l}" for l in layers], tokens_ if "pos" in result.axes else ["all positions"]


def run(ctx):
    import csv

    import torch

    from mechscope import plotting
    from mechscope.errors import BadInput
    from mechscope.techniques import patching

    args = ctx.args
    if args.batch_size is not None and args.batch_size < 1:
        raise BadInput("--batch-size must be at least 1")
    if args.batch_size is not None and args.batch_size > 1_000_000:
        raise BadInput("--batch-size must be at most 1000000")
    components = _components(args.component)
    pairs = pairs_from_args(args)
    model = ctx.model
    ctx.engine.require([patching.COMPONENTS[c].format(0) for c in components], f"--component {','.join(components)}")
    batch = patching.pair_batch(model, pairs)
    metric = {"recovery": patching.logit_diff_metric(batch.answer, batch.wrong),
              "logit_diff": patching.logit_diff_metric(batch.answer, batch.wrong),
              "prob": patching.answer_prob_metric(batch.answer),
              "kl": patching.kl_to_clean_metric()}[args.metric]
    first_tokens = batch.clean[0, :int(batch.lengths[0])]
    summary = {"mode": args.mode, "metric": args.metric, "n_pairs": len(pairs), "components": {}}
    full, lines, notes = {}, [], []
    for component in components:
        result = patching.patch_sweep(model, batch.clean, batch.corrupted, component, metric, mode=args.mode,
                                      by_position=not args.all_positions, lengths=batch.lengths,
                                      batch_size=args.batch_size)
        values = result.recovery if args.metric == "recovery" else result.values
        grid = values.reshape(-1, values.shape[-1]) if values.ndim > 1 else values[:, None]
        rows, cols = _labels(model, first_tokens, values.shape[1] if "head" in result.axes else 0, result)
        cols = cols[:grid.shape[1]] + [f"{i}" for i in range(len(cols), grid.shape[1])]
        png = plotting.heatmap(grid, ctx.run_dir / f"{component}.png", row_labels=rows, col_labels=cols,
                               title=f"{args.mode} {component}: {args.metric}",
                               xlabel="position" if "pos" in result.axes else "head",
                               ylabel="layer" if len(result.axes) < 3 else "layer.head", colorbar_label=args.metric)
        with open(ctx.run_dir / f"{component}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([""] + cols)
            writer.writerows([[r] + [f"{v:.6g}" for v in row] for r, row in zip(rows, grid.tolist())])
        # a cell matters as much as it moves the metric away from the unpatched target run
        unpatched = {"recovery": 0.0 if args.mode == "denoise" else 1.0}.get(
            args.metric, float((result.corrupted if args.mode == "denoise" else result.clean).mean()))
        effect = torch.nan_to_num((grid - unpatched).abs(), nan=-1.0)
        top = effect.flatten().topk(min(5, effect.numel())).indices.tolist()
        best = [{"row": rows[i // grid.shape[1]], "col": cols[i % grid.shape[1]],
                 "value": round(float(grid.flatten()[i]), 4)} for i in top]
        entry = {"shape": list(values.shape), "axes": list(result.axes), "top": best, "plot": png.name,
                 "clean": round(float(result.clean.mean()), 4), "corrupted": round(float(result.corrupted.mean()), 4)}
        if "pos" in result.axes and "head" not in result.axes:
            entry["top_position_per_layer"] = [cols[int(i)] for i in effect.argmax(1)]
        summary["components"][component] = entry
        if args.metric == "recovery" and not float((result.clean.mean() - result.corrupted.mean()).abs()) > 1e-6:
            notes.append(f"{component}: recovery is undefined (null): clean and corrupted give the same logit diff "
                         f"({entry['clean']}), so (patched - corrupted) / (clean - corrupted) divides by zero; use a "
                         f"corrupted prompt that changes the answer, or --metric logit_diff")
        full[component] = {"values": values, "raw_metric": result.values, "per_prompt": result.per_prompt,
                           "axes": result.axes, "row_labels": rows, "col_labels": cols}
        lines.append(f"{component}: clean {entry['clean']:.3f}, corrupted {entry['corrupted']:.3f}; top "
                     + ", ".join(f"{b['row']}/{b['col']} {b['value']:.3f}" for b in best[:3]))
    text = f"{args.mode} patching, metric {args.metric}, {len(pairs)} pair(s)\n" + "\n".join(lines)
    return {"summary": summary, "results": full, "pairs": pairs, "text": text, "notes": notes}

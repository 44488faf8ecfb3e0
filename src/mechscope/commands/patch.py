"""Activation patching: copy one activation from a source run into a target run, for every layer
(x position, x head), and score the output. Exact (the same numbers as transformer_lens.patching in float32;
in half precision within rounding, see techniques/patching.py) on every engine; on --backend tl a suffix-only engine reruns only the blocks and positions after the patch, elsewhere
the cells of all layers run as batch rows of one edited forward, with logits at the answer position only.

    mechscope patch                                   # IOI example: resid_pre, attn_out, mlp_out by position
    mechscope patch --task ioi --n 64                 # a prompt set, columns IO, S1, S2, END
    mechscope patch --clean "The Louvre is in the city of" --corrupted "The Colosseum is in the city of" \\
        --answer paris --wrong rome --component resid_pre,z
    mechscope patch --pairs pairs.jsonl --component z --all-positions --mode noise
    mechscope patch --task ioi --backend tl --compare-backend nnsight   # both engines; the largest difference
    mechscope patch --task ioi --component z --all-positions --with-ablated 0.2 --ablation mean   # backup heads

Prompt sets: --task ioi|facts (the bundled tasks, or generated for other tokenizers: mechscope.tasks), or
--pairs FILE: a JSON list or JSONL of {"clean", "corrupted", "answer", "wrong", "positions"?} objects; the
two prompts of a pair must have the same number of tokens; pairs may differ in length (right-padded, each
read at its own last token). When prompts differ in length or template, heatmap columns are the named
positions (IO, S1, S2, END; SUBJECT, RELATION, END; a pairs file's "positions"): every position is patched
and each prompt's values are gathered at its own named positions. Otherwise columns are the first prompt's
tokens. --mode denoise patches clean into corrupted (is it sufficient?), noise patches corrupted into clean
(is it necessary?). --metric recovery (default) reports (patched - corrupted) / (clean - corrupted) of the
logit difference, per cell a ratio of means over the prompts that have the cell: 1 = clean, 0 = corrupted.
The summary gives each top cell's mean with a 95% interval over prompts (recovery: Fieller's interval for a
ratio of means; other metrics: a studentized bootstrap; none from one prompt) and the share of prompts whose
effect has the same sign, and the rank stability of the top 1..--stability-k cells among those whose interval
excludes 0. With --task, prompts sharing a template (ioi) are resampled together (cluster bootstrap).

--with-ablated COMPONENTS (heads 0.2, layers attn1 / mlp1; --ablation mean over the clean prompts, or zero)
re-runs each sweep with them held ablated in every run and reports the cells whose effect (patched - target,
in units of the unablated clean - corrupted gap) changes by at least 0.02 with a Benjamini-Hochberg adjusted
p < 0.05 over every cell of the component (false discovery rate 5%; the number of tests is reported): the
backup test of Wang et al. 2022.

Writes per component: a heatmap PNG, a CSV of the grid, a CSV of every prompt's values
(COMPONENT_per_prompt.csv) and, with --with-ablated, COMPONENT_backup.png / .csv.
"""
HELP = "activation patching sweeps (resid, attn/mlp out, heads) with a fast exact engine"

IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
IOI_POSITIONS = {"IO": ["Mary", 1], "S1": ["John", 1], "S2": ["John", 2]}
METRICS = ("recovery", "logit_diff", "prob", "kl")
TOP = 5
STABILITY_K = 5          # --stability-k default: rank stability of the top 1..K cells
FDR = 0.05               # --with-ablated: Benjamini-Hochberg false discovery rate over a component's cells
HEATMAP_MAX_CELLS = 1000  # heatmap cells (all components together) in the JSON summary
MAX_LABELS = 64          # position labels listed in the JSON summary
MAX_PROMPTS = 100_000    # --n: more is hours of generation, not a better estimate
MIN_CHANGE = 0.02        # --with-ablated: a cell "changes" by at least this share of the clean - corrupted gap


def add_pair_arguments(parser, tasks=("ioi", "facts")):
    """--clean/--corrupted/--answer/--wrong, --pairs FILE or --task NAME --n N: shared with attribution-patch
    and path-patch (read by prompt_pairs)."""
    parser.add_argument("--clean", help="clean prompt (default: an IOI sentence)")
    parser.add_argument("--corrupted", help="corrupted prompt with the same number of tokens")
    parser.add_argument("--answer", help="the clean answer (one token; default for IOI: Mary)")
    parser.add_argument("--wrong", help="the corrupted answer (one token; default for IOI: John)")
    parser.add_argument("--pairs", help="JSON / JSONL file of {clean, corrupted, answer, wrong} pairs (instead of --clean ...)")
    parser.add_argument("--task", choices=tasks, help="a bundled prompt set with corrupted twins (instead of --clean ...)")
    parser.add_argument("--n", type=int, default=32, help="--task: number of prompts (default: %(default)s)")


def prompt_pairs(args, engine):
    """The prompt pairs (a tasks.PromptSet) of --task, --pairs FILE or --clean/--corrupted/--answer/--wrong
    (default: the IOI example, with its named positions)."""
    from mechscope import tasks
    from mechscope.errors import BadInput

    given = [name for name, value in (("--task", args.task), ("--pairs", args.pairs),
                                      ("--clean/--corrupted", args.clean or args.corrupted)) if value]
    if len(given) > 1:
        raise BadInput(f"pass one of --task, --pairs FILE or --clean/--corrupted (not both {' and '.join(given)})")
    if args.task:
        check_n(args.n)
        return tasks.load_task(engine, args.task, n=args.n, seed=args.seed)
    if args.pairs:
        from mechscope.inputs import read_text

        text = read_text(args.pairs, "pairs file")  # a missing file, a directory, not UTF-8: one line each
        if text.strip() in ("", "[]"):
            raise BadInput(f"no prompt pairs in {args.pairs}; write one "
                           f'{{"clean": ..., "corrupted": ..., "answer": ..., "wrong": ...}} per line')
        return tasks.read_pair_file(args.pairs)
    if not args.clean and not args.corrupted:
        prompt = tasks.Prompt(IOI_CLEAN, answer=args.answer or "Mary", wrong=args.wrong or "John",
                              corrupted=IOI_CORRUPTED, positions=IOI_POSITIONS)
        return tasks.PromptSet("ioi-example", [prompt], tuple(IOI_POSITIONS) + (tasks.END,))
    if not (args.clean and args.corrupted and args.answer and args.wrong):
        raise BadInput("--clean needs --corrupted, --answer and --wrong (the clean and the corrupted answer tokens)")
    return tasks.PromptSet("pair", [tasks.Prompt(args.clean, answer=args.answer, wrong=args.wrong,
                                                 corrupted=args.corrupted)])


def check_n(n: int) -> None:
    """--n: prompts (or sequences) to draw, 1..MAX_PROMPTS."""
    from mechscope.errors import BadInput

    if not 1 <= n <= MAX_PROMPTS:
        raise BadInput(f"--n must be at least 1 and at most {MAX_PROMPTS} (prompts drawn for --task)")


def pair_records(prompt_set, batch) -> list[dict]:
    """The pairs as they ran, for result.json: texts, answers, group and named positions (token indices)."""
    return [{"clean": p.text, "corrupted": p.corrupted, "answer": p.answer, "wrong": p.wrong, "group": p.group,
             "positions": {name: int(index[i]) for name, index in batch.positions.items()}}
            for i, p in enumerate(prompt_set.prompts)]


def position_columns(engine, batch) -> tuple[bool, list[str]]:
    """(aligned, column labels): aligned = prompts differ in length or template and name positions, so columns
    are those names; else the first prompt's tokens (positions past it, in longer prompts, by index)."""
    names = [name for name in batch.positions if name != "END"]
    if names and not batch.same_layout:
        return True, list(batch.positions)
    first = engine.to_str_tokens(batch.clean[0, :int(batch.lengths[0])])
    labels = [f"{i} {t}" for i, t in enumerate(first)]
    return False, labels + [str(i) for i in range(len(labels), batch.clean.shape[1])]


def _components(engine, spec: str) -> tuple[list[str], dict]:
    """The requested components the model has, and {component: why skipped} for `all`."""
    from mechscope.inputs import names_from_list
    from mechscope.techniques.patching import COMPONENTS

    names = names_from_list(spec, COMPONENTS, "component")
    sites = {name: [COMPONENTS[name].format(layer) for layer in range(engine.cfg.n_layers)] for name in names}
    if spec.strip() != "all":
        for name in names:
            engine.require(sites[name], f"patching {name}")
        return names, {}
    skipped = {name: engine.missing_site_hint(next(s for s in sites[name] if not engine.has_site(s)))
               for name in names if not all(engine.has_site(s) for s in sites[name])}
    return [name for name in names if name not in skipped], skipped


def _row_labels(result, n_heads: int) -> list[str]:
    layers = result.meta["layers"]
    if "head" in result.axes and "pos" in result.axes:
        return [f"L{l}H{h}" for l in layers for h in range(n_heads)]
    return [f"L{l}" for l in layers]


def _grid(values):
    """[rows, cols] view of a [layers, (heads), (pos)] tensor."""
    if values.ndim == 1:
        return values[:, None]
    return values.reshape(-1, values.shape[-1])


def rounded(t, digits: int = 4):
    """A tensor as nested lists of rounded floats (None where not finite)."""
    import math

    if t.ndim == 0:
        x = float(t)
        return round(x, digits) if math.isfinite(x) else None
    return [rounded(row, digits) for row in t]


def number(x, spec: str = ".3f") -> str:
    """A summary number for text output: formatted, or "null" where undefined."""
    return "null" if x is None else format(x, spec)


def _effect_reading(mode: str, recovery: bool) -> str:
    """Which way a cell's value is an effect: each top cell's `effect` is its value minus the unpatched run's,
    and the top cells are ranked by |effect| (in noise mode recovery 0 is the strongest effect, 1 none)."""
    if recovery and mode == "noise":
        return ("cells ranked by |effect|, effect = recovery - 1: near -1 the corrupted activation destroys the "
                "clean answer (recovery 0), near 0 it does nothing (recovery 1)")
    if recovery:
        return ("cells ranked by |effect|, effect = recovery: near 1 the clean activation restores the clean answer, "
                "near 0 it does nothing")
    return f"cells ranked by |effect|, effect = patched - unpatched {'clean' if mode == 'noise' else 'corrupted'} run"


def _cell(grid, rows, cols, i, **extra) -> dict:
    return {"row": rows[i // grid.shape[1]], "col": cols[i % grid.shape[1]], **extra}


def _label(rows, cols, i) -> str:
    """"ROW/COL" of flat cell index i."""
    return f"{rows[i // len(cols)]}/{cols[i % len(cols)]}"


def _write_grid(path, grid, rows, cols) -> None:
    from mechscope.runs import write_csv

    write_csv(path, [[r] + [f"{v:.6g}" for v in row] for r, row in zip(rows, grid.tolist())], header=[""] + cols)


def _write_per_prompt(path, result, effect, rows, cols) -> None:
    """One line per prompt and cell: the metric after the patch and the (normalised) effect."""
    from mechscope.runs import write_csv

    values = result.per_prompt.reshape(len(result.per_prompt), len(rows), len(cols))
    effect = effect.reshape(values.shape)
    write_csv(path, ([p, r, c, f"{values[p, i, j]:.6g}", f"{effect[p, i, j]:.6g}"] for p in range(values.shape[0])
                     for i, r in enumerate(rows) for j, c in enumerate(cols)),
              header=["prompt", "row", "col", result.metric, "effect"])


def run(ctx):
    import torch

    from mechscope import plotting, stats
    from mechscope.errors import BadInput
    from mechscope.techniques import ablation, patching

    args = ctx.args
    if args.batch_size is not None and not 1 <= args.batch_size <= 1_000_000:
        raise BadInput("--batch-size must be at least 1 and at most 1000000")
    engine = ctx.engine
    components, skipped = _components(engine, args.component)
    held = ablation.parse_components(engine, args.with_ablated) if args.with_ablated else []
    if args.stability_k < 1:
        raise BadInput("--stability-k must be at least 1")
    prompt_set = prompt_pairs(args, engine)
    groups = prompt_set.groups
    batch = patching.pair_batch(engine, prompt_set)
    metric = {"recovery": patching.logit_diff_metric(batch.answer, batch.wrong),
              "logit_diff": patching.logit_diff_metric(batch.answer, batch.wrong),
              "prob": patching.answer_prob_metric(batch.answer),
              "kl": patching.kl_to_clean_metric()}[args.metric]
    recovery = args.metric == "recovery"
    aligned, position_labels = position_columns(engine, batch)
    edits = []
    if held:
        edits = ablation.ablation_edits(engine, held, args.ablation, reference=batch.clean, lengths=batch.lengths)

    if args.compare_backend == engine.name:
        raise BadInput(f"--compare-backend {args.compare_backend} is the engine this run uses; name another one")

    def sweep(component, edits=(), on=None):
        eng, b = on or (engine, batch)
        result = patching.patch_sweep(eng, b.clean, b.corrupted, component, metric, mode=args.mode,
                                      by_position=not args.all_positions, lengths=b.lengths,
                                      batch_size=args.batch_size, edits=edits)
        return result.at_positions(b.positions) if aligned else result

    summary = {"mode": args.mode, "metric": args.metric, "effect": _effect_reading(args.mode, recovery),
               "n_pairs": len(batch.clean), "prompts": prompt_set.name,
               "n_groups": len(set(groups)) if groups else len(batch.clean),
               "engine": engine.name, "columns": "named positions" if aligned else "token positions",
               "named_positions": None if aligned else {k: int(v[0]) for k, v in batch.positions.items()},
               "positions": position_labels if len(position_labels) <= MAX_LABELS else "in result.json",
               "components": {}}
    if skipped:
        summary["skipped"] = skipped
    full, lines, notes = {}, [], []
    heatmap_budget = HEATMAP_MAX_CELLS
    for component in components:
        result = sweep(component)
        cells = patching.cell_summary(result, recovery=recovery, k=args.stability_k, seed=args.seed, groups=groups)
        values = cells["mean"]
        grid = _grid(values)
        rows = _row_labels(result, values.shape[1] if "head" in result.axes else 0)
        cols = position_labels if "pos" in result.axes else \
            ([f"H{h}" for h in range(grid.shape[1])] if "head" in result.axes else ["all positions"])
        png = plotting.heatmap(grid, ctx.run_dir / f"{component}.png", row_labels=rows, col_labels=cols,
                               title=f"{args.mode} {component}: {args.metric} (mean of {len(batch.clean)})",
                               xlabel="position" if "pos" in result.axes else "head",
                               ylabel="layer" if len(result.axes) < 3 else "layer.head", colorbar_label=args.metric)
        _write_grid(ctx.run_dir / f"{component}.csv", grid, rows, cols)
        effect = result.effect_per_prompt(normalise=recovery)
        _write_per_prompt(ctx.run_dir / f"{component}_per_prompt.csv", result, effect, rows, cols)
        # a cell matters as much as it moves the metric away from the unpatched target run
        unpatched = 0.0 if recovery and args.mode == "denoise" else 1.0 if recovery else float(result.target.mean())
        size = torch.nan_to_num((grid - unpatched).abs(), nan=-1.0).flatten()
        top = size.topk(min(TOP, size.numel())).indices.tolist()
        flat = {key: _grid(cells[key]).flatten() for key in ("ci_low", "ci_high", "sign_share")}
        best = [_cell(grid, rows, cols, i, value=rounded(grid.flatten()[i]),
                      effect=rounded(grid.flatten()[i] - unpatched),
                      ci=[rounded(flat["ci_low"][i]), rounded(flat["ci_high"][i])],
                      sign_share=rounded(flat["sign_share"][i], 3)) for i in top]
        stability = cells["stability"]
        clean_stats, corrupted_stats = (stats.summary(x, groups=groups) for x in (result.clean, result.corrupted))
        entry = {"shape": list(values.shape), "axes": list(result.axes), "top": best, "plot": png.name,
                 "clean": clean_stats["mean"], "clean_ci": [clean_stats["ci_low"], clean_stats["ci_high"]],
                 "corrupted": corrupted_stats["mean"],
                 "corrupted_ci": [corrupted_stats["ci_low"], corrupted_stats["ci_high"]],
                 "stability": {"top_k": [_label(rows, cols, i) for i in stability["top_k"]],
                               "set_frequency_by_k": stability["set_frequency_by_k"],
                               "top_k_set_frequency": stability["top_k_set_frequency"],
                               "in_top_k_frequency": [stability["in_top_k_frequency"][i] for i in stability["top_k"]],
                               "median_rank_correlation": stability["median_rank_correlation"],
                               "n_ranked": stability["n_ranked"], "ranked": stability["ranked"]},
                 "implementation": result.meta.get("implementation")}
        if "pos" not in result.axes:
            entry["columns"] = cols
        if grid.numel() <= heatmap_budget:  # rows: layers (L0, L1, ...) or heads by layer (L0H0, L0H1, ...)
            entry["heatmap"] = rounded(grid, 3)
            heatmap_budget -= grid.numel()
        else:
            entry["heatmap"] = "in result.json"
        if "pos" in result.axes and "head" not in result.axes:
            entry["top_position_per_layer"] = [cols[int(i)] for i in torch.nan_to_num(
                (grid - unpatched).abs(), nan=-1.0).argmax(1)]
        full[component] = {"values": grid, "ci_low": _grid(cells["ci_low"]),
                           "ci_high": _grid(cells["ci_high"]),
                           "sign_share": _grid(cells["sign_share"]), "raw_metric": result.values,
                           "per_prompt": result.per_prompt, "clean": result.clean, "corrupted": result.corrupted,
                           "axes": result.axes, "row_labels": rows, "col_labels": cols}
        interval = (lambda b: " " + stats.ci_text(b["ci"][0], b["ci"][1], ".4f")) if len(batch.clean) > 1 else \
            (lambda b: "")
        line = (f"{component}: clean {number(entry['clean'])}, corrupted {number(entry['corrupted'])}; largest effects "
                + ", ".join(f"{b['row']}/{b['col']} {number(b['value'])}{interval(b)} (effect {number(b['effect'], '+.3g')})"
                            for b in best[:3]))
        if held:
            entry["backup"], full[component]["backup"] = _backup(ctx, component, result, sweep(component, edits),
                                                                 recovery, rows, cols, args.seed, groups)
            line += (f"; with {args.with_ablated} ablated: {entry['backup']['n_changed']} cell(s) change "
                     f"(BH-adjusted p < {FDR} over {entry['backup']['n_tests']} cells)")
        summary["components"][component] = entry
        lines.append(line)
        undefined = int((~torch.isfinite(values) & ~result.values.isnan()).sum()) if recovery else 0
        if undefined:
            notes.append(f"{component}: recovery is undefined (null) in {undefined} cell(s): clean and corrupted give "
                         f"the same logit diff there, so (patched - corrupted) / (clean - corrupted) divides by zero; "
                         f"use a corrupted prompt that changes the answer, or --metric logit_diff")
    if args.compare_backend:
        summary["compare_backend"] = _compare(args, prompt_set, components, full, sweep)
        lines.append(f"{args.compare_backend} vs {engine.name}: largest |difference| of a cell's mean "
                     f"{args.metric} {summary['compare_backend']['max_abs_difference']:.3g} at "
                     f"{summary['compare_backend']['at']}")
    if held:
        summary["with_ablated"] = {"components": [c.label for c in held], "ablation": args.ablation,
                                   "reference": "the clean prompts (BOS and padding excluded)"
                                   if args.ablation == "mean" else None}
    if skipped:
        lines.append("skipped: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))
    text = (f"{args.mode} patching on {engine.name}, metric {args.metric}, {len(batch.clean)} pair(s) "
            f"({prompt_set.name}), {'named positions' if aligned else 'token positions'}; {summary['effect']}\n"
            + "\n".join(lines))
    return {"summary": summary, "results": full, "pairs": pair_records(prompt_set, batch), "text": text,
            "notes": notes}


def _compare(args, prompt_set, components, full, sweep) -> dict:
    """The same sweeps on --compare-backend's engine: the largest |difference| of a cell's mean metric (the
    values of the heatmaps and CSVs), overall and per component."""
    from mechscope.models import load_model
    from mechscope.techniques import patching

    other = load_model(args.model, backend=args.compare_backend, device=args.device, dtype=args.dtype)
    on = (other, patching.pair_batch(other, prompt_set))
    per_component, worst = {}, (-1.0, "")
    for component in components:
        mine = full[component]
        theirs = _grid(patching.cell_summary(sweep(component, on=on), recovery=args.metric == "recovery",
                                             k=1, seed=args.seed)["mean"])
        diff = (theirs - mine["values"]).abs().nan_to_num(0.0).flatten()
        i = int(diff.argmax())
        per_component[component] = rounded(diff[i], 8)
        if float(diff[i]) > worst[0]:
            worst = (float(diff[i]), f"{component} {_label(mine['row_labels'], mine['col_labels'], i)}")
    return {"engine": other.name, "max_abs_difference": round(worst[0], 8), "at": worst[1],
            "per_component": per_component}


def _backup(ctx, component, base, ablated, recovery, rows, cols, seed, groups) -> tuple[dict, dict]:
    """Which cells' effects change with the components held ablated -> (summary entry, full result): a cell
    changes when its change is at least MIN_CHANGE of the gap and its Benjamini-Hochberg adjusted p < FDR."""
    from mechscope import plotting, stats
    from mechscope.techniques import patching

    change = patching.effect_change(base, ablated, recovery=recovery, seed=seed, groups=groups)
    change["p_adjusted"] = stats.adjust(change["p_value"], "bh")
    grid = {key: _grid(change[key]) for key in ("mean", "ci_low", "ci_high", "sign_share", "p_value", "p_adjusted")}
    plotting.heatmap(grid["mean"], ctx.run_dir / f"{component}_backup.png", row_labels=rows, col_labels=cols,
                     title=f"{component}: change of each cell's effect with components held ablated",
                     colorbar_label="change" + (" (of clean - corrupted)" if recovery else ""))
    _write_grid(ctx.run_dir / f"{component}_backup.csv", grid["mean"], rows, cols)
    mean = grid["mean"].flatten()
    gap = 1.0 if recovery else float((base.clean - base.corrupted).mean().abs())
    adjusted = grid["p_adjusted"].flatten()
    changed = (mean.abs() >= MIN_CHANGE * gap) & (adjusted < FDR)   # NaN (one prompt: no test) is never < FDR
    order = [i for i in mean.abs().nan_to_num(-1.0).argsort(descending=True).tolist() if changed[i]]
    n_tests = int((~grid["p_value"].isnan()).sum())
    entry = {"n_changed": len(order), "plot": f"{component}_backup.png",
             "multiplicity": f"Benjamini-Hochberg over {n_tests} cells (false discovery rate {FDR:.0%}); p from "
                             f"Student's t on the per-prompt changes" if n_tests else
                             "no test: one prompt (or group) has no spread; pass more prompts",
             "n_tests": n_tests,
             "clean": rounded(ablated.clean.mean()), "corrupted": rounded(ablated.corrupted.mean()),
             "changed": [_cell(grid["mean"], rows, cols, i, change=rounded(mean[i]),
                               ci=[rounded(grid["ci_low"].flatten()[i]), rounded(grid["ci_high"].flatten()[i])],
                               p=rounded(grid["p_value"].flatten()[i], 6), p_adjusted=rounded(adjusted[i], 6),
                               sign_share=rounded(grid["sign_share"].flatten()[i], 3)) for i in order[:10]]}
    return entry, {"change": grid["mean"], "ci_low": grid["ci_low"], "ci_high": grid["ci_high"],
                   "p_value": grid["p_value"], "p_adjusted": grid["p_adjusted"],
                   "per_prompt": change["per_prompt"], "ablated_values": _grid(ablated.values)}


def add_arguments(parser):
    add_pair_arguments(parser)
    parser.add_argument("--component", default="resid_pre,attn_out,mlp_out",
                        help="comma-separated: resid_pre resid_mid resid_post attn_out mlp_out z q k v pattern, "
                             "or all (those the model has) (default: %(default)s)")
    parser.add_argument("--all-positions", action="store_true", help="patch every position at once (default: one position at a time)")
    parser.add_argument("--mode", default="denoise", choices=("denoise", "noise"),
                        help="denoise: clean into corrupted; noise: corrupted into clean (default: %(default)s)")
    parser.add_argument("--metric", default="recovery", choices=METRICS, help="(default: %(default)s)")
    parser.add_argument("--batch-size", type=int, help="patched rows per forward call (default: from a memory budget)")
    parser.add_argument("--compare-backend", choices=("tl", "bridge", "nnsight"), metavar="ENGINE",
                        help="run the same sweeps on a second engine (tl, bridge or nnsight) and report the largest "
                             "difference of a cell's mean metric")
    parser.add_argument("--with-ablated", metavar="COMPONENTS",
                        help="re-run with these held ablated (heads 0.2, attn1, mlp1) and report the cells whose "
                             "effect changes (backup test)")
    parser.add_argument("--stability-k", type=int, default=STABILITY_K,
                        help="rank stability of the top 1..K cells (among those whose interval excludes 0) "
                             "(default: %(default)s)")
    parser.add_argument("--ablation", default="mean", choices=("mean", "zero"),
                        help="--with-ablated: mean over the clean prompts, or zero (default: %(default)s)")


def headline(summary: dict) -> str:
    """The finding in one sentence: the cell that moves the metric most, over all components (mode-aware)."""
    from mechscope.findings import ci, count, num

    mode, recovery = summary["mode"], summary["metric"] == "recovery"
    n = count(summary["n_pairs"], "pair") + (f", {summary['prompts']}" if summary["prompts"] != "pair" else "")

    def unpatched(e):
        if recovery:
            return 0.0 if mode == "denoise" else 1.0
        return e["corrupted"] if mode == "denoise" else e["clean"]
    best = [(abs(e["top"][0]["value"] - unpatched(e)), name, e) for name, e in summary["components"].items()
            if e["top"] and e["top"][0]["value"] is not None and unpatched(e) is not None]
    if not best:
        return f"{mode} patching, metric {summary['metric']}: no cell with a defined effect ({n})"
    _, name, e = max(best, key=lambda b: b[0])
    top = e["top"][0]
    where = f"{cell_name(top['row'], top['col'])} ({name})"
    value = f"{num(top['value'])}{ci(top['ci'])}"
    if recovery and mode == "denoise":
        return (f"patching {where} from clean into corrupted restores {value} of the logit difference "
                f"(0 = corrupted, 1 = clean; {n})")
    if recovery:
        return (f"patching {where} from corrupted into clean leaves {value} of the logit difference "
                f"(1 = no effect, 0 = fully corrupted; {n})")
    return f"{mode} patching {where} moves the {summary['metric']} to {value} (unpatched {num(unpatched(e))}; {n})"


def cell_name(row: str, col: str) -> str:
    """'L1H2' (a head over all positions), 'L0' (a layer over all positions), 'L0H2 at END' (a named
    position) or "L0 at position 2 ('louvre')" (a token position, labelled '2 louvre')."""
    if col == "all positions":
        return row
    if col.startswith("H") and col[1:].isdigit() and "H" not in row:
        return row + col
    index, _, token = col.partition(" ")
    return f"{row} at position {index} ({token!r})" if index.isdigit() and token else f"{row} at {col}"

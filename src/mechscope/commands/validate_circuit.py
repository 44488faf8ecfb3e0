"""Validate a circuit (heads LAYER.HEAD, MLP layers mlpL): faithfulness, completeness, minimality, falsifiability.

- faithfulness (sufficiency): ablate every head (and, with --ablate-mlps, every MLP) outside the circuit;
  the fraction of the clean metric recovered against the floor, everything ablated (the empty circuit:
  0 = no better than nothing, 1 = the full model); faithfulness_vs_corrupted: the same against the model
  run on the corrupted prompts (ioi / facts twins; induction: [BOS, s, r] with s other random words), when
  the task has them.
- necessity (completeness): ablate only the circuit; how far that moves the metric toward the floor (same
  normalisation; 1 = nothing outside the circuit carries the behaviour).
- minimality: how much faithfulness drops when each component is taken out of the circuit, and Wang et
  al.'s F(C \ K) - F(C \ (K + {v})) with K found greedily (minimality_greedy): a backup component reads ~0
  with K = {} (L2H2 of the bundled model: 0.03) and shows once what it backs up is gone (K = {2.1}: 0.15).
- falsifiability: a known-wrong circuit of the same make-up (--wrong-circuit, default: one drawn outside the
  circuit) must score low: `passes` when its faithfulness interval lies below the circuit's.
- random circuits of the same size (--random, seeded, drawn outside the circuit): the baseline to beat.

Mean ablation as in Wang et al. (a per-position mean over a reference distribution, their ABC prompts):
--wang-mean = --method mean --per-position with the task's corrupted prompts as the reference (prompts of
one token length: induction, or --task facts).

Same tasks and prompt options as `mechscope ablate` (--task induction (default), ioi, facts; --prompts FILE;
--prompt/--answer/--wrong). Each number comes with a 95% bootstrap interval over the prompts. Values outside
[0, 1] are explained in the output (minimality > 1: without that component the rest does worse than nothing).

    mechscope validate-circuit --circuit 0.1,1.2,2.1,2.2          # the bundled model's induction circuit
    mechscope validate-circuit --circuit 0.1,1.2,2.1,2.2,mlp0 --ablate-mlps --method zero --random 10
"""
HELP = "necessity, sufficiency / faithfulness and minimality of a circuit"


def add_arguments(parser):
    from mechscope.commands.ablate import add_task_arguments

    parser.add_argument("--circuit", required=True,
                        help="the circuit's heads and MLP layers, e.g. 0.1,1.2,mlp1 (use '' for the empty circuit)")
    parser.add_argument("--method", default="mean", choices=("mean", "zero", "resample", "noise"),
                        help="how components outside the circuit are ablated (default: %(default)s)")
    parser.add_argument("--ablate-mlps", action="store_true",
                        help="ablate the MLP layers outside the circuit too (implied when the circuit names one)")
    parser.add_argument("--random", type=int, default=5,
                        help="random circuits of the same size to compare against (default: %(default)s)")
    parser.add_argument("--wrong-circuit", help="a known-wrong circuit of the same size for the falsifiability "
                        "check (default: drawn outside the circuit)")
    parser.add_argument("--wang-mean", action="store_true",
                        help="mean ablation as in Wang et al.: per position, over the task's corrupted prompts")
    add_task_arguments(parser)


def notes(v) -> list[str]:
    """What a reader needs to read values outside [0, 1]."""
    out = []
    for label, drop in v.minimality.items():
        if drop > 1 and v.faithfulness - drop < 0:
            out.append(f"minimality of {label} is {drop:.2f} > 1: without {label} the rest of the circuit does worse "
                       f"than everything ablated (faithfulness {v.faithfulness - drop:.2f} < 0), e.g. heads that now "
                       f"read a broken signal and write a confidently wrong one; {label} is essential")
        elif drop > 1:
            out.append(f"minimality of {label} is {drop:.2f} > 1 because the circuit's faithfulness is above 1")
    if v.faithfulness > 1:
        out.append(f"faithfulness {v.faithfulness:.2f} > 1: the circuit alone does better than the full model; the "
                   f"components outside it worked against the behaviour")
    if v.faithfulness < 0:
        out.append(f"faithfulness {v.faithfulness:.2f} < 0: the circuit alone does worse than everything ablated")
    if v.necessity > 1:
        out.append(f"necessity {v.necessity:.2f} > 1: ablating only the circuit is worse than ablating everything "
                   f"(the remaining components, left without the circuit, hurt the behaviour)")
    return out


def run(ctx):
    from mechscope import plotting
    from mechscope.commands.ablate import build_task
    from mechscope.errors import BadInput
    from mechscope.techniques.ablation import ablated_metric, parse_components
    from mechscope.techniques.validation import check_circuit, validate_circuit

    args = ctx.args
    if args.random < 0:
        raise BadInput("--random must be 0 or more")
    if args.random > 1000:
        raise BadInput("--random must be at most 1000")
    engine = ctx.engine
    circuit = parse_components(engine, args.circuit) if args.circuit.strip() else []
    wrong = parse_components(engine, args.wrong_circuit) if args.wrong_circuit else None
    if wrong is not None and sorted(c.kind for c in wrong) != sorted(c.kind for c in circuit):
        raise BadInput("--wrong-circuit must have the circuit's make-up (as many heads and MLP layers)")
    ablate_mlps = args.ablate_mlps or any(c.kind == "mlp" for c in circuit + (wrong or []))
    if args.wang_mean and (args.method != "mean" or args.reference):
        raise BadInput("--wang-mean is mean ablation over the corrupted prompts: drop --method / --reference")
    check_circuit(engine, circuit + (wrong or []), ablate_mlps)
    task = build_task(engine, args)
    reference, per_position = task["reference"], args.per_position
    if args.wang_mean:
        if task["corrupted"] is None:
            raise BadInput("--wang-mean needs corrupted prompts: use --task induction, ioi or facts")
        reference, per_position = task["corrupted"], True
        task["reference_note"] = "Wang et al.'s mean ablation: per position, over the task's corrupted prompts"
    corrupted_values = None if task["corrupted"] is None else \
        ablated_metric(engine, task["corrupted"], [[]], task["metric"])[0]
    v = validate_circuit(engine, task["tokens"], circuit, task["metric"], args.method, ablate_mlps=ablate_mlps,
                         n_random=args.random, seed=args.seed, reference=reference,
                         per_position=per_position, skip_bos=not args.include_bos,
                         corrupted_values=corrupted_values, wrong_circuit=wrong)

    randoms = {key: [r[key] for r in v.random_circuits] for key in ("faithfulness", "necessity")}
    r4 = lambda x: round(x, 4)  # noqa: E731
    interval = lambda d: {k: r4(x) for k, x in d.items()}  # noqa: E731
    summary = {"circuit": v.circuit, "method": v.method, "metric": task["metric_name"], "prompts": task["prompts"],
               "n_prompts": v.n_prompts, "ablate_mlps": ablate_mlps, "reference": task["reference_note"],
               "faithfulness": r4(v.faithfulness), "faithfulness_ci": interval(v.intervals["faithfulness"]),
               "necessity": r4(v.necessity), "necessity_ci": interval(v.intervals["necessity"]),
               "minimality": {c: r4(x) for c, x in v.minimality.items()},
               "minimality_ci": {c: interval(d) for c, d in v.intervals["minimality"].items()},
               "random_circuits": len(v.random_circuits),
               "random_faithfulness_mean": r4(sum(randoms["faithfulness"]) / len(v.random_circuits))
               if v.random_circuits else None,
               "random_faithfulness_max": r4(max(randoms["faithfulness"])) if v.random_circuits else None,
               "random_necessity_mean": r4(sum(randoms["necessity"]) / len(v.random_circuits))
               if v.random_circuits else None,
               "completeness": r4(v.necessity),
               "faithfulness_vs_corrupted": interval(v.faithfulness_vs_corrupted) if v.faithfulness_vs_corrupted
               else None,
               "minimality_greedy": {c: {k: r4(x) if k != "K" else x for k, x in d.items()}
                                     for c, d in v.greedy_minimality.items()},
               "falsifiability": {k: r4(x) if isinstance(x, float) else x for k, x in v.falsifiability.items()}
               if v.falsifiability else None,
               "clean_metric": r4(v.clean), "all_ablated_metric": r4(v.all_ablated), "floor_metric": r4(v.all_ablated),
               "corrupted_metric": None if v.corrupted is None else r4(v.corrupted),
               "circuit_only_metric": r4(v.circuit_only), "circuit_ablated_metric": r4(v.circuit_ablated),
               "intervals": "95% Fieller interval of each ratio of means over prompts (stats.ratio_interval); stderr by the delta method",
               "notes": notes(v)}
    labels = ["circuit"] + [f"random {r['circuit']}" for r in v.random_circuits]
    plotting.bars([v.faithfulness] + randoms["faithfulness"], labels,
                  ctx.run_dir / "faithfulness.png", title=f"faithfulness ({v.method} ablation of the rest)",
                  xlabel="fraction of clean behaviour recovered")
    if v.minimality:
        plotting.bars(list(v.minimality.values()), list(v.minimality),
                      ctx.run_dir / "minimality.png", title="minimality: faithfulness lost without each component",
                      xlabel="faithfulness(circuit) - faithfulness(circuit without it)")

    ci = lambda d: f"[{d['ci_low']:.3f}, {d['ci_high']:.3f}]"  # noqa: E731
    lines = [f"circuit {','.join(v.circuit) or '(empty)'} on {task['prompts']}: {task['metric_name']} clean "
             f"{v.clean:.4f}, everything ablated ({v.method}) {v.all_ablated:.4f}, circuit only {v.circuit_only:.4f}, "
             f"circuit ablated {v.circuit_ablated:.4f}",
             f"reference: {task['reference_note']}",
             f"faithfulness {v.faithfulness:.3f} {ci(v.intervals['faithfulness'])}   necessity {v.necessity:.3f} "
             f"{ci(v.intervals['necessity'])}   (95% bootstrap over prompts)"]
    if v.random_circuits:
        lines.append(f"random circuits of the same size ({len(v.random_circuits)}): faithfulness mean "
                     f"{summary['random_faithfulness_mean']:.3f}, max {summary['random_faithfulness_max']:.3f}; "
                     f"necessity mean {summary['random_necessity_mean']:.3f}")
    if v.faithfulness_vs_corrupted:
        f = v.faithfulness_vs_corrupted
        lines.append(f"faithfulness against the corrupted prompts ({task['metric_name']} {v.corrupted:.4f}): "
                     f"{f['value']:.3f} {ci(f)}")
    lines += [f"  without {label:>8}: faithfulness drops by {drop:+.3f} {ci(v.intervals['minimality'][label])}"
              + (f"; with K = {{{','.join(g['K'])}}} removed first (greedy): {g['value']:+.3f} {ci(g)}"
                 if (g := v.greedy_minimality.get(label)) and g["K"] else "")
              for label, drop in v.minimality.items()]
    if v.falsifiability:
        w = v.falsifiability
        lines.append(f"falsifiability: the wrong circuit {','.join(w['circuit'])} has faithfulness {w['faithfulness']:.3f} "
                     f"{ci(w)}: " + ("below the circuit's interval (the test can fail, and this circuit passes it)"
                                     if w["passes"] else "NOT below the circuit's interval: this test does not tell "
                                     "the circuit from a wrong one"))
    lines += [f"note: {n}" for n in summary["notes"]]
    return {"summary": summary, "random_circuits": v.random_circuits, "text": "\n".join(lines)}


def headline(summary: dict) -> str:
    """The finding in one sentence: faithfulness and necessity of the circuit against random circuits."""
    from mechscope.findings import ci, count, num

    return (f"the circuit {', '.join(summary['circuit'])} ({summary['method']} ablation) is "
            f"{num(summary['faithfulness'])}{ci(summary['faithfulness_ci'])} faithful and "
            f"{num(summary['necessity'])}{ci(summary['necessity_ci'])} necessary on the {summary['metric']} "
            f"(random circuits of its size: faithfulness at most {num(summary['random_faithfulness_max'])}; "
            f"{count(summary['n_prompts'], 'prompt')})")

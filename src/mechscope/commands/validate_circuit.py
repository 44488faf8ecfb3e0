"""Validate a circuit (heads LAYER.HEAD, MLP layers mlpL): necessity, faithfulness and minimality.

- faithfulness (sufficiency): ablate every head (and, with --ablate-mlps, every MLP) outside the circuit;
  the fraction of the clean metric recovered relative to everything ablated (0 = no better than nothing,
  1 = the full model).
- necessity: ablate only the circuit; the fraction of the behaviour lost (same normalisation).
- minimality: how much faithfulness drops when each component is taken out of the circuit.
- random circuits of the same size (--random, seeded, drawn outside the circuit): the baseline to beat.

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
    from mechscope.techniques.ablation import parse_components
    from mechscope.techniques.validation import validate_circuit

    args = ctx.args
    if args.random < 0:
        raise BadInput("--random must be 0 or more")
    if args.random > 1000:
        raise BadInput("--random must be at most 1000")
    engine = ctx.engine
    circuit = parse_components(engine, args.circuit) if args.circuit.strip() else []
    ablate_mlps = args.ablate_mlps or any(c.kind == "mlp" for c in circuit)
    task = build_task(engine, args)
    v = validate_circuit(engine, task["tokens"], circuit, task["metric"], args.method, ablate_mlps=ablate_mlps,
                         n_random=args.random, seed=args.seed, reference=task["reference"],
                         per_position=args.per_position, skip_bos=not args.include_bos)

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
               "clean_metric": r4(v.clean), "all_ablated_metric": r4(v.all_ablated),
               "circuit_only_metric": r4(v.circuit_only), "circuit_ablated_metric": r4(v.circuit_ablated),
               "intervals": "95% percentile bootstrap over prompts (1000 resamples; stderr = their std)",
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
    lines += [f"  without {label:>8}: faithfulness drops by {drop:+.3f} {ci(v.intervals['minimality'][label])}"
              for label, drop in v.minimality.items()]
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

"""Validate a circuit (heads LAYER.HEAD, MLP layers mlpL): necessity, faithfulness and minimality.

- faithfulness (sufficiency): ablate every head (and, with --ablate-mlps, every MLP) outside the circuit;
  the fraction of the clean metric recovered relative to everything ablated (0 = no better than nothing,
  1 = the full model).
- necessity: ablate only the circuit; the fraction of the behaviour lost (same normalisation).
- minimality: how much faithfulness drops when each component is taken out of the circuit.
- random circuits of the same size (--random, seeded, drawn outside the circuit): the baseline to beat.

Same tasks and prompt options as `mechscope ablate` (induction by default, ioi, or --prompt/--answer/--wrong).

    mechscope validate-circuit --circuit 0.1,1.2
    mechscope validate-circuit --circuit 0.1,1.2,mlp1 --ablate-mlps --method zero --random 10
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
    model = ctx.model
    circuit = parse_components(model, args.circuit) if args.circuit.strip() else []
    ablate_mlps = args.ablate_mlps or any(c.kind == "mlp" for c in circuit)
    task = build_task(model, args)
    v = validate_circuit(model, task["tokens"], circuit, task["metric"], args.method, ablate_mlps=ablate_mlps,
                         n_random=args.random, seed=args.seed, reference=task["reference"],
                         per_position=args.per_position)

    mean = lambda key: sum(r[key] for r in v.random_circuits) / len(v.random_circuits) if v.random_circuits else None
    summary = {"circuit": v.circuit, "method": v.method, "metric": task["metric_name"], "ablate_mlps": ablate_mlps,
               "n_prompts": task["tokens"].shape[0], "faithfulness": v.faithfulness, "necessity": v.necessity,
               "minimality": v.minimality, "random_faithfulness_mean": mean("faithfulness"),
               "random_necessity_mean": mean("necessity"), "clean_metric": v.clean,
               "all_ablated_metric": v.all_ablated, "circuit_only_metric": v.circuit_only,
               "circuit_ablated_metric": v.circuit_ablated}
    labels = ["circuit"] + [f"random {r['circuit']}" for r in v.random_circuits]
    plotting.bars([v.faithfulness] + [r["faithfulness"] for r in v.random_circuits], labels,
                  ctx.run_dir / "faithfulness.png", title=f"faithfulness ({v.method} ablation of the rest)",
                  xlabel="fraction of clean behaviour recovered")
    if v.minimality:
        plotting.bars(list(v.minimality.values()), list(v.minimality),
                      ctx.run_dir / "minimality.png", title="minimality: faithfulness lost without each component",
                      xlabel="faithfulness(circuit) - faithfulness(circuit without it)")

    lines = [f"circuit {','.join(v.circuit) or '(empty)'}: {task['metric_name']} clean {v.clean:.4f}, "
             f"everything ablated ({v.method}) {v.all_ablated:.4f}, circuit only {v.circuit_only:.4f}, "
             f"circuit ablated {v.circuit_ablated:.4f}",
             f"faithfulness {v.faithfulness:.3f}   necessity {v.necessity:.3f}"]
    if v.random_circuits:
        lines.append(f"random circuits of the same size ({len(v.random_circuits)}): faithfulness "
                     f"{mean('faithfulness'):.3f}, necessity {mean('necessity'):.3f} (means)")
    lines += [f"  without {label:>8}: faithfulness drops by {drop:+.3f}" for label, drop in v.minimality.items()]
    return {"summary": summary, "random_circuits": v.random_circuits, "text": "\n".join(lines)}

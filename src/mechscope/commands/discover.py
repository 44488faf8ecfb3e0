"""Edge-level circuit discovery: which edges form the circuit for a task, and how faithful is it?

The model as a graph: the input embeddings, each head (its q, k and v inputs separate receivers), each MLP and
the logits; an edge from every upstream output to every downstream input through the residual stream. Every
edge is scored by EAP (Syed et al. 2023: gradient x activation difference) and EAP-IG (Hanna et al. 2024:
gradients averaged over --steps interpolations of the token embeddings) from one corrupted forward and one
batched forward + backward. The circuit is the top edges by --method (--edges N, or the fewest reaching
--target faithfulness), kept connected to the logits, and is evaluated EXACTLY by edge patching: every edge
outside it gets its sender's corrupted output, in one batched forward.

Faithfulness = (m(circuit) - m(no edges)) / (m(all edges) - m(no edges)), with a 95% bootstrap interval over
prompts; no edges = the corrupted run, all edges = the clean run. Completeness = the faithfulness of the model
less the circuit's edges (near 0: the circuit carries the behaviour). The curve shows faithfulness against
edges kept for EAP, EAP-IG and random edge sets. Agreement: the estimates against exact single-edge effects of
up to --check edges (Spearman, top-10 overlap) - when it is low, trust the exact curve, not the scores.

Prompts: --task induction (default: [BOS, r, r], the first copy re-drawn in the corrupted run, metric = mean
log-prob of the second copy), --task ioi|facts, --pairs FILE or --clean/--corrupted/--answer/--wrong (logit diff).
Engines: tl and nnsight (the same scores; nnsight derives each head's q / k / v input from the block's norm and
projection weights, so it needs a local, unquantised load); the bridge and grouped-query models are refused.

    mechscope discover                                   # the bundled model's induction circuit, 0.9 target
    mechscope discover --task ioi --n 32 --edges 40 --method eap

Writes circuit.png, curve.png, agreement.png, edges.csv (every edge: scores, exact effect where checked,
in_circuit) and result.json.
"""
HELP = "edge-level circuit discovery (EAP, EAP-IG) checked by exact edge patching (tl, nnsight)"


def add_arguments(parser):
    from mechscope.commands.patch import add_pair_arguments

    parser.add_argument("--method", default="eap-ig", choices=("eap-ig", "eap"),
                        help="the ranking that picks the circuit (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG interpolation steps (default: %(default)s)")
    parser.add_argument("--target", type=float, default=None,
                        help="the fewest top edges whose exact faithfulness reaches this (default 0.9 unless --edges)")
    parser.add_argument("--edges", type=int, default=None, help="the top N edges instead of a --target")
    parser.add_argument("--check", type=int, default=100,
                        help="edges whose exact single-edge effect is measured to check the estimates "
                             "(all when the model has fewer; default: %(default)s)")
    add_pair_arguments(parser, tasks=("induction", "ioi", "facts"))
    parser.add_argument("--seq-len", type=int, default=10, help="induction: length of r (default: %(default)s)")


def headline(summary: dict) -> str:
    """One sentence: the circuit's size, its exact faithfulness with interval, n, and the estimate's agreement."""
    from mechscope.findings import ci, count, num

    f = summary["faithfulness"]
    agree = summary["agreement"][summary["method"]]
    return (f"a circuit of {summary['circuit_edges']} edges (of {summary['n_edges']}, by {summary['method'].upper()}) "
            f"reaches faithfulness {num(f['mean'], 3)}{ci(f['ci'], digits=3)} under exact edge patching "
            f"({count(summary['n_prompts'], 'prompt')}); its scores rank {agree['n_edges']} checked edges with "
            f"Spearman {num(agree['spearman'])} against exact single-edge effects")


def _round(x, digits: int = 4):
    """A float (or 0-d tensor) rounded; None where not finite (strict JSON)."""
    import math

    x = float(x)
    return round(x, digits) if math.isfinite(x) else None


def run(ctx):
    import torch

    from mechscope import plotting, runs
    from mechscope.commands.path_patch import _task
    from mechscope.errors import BadInput
    from mechscope.techniques import edges

    args = ctx.args
    if args.target is not None and args.edges is not None:
        raise BadInput("pass --target or --edges, not both")
    if args.target is not None and not 0 < args.target <= 1:
        raise BadInput("--target must be in (0, 1]")
    if args.edges is not None and args.edges < 1:
        raise BadInput("--edges must be at least 1")
    if not 1 <= args.steps <= 100:
        raise BadInput("--steps must be in 1..100")
    if args.check < 2:
        raise BadInput("--check must be at least 2 (edges compared with exact patching)")
    target = args.target if args.target is not None or args.edges is not None else 0.9
    if not (args.task or args.pairs or args.clean or args.corrupted):
        args.task = "induction"
    engine = ctx.engine
    graph = edges.build_graph(engine.cfg)
    edges.require_sites(engine, graph)
    if args.edges is not None and args.edges > len(graph.edges):
        raise BadInput(f"--edges must be at most {len(graph.edges)} (this model's edge count)")
    clean, corrupted, metric, metric_name, pairs = _task(engine, args)
    d = edges.discover(engine, clean, corrupted, metric, method=args.method, steps=args.steps,
                       target=None if args.edges is not None else target, n_edges=args.edges, check=args.check,
                       seed=args.seed)

    names, gap = graph.names, d.floor - d.clean
    fraction = {m: d.scores.mean(m) / gap for m in edges.METHODS}            # [n_edges] as fractions of the gap
    exact = torch.full((len(names),), float("nan"))
    exact[d.checked] = d.exact.mean(1) / gap
    rows = [{"edge": name, "sender": graph.senders[s], "receiver": graph.receivers[r],
             "eap": f"{fraction['eap'][i]:.6g}", "eap_ig": f"{fraction['eap-ig'][i]:.6g}",
             "exact": "" if exact[i].isnan() else f"{exact[i]:.6g}", "in_circuit": int(d.circuit[i])}
            for i, (name, (s, r)) in enumerate(zip(names, graph.edges))]
    runs.write_csv(ctx.run_dir / "edges.csv", rows)
    chosen = d.circuit.nonzero()[:, 0].tolist()
    ranked = sorted(chosen, key=lambda i: -abs(fraction[args.method][i]))
    plotting.circuit([(graph.senders[graph.edges[i][0]], graph.receivers[graph.edges[i][1]],
                       float(fraction[args.method][i])) for i in chosen], graph.n_layers, graph.n_heads,
                     ctx.run_dir / "circuit.png",
                     title=f"{len(chosen)} edges, faithfulness {d.faithfulness[0]:.2f} (width: {args.method} score)")
    curves = {m: (d.curve[m]["mean"], d.curve[m]["low"], d.curve[m]["high"]) for m in ("eap", "eap-ig", "random")}
    plotting.lines(curves, ctx.run_dir / "curve.png", x=d.curve["sizes"], reference=1.0, reference_label="clean",
                   title="faithfulness of the top-k edges (exact edge patching)", xlabel="edges selected (k)",
                   ylabel="faithfulness")
    plotting.scatter_agreement({m: (exact[d.checked], fraction[m][d.checked]) for m in edges.METHODS},
                               ctx.run_dir / "agreement.png", title="edge scores vs exact single-edge effects",
                               xlabel="exact effect (fraction of the clean - corrupted gap)", ylabel="estimate")

    interval = lambda t: {"mean": _round(t[0]), "ci": [_round(t[1]), _round(t[2])]}  # noqa: E731
    summary = {"metric": metric_name, "engine": engine.name, "n_prompts": d.n_prompts,
               "prompts": args.task or "pairs", "method": args.method, "steps": args.steps,
               "target": None if args.edges is not None else target, "n_edges": len(names),
               "circuit_edges": len(chosen), "faithfulness": interval(d.faithfulness),
               "completeness": interval(d.completeness), "clean_metric": _round(d.clean),
               "floor_metric": _round(d.floor),
               "agreement": {m: {k: _round(v) if isinstance(v, float) else v for k, v in a.items()}
                             for m, a in d.agreement.items()},
               "top_edges": [{"edge": names[i], args.method: _round(fraction[args.method][i]),
                              "exact": _round(exact[i])} for i in ranked[:15]],
               "units": "edge scores and exact effects: m(edge removed) - m(clean), as fractions of "
                        "(corrupted - clean); intervals: 95% bootstrap over prompts",
               "plots": ["circuit.png", "curve.png", "agreement.png"]}
    summary["headline"] = headline(summary)
    curve = {"sizes": d.curve["sizes"], **{m: {k: [_round(x) for x in v] if k != "edges" else v
                                               for k, v in d.curve[m].items()} for m in ("eap", "eap-ig", "random")}}
    text = "\n".join(
        [summary["headline"],
         f"{metric_name}: clean {d.clean:.3f}, no edges (corrupted) {d.floor:.3f}; completeness "
         f"{d.completeness[0]:.2f} [{d.completeness[1]:.2f}, {d.completeness[2]:.2f}] (circuit removed)",
         "agreement with exact single-edge effects: " + "; ".join(
             f"{m} Spearman {a['spearman']:.2f}, top-{a['k']} overlap {a['top_k_overlap']:.2f}"
             for m, a in d.agreement.items()) + f" ({d.agreement['eap']['n_edges']} edges)",
         "faithfulness curve (k: eap / eap-ig / random): " + ", ".join(
             f"{k}: {e:.2f}/{g:.2f}/{r:.2f}" for k, e, g, r in zip(d.curve["sizes"], d.curve["eap"]["mean"],
                                                                  d.curve["eap-ig"]["mean"], d.curve["random"]["mean"])),
         "top edges: " + ", ".join(f"{t['edge']} {t[args.method]:+.2f}" for t in summary["top_edges"][:8])])
    return {"summary": summary, "curve": curve, "circuit": [names[i] for i in ranked], "pairs": pairs, "text": text}

"""Find and explain SAE features: top features at a position of a prompt set, max-activating contexts over a
corpus (and examples from lower activation quantiles), each feature's logit effect, an offline HTML page.

    mechscope sae-features                                      # top features at "france" in "the capital of france is"
    mechscope sae-features --prompt "the capital of france is" --prompt "the capital of spain is" --position -1
    mechscope sae-features --features 12,40 --n-tokens 1000000  # max-activating contexts of chosen features
    mechscope sae-features --features country,person_name       # the shipped SAE's named features (SAE_CARD.md)
    mechscope sae-features --features all --n-tokens 200000     # every feature: features.csv (+ a page for the first 50)

With --prompt (repeatable; prompts may differ in length) the top --top features at --position of each
prompt (negative counts from the end) are ranked by mean activation, with a 95% bootstrap interval over
prompts, the fraction of prompts they are active on and their rank stability (fraction of prompts where
they are in the top --top). Those features (or --features) are then searched over the corpus (--data, or
--n-tokens of the bundled corpus): the --k largest activations and --per-band examples from each
activation-quantile band, each as a window of tokens (the example's token in [brackets]). The logit
effect is the feature's decoder direction read out through the final norm (at its mean scale on the
corpus) and the unembedding: the next tokens it pushes up and down directly. Pretrained releases get
Neuronpedia links. BOS / EOS / PAD positions never count.
Writes features.csv, features.html (self-contained, offline) and top_features.png (with --prompt).
"""
HELP = "top features, max-activating contexts (with quantile examples), logit effects, an HTML feature page"

DEFAULT_PROMPT = "The capital of France is"
DEFAULT_POSITION = -2                 # "france"
MAX_PAGE_FEATURES = 50


def add_arguments(parser):
    from mechscope.commands.sae_eval import add_data_arguments, add_sae_argument

    add_sae_argument(parser)
    parser.add_argument("--prompt", action="append", help=f'prompt (repeatable; default: "{DEFAULT_PROMPT}" when '
                        f"no --features are given)")
    parser.add_argument("--task", choices=("ioi", "facts", "sentiment"),
                        help="a bundled prompt set instead of --prompt (its named positions: ioi IO S1 S2 END, facts "
                             "SUBJECT RELATION END)")
    parser.add_argument("--n", type=int, default=64, help="prompts drawn for --task (default: %(default)s)")
    parser.add_argument("--position", help=f"position in each prompt: an index (negative counts from the end) or, with "
                        f"--task, a position name (default: -1, or {DEFAULT_POSITION} for the default prompt)")
    parser.add_argument("--top", type=int, default=10, help="top features per prompt set (default: %(default)s)")
    parser.add_argument("--features", help="comma-separated feature indices or names, or all (default: the top "
                        "features of the prompts)")
    add_data_arguments(parser, n_tokens=200_000)
    parser.add_argument("--k", type=int, default=20, help="max-activating examples per feature (default: %(default)s)")
    parser.add_argument("--per-band", type=int, default=3,
                        help="examples per activation-quantile band (default: %(default)s)")
    parser.add_argument("--window", default="8,3", help="tokens before,after each example (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per forward (default: %(default)s)")


def _window(spec: str) -> tuple[int, int]:
    from mechscope.errors import BadInput

    try:
        before, after = (int(s) for s in spec.split(","))
    except ValueError:
        raise BadInput(f"--window {spec!r}: write BEFORE,AFTER, e.g. 8,3") from None
    if not (0 <= before <= 64 and 0 <= after <= 64):
        raise BadInput("--window: BEFORE and AFTER must be in 0..64")
    return before, after


def prompt_positions(ctx, default: str | None):
    """(rows: n x [seq_i] ids, [n] positions, prompt texts, position label, [n] groups: the task's templates, the
    unit intervals resample, or None) from --task / --prompt and --position; ([], [], [], None, None) when neither
    is given and there is no default prompt."""
    from mechscope import inputs, tasks
    from mechscope.errors import BadInput

    args, engine = ctx.args, ctx.engine
    if args.task and args.prompt:
        raise BadInput("pass --task or --prompt, not both")
    spec = args.position
    if args.task:
        if not 1 <= args.n <= 10_000:
            raise BadInput("--n must be in 1..10000")
        prompt_set = tasks.load_task(engine, args.task, n=args.n, seed=args.seed)
        rows, named = prompt_set.tokens(engine)
        spec = spec or tasks.END
        groups = prompt_set.groups
        if spec in named:
            return rows, named[spec].tolist(), prompt_set.texts, spec, groups
        prompts = prompt_set.texts
    else:
        groups = None
        prompts = args.prompt or ([default] if default else [])
        if not prompts:
            return [], [], [], None, None
        rows = [inputs.tokens(engine, p)[0] for p in prompts]
        spec = spec if spec is not None else (str(DEFAULT_POSITION) if not args.prompt else "-1")
    try:
        index = int(spec)
    except ValueError:
        names = f"; the task's positions are {', '.join(named)}" if args.task else " (names need --task)"
        raise BadInput(f"--position {spec!r} is neither an index nor a position name{names}") from None
    if any(not -len(r) <= index < len(r) for r in rows):
        raise BadInput(f"--position {index} is outside a prompt (the shortest has {min(map(len, rows))} tokens)")
    return rows, [index % len(r) for r in rows], prompts, index, groups


def context_text(example: dict) -> str:
    """'the capital of [france] is' from a context window {tokens, values, at}."""
    return " ".join(f"[{t}]" if i == example["at"] else t for i, t in enumerate(example["tokens"]))


def run(ctx):
    from mechscope import plotting
    from mechscope.commands.sae_eval import load_checked_sae, rows_from_args
    from mechscope.errors import BadInput
    from mechscope.techniques import sae as saes
    from mechscope.techniques import sae_features as sf

    args, engine = ctx.args, ctx.engine
    for name in ("top", "k", "batch_size"):
        if not 1 <= getattr(args, name) <= 10_000:
            raise BadInput(f"--{name.replace('_', '-')} must be in 1..10000")
    if not 0 <= args.per_band <= 100:
        raise BadInput("--per-band must be in 0..100")
    before, after = _window(args.window)
    sae = load_checked_sae(ctx)
    names = saes.named_features(args.sae)
    label_of = {int(v["feature"]): k for k, v in names.items()}
    chosen = None if (args.features or "").strip() == "all" else (
        saes.parse_features(args.features, sae, names) if args.features is not None else None)

    result = {}
    rows, positions, prompts, position, groups = prompt_positions(ctx, default=None if args.features else DEFAULT_PROMPT)
    if prompts:
        ranked = sf.top_features(engine, sae, rows, positions, args.top, seed=args.seed, groups=groups)
        top = ranked["features"]
        at = [engine.to_single_str_token(int(r[p])) for r, p in zip(rows, positions)]
        result["top_features"] = {"prompts": prompts, "position": position, "tokens_at_position": at, **ranked}
        plotting.bars([t["mean"] for t in top], [f"{t['feature']} {label_of.get(t['feature'], '')}" for t in top],
                      ctx.run_dir / "top_features.png", title=f"top features at position {position} "
                      f"({len(prompts)} prompt{'s' * (len(prompts) > 1)})", xlabel="mean activation")
        chosen = chosen if chosen is not None or args.features else [t["feature"] for t in top if t["mean"] > 0]

    corpus = rows_from_args(ctx, sae, seed=args.seed + 1000)
    search = sf.max_activating(engine, sae, corpus, chosen, k=args.k, batch_size=args.batch_size, seed=args.seed)
    scale = sf.final_scale(engine, corpus)
    effects = sf.logit_effects(engine, sae, search.features, scale)
    up, down = sf.top_tokens(engine, effects)
    density = search.count / max(search.n_tokens, 1)
    seq = corpus.shape[1]
    with open(ctx.run_dir / "features.csv", "w") as f:
        f.write("feature,name,density,max_activation,mean_when_active,top_tokens,logit_up\n")
        for j, feat in enumerate(search.features):
            tops = [int(corpus.view(-1)[i]) for v, i in zip(search.top_values[j], search.top_index[j]) if v > 0][:5]
            f.write(f"{feat},{label_of.get(feat, '')},{density[j]:.6g},{search.top_values[j, 0]:.6g},"
                    f"{search.total[j] / max(search.count[j], 1):.6g},"
                    f"{' '.join(engine.to_single_str_token(t) for t in tops)},{' '.join(t for t, _ in up[j][:5])}\n")

    pages = []
    for j, feat in enumerate(search.features[:MAX_PAGE_FEATURES]):
        top_idx = [int(i) for v, i in zip(search.top_values[j], search.top_index[j]) if v > 0]
        bands = sf.quantile_examples(search, j, args.per_band, seed=args.seed)
        band_ctx = sf.contexts(engine, sae, corpus, feat, [i for b in bands for _, i in b["examples"]], before, after)
        it = iter(band_ctx)
        pages.append({
            "feature": feat, "label": f"feature {feat}" + (f" ({label_of[feat]})" if feat in label_of else ""),
            "name": label_of.get(feat), "density": float(density[j]), "count": int(search.count[j]),
            "n_tokens": search.n_tokens, "max": float(search.top_values[j, 0]),
            "mean_active": float(search.total[j] / max(search.count[j], 1)), "neuronpedia": saes.neuronpedia_url(sae, feat),
            "logit_up": up[j], "logit_down": down[j],
            "top": sf.contexts(engine, sae, corpus, feat, top_idx, before, after),
            "bands": [{**{k: b[k] for k in ("band", "low", "high")}, "examples": [next(it) for _ in b["examples"]]}
                      for b in bands],
            "top_positions": [divmod(i, seq) for i in top_idx]})
    page = plotting.feature_pages_html(pages, ctx.run_dir / "features.html",
                                       title=f"{sae.cfg.metadata.hook_name} SAE features ({engine.cfg.model_name})",
                                       subtitle=f"{search.n_tokens} corpus tokens searched; {sae.cfg.architecture()} "
                                                f"SAE, {sae.cfg.d_sae} features")
    files = ["features.csv", page.name] + (["top_features.png"] if prompts else [])
    shown = [{"feature": p["feature"], "name": p["name"], "density": round(p["density"], 5), "max": round(p["max"], 4),
              "top_contexts": [context_text(c) for c in p["top"][:5]],
              "lower_quantile_contexts": {b["band"]: [context_text(c) for c in b["examples"][:2]] for b in p["bands"][:3]},
              "logit_up": [t for t, _ in p["logit_up"][:6]], "logit_down": [t for t, _ in p["logit_down"][:6]],
              "neuronpedia": p["neuronpedia"]} for p in pages[:10]]
    summary = {"sae": saes.describe(sae), "n_tokens_searched": search.n_tokens, "n_features": len(search.features),
               "final_norm_scale": round(scale, 4), "features": shown, "files": files}
    if "top_features" in result:
        tf = result["top_features"]
        summary["top_features"] = {"n_prompts": len(tf["prompts"]), "position": tf["position"],
                                   "tokens_at_position": tf["tokens_at_position"][:5],
                                   "rank_stability": tf["rank_stability"],
                                   "features": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in t.items()
                                                 if k != "per_prompt"} for t in tf["features"]]}
    lines = []
    if "top_features" in summary:
        tf = summary["top_features"]
        lines.append(f"top features at position {tf['position']} ({tf['tokens_at_position'][0]!r}...) of "
                     f"{tf['n_prompts']} prompt(s): mean activation [95% CI], active fraction, top-{args.top} fraction")
        lines += [f"  {t['feature']:>5} {label_of.get(t['feature'], ''):<14} {t['mean']:.3f} "
                  f"[{t['ci'][0]:.3f}, {t['ci'][1]:.3f}]  {t['active_fraction']:.2f}  {t['top_k_fraction']:.2f}"
                  for t in tf["features"]]
    for s in shown:
        lines.append(f"feature {s['feature']}{' (' + s['name'] + ')' if s['name'] else ''}: density {s['density']:.4f}, "
                     f"max {s['max']:.2f}; pushes up {', '.join(s['logit_up'])}")
        lines += [f"    {c}" for c in s["top_contexts"][:3]]
    lines.append(f"{search.n_tokens} tokens searched; {len(search.features)} features in features.csv, "
                 f"{len(pages)} in features.html")
    return {"summary": summary, "text": "\n".join(lines), **result, "features": pages, "density": density.tolist()}


def headline(summary: dict) -> str:
    """The finding in one sentence: the most active feature on the prompts, else the first feature listed."""
    from mechscope.findings import ci, count, num

    if summary.get("top_features", {}).get("features"):
        tf = summary["top_features"]
        t = tf["features"][0]
        return (f"feature {t['feature']} is the most active at position {tf['position']}: mean activation "
                f"{num(t['mean'], 3)}{ci(t['ci'], digits=3)}, active on {num(t['active_fraction'])} of "
                f"{count(tf['n_prompts'], 'prompt')}")
    if not summary["features"]:
        return f"no active feature in {summary['n_tokens_searched']} tokens searched"
    f = summary["features"][0]
    return (f"feature {f['feature']}{' (' + f['name'] + ')' if f['name'] else ''} leads the list: max activation "
            f"{num(f['max'])}, density {num(f['density'], 4)} ({summary['n_features']} features, "
            f"{summary['n_tokens_searched']} tokens searched)")

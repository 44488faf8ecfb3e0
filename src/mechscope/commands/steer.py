"""Activation addition: steer a model with a vector added to the residual stream at one layer, against
same-norm random directions, on held-out prompts, with its cost on neutral text.

    mechscope steer                                   # sentiment vector from training openers, held-out prompts
    mechscope steer --layer 1 --strengths 0,2,4,8 --n-random 20
    mechscope steer --positive "i love this !" --negative "i hate this !" --prompt "this is awful ! it ' s so"
    mechscope steer --direction v.pt --strengths 0,4  # a given [d_model] direction (.pt or .npy)

Default (no --positive / --negative / --direction): the bundled sentiment prompts are split by opener
(mechscope.tasks, --seed); the vector is mean(resid_pre at --layer | positive training prompts) -
mean(... | negative training prompts), read at each prompt's last position (--vector-position last) or
averaged over its positions after BOS (mean); the prompts steered are the negative prompts of the held-out
openers, so no test prompt shares an opener with the contrast set. --prompt / --prompts FILE steer your
own prompts instead (the output says whether they overlap the contrast prompts).

strength * vector is added at every position >= --from-position of the prompt and at every generated
position (the same tokens with or without the KV cache); generation is greedy. Controls at the same strengths
and norm: --n-random (default 10) isotropic Gaussian directions and --n-structured (default 10) structured
ones, each the difference of the mean residuals (read like the vector) of two random halves of the neutral
texts; the residual stream is anisotropic, so the structured ones move the model more, and each strength
is judged against the kind whose effects spread wider. Effects, each per prompt with a
95% bootstrap interval over prompts: the next-token logit difference mean(positive word logits) -
mean(negative word logits), and positive / negative words per generated token (the share positive /
(positive + negative) is reported too, but it saturates). Each strength places the vector's effect in
that kind's distribution (z-score; `beats` = share of its directions it exceeds; `p_value` = (1 + controls
at least as high) / (n + 1)); `control` names the kind. Side effect: next-token loss on neutral texts
(--neutral FILE, default: bundled neutral sentences) with the vector added, over the predictions steering
can change (not the one made from BOS), against no steering and against the controls.

Writes steering.csv (one row per strength), per_prompt.csv, side_effect.csv, generations.json, and
logit_diff_vs_strength.png, net_rate_vs_strength.png, lm_loss_vs_strength.png.
"""
HELP = "activation addition steering with random-direction controls, held-out prompts and side effects"


def add_arguments(parser):
    parser.add_argument("--layer", type=int, default=1,
                        help="resid_pre of this layer is steered (default: %(default)s)")
    parser.add_argument("--positive", action="append",
                        help="positive contrast prompt (repeatable; default: the training split of the sentiment task)")
    parser.add_argument("--negative", action="append",
                        help="negative contrast prompt (repeatable; default: the training split of the sentiment task)")
    parser.add_argument("--direction", help="a .pt or .npy file holding a [d_model] vector, instead of the prompts")
    parser.add_argument("--vector-position", choices=("last", "mean"), default="last",
                        help="contrast prompts read at their last position, or averaged over positions "
                             "(default: %(default)s)")
    parser.add_argument("--prompt", action="append",
                        help="prompt to steer (repeatable; default: the held-out negative sentiment prompts)")
    parser.add_argument("--prompts", metavar="FILE", help="JSON / JSONL prompts to steer")
    parser.add_argument("--neutral", metavar="FILE",
                        help="JSON / JSONL neutral texts for the side-effect loss (default: bundled neutral sentences)")
    parser.add_argument("--strengths", default="0,2,4,8", help="comma-separated multipliers (default: %(default)s)")
    parser.add_argument("--n-random", type=int, default=10,
                        help="same-norm random directions (controls) per strength (default: %(default)s)")
    parser.add_argument("--n-structured", type=int, default=10,
                        help="structured controls per strength: differences of the mean residuals of two random "
                             "halves of the neutral texts, same norm (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=10, help="tokens generated (default: %(default)s)")
    parser.add_argument("--from-position", type=int, default=1,
                        help="first prompt position steered; 1 skips BOS (default: %(default)s)")
    parser.add_argument("--positive-words", help="comma-separated positive words (default: the bundled corpus list)")
    parser.add_argument("--negative-words", help="comma-separated negative words (default: the bundled corpus list)")


def _word_ids(engine, words: list[str], what: str) -> list[int]:
    from mechscope import inputs
    from mechscope.errors import BadInput

    ids = []
    for w in words:
        try:
            ids.append(inputs.single_token(engine, w))
        except BadInput:
            continue
    if not ids:
        raise BadInput(f"none of the {what} words is a single token for this model; pass --{what}-words")
    return sorted(set(ids))


def load_direction(path: str, d_model: int):
    """A [d_model] float tensor from a .pt (tensor) or .npy file."""
    from pathlib import Path

    import torch

    from mechscope.errors import BadInput

    file = Path(path)
    if not file.is_file():
        raise BadInput(f"direction file {path} does not exist")
    try:
        if file.suffix.lower() == ".npy":
            import numpy as np
            value = torch.from_numpy(np.load(file))
        else:
            value = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise BadInput(f"cannot read {path} as a tensor ({type(e).__name__}); save one with torch.save or np.save")
    if not isinstance(value, torch.Tensor) or value.squeeze().shape != (d_model,):
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise BadInput(f"{path} holds {shape}; a steering direction must be a tensor of shape [{d_model}] (d_model)")
    value = value.squeeze().float()
    if not torch.isfinite(value).all():
        raise BadInput(f"{path} holds non-finite values (NaN or inf); a steering direction must be finite")
    return value


def sentiment_split(engine, seed: int):
    """(positive openers, negative openers, negative test prompts, rule): the bundled sentiment prompts split
    by opener within each label (mechscope.tasks PromptSet.split, 40% of the openers held out); the contrast
    prompts are the training openers themselves ("i adore this !"), the steered prompts the negative prompts
    of the held-out openers ("i hate this ! it ' s so")."""
    from dataclasses import replace

    from mechscope import tasks

    ps = tasks.load_task(engine, "sentiment", 10_000, seed)
    split = {label: replace(ps, prompts=[p for p in ps.prompts if p.label == label]).split(0.4, seed)
             for label in ("positive", "negative")}
    openers = {label: sorted({p.group for p in split[label][0].prompts}) for label in split}
    test = split["negative"][1]
    rule = (f"sentiment openers split within each label (seed {seed}): vector from the training openers "
            f"{openers['positive']} - {openers['negative']}; steered: the {len(test)} negative prompts of the "
            f"held-out openers {sorted({p.group for p in test.prompts})}")
    return openers["positive"], openers["negative"], test.texts, rule


def _overlap(contrast: list[str], prompts: list[str]) -> list[str]:
    """Contrast prompts that occur inside a steered prompt (or the other way round), case-insensitive."""
    low = [p.lower() for p in prompts]
    return [c for c in contrast if any(c.lower() in p or p in c.lower() for p in low)]


def parse_strengths(spec: str) -> list[float]:
    """'0,2,4' -> [0.0, 2.0, 4.0]: 1 to 20 finite numbers of magnitude <= 1e6."""
    import math

    from mechscope.errors import BadInput

    try:
        values = [float(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise BadInput(f"--strengths {spec!r} is not a comma-separated list of numbers") from None
    if not values or len(values) > 20:
        raise BadInput("--strengths needs 1 to 20 numbers, e.g. 0,2,4,8")
    if not all(math.isfinite(v) and abs(v) <= 1e6 for v in values):
        raise BadInput(f"--strengths {spec!r}: each strength must be a finite number of magnitude <= 1e6")
    return values


def run(ctx):
    import torch

    from mechscope import inputs, plotting, stats, tasks
    from mechscope.runs import write_csv, write_json
    from mechscope.errors import BadInput
    from mechscope.techniques import steering
    from mechscope.toy import corpus

    args = ctx.args
    strengths = parse_strengths(args.strengths)
    if not 1 <= args.max_new_tokens <= 200:
        raise BadInput("--max-new-tokens must be in 1..200")
    if not 0 <= args.n_random <= 200 or not 0 <= args.n_structured <= 200:
        raise BadInput("--n-random and --n-structured must be in 0..200 (10 or more to place the effect among "
                       "control directions)")
    if args.prompt and args.prompts:
        raise BadInput("give --prompt or --prompts, not both")
    engine = ctx.engine
    layer = inputs.layer(engine, args.layer)

    contrast_given = bool(args.positive or args.negative)
    if contrast_given and not (args.positive and args.negative):
        raise BadInput("give both --positive and --negative contrast prompts (or neither, for the bundled split)")
    rule, held_out_prompts = None, None
    if not contrast_given and not args.direction:
        positive, negative, held_out_prompts, rule = sentiment_split(engine, args.seed)
    else:
        positive, negative = args.positive or [], args.negative or []
    if args.prompt or args.prompts:
        prompts = args.prompt or tasks.read_prompt_file(args.prompts).texts
    elif held_out_prompts is not None:
        prompts = held_out_prompts
    else:
        bundled = [p.text for p in tasks.load_task(engine, "sentiment", 10_000, args.seed).prompts
                   if p.label == "negative"]
        prompts = [p for p in bundled if not _overlap(positive + negative, [p])]
        if not prompts:
            raise BadInput("every bundled negative prompt contains one of your contrast prompts; pass --prompt to "
                           "steer held-out prompts")
    overlap = _overlap(positive + negative, prompts)
    rows = [inputs.tokens(engine, p)[0] for p in prompts]
    shortest = min(len(r) for r in rows)
    if shortest < 2 or not 0 <= args.from_position <= shortest:
        raise BadInput(f"--from-position must be in 0..{shortest} (the shortest prompt's token count) and prompts "
                       f"need 2+ tokens")
    longest = max(len(r) for r in rows)
    if longest + args.max_new_tokens > engine.cfg.n_ctx:
        raise BadInput(f"prompt ({longest} tokens) + --max-new-tokens ({args.max_new_tokens}) exceed the "
                       f"context of {engine.cfg.n_ctx}; shorten one")
    neutral_texts = tasks.read_prompt_file(args.neutral).texts if args.neutral else tasks.neutral_texts(engine)
    neutral = [inputs.tokens(engine, t)[0] for t in neutral_texts]
    if min(len(r) for r in neutral) < 2 + max(args.from_position, 1):
        raise BadInput("each --neutral text needs at least 2 tokens after --from-position (and after BOS)")
    if args.n_structured and len(neutral) < 4:
        raise BadInput("structured controls split the neutral texts in halves: give 4 or more, or --n-structured 0")
    for what, words in (("positive", args.positive_words), ("negative", args.negative_words)):
        if words is not None and not words.replace(",", "").strip():
            raise BadInput(f"--{what}-words is empty: pass comma-separated words, or leave it out for the defaults")
    positive_ids = _word_ids(engine, args.positive_words.split(",") if args.positive_words else corpus.POSITIVE_WORDS,
                             "positive")
    negative_ids = _word_ids(engine, args.negative_words.split(",") if args.negative_words else corpus.NEGATIVE_WORDS,
                             "negative")

    if args.direction:
        vector = load_direction(args.direction, engine.cfg.d_model).to(engine.cfg.device)
        source = args.direction
    else:
        vector = steering.mean_difference(engine, [inputs.tokens(engine, p)[0] for p in positive],
                                          [inputs.tokens(engine, p)[0] for p in negative], layer, args.vector_position)
        source = (f"mean of {len(positive)} positive - {len(negative)} negative contrast prompts "
                  f"({args.vector_position} position)")
    if float(vector.norm()) < 1e-6 and args.direction:
        raise BadInput(f"--direction {args.direction} is a zero vector: it cannot steer; pass a nonzero direction")
    if float(vector.norm()) < 1e-6:
        raise BadInput(f"the steering vector is zero at resid_pre {layer} (the contrast prompts' residuals are "
                       f"identical there, e.g. the same last token at layer 0); use a later --layer or "
                       f"--vector-position mean")
    structured = steering.structured_directions(engine, neutral, layer, vector, args.n_structured, args.seed,
                                                "last" if args.direction else args.vector_position)
    sweep = steering.steering_sweep(engine, rows, layer, vector, strengths, positive_ids, negative_ids,
                                    args.max_new_tokens, args.from_position, n_random=args.n_random, seed=args.seed,
                                    neutral=neutral, structured=structured)

    # ---------------------------------------------------------------- tables
    r4 = lambda x: None if x is None or x != x else round(float(x), 4)  # noqa: E731
    metrics = ("logit_diff", "net_rate", "positive_rate", "negative_rate", "positive_share")
    placements = {m: sweep.placement(m) for m in metrics + ("lm_loss",)}
    unsteered_loss = sweep.lm_loss[0, strengths.index(0)] if 0 in strengths else \
        steering.lm_loss(engine, neutral, layer, torch.zeros_like(vector), args.from_position)
    pooled = sweep.pooled_positive_share()
    # prompts that share an opener are resampled together (the bundled task's groups; your prompts: each its own)
    opener = {p.text: p.group for p in tasks.load_task(engine, "sentiment", 10_000, args.seed).prompts}
    groups = [opener[p] for p in prompts] if all(p in opener for p in prompts) else None
    per_strength = {m: stats.summary(getattr(sweep, m)[0].T, seed=args.seed, groups=None if m == "lm_loss" else groups)
                    for m in metrics + ("lm_loss",)}
    increase = stats.summary((sweep.lm_loss[0] - unsteered_loss).T, seed=args.seed)
    table = []
    for s, strength in enumerate(strengths):
        row = {"strength": strength}
        for m in metrics:
            st = per_strength[m]
            row.update({m: st["mean"][s], f"{m}_ci_low": st["ci_low"][s], f"{m}_ci_high": st["ci_high"][s]})
            row.update({f"{m}_random_{k}": v if k == "control" else r4(v) for k, v in placements[m][s].items()})
        row["pooled_positive_share"] = r4(pooled[0, s])
        row.update({"lm_loss": per_strength["lm_loss"]["mean"][s], "lm_loss_increase": increase["mean"][s],
                    "lm_loss_increase_ci_low": increase["ci_low"][s], "lm_loss_increase_ci_high": increase["ci_high"][s],
                    **{f"lm_loss_random_{k}": v if k == "control" else r4(v)
                       for k, v in placements["lm_loss"][s].items()}})
        for k in ("random_mean", "random_max"):   # the random directions' loss increase, like the vector's
            if k in placements["lm_loss"][s]:
                row[f"lm_loss_increase_{k}"] = r4(placements["lm_loss"][s][k] - float(unsteered_loss.mean()))
        table.append(row)
    write_csv(ctx.run_dir / "steering.csv", table)
    kinds = sweep.kind_of()
    names = ["steer"] + [f"{kinds[d]} {d - kinds.index(kinds[d])}" for d in range(1, len(kinds))]
    write_csv(ctx.run_dir / "per_prompt.csv", [
        {"direction": names[d], "strength": strength, "prompt": i, **{m: r4(getattr(sweep, m)[d, s, i]) for m in metrics},
         "generated_tokens": int(sweep.generated[d, s, i])}
        for d in range(len(names)) for s, strength in enumerate(strengths) for i in range(len(prompts))])
    write_csv(ctx.run_dir / "side_effect.csv", [
        {"direction": names[d], "strength": strength, "text": i, "lm_loss": r4(sweep.lm_loss[d, s, i]),
         "unsteered_lm_loss": r4(unsteered_loss[i])}
        for d in range(len(names)) for s, strength in enumerate(strengths) for i in range(len(neutral))])
    generations = [{"prompt": p, **{f"{kind} {strength:g}": engine.to_string(sweep.generations[d][s][j])
                                    for kind, d in (("steer", 0), ("random 0", 1)) if d < len(names)
                                    for s, strength in enumerate(strengths)}}
                   for j, p in enumerate(prompts)]
    write_json(ctx.run_dir / "generations.json", generations)

    # ---------------------------------------------------------------- plots
    plots = []
    for key, label in (("logit_diff", "next-token logit diff (positive - negative words)"),
                       ("net_rate", "(positive - negative words) per generated token"),
                       ("lm_loss", "loss on neutral text (nats)")):
        st = per_strength[key]
        curves = {"steering vector (95% CI over prompts)": (st["mean"], st["ci_low"], st["ci_high"])}
        for kind in sorted(set(kinds[1:])):
            means = getattr(sweep, key)[torch.tensor([k == kind for k in kinds])].nanmean(-1)   # [n_kind, S]
            curves[f"{len(means)} {kind} directions (mean, min-max)"] = (
                means.mean(0), means.min(0).values, means.max(0).values)
        plots.append(plotting.lines(curves, ctx.run_dir / f"{key}_vs_strength.png", x=strengths,
                                    title=f"steering at resid_pre {layer} (|v| = {sweep.vector_norm:.2f})",
                                    xlabel="strength", ylabel=label))

    notes = []
    if overlap:
        notes.append(f"not held out: the steered prompts contain the contrast prompts {overlap[:3]}")
    if groups is not None and len(set(groups)) < 6:
        notes.append(f"the {len(prompts)} steered prompts come from {len(set(groups))} opener(s), the independent "
                     f"units their intervals resample (the bundled corpus has 5 openers per label, so a held-out "
                     f"split cannot hold 6): read the intervals as wide, and steer more prompts of your own")
    if 0 < args.n_random < 10 or 0 < args.n_structured < 10:
        notes.append(f"only {args.n_random} Gaussian / {args.n_structured} structured directions: z-scores, 'beats' and "
                     f"p-values are coarse (use 10 or more; p can be no smaller than 1 / (n + 1))")
    headline = ("logit_diff", "net_rate", "positive_share")
    summary = {
        "layer": layer, "hook": steering.hook_name(layer), "vector": source, "vector_norm": r4(sweep.vector_norm),
        "split": rule, "held_out": None if args.direction else not overlap, "n_prompts": len(prompts),
        "n_groups": len(set(groups)) if groups is not None else len(prompts),
        "n_random": args.n_random, "n_structured": args.n_structured, "n_neutral_texts": len(neutral),
        "unsteered_lm_loss": r4(unsteered_loss.mean()),
        "effects": [{"strength": r["strength"],
                     **{m: {"mean": r[m], "ci": [r[f"{m}_ci_low"], r[f"{m}_ci_high"]],
                            **{k: r.get(f"{m}_random_{k}") for k in ("random_mean", "random_std", "random_max",
                                                                       "random_min", "z", "beats", "p_value",
                                                                       "control")}}
                        for m in headline},
                     "pooled_positive_share": r["pooled_positive_share"],
                     "lm_loss_increase": {"mean": r["lm_loss_increase"],
                                          "ci": [r["lm_loss_increase_ci_low"], r["lm_loss_increase_ci_high"]],
                                          "random_mean": r.get("lm_loss_increase_random_mean"),
                                          "random_max": r.get("lm_loss_increase_random_max")}} for r in table],
        "intervals": "95% studentized bootstrap over openers (prompts sharing one resampled together; Student's t "
                     "below 5 openers; over neutral texts for lm_loss); random_*: over the "
                     "means of the control kind named by `control` (Gaussian or structured, per strength the one "
                     "whose means spread wider); z = (vector - random mean) / random std; beats = share of those "
                     "directions the vector exceeds (for lm_loss: stays below); p_value = (1 + controls at least "
                     "as high) / (n + 1)",
        "controls_by_kind": {kind: [{"strength": strength, **{k: r4(v) if k != "control" else v
                                                              for k, v in sweep.placement("logit_diff", kind)[s].items()}}
                                    for s, strength in enumerate(strengths)]
                             for kind in sorted(set(kinds[1:]))},
        "example": {k: v[:200] for k, v in generations[0].items() if not k.startswith("random")}, "notes": notes,
        "files": ["steering.csv", "per_prompt.csv", "side_effect.csv", "generations.json"] + [p.name for p in plots]}
    lines = [f"steering resid_pre {layer} (|v| = {sweep.vector_norm:.2f}; {source}), {len(prompts)} prompts, "
             f"{args.n_random} Gaussian and {args.n_structured} structured same-norm control directions (each "
             f"strength against the wider kind)" + (f"\n{rule}" if rule else ""),
             "  strength  logit diff [95% CI]   random mean (max)   z      beats | net rate [95% CI]        "
             "random max | loss increase on neutral text (random mean)"]
    for r in table:
        lines.append(
            f"  {r['strength']:>8g}  {r['logit_diff']:+7.3f} {stats.ci_text(r['logit_diff_ci_low'], r['logit_diff_ci_high'], '+.2f')}"
            f"  {_fmt(r.get('logit_diff_random_random_mean'))} ({_fmt(r.get('logit_diff_random_random_max'))})"
            f"  {_fmt(r.get('logit_diff_random_z'), '+6.1f')}  {_fmt(r.get('logit_diff_random_beats'), '4.2f')} |"
            f" {r['net_rate']:+.3f} {stats.ci_text(r['net_rate_ci_low'], r['net_rate_ci_high'], '+.2f')}"
            f"  {_fmt(r.get('net_rate_random_random_max'), '+.3f')} |"
            f" {r['lm_loss_increase']:+.3f} ({_fmt(r.get('lm_loss_increase_random_mean'), '+.3f')})")
    lines.append(f"  unsteered loss on {len(neutral)} neutral texts: {float(unsteered_loss.mean()):.3f} nats")
    lines.append(f"  {prompts[0]!r} -> " + " | ".join(f"{s:g}: {generations[0][f'steer {s:g}']}" for s in strengths))
    lines += [f"note: {n}" for n in notes]
    return {"summary": summary, "text": "\n".join(lines), "effects": table, "vector": vector.cpu()}


def _fmt(value, spec: str = "+7.3f") -> str:
    return "   n/a" if value is None else format(value, spec)


def headline(summary: dict) -> str:
    """The finding in one sentence: the strongest strength's logit difference against the random directions."""
    from mechscope.findings import ci, count, num

    e = max(summary["effects"], key=lambda r: abs(r["strength"]))
    d, loss = e["logit_diff"], e["lm_loss_increase"]
    text = (f"steering at strength {e['strength']:g} moves the logit difference to {num(d['mean'], signed=True)}"
            f"{ci(d['ci'], signed=True)}")
    kind = d.get("control") or "gaussian"           # the wider-spread control kind this strength is judged against
    n_kind = summary.get("n_structured", 0) if kind == "structured" else summary["n_random"]
    if n_kind and d.get("beats") is not None:
        beaten = round(d["beats"] * n_kind)
        share = f"all {beaten}" if beaten == n_kind else f"{beaten} of {n_kind}"
        p = f", p = {num(d['p_value'], 3)}" if d.get("p_value") is not None else ""
        text += f", beyond {share} {kind} control directions (best {num(d['random_max'], signed=True)}{p})"
    return text + (f", at {num(loss['mean'], signed=True)}{ci(loss['ci'], signed=True)} nats of loss "
                   f"({count(summary['n_prompts'], 'prompt')}, {summary['hook']})")

"""Steer generation along an SAE feature's decoder direction, against random-feature and random-direction controls.

    mechscope sae-steer                                     # the shipped SAE's default feature and prompts
    mechscope sae-steer --feature 123 --strengths 0,4,8 --prompt "the big dog sees the" --target-words paris,rome
    mechscope sae-steer --feature country --controls 16

strength * W_dec[feature] is added at the SAE's hook at every prompt position >= --from-position and at
every generated position (greedy; the same tokens with and without the KV cache). With the error term
kept, that raises the feature's activation by `strength`. Controls at the same strengths: --controls
(default 32) other features' decoder directions, matched to the feature on activation frequency and
magnitude on the bundled corpus and drawn without replacement, and --controls Gaussian random directions,
each with the feature's decoder norm. Effects per prompt: the share of generated tokens that are --target-words
(until EOS), the next-token log-probability of the target words at the prompt's last position, and a
fluency cost (the unsteered model's mean loss on the generated tokens, in nats): means with 95% bootstrap
intervals over prompts; for each control kind the mean and range over its directions and the feature's
empirical p-value against them ((1 + controls at least as high) / (n + 1)); `p_value` is the larger of
the two kinds' (the claim holds against both). A feature whose effect sits inside the controls' range has
not been shown to steer anything.
Writes steering.csv, share_vs_strength.png, log_mass_vs_strength.png and generations.json.

Named features of the shipped SAE (SAE_CARD.md) carry default prompts and target words.
"""
HELP = "steer generation along an SAE feature, with random-feature / direction controls"

DEFAULT_FEATURE = "capital_of"
DEFAULT_STRENGTHS = "0,4,8,16"


def add_arguments(parser):
    from mechscope.commands.sae_eval import add_sae_argument

    add_sae_argument(parser)
    parser.add_argument("--feature", help=f"feature index or name (default for the shipped SAE: {DEFAULT_FEATURE})")
    parser.add_argument("--prompt", action="append", help="prompt to steer (repeatable; default: the named feature's)")
    parser.add_argument("--target-words", help="comma-separated words the feature should bring out (default: the "
                        "named feature's)")
    parser.add_argument("--strengths", help="comma-separated strengths, in units of the feature's activation "
                        f"(default: the named feature's, else {DEFAULT_STRENGTHS})")
    parser.add_argument("--controls", type=int, default=32, help="directions per control kind (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated (default: %(default)s)")
    parser.add_argument("--from-position", type=int, default=1, help="first prompt position steered; 1 skips BOS "
                        "(default: %(default)s)")


def word_ids(engine, spec: str | list[str], what: str) -> list[int]:
    """Token ids of comma-separated single-token words (at least one)."""
    from mechscope import inputs
    from mechscope.errors import BadInput

    words = [w.strip() for w in (spec.split(",") if isinstance(spec, str) else spec) if w.strip()]
    if not words:
        raise BadInput(f"no {what} given: pass comma-separated single-token words")
    return sorted({inputs.single_token(engine, w) for w in words})


def named_feature(args, sae, default: str) -> tuple[int, str | None, dict]:
    """(index, name, card entry or {}) of --feature, or of `default` for an SAE with named features."""
    from mechscope.errors import BadInput
    from mechscope.techniques import sae as saes

    names = saes.named_features(args.sae)
    spec = args.feature or (default if default in names else None)
    if spec is None:
        raise BadInput("pass --feature INDEX (this SAE has no named features)")
    feature = saes.parse_features(spec, sae, names)[0]
    name = next((k for k, v in names.items() if int(v["feature"]) == feature), None)
    return feature, name, names.get(name, {})


def run(ctx):
    import json

    import torch

    from mechscope import inputs, plotting
    from mechscope.commands.sae_eval import load_checked_sae
    from mechscope.commands.steer import parse_strengths
    from mechscope.errors import BadInput
    from mechscope.techniques import sae as saes
    from mechscope.techniques import sae_interventions as si

    args, engine = ctx.args, ctx.engine
    if args.strengths is not None:
        parse_strengths(args.strengths)                                 # bad strengths fail before any loading
    if not 1 <= args.controls <= 100 or not 1 <= args.max_new_tokens <= 200:  # no controls: nothing to compare with
        raise BadInput("--controls must be in 1..100 and --max-new-tokens in 1..200")
    sae = load_checked_sae(ctx)
    feature, name, entry = named_feature(args, sae, DEFAULT_FEATURE)
    strengths = parse_strengths(args.strengths or ",".join(f"{v:g}" for v in entry.get("strengths", [])) or DEFAULT_STRENGTHS)
    prompts = args.prompt or entry.get("steer_prompts")
    if args.target_words is not None and not args.target_words.replace(",", "").strip():
        raise BadInput("--target-words is empty: pass comma-separated words, e.g. paris,rome")
    targets = args.target_words or entry.get("target_words")
    if not prompts or not targets:
        raise BadInput("pass --prompt and --target-words (the feature has no defaults)")
    rows = [inputs.tokens(engine, p)[0] for p in prompts]
    shortest, longest = min(map(len, rows)), max(map(len, rows))
    if shortest < 2 or not 0 <= args.from_position <= shortest:
        raise BadInput(f"--from-position must be in 0..{shortest} (the shortest prompt's tokens) and prompts need 2+ tokens")
    if longest + args.max_new_tokens > engine.cfg.n_ctx:
        raise BadInput(f"prompt ({longest} tokens) + --max-new-tokens exceed the context of {engine.cfg.n_ctx}")
    target_ids = word_ids(engine, targets, "target words")
    profile = si.corpus_profile(engine, sae)
    result = si.steering_sweep(engine, sae, feature, rows, strengths, target_ids, args.max_new_tokens,
                               args.from_position, args.controls, seed=args.seed, profile=profile)

    table = []
    for s, eff, ctl in zip(strengths, result.effects, result.controls):
        row = {"strength": s}
        for metric in ("share", "log_mass", "fluency_cost"):
            row[metric] = eff[metric]["mean"]
            row[f"{metric}_low"], row[f"{metric}_high"] = eff[metric]["ci_low"], eff[metric]["ci_high"]
            for kind in ctl:
                for stat in ("mean", "low", "high", "p_value"):
                    row[f"{kind}_{metric}_{stat}"] = ctl[kind][metric][stat]
        table.append(row)
    with open(ctx.run_dir / "steering.csv", "w") as f:
        f.write(",".join(table[0]) + "\n")
        f.writelines(",".join("" if v is None else f"{v:.6g}" for v in r.values()) + "\n" for r in table)
    plots = []
    for metric, label in (("share", "share of generated tokens in the target set"),
                          ("log_mass", "next-token log P(target set)")):
        curves = {f"feature {feature} (95% CI)": ([r[metric] for r in table], [r[f"{metric}_low"] for r in table],
                                                  [r[f"{metric}_high"] for r in table])}
        if args.controls:
            curves.update({f"{kind.replace('_', ' ')} (range of {args.controls})": (
                [r[f"{kind}_{metric}_mean"] for r in table], [r[f"{kind}_{metric}_low"] for r in table],
                [r[f"{kind}_{metric}_high"] for r in table]) for kind in si.CONTROL_KINDS})
        plots.append(plotting.lines(curves, ctx.run_dir / f"{metric}_vs_strength.png", x=strengths,
                                    title=f"steering feature {feature} at {sae.cfg.metadata.hook_name}",
                                    xlabel="strength (feature activation added)", ylabel=label))
    generations = [{"prompt": p, **{f"{s:g}": engine.to_string(torch.tensor(result.generations[i][j]))
                                    for i, s in enumerate(strengths)}} for j, p in enumerate(prompts)]
    (ctx.run_dir / "generations.json").write_text(json.dumps(generations, indent=1))
    pair = lambda r, key: [round(r[f"{key}_low"], 4), round(r[f"{key}_high"], 4)]  # noqa: E731
    effects = [{"strength": r["strength"], "log_mass": round(r["log_mass"], 4), "log_mass_ci": pair(r, "log_mass"),
                "share": round(r["share"], 4), "share_ci": pair(r, "share"), "fluency_cost": round(r["fluency_cost"], 4),
                "controls_range": {k: {m: pair(r, f"{k}_{m}") for m in ("log_mass", "share")} for k in si.CONTROL_KINDS}
                if args.controls else None,
                "p_value": {m: max(r[f"{k}_{m}_p_value"] for k in si.CONTROL_KINDS) for m in ("log_mass", "share")}
                if args.controls else None} for r in table]
    summary = {"sae": saes.describe(sae), "feature": feature, "name": name, "n_prompts": len(prompts),
               "target_words": targets if isinstance(targets, list) else targets.split(","),
               "decoder_norm": round(result.decoder_norm, 4), "controls": args.controls, "effects": effects,
               "example": generations[0], "files": ["steering.csv", "generations.json", *[p.name for p in plots]]}
    lines = [f"steering feature {feature} at {sae.cfg.metadata.hook_name} on {len(prompts)} prompts "
             f"(|W_dec| {result.decoder_norm:.3f}): next-token log P(target words) and share of target words "
             f"generated [95% CI]" + (f"; matched random features | random directions: range over {args.controls} "
                                      f"each; p: empirical p-value of log P against the wider of the two"
                                      if args.controls else "")]
    for r in table:
        line = (f"  {r['strength']:>6g}: log P {r['log_mass']:+.2f} [{r['log_mass_low']:+.2f}, {r['log_mass_high']:+.2f}]"
                f"  share {r['share']:.3f} [{r['share_low']:.3f}, {r['share_high']:.3f}]")
        if args.controls:
            line += "  controls: " + " | ".join(
                f"log P {r[f'{k}_log_mass_low']:+.2f}..{r[f'{k}_log_mass_high']:+.2f} share "
                f"{r[f'{k}_share_low']:.3f}..{r[f'{k}_share_high']:.3f}" for k in si.CONTROL_KINDS)
            line += f"  p {max(r[f'{k}_log_mass_p_value'] for k in si.CONTROL_KINDS):.3g}"
        lines.append(line + f"  fluency cost {r['fluency_cost']:.2f}")
    lines.append(f"  {prompts[0]!r} -> " + " | ".join(f"{s}: {generations[0][s]}" for s in list(generations[0])[1:]))
    return {"summary": summary, "text": "\n".join(lines), "effects": table, "generations": generations}


def headline(summary: dict) -> str:
    """The finding in one sentence: the strongest strength's effect on the target words, against its controls."""
    from mechscope.findings import ci, count, num

    e = max(summary["effects"], key=lambda r: abs(r["strength"]))
    name = f" ({summary['name']})" if summary["name"] else ""
    text = (f"steering feature {summary['feature']}{name} at strength {e['strength']:g} moves log P(target words) to "
            f"{num(e['log_mass'], signed=True)}{ci(e['log_mass_ci'], signed=True)} and their share of generated "
            f"words to {num(e['share'], 3)}{ci(e['share_ci'], digits=3)}")
    for kind, r in (e["controls_range"] or {}).items():
        text += f"; {kind.replace('_', ' ')}: log P {num(r['log_mass'][0], signed=True)} to {num(r['log_mass'][1], signed=True)}"
    return text + f" (fluency cost {num(e['fluency_cost'])}; {count(summary['n_prompts'], 'prompt')})"

"""Ablate SAE features with the error term kept, or attribute a metric to every (position, feature) and check
the top ones by exact ablation.

    mechscope sae-ablate            # attribution on the 23 "the capital of X is" prompts (capital - another capital)
    mechscope sae-ablate --features capital_of --positions last
    mechscope sae-ablate --prompt "when mary and john went to the store , john gave a drink to" --answer mary \\
        --wrong john --features 12,40 --positions all

The metric, per prompt at its last position: the logit difference --answer - --wrong, or the answer's
log-probability without --wrong. Prompts must have the same number of tokens (positions are compared
across prompts).

With --features: those features are zeroed at --positions (all, last, or comma-separated indices;
negative counts from the end) and the model runs on x - decode(f) + decode(f_ablated) (sae-lens's
use_error_term=True: nothing else changes). Reported: the metric's change per prompt, mean with a 95%
bootstrap interval, the fraction of prompts whose top-1 prediction changes and the tokens that gain the
most. Controls: --controls (default 32) sets of as many other features, each matched to one ablated feature
on how often (share of prompts) and how strongly (mean activation where active) it is active at those
positions, no feature drawn twice; the claim is the empirical p-value of the effect's size against the
controls' ((1 + controls with |effect| at least as large) / (n + 1)), not "outside the range of a few".

Without --features (attribution): for every (position, feature) the first-order estimate of zeroing it,
-f * dm/df (one forward and one backward), averaged over prompts; the --top pairs by |estimate| are then
ablated exactly, one at a time, and the estimates compared with the exact effects (Pearson r, sign
agreement, largest error). Estimates miss effects that go through nonlinearities: trust the exact column.
Writes ablation.csv or attribution.csv and a plot.
"""
HELP = "ablate SAE features (error term kept); attribute a metric to features, checked exactly"


def add_arguments(parser):
    from mechscope.commands.sae_eval import add_sae_argument

    add_sae_argument(parser)
    parser.add_argument("--prompt", action="append", help="prompt (repeatable, same token count; default: the "
                        "bundled model's capital prompts)")
    parser.add_argument("--answer", action="append", help="the expected next token (one for all prompts, or one each)")
    parser.add_argument("--wrong", action="append", help="a wrong next token (one for all, or one each): metric = logit diff")
    parser.add_argument("--features", help="comma-separated feature indices or names to ablate (default: attribution)")
    parser.add_argument("--task", choices=("ioi", "facts"), help="a bundled prompt set with its answers and wrong answers "
                        "(positions: ioi IO S1 S2, facts SUBJECT RELATION)")
    parser.add_argument("--n", type=int, default=64, help="prompts drawn for --task (default: %(default)s)")
    parser.add_argument("--positions", default="all", help="all, last, the task's position names, or comma-separated "
                        "indices (negative: from each prompt's end) (default: %(default)s)")
    parser.add_argument("--controls", type=int, default=32, help="matched control feature sets (default: %(default)s)")
    parser.add_argument("--top", type=int, default=10, help="attribution: pairs checked exactly (default: %(default)s)")


def _prompts(ctx):
    """(tokens [n, seq] right-padded, [n] last positions, answer ids [n], wrong ids [n] or None, prompts,
    {position name: [n] index} for --task, [n] groups (templates) for --task or None: the unit intervals resample)."""
    import torch

    from mechscope import inputs, tasks
    from mechscope.commands import prompt_sets
    from mechscope.errors import BadInput
    from mechscope.toy import corpus

    args, engine = ctx.args, ctx.engine
    named, groups = {}, None
    if args.answer and not args.prompt:
        raise BadInput("--answer goes with --prompt: the default prompts and --task carry their own answers")
    if args.task:
        if args.prompt:
            raise BadInput("pass --task or --prompt, not both")
        prompt_set = tasks.load_task(engine, args.task, n=args.n, seed=args.seed)
        rows, named = prompt_set.tokens(engine)
        prompts, groups = prompt_set.texts, prompt_set.groups
        answers, wrongs = [p.answer for p in prompt_set.prompts], args.wrong or [p.wrong for p in prompt_set.prompts]
    else:
        if args.prompt:
            if not args.answer:
                raise BadInput("--prompt needs --answer (the expected next token)")
            prompts, answers, wrongs = args.prompt, args.answer, args.wrong
        else:
            prompts = [f"the capital of {c} is" for c in corpus.CAPITALS]
            answers = list(corpus.CAPITALS.values())
            wrongs = args.wrong or answers[1:] + answers[:1]          # another country's capital
        rows = [inputs.tokens(engine, p)[0] for p in prompts]
    n = len(prompts)

    def per_prompt(words, flag):
        return torch.tensor(prompt_sets.ids_per_prompt(engine, words, n, f"--{flag}"))
    answer_ids = per_prompt(answers, "answer")
    wrong_ids = per_prompt(wrongs, "wrong") if wrongs else None
    inputs.distinct_answers(answer_ids, wrong_ids)
    last = torch.tensor([len(r) - 1 for r in rows])
    tokens = tasks.padded(engine, rows)[0].to(engine.cfg.device)   # padding comes after each row's last token: it cannot matter
    return tokens, last, answer_ids, wrong_ids, prompts, named, groups


def make_metric(answer, wrong, last):
    """logits [batch, seq, d_vocab] -> [batch] at each prompt's last position: logit diff, or the answer's
    log-probability. answer / wrong / last: [n]; a batch of several copies of the n prompts is matched copy by copy."""
    import torch

    def metric(logits):
        reps = len(logits) // len(answer)
        rows = torch.arange(len(logits), device=logits.device)
        at = logits[rows, last.repeat(reps).to(logits.device)].float()
        a = answer.repeat(reps).to(at.device)
        if wrong is None:
            return at.log_softmax(-1)[rows, a]
        return at[rows, a] - at[rows, wrong.repeat(reps).to(at.device)]
    return metric


def position_mask(spec: str, last, named: dict, seq: int):
    """--positions -> [n, seq] bool (None = all): all, last, names of the task's positions, or indices (negative
    counts back from each prompt's last token)."""
    import torch

    from mechscope.errors import BadInput

    if spec == "all":
        return None
    mask = torch.zeros(len(last), seq, dtype=torch.bool)
    rows = torch.arange(len(last))
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        if item == "last":
            mask[rows, last] = True
        elif item in named:
            mask[rows, named[item]] = True
        else:
            try:
                index = int(item)
            except ValueError:
                known = f", or a position of the task: {', '.join(named)}" if named else ""
                raise BadInput(f"--positions {spec!r}: write all, last, or comma-separated indices{known}") from None
            shortest = int(last.min()) + 1
            if not -shortest <= index < shortest:
                raise BadInput(f"--positions must be in {-shortest}..{shortest - 1} (the shortest prompt has "
                               f"{shortest} tokens)")
            mask[rows, index if index >= 0 else last + 1 + index] = True
    if not mask.any():
        raise BadInput("--positions names no position")
    return mask


def run(ctx):
    from mechscope.commands.sae_eval import load_checked_sae
    from mechscope.errors import BadInput
    from mechscope.techniques import sae as saes

    args = ctx.args
    if not 0 <= args.controls <= 100 or not 1 <= args.top <= 1000:
        raise BadInput("--controls must be in 0..100 and --top in 1..1000")
    sae = load_checked_sae(ctx)
    tokens, last, answer, wrong, prompts, named, groups = _prompts(ctx)
    metric = make_metric(answer, wrong, last)
    label = "logit diff (answer - wrong)" if wrong is not None else "log P(answer)"
    if args.features is not None:  # an empty --features is refused, not taken as the default
        features = saes.parse_features(args.features, sae, saes.named_features(args.sae))
        mask = position_mask(args.positions, last, named, tokens.shape[1])
        return _ablation(ctx, sae, tokens, last, metric, label, features, mask, prompts, groups)
    if args.positions != "all":
        raise BadInput("--positions picks where --features are ablated; attribution (without --features) scores "
                       "every position: pass --features, or leave --positions out")
    if (last != last[0]).any():
        raise BadInput("attribution compares positions across prompts, so they need one token count; pass --features "
                       "to ablate, or prompts of one length")
    return _attribution(ctx, sae, tokens, metric, label, prompts)


def _ablation(ctx, sae, tokens, last, metric, label, features, positions, prompts, groups=None):
    import torch

    from mechscope import plotting, stats
    from mechscope.techniques import sae as saes
    from mechscope.techniques import sae_interventions as si

    engine, args = ctx.engine, ctx.args
    hook = sae.cfg.metadata.hook_name
    with torch.no_grad():  # si.ablate's two runs, keeping the logits for the next-token changes too
        edit = saes.splice(sae, tokens, engine, edit=si.zero_features(features, positions))
        base_logits, after_logits = engine.run(tokens)[0], engine.run(tokens, edits=[(hook, edit)])[0]
        clean, ablated = metric(base_logits).float().cpu(), metric(after_logits).float().cpu()
        rows = torch.arange(len(tokens), device=base_logits.device)
        base, after = base_logits[rows, last.to(rows.device)].float(), after_logits[rows, last.to(rows.device)].float()
        inside = torch.arange(tokens.shape[1]) <= last[:, None]          # [n, seq] not padding
        acts = saes.feature_acts(engine, sae, tokens) * inside[..., None].to(tokens.device)
    flipped = (base.argmax(-1) != after.argmax(-1)).float().mean()
    gain = (after.log_softmax(-1) - base.log_softmax(-1)).mean(0)
    gainers = [(engine.to_single_str_token(int(i)), round(float(gain[i]), 4)) for i in gain.topk(8).indices]
    losers = [(engine.to_single_str_token(int(i)), round(float(gain[i]), 4)) for i in gain.topk(8, largest=False).indices]
    scope = acts if positions is None else acts * positions.to(acts.device)[..., None]   # [n, seq, d_sae]
    frequency, magnitude = si.feature_profile(scope)
    control_sets = si.matched_sets(frequency, magnitude, features, args.controls, seed=args.seed)
    control_means = [float((si.ablate(engine, sae, tokens, metric, s, positions)[1] - clean).mean()) for s in control_sets]
    effect = ablated - clean
    effect_summary = stats.summary(effect, seed=args.seed, groups=groups)
    p_value = stats.empirical_p(effect_summary["mean"], control_means)
    matched = sorted({f for s in control_sets for f in s})
    hit = (acts[..., torch.tensor(features, device=acts.device)] > 0).any(-1)          # [n, seq]
    hit = hit if positions is None else hit & positions.to(hit.device)
    active = float(hit.any(-1).float().mean())  # the share of prompts with a chosen feature active where ablated
    with open(ctx.run_dir / "ablation.csv", "w") as f:
        f.write("prompt,clean,ablated,effect\n")
        f.writelines(f"\"{p}\",{c:.6g},{a:.6g},{e:.6g}\n" for p, c, a, e in zip(prompts, clean, ablated, effect))
    plot = plotting.bars([effect_summary["mean"]] + control_means, [f"features {','.join(map(str, features))}"] +
                         [f"control {i}" for i in range(len(control_means))], ctx.run_dir / "ablation.png",
                         title=f"zero-ablating SAE features at {hook} (error term kept)", xlabel=f"mean change in {label}")
    summary = {"sae": saes.describe(sae), "features": features, "positions": ctx.args.positions, "metric": label,
               "n_prompts": len(prompts), "clean_mean": round(float(clean.mean()), 4), "effect": effect_summary,
               "prompts_with_feature_active": round(active, 4), "top1_changed": round(float(flipped), 4),
               "tokens_gaining": gainers, "tokens_losing": losers,
               "controls": {"n": len(control_means), "mean": float(torch.tensor(control_means).mean()) if control_means else None,
                            "low": min(control_means, default=None), "high": max(control_means, default=None),
                            "p_value": p_value, "matched_on": "activation frequency (share of prompts active) and "
                            "magnitude (mean activation where active), at the ablated positions",
                            "features": {"frequency": [round(float(frequency[f]), 4) for f in features],
                                         "magnitude": [round(float(magnitude[f]), 4) for f in features]},
                            "control_frequency_range": [round(float(frequency[matched].min()), 4),
                                                        round(float(frequency[matched].max()), 4)] if matched else None,
                            "control_magnitude_range": [round(float(magnitude[matched].min()), 4),
                                                        round(float(magnitude[matched].max()), 4)] if matched else None},
               "files": ["ablation.csv", plot.name]}
    c = summary["controls"]
    text = (f"zero-ablating features {features} at positions {ctx.args.positions} ({hook}, error term kept), "
            f"{len(prompts)} prompts:\n  {label}: {float(clean.mean()):.3f} -> {float(ablated.mean()):.3f}, change "
            f"{effect_summary['mean']:+.3f} {stats.ci_text(effect_summary['ci_low'], effect_summary['ci_high'], '+.3f')}; "
            f"top-1 changed on {flipped:.0%}\n"
            + (f"  control ({c['n']} sets of {len(features)} features matched on frequency and magnitude): "
               f"{c['low']:+.3f} to {c['high']:+.3f}; empirical p = {p_value:.3g} (|effect| vs the controls')\n"
               if control_means else "")
            + f"  gain: {', '.join(t for t, _ in gainers[:5])}; lose: {', '.join(t for t, _ in losers[:5])}")
    return {"summary": summary, "text": text, "per_prompt": {"clean": clean, "ablated": ablated}}


def _attribution(ctx, sae, tokens, metric, label, prompts):
    from mechscope import plotting
    from mechscope.techniques import sae as saes
    from mechscope.techniques import sae_interventions as si

    engine, args = ctx.engine, ctx.args
    estimates, acts = si.attribute(engine, sae, tokens, metric)
    mean_est = estimates.mean(0).cpu()                            # [seq, d_sae]
    top = mean_est.abs().flatten().topk(min(args.top, int((mean_est != 0).sum()) or 1)).indices
    items = [divmod(int(i), mean_est.shape[1]) for i in top]
    exact = si.exact_ablations(engine, sae, tokens, metric, items).mean(1)
    est = mean_est[[p for p, _ in items], [f for _, f in items]]
    agree = si.agreement(est, exact)
    words = engine.to_str_tokens(tokens[0])
    names = {int(v["feature"]): k for k, v in saes.named_features(args.sae).items()}
    rows = [{"position": p, "token": words[p], "feature": f, "name": names.get(f), "estimate": round(float(e), 5),
             "exact": round(float(x), 5), "mean_activation": round(float(acts[:, p, f].mean()), 4)}
            for (p, f), e, x in zip(items, est, exact)]
    with open(ctx.run_dir / "attribution.csv", "w") as fh:
        fh.write("position,token,feature,name,estimate,exact,mean_activation\n")
        fh.writelines(f"{r['position']},\"{r['token']}\",{r['feature']},{r['name'] or ''},{r['estimate']},{r['exact']},"
                      f"{r['mean_activation']}\n" for r in rows)
    plot = plotting.scatter_agreement({"top (position, feature)": (exact, est)}, ctx.run_dir / "attribution.png",
                                      title=f"feature attribution vs exact ablation ({label})",
                                      xlabel="exact change (zero-ablated)", ylabel="attribution estimate")
    summary = {"sae": saes.describe(sae), "metric": label, "n_prompts": len(prompts), "tokens": words,
               "top": rows, "agreement": agree, "files": ["attribution.csv", plot.name]}
    lines = [f"feature attribution at {sae.cfg.metadata.hook_name} for {label}, {len(prompts)} prompts; top {len(rows)} "
             f"(position, feature) by |estimate|, checked by exact ablation:"]
    lines += [f"  pos {r['position']:>2} {r['token']!r:<10} feature {r['feature']:>5} {r['name'] or '':<14} estimate "
              f"{r['estimate']:+.3f}  exact {r['exact']:+.3f}" for r in rows]
    lines.append(f"  agreement: Pearson {agree['pearson']:.3f}, sign {agree['sign_agreement']:.0%}, "
                 f"max |error| {agree['max_abs_error']:.3f}")
    return {"summary": summary, "text": "\n".join(lines), "estimates_mean": mean_est.tolist()}


def headline(summary: dict) -> str:
    """The finding in one sentence: the ablation's effect against random feature sets, or the top attribution."""
    from mechscope.findings import ci, count, num

    n = count(summary["n_prompts"], "prompt")
    if "top" in summary:   # --attribute
        if not summary["top"]:
            return f"no feature attribution ({n})"
        t = summary["top"][0]
        return (f"feature {t['feature']} at position {t['position']} ({t['token']!r}) has the largest attribution to "
                f"the {summary['metric']}: {num(t['estimate'], signed=True)} (exact {num(t['exact'], signed=True)}); "
                f"estimate vs exact Pearson {num(summary['agreement']['pearson'], 3)} ({n})")
    e, c = summary["effect"], summary["controls"]
    text = (f"zero-ablating features {', '.join(map(str, summary['features']))} changes the {summary['metric']} by "
            f"{num(e['mean'], signed=True)}{ci(e, signed=True)}")
    if c["n"]:
        text += f" ({c['n']} random active sets: {num(c['low'], signed=True)} to {num(c['high'], signed=True)})"
    return text + f"; top-1 changed on {num(summary['top1_changed'])} of {n}"

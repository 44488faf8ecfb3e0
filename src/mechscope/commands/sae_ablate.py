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
most; the control zeroes --controls random sets of as many features active on these prompts.

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
    parser.add_argument("--positions", default="all", help="all, last, or comma-separated positions (default: %(default)s)")
    parser.add_argument("--controls", type=int, default=8, help="random feature sets for the control (default: %(default)s)")
    parser.add_argument("--top", type=int, default=10, help="attribution: pairs checked exactly (default: %(default)s)")


def _prompts(ctx):
    """(tokens [n, seq], answer ids [n], wrong ids [n] or None, prompts)."""
    import torch

    from mechscope import inputs
    from mechscope.errors import BadInput
    from mechscope.toy import corpus

    args, engine = ctx.args, ctx.engine
    if args.prompt:
        if not args.answer:
            raise BadInput("--prompt needs --answer (the expected next token)")
        prompts, answers, wrongs = args.prompt, args.answer, args.wrong
    else:
        prompts = [f"the capital of {c} is" for c in corpus.CAPITALS]
        answers = list(corpus.CAPITALS.values())
        wrongs = args.wrong or answers[1:] + answers[:1]          # another country's capital
    n = len(prompts)

    def per_prompt(words, flag):
        if len(words) not in (1, n):
            raise BadInput(f"give one --{flag} for all prompts or one per prompt ({n} prompts, {len(words)} given)")
        ids = [inputs.single_token(engine, w) for w in words]
        return torch.tensor(ids * n if len(ids) == 1 else ids)
    tokens = inputs.token_batch(engine, prompts).to(engine.cfg.device)
    return tokens, per_prompt(answers, "answer"), per_prompt(wrongs, "wrong") if wrongs else None, prompts


def make_metric(answer, wrong):
    """logits [batch, seq, d_vocab] -> [batch] at the last position: logit diff, or the answer's log-probability.
    answer / wrong: [n] ids; a batch of several copies of the n prompts is matched copy by copy."""
    import torch

    def metric(logits):
        last = logits[:, -1].float()
        reps = len(last) // len(answer)
        a = answer.repeat(reps).to(last.device)
        rows = torch.arange(len(last), device=last.device)
        if wrong is None:
            return last.log_softmax(-1)[rows, a]
        return last[rows, a] - last[rows, wrong.repeat(reps).to(last.device)]
    return metric


def _positions(spec: str, seq: int):
    import torch

    from mechscope.errors import BadInput

    if spec == "all":
        return None
    if spec == "last":
        picks = [seq - 1]
    else:
        try:
            picks = [int(s) for s in spec.split(",") if s.strip()]
        except ValueError:
            raise BadInput(f"--positions {spec!r}: write all, last, or comma-separated indices") from None
    if not picks or any(not -seq <= p < seq for p in picks):
        raise BadInput(f"--positions must be in {-seq}..{seq - 1} (the prompts have {seq} tokens)")
    mask = torch.zeros(seq, dtype=torch.bool)
    mask[[p % seq for p in picks]] = True
    return mask


def run(ctx):
    from mechscope.commands.sae_eval import load_checked_sae
    from mechscope.errors import BadInput
    from mechscope.techniques import sae as saes

    args = ctx.args
    if not 0 <= args.controls <= 100 or not 1 <= args.top <= 1000:
        raise BadInput("--controls must be in 0..100 and --top in 1..1000")
    sae = load_checked_sae(ctx)
    tokens, answer, wrong, prompts = _prompts(ctx)
    metric = make_metric(answer, wrong)
    label = "logit diff (answer - wrong)" if wrong is not None else "log P(answer)"
    if args.features:
        features = saes.parse_features(args.features, sae, saes.named_features(args.sae))
        return _ablation(ctx, sae, tokens, metric, label, features, _positions(args.positions, tokens.shape[1]), prompts)
    return _attribution(ctx, sae, tokens, metric, label, prompts)


def _ablation(ctx, sae, tokens, metric, label, features, positions, prompts):
    import torch

    from mechscope import plotting
    from mechscope.techniques import sae as saes
    from mechscope.techniques import sae_interventions as si

    engine, args = ctx.engine, ctx.args
    hook = sae.cfg.metadata.hook_name
    clean, ablated = si.ablate(engine, sae, tokens, metric, features, positions)
    effect = ablated - clean
    with torch.no_grad():
        base = engine.run(tokens)[0][:, -1].float()
        after = engine.run(tokens, edits=[(hook, saes.splice(sae, tokens, engine, edit=si.zero_features(features, positions)))])[0][:, -1].float()
        acts = saes.feature_acts(engine, sae, tokens)
    flipped = (base.argmax(-1) != after.argmax(-1)).float().mean()
    gain = (after.log_softmax(-1) - base.log_softmax(-1)).mean(0)
    gainers = [(engine.to_single_str_token(int(i)), round(float(gain[i]), 4)) for i in gain.topk(8).indices]
    losers = [(engine.to_single_str_token(int(i)), round(float(gain[i]), 4)) for i in gain.topk(8, largest=False).indices]
    scope = acts if positions is None else acts[:, positions.to(acts.device)]
    control_sets = si.random_active_sets(scope, len(features), args.controls, features, seed=args.seed)
    control_means = [float((si.ablate(engine, sae, tokens, metric, s, positions)[1] - clean).mean()) for s in control_sets]
    stats = si.summary(effect, args.seed)
    active = float((scope[..., torch.tensor(features, device=scope.device)] > 0).any(-1).any(-1).float().mean())
    with open(ctx.run_dir / "ablation.csv", "w") as f:
        f.write("prompt,clean,ablated,effect\n")
        f.writelines(f"\"{p}\",{c:.6g},{a:.6g},{e:.6g}\n" for p, c, a, e in zip(prompts, clean, ablated, effect))
    plot = plotting.bars([stats["mean"]] + control_means, [f"features {','.join(map(str, features))}"] +
                         [f"control {i}" for i in range(len(control_means))], ctx.run_dir / "ablation.png",
                         title=f"zero-ablating SAE features at {hook} (error term kept)", xlabel=f"mean change in {label}")
    summary = {"sae": saes.describe(sae), "features": features, "positions": ctx.args.positions, "metric": label,
               "n_prompts": len(prompts), "clean_mean": round(float(clean.mean()), 4), "effect": stats,
               "prompts_with_feature_active": round(active, 4), "top1_changed": round(float(flipped), 4),
               "tokens_gaining": gainers, "tokens_losing": losers,
               "controls": {"n": len(control_means), "mean": float(torch.tensor(control_means).mean()) if control_means else None,
                            "low": min(control_means, default=None), "high": max(control_means, default=None)},
               "files": ["ablation.csv", plot.name]}
    c = summary["controls"]
    text = (f"zero-ablating features {features} at positions {ctx.args.positions} ({hook}, error term kept), "
            f"{len(prompts)} prompts:\n  {label}: {float(clean.mean()):.3f} -> {float(ablated.mean()):.3f}, change "
            f"{stats['mean']:+.3f} [{stats['ci'][0]:+.3f}, {stats['ci'][1]:+.3f}]; top-1 changed on {flipped:.0%}\n"
            + (f"  control ({c['n']} random sets of {len(features)} active features): {c['low']:+.3f} to {c['high']:+.3f}\n"
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

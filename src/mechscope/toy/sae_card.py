"""The measurements behind SAE_CARD.md: the shipped SAE's quality, and its named features with max-activating
examples and causal tests.

    python -m mechscope.toy.sae_card                  # the card's numbers as JSON (stdout)
    python -m mechscope.toy.sae_card --write-names    # find the named features by rule, write features.json

Named features are found by rule, not picked by hand, so a retrained SAE gets them back. A feature is
"pure" for a word group when at least 90% of its 20 largest activations on the corpus are on that group.
- capital_of: the top feature (mean activation) at "of" in the 23 prompts "the capital of X is";
- country: of the features pure for countries, the one active on the most X positions of those prompts;
- person_name: of the features pure for names, the one active on the most name positions (IO, S1, S2) of
  held-out IOI prompts.
Causal tests (error term kept), each against N_CONTROLS controls, stated as empirical p-values
(stats.empirical_p): for steering, features matched to the feature on activation frequency and magnitude on
the corpus and Gaussian directions, both of the feature's norm (p: the larger of the two kinds'); for
ablation, features matched on how often and how strongly they are active at the same positions:
- steering: strength = the feature's largest corpus activation, added at every position of 16 prompts
  without a name or place; measured: the next-token log-probability of the target words (capital_of:
  countries, country: capital cities, person_name: names) and their share of 8 generated tokens;
- ablation: capital_of at "of" in "<a filler sentence> the capital of" (log P(a country next));
  country at X in "the capital of X is" (the answer's logit minus the mean logit); person_name at IO, S1
  and S2 of IOI prompts (the logit difference IO - S).
The tests (tests/test_sae_card.py) assert what these show on the shipped weights.
"""
from __future__ import annotations

import argparse
import json
import random
import sys

import torch

from mechscope.toy import corpus

PURITY = 0.9
N_CONTROLS = 99            # of each kind: an empirical p-value can reach 1/100, enough to survive Holm over the family
FAMILY_LEVEL = 0.05        # the card's significance claims are one family, Holm-adjusted (family-wise error 5%)
WORDS = {"country": list(corpus.CAPITALS), "city": sorted(set(corpus.CAPITALS.values()) | set(corpus.LANDMARKS.values())),
         "person_name": list(corpus.NAMES)}
DESCRIPTIONS = {
    "capital_of": "fires on 'of' after 'capital' (the capital of ...): a country comes next",
    "country": "fires on country tokens in fact sentences (the capital of [norway] is oslo)",
    "person_name": "fires on person names, most at the start of a clause ([adam] gave a phone ...)",
}
TARGETS = {"capital_of": "country", "country": "city", "person_name": "person_name"}   # what steering should raise


def word_ids(engine, group: str) -> list[int]:
    return sorted({int(engine.to_tokens(w, prepend_bos=False)[0, 0]) for w in WORDS[group]})


def steer_prompts(n: int = 16, seed: int = 0) -> list[str]:
    """Prompts without a person or place name, of one length: filler sentences cut before their object."""
    rng = random.Random(seed)
    return [f"the {rng.choice(corpus.FILLER_ADJECTIVES)} {rng.choice(corpus.FILLER_NOUNS)} "
            f"{rng.choice(corpus.FILLER_VERBS)} the" for _ in range(n)]


def filler_sentences(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(corpus.filler_sentence(rng)) for _ in range(n)]


def _share_in(values: torch.Tensor, index: torch.Tensor, flat: torch.Tensor, ids: list[int]) -> float:
    """Share of the entries with values > 0 whose token (flat[index]) is in ids."""
    index = index[values > 0]
    return float(torch.isin(flat[index], torch.tensor(ids)).float().mean()) if len(index) else 0.0


def find_names(engine, sae, search, rows) -> dict[str, int]:
    """{name: feature index} by the rules of the module docstring. search: sae_features.max_activating over all
    features of the corpus rows."""
    from mechscope import tasks
    from mechscope.techniques import sae_features as sf

    flat = rows.reshape(-1)
    pure = {g: [j for j in search.features if _share_in(search.top_values[j], search.top_index[j], flat,
                                                       word_ids(engine, g)) >= PURITY] for g in ("country", "person_name")}
    capitals = [engine.to_tokens(f"the capital of {c} is")[0] for c in corpus.CAPITALS]
    at_of = sf.acts_at(engine, sae, capitals, [3] * len(capitals)).mean(0)
    on_country = (sf.acts_at(engine, sae, capitals, [4] * len(capitals)) > 0).float().mean(0)
    ioi_rows, named = tasks.load_task(engine, "ioi", n=64, seed=0).tokens(engine)
    on_names = sum((sf.acts_at(engine, sae, ioi_rows, named[p].tolist()) > 0).float().mean(0) for p in ("IO", "S1", "S2"))
    most = lambda score, allowed: max(allowed, key=lambda j: (float(score[j]), -j))  # noqa: E731
    return {"capital_of": int(at_of.argmax()), "country": most(on_country, pure["country"]),
            "person_name": most(on_names, pure["person_name"])}


def _examples(engine, sae, rows, search, feature: int, scale: float) -> dict:
    """Max-activating contexts, quantile-band examples and the logit effect of one feature."""
    from mechscope.commands.sae_features import context_text
    from mechscope.techniques import sae_features as sf

    top = search.top_index[feature][search.top_values[feature] > 0]
    flat = rows.reshape(-1)
    up, down = sf.top_tokens(engine, sf.logit_effects(engine, sae, [feature], scale))
    return {"density": float(search.count[feature] / search.n_tokens), "max_activation": float(search.top_values[feature, 0]),
            "top_tokens": [engine.to_single_str_token(int(flat[i])) for i in top],
            "top_contexts": [context_text(c) for c in sf.contexts(engine, sae, rows, feature, top[:6].tolist())],
            "quantile_examples": {b["band"]: [context_text(c) for c in sf.contexts(
                engine, sae, rows, feature, [i for _, i in b["examples"]])] for b in sf.quantile_examples(search, feature, 2)},
            "logit_up": [t for t, _ in up[0]], "logit_down": [t for t, _ in down[0]]}


def _steering(engine, sae, feature: int, strength: float, target: str, profile) -> dict:
    """Steer at 0 and `strength` on steer_prompts(): log P(target words) and their share of generated tokens.
    profile: si.corpus_profile(engine, sae), what the control features are matched on."""
    from mechscope.techniques import sae_interventions as si

    prompts = [engine.to_tokens(p)[0] for p in steer_prompts()]
    sweep = si.steering_sweep(engine, sae, feature, prompts, [0.0, strength], word_ids(engine, target),
                              max_new_tokens=8, n_controls=N_CONTROLS, seed=0, profile=profile)
    (base, steered), controls = sweep.effects, sweep.controls[1]
    return {"strength": strength, "target": target, "n_prompts": len(prompts),
            "log_mass": [base["log_mass"]["mean"], steered["log_mass"]["mean"]],
            "log_mass_ci": [steered["log_mass"]["ci_low"], steered["log_mass"]["ci_high"]],
            "share": [base["share"]["mean"], steered["share"]["mean"]],
            "controls_log_mass_max": {k: controls[k]["log_mass"]["high"] for k in si.CONTROL_KINDS},
            "controls_share_max": {k: controls[k]["share"]["high"] for k in si.CONTROL_KINDS},
            "n_controls": N_CONTROLS,
            "p_log_mass": max(controls[k]["log_mass"]["p_value"] for k in si.CONTROL_KINDS),
            "p_log_mass_by_kind": {k: controls[k]["log_mass"]["p_value"] for k in si.CONTROL_KINDS},
            "p_share": max(controls[k]["share"]["p_value"] for k in si.CONTROL_KINDS),
            "fluency_cost": [base["fluency_cost"]["mean"], steered["fluency_cost"]["mean"]]}


def _ablation(engine, sae, feature: int, tokens, mask, metric, what: str) -> dict:
    """Zero-ablate the feature at mask [n, seq] (error term kept), and N_CONTROLS features matched to it on
    how often and how strongly they are active there; p: empirical p-value of |effect| against theirs."""
    from mechscope import stats
    from mechscope.techniques import sae as saes
    from mechscope.techniques import sae_interventions as si

    clean, ablated = si.ablate(engine, sae, tokens, metric, [feature], mask)
    scope = saes.feature_acts(engine, sae, tokens) * mask.to(tokens.device)[..., None]
    sets = si.matched_sets(*si.feature_profile(scope), [feature], N_CONTROLS, seed=0)
    controls = [float((si.ablate(engine, sae, tokens, metric, s, mask)[1] - clean).mean()) for s in sets]
    effect = stats.summary(ablated - clean)
    return {"metric": what, "n_prompts": len(tokens), "clean": float(clean.mean()), "effect": effect,
            "p_effect": float(stats.p_value(ablated - clean)),
            "controls": controls, "p_value": stats.empirical_p(effect["mean"], controls)}


def _ablation_tests(engine, sae, names: dict[str, int]) -> dict[str, dict]:
    """The three ablations of the module docstring."""
    from mechscope import tasks
    from mechscope.commands.sae_ablate import make_metric

    ids = lambda words: torch.tensor([int(engine.to_tokens(w, prepend_bos=False)[0, 0]) for w in words])  # noqa: E731
    out = {}
    # capital_of at "of": is a country predicted next?
    rows = [engine.to_tokens(f"{s} the capital of")[0] for s in filler_sentences(32)]
    tokens, last = tasks.padded(engine, rows)[0], torch.tensor([len(r) - 1 for r in rows])
    countries = torch.tensor(word_ids(engine, "country"))
    at = lambda logits: logits[torch.arange(len(logits)), last.repeat(len(logits) // len(last))].float()  # noqa: E731
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[torch.arange(len(tokens)), last] = True
    out["capital_of"] = _ablation(engine, sae, names["capital_of"], tokens, mask,
                                  lambda lg: at(lg).log_softmax(-1)[:, countries].logsumexp(-1), "log P(country next)")
    # country at X: the answer's logit against the others
    tokens = torch.cat([engine.to_tokens(f"the capital of {c} is") for c in corpus.CAPITALS])
    answers = ids(corpus.CAPITALS.values())
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[:, 4] = True

    def answer_logit(logits):
        lg = logits[:, -1].float()
        return lg[torch.arange(len(lg)), answers.repeat(len(lg) // len(answers))] - lg.mean(-1)
    out["country"] = _ablation(engine, sae, names["country"], tokens, mask, answer_logit, "answer logit - mean logit")
    # person_name at IO, S1, S2: the IOI logit difference
    prompt_set = tasks.load_task(engine, "ioi", n=64, seed=1)
    rows, named = prompt_set.tokens(engine)
    tokens = tasks.padded(engine, rows)[0]
    metric = make_metric(ids([p.answer for p in prompt_set.prompts]), ids([p.wrong for p in prompt_set.prompts]),
                         named[tasks.END])
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    for p in ("IO", "S1", "S2"):
        mask[torch.arange(len(tokens)), named[p]] = True
    out["person_name"] = _ablation(engine, sae, names["person_name"], tokens, mask, metric, "IOI logit diff (IO - S)")
    return out


def measure(engine=None, sae=None, n_search_tokens: int = 200_000, n_eval_tokens: int = 100_000,
            names: dict[str, int] | None = None, claims_only: bool = False) -> dict:
    """The card: evaluation, the rule-found names, and for each named feature (`names`, default: the rule's)
    its examples, purity, logit effect and causal tests; claims_only: just what `claims` reads (no examples,
    no steering of `country`), for the slow retrain test."""
    from mechscope.models import load_model
    from mechscope.techniques import sae as saes
    from mechscope.techniques import sae_features as sf
    from mechscope.techniques import sae_training

    engine = engine or load_model("mechscope-toy", backend="tl", device="cpu")
    sae = sae or saes.load_sae(saes.SHIPPED_RELEASE)
    saes.check_fits(sae, engine)
    from mechscope.commands.sae_eval import HELD_OUT_SEED, TRAINING_TOKENS

    held_out = saes.corpus_rows(engine, n_eval_tokens, 64, seed=HELD_OUT_SEED,   # no sentence of the training text
                                exclude=saes.training_sentences(TRAINING_TOKENS, 64, seed=0))
    quality = sae_training.evaluate(engine, sae, held_out)
    rows = saes.corpus_rows(engine, n_search_tokens, 64, seed=1001)
    search = sf.max_activating(engine, sae, rows, None, k=20)
    found = find_names(engine, sae, search, rows)
    names = names or found
    scale = None if claims_only else sf.final_scale(engine, rows)
    from mechscope.techniques import sae_interventions as si

    profile = si.corpus_profile(engine, sae)
    capital = int(engine.to_tokens("capital", prepend_bos=False)[0, 0])
    features = {}
    for name, feature in names.items():
        if claims_only:
            features[name] = {"feature": feature}
            if name != "country":
                features[name]["steering"] = _steering(engine, sae, feature, float(round(float(
                    search.top_values[feature, 0]))), TARGETS[name], profile)
            continue
        entry = {"feature": feature, "description": DESCRIPTIONS[name], **_examples(engine, sae, rows, search, feature, scale)}
        top = search.top_index[feature][search.top_values[feature] > 0]
        if name == "capital_of":
            entry["top20_after_capital"] = float((rows.reshape(-1)[top - 1] == capital).float().mean())
        else:
            group = word_ids(engine, name)
            entry["top20_purity"] = _share_in(search.top_values[feature], search.top_index[feature], rows.reshape(-1), group)
            entry["sample_purity"] = _share_in(search.sample_values[feature], search.sample_index[feature],
                                               rows.reshape(-1), group)
        entry["steering"] = _steering(engine, sae, feature, float(round(entry["max_activation"])), TARGETS[name], profile)
        features[name] = entry
    for name, result in _ablation_tests(engine, sae, names).items():
        features[name]["ablation"] = result
    return {"sae": saes.describe(sae), "evaluation": {k: v for k, v in vars(quality).items() if k != "density"},
            "n_search_tokens": search.n_tokens, "names": names, "names_found_by_rule": found, "features": features}


def significance_family(card: dict) -> dict[str, dict]:
    """The card's significance claims as one family: {claim: {"p", "p_holm"}}, Holm-adjusted (stats.adjust), so
    that all of them hold together at family-wise error FAMILY_LEVEL. Steering p-values are empirical, against
    N_CONTROLS matched features and N_CONTROLS Gaussian directions (the larger of the two, unless a kind is
    named); ablation p-values are Student t on the per-prompt changes (stats.p_value)."""
    from mechscope import stats

    f = card["features"]
    p = {"capital_of steering: countries' share of generated tokens beyond every kind of control":
         f["capital_of"]["steering"]["p_share"],
         "capital_of ablation at 'of': log P(country next) falls": f["capital_of"]["ablation"]["p_effect"],
         "country ablation at X: the answer's logit falls": f["country"]["ablation"]["p_effect"],
         "person_name steering: log P(name) beyond Gaussian directions":
         f["person_name"]["steering"]["p_log_mass_by_kind"]["random_direction"]}
    adjusted = stats.adjust(torch.tensor(list(p.values()), dtype=torch.float64), "holm").tolist()
    return {claim: {"p": p[claim], "p_holm": a} for claim, a in zip(p, adjusted)}


def claims(card: dict) -> dict[str, bool]:
    """The claims SAE_CARD.md asserts, checked on a measure() result (the shipped SAE, or a retrain: the slow test
    retrains with seeds 0 and 1): quality and effect sizes by threshold, significance through
    significance_family (Holm-adjusted p < FAMILY_LEVEL, with the sign the claim states)."""
    q, f = card["evaluation"], card["features"]
    cap, person = f["capital_of"], f["person_name"]
    gain = lambda st: st["log_mass"][1] - st["log_mass"][0]  # noqa: E731
    out = {
        "quality: L0 8, explained variance > 0.88, CE loss recovered > 97%, dead < 10%":
            q["l0"] == 8 and q["explained_variance"] > 0.88 and q["ce_recovered"] > 0.97 and q["dead_fraction"] < 0.1,
        "capital_of steering: log P(country) up > 4 nats": gain(cap["steering"]) > 4,
        "capital_of steering: countries > 20% of generated tokens": cap["steering"]["share"][1] > 0.2,
        "person_name steering: log P(name) up > 3 nats": gain(person["steering"]) > 3,
    }
    signs = {"capital_of ablation at 'of': log P(country next) falls": cap["ablation"]["effect"]["mean"] < 0,
             "country ablation at X: the answer's logit falls": f["country"]["ablation"]["effect"]["mean"] < 0}
    for claim, p in significance_family(card).items():
        out[f"{claim} (Holm-adjusted p < {FAMILY_LEVEL})"] = p["p_holm"] < FAMILY_LEVEL and signs.get(claim, True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-names", action="store_true", help="write the rule-found names to features.json")
    args = parser.parse_args(argv)
    from mechscope.techniques import sae as saes

    shipped = {k: int(v["feature"]) for k, v in saes.named_features(saes.SHIPPED_RELEASE).items()}
    card = measure(names=None if args.write_names else shipped or None)
    if args.write_names:
        out = {name: {"feature": feature, "description": DESCRIPTIONS[name], "steer_prompts": steer_prompts(),
                      "strengths": [0, card["features"][name]["steering"]["strength"]],
                      "target_words": WORDS[TARGETS[name]]}
               for name, feature in card["names_found_by_rule"].items()}
        path = saes.shipped_saes()[saes.DEFAULT_SHIPPED_ID] / "features.json"
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    card["significance_family"] = significance_family(card)
    card["claims"] = claims(card)
    print(json.dumps(card, indent=1))


if __name__ == "__main__":
    main()

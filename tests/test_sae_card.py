"""The shipped SAE (SAE_CARD.md) on the shipped weights: its quality, its named features (found again by rule),
their max-activating examples, and the causal tests the card reports."""
import pytest

from mechscope.techniques import sae as saes
from mechscope.techniques import sae_features as sf
from mechscope.toy import sae_card as card


@pytest.fixture(scope="module")
def shipped():
    return saes.load_sae("mechscope-toy")


@pytest.fixture(scope="module")
def names():
    return {k: int(v["feature"]) for k, v in saes.named_features("mechscope-toy").items()}


@pytest.fixture(scope="module")
def search(toy_engine, shipped):
    rows = saes.corpus_rows(toy_engine, 60_000, 64, seed=1001)
    return rows, sf.max_activating(toy_engine, shipped, rows, None, k=20)


def test_shipped_sae_fits_the_bundled_model_and_is_described_right(toy_engine, shipped):
    saes.check_fits(shipped, toy_engine)
    meta = shipped.cfg.metadata
    assert (shipped.cfg.architecture(), shipped.cfg.d_sae, shipped.cfg.k) == ("topk", 256, 8)
    assert meta.model_from_pretrained_kwargs == saes.weight_processing(toy_engine)
    assert meta.prepend_bos and meta.context_size == 64 and meta.hook_name == "blocks.1.hook_resid_pre"


def test_shipped_sae_quality(toy_engine, shipped):
    """SAE_CARD.md: explained variance 0.911, CE loss recovered 98.9% on 100k held-out tokens; measured here on
    10k tokens of the same held-out text (no sentence of the training text), with thresholds that leave room
    for a retrain."""
    from mechscope.commands.sae_eval import TRAINING_TOKENS
    from mechscope.techniques import sae_training

    training = saes.training_sentences(TRAINING_TOKENS, 64, seed=0)
    rows = saes.corpus_rows(toy_engine, 10_000, 64, seed=1000, exclude=training)
    q = sae_training.evaluate(toy_engine, shipped, rows)
    assert q.l0 == pytest.approx(8.0)
    assert q.explained_variance > 0.88 and q.ce_recovered > 0.97 and q.dead_fraction < 0.1


def test_named_features_are_found_again_by_rule(toy_engine, shipped, names, search):
    rows, result = search
    assert card.find_names(toy_engine, shipped, result, rows) == names


def test_named_features_max_activating_examples(toy_engine, names, search):
    rows, result = search
    flat = rows.reshape(-1)
    for name in ("country", "person_name"):
        j = names[name]
        assert card._share_in(result.top_values[j], result.top_index[j], flat, card.word_ids(toy_engine, name)) >= 0.9
        assert card._share_in(result.sample_values[j], result.sample_index[j], flat,
                              card.word_ids(toy_engine, name)) > 0.25        # well above chance (~0.03 / 0.1)
    top = result.top_index[names["capital_of"]]
    capital, of = (int(toy_engine.to_tokens(w, prepend_bos=False)[0, 0]) for w in ("capital", "of"))
    assert (flat[top] == of).all() and (flat[top - 1] == capital).float().mean() >= 0.9


@pytest.fixture(scope="module")
def profile(toy_engine, shipped):
    from mechscope.techniques import sae_interventions as si

    return si.corpus_profile(toy_engine, shipped)


def test_capital_of_feature_predicts_a_country(toy_engine, shipped, names, profile):
    """Steered into unrelated text it makes countries likely: their share of the generated text beats all
    N_CONTROLS matched features and N_CONTROLS Gaussian directions (p = 1/(N_CONTROLS + 1)), but its log
    P(country) does not beat every matched feature (issue 17 found a retrain where the old "CI above every
    control" failed; a matched feature that also promotes countries is a fair control). Ablated at 'of' it
    makes a country next less likely (t-test p tiny), beyond every matched feature active there (12 of them:
    p = 1/13, the least possible: described in the card, not claimed)."""
    effects = sf.logit_effects(toy_engine, shipped, [names["capital_of"]], 1.0)
    up, _ = sf.top_tokens(toy_engine, effects)
    assert sum(t in card.WORDS["country"] for t, _ in up[0]) >= 6
    steer = card._steering(toy_engine, shipped, names["capital_of"], 20.0, "country", profile)
    assert steer["log_mass"][1] - steer["log_mass"][0] > 4
    assert steer["share"][1] > 0.2 and steer["p_share"] == pytest.approx(1 / (card.N_CONTROLS + 1))
    assert steer["p_log_mass"] > 1 / (card.N_CONTROLS + 1)   # some matched features reach it: not claimed
    ablation = card._ablation_tests(toy_engine, shipped, names)
    cap = ablation["capital_of"]
    assert cap["effect"]["ci_high"] < 0 and cap["p_effect"] < 1e-6
    assert cap["p_value"] == pytest.approx(1 / (len(cap["controls"]) + 1))
    # country: the answer's logit drops when it is ablated at X (significant), but it is not the main carrier
    assert ablation["country"]["effect"]["ci_high"] < 0 and ablation["country"]["p_value"] > 0.05


def test_person_name_feature_makes_names_likely(toy_engine, shipped, names, profile):
    steer = card._steering(toy_engine, shipped, names["person_name"], 12.0, "person_name", profile)
    assert steer["log_mass"][1] - steer["log_mass"][0] > 3
    assert steer["p_log_mass_by_kind"]["random_direction"] == pytest.approx(1 / (card.N_CONTROLS + 1))


def test_the_card_claims_are_one_holm_family():
    """Issue 17: the card's significance claims hold together (Holm over the family), not each on its own. A
    family of four claims at p = 1/33 each (32 controls, the card before) fails it; p = 1/100 each passes."""
    def fake(p_steer, p_ablate):
        steering = {"log_mass": [-9.0, -2.0], "share": [0.0, 0.5], "p_share": p_steer,
                    "p_log_mass_by_kind": {"random_direction": p_steer}}
        ablation = {"effect": {"mean": -0.1, "ci_high": -0.05}, "p_effect": p_ablate}
        return {"evaluation": {"l0": 8, "explained_variance": 0.9, "ce_recovered": 0.99, "dead_fraction": 0.02},
                "features": {"capital_of": {"steering": steering, "ablation": ablation},
                             "country": {"ablation": ablation}, "person_name": {"steering": steering}}}
    assert not all(card.claims(fake(1 / 33, 1e-4)).values())
    family = card.significance_family(fake(1 / 33, 1e-4))
    assert sorted(round(f["p_holm"], 4) for f in family.values()) == [0.0004, 0.0004, 0.0606, 0.0606]
    assert all(card.claims(fake(1 / 100, 1e-4)).values())


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_every_card_claim_survives_a_retrain(toy_engine, seed, tmp_path):
    """Issue 17: retrain the card's SAE (make sae's settings, the card's 1M training tokens; seed 1 also draws
    another corpus) and check every claim SAE_CARD.md asserts (card.claims: the Holm family and the effect
    sizes) on the rule-found features, with the card's 99 controls of each kind. Measured on 2026-12-07: every
    claim holds on both seeds; both seeds together 236 s on the 2-core machine while the default suite ran
    beside them."""
    from mechscope.techniques import sae_training

    rows = saes.corpus_rows(toy_engine, 1_000_000, 64, seed=seed)
    sae, _ = sae_training.train_on_model(toy_engine, "blocks.1.hook_resid_pre", rows, tmp_path / "sae", "topk", 256, 8,
                                         1_000_000, 4096, None, seed,
                                         dataset_name=f"mechscope-toy corpus (seed {seed}, 1000000 tokens)")
    result = card.measure(toy_engine, sae, n_search_tokens=60_000, n_eval_tokens=20_000, claims_only=True)
    failed = [claim for claim, holds in card.claims(result).items() if not holds]
    assert not failed, (failed, {k: v.get("steering") for k, v in result["features"].items()})


@pytest.mark.slow
def test_the_card_command_reproduces_the_card():
    """`python -m mechscope.toy.sae_card` measures every number of SAE_CARD.md (about 2 minutes)."""
    result = card.measure()
    assert result["names"] == result["names_found_by_rule"] and all(card.claims(result).values())
    assert result["evaluation"]["explained_variance"] > 0.9 and result["evaluation"]["ce_recovered"] > 0.98
    assert result["features"]["capital_of"]["steering"]["share"][1] > 0.3

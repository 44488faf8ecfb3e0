"""Activation addition: a sentiment vector built from training openers turns the bundled model's held-out
negative prompts positive, beyond every one of 10 same-norm random directions; strength 0 changes nothing;
the KV cache changes nothing; batching (directions, strengths, prompts) changes nothing; the side-effect loss
at strength 0 is the model's own loss; the `steer` command, its files and its bad inputs."""
import json
import re

import pytest
import torch
import torch.nn.functional as F

from mechscope import tasks
from mechscope.cli import main
from mechscope.commands import steer as steer_command
from mechscope.techniques import steering
from mechscope.toy import corpus

LAYER = 1


@pytest.fixture
def engine(toy_on):
    """mechscope-toy on each engine (conftest's toy_on: loaded once per session)."""
    return toy_on


@pytest.fixture(scope="module")
def split(toy_engine):
    return steer_command.sentiment_split(toy_engine, seed=0)


@pytest.fixture(scope="module")
def sentiment_vector(toy_engine, split):
    positive, negative, _, _ = split
    return steering.mean_difference(toy_engine, [toy_engine.to_tokens(p)[0] for p in positive],
                                    [toy_engine.to_tokens(p)[0] for p in negative], LAYER)


@pytest.fixture(scope="module")
def held_out_rows(toy_engine, split):
    return [toy_engine.to_tokens(p)[0] for p in split[2]]


@pytest.fixture(scope="module")
def word_ids(toy_engine):
    return ([toy_engine.to_tokens(w, prepend_bos=False)[0, 0].item() for w in corpus.POSITIVE_WORDS],
            [toy_engine.to_tokens(w, prepend_bos=False)[0, 0].item() for w in corpus.NEGATIVE_WORDS])


@pytest.fixture(scope="module")
def negative_batch(held_out_rows):
    """The held-out negative prompts of the most common length, as one [n, seq] batch."""
    lengths = [len(r) for r in held_out_rows]
    common = max(set(lengths), key=lengths.count)
    return torch.stack([r for r in held_out_rows if len(r) == common])


def test_contrast_openers_never_appear_in_the_steered_prompts(split):
    """Issue 8: the old default built the vector from "i love this !" - "i hate this !" and steered
    "i hate this ! it ' s ...": the test prompts contained the contrast prompt."""
    positive, negative, test, rule = split
    assert len(positive) >= 2 and len(negative) >= 2 and len(test) >= 6
    assert not any(opener in prompt for opener in positive + negative for prompt in test)
    assert all(any(prompt.startswith(o) for o in corpus.NEGATIVE_OPENERS) for prompt in test)
    assert "held-out openers" in rule


def test_sentiment_vector_beats_every_random_direction_on_held_out_prompts(toy_engine, sentiment_vector,
                                                                          held_out_rows, word_ids):
    """Model card: negative openers continue with negative words (1.00). The training openers' vector makes the
    held-out negative prompts' next word positive (logit diff > 0 at strength 4, measured +6.4) beyond each of
    10 same-norm random directions (measured max -1.4, z 5.6), and generates positive words."""
    sweep = steering.steering_sweep(toy_engine, held_out_rows, LAYER, sentiment_vector, [0, 4], *word_ids,
                                    max_new_tokens=6, n_random=10, seed=0)
    assert sweep.logit_diff.shape == (11, 2, len(held_out_rows))
    assert float(sweep.logit_diff[0, 0].max()) < 0                    # unsteered: every prompt leans negative
    assert float(sweep.pooled_positive_share()[0, 0]) == 0.0
    four = sweep.placement("logit_diff")[1]
    assert float(sweep.logit_diff[0, 1].mean()) > 0 and four["beats"] == 1.0 and four["z"] > 3, four
    assert float(sweep.net_rate[0, 1].nanmean()) > sweep.placement("net_rate")[1]["random_max"]
    assert float(sweep.net_rate[0, 1].nanmean()) > 0 > float(sweep.net_rate[0, 0].nanmean())


def test_rates_do_not_saturate_where_the_share_does():
    """Issue 8: 5 positive words among 300 generated tokens read 1.00 as a share; the rate per token reads 5/300."""
    counts = lambda x: torch.tensor(x, dtype=torch.float).view(1, 1, -1)  # noqa: E731
    sweep = steering.SteeringSweep([4.0], 1.0, logit_diff=counts([0.0]), positive_words=counts([5.0]),
                                   negative_words=counts([0.0]), generated=counts([300.0]), lm_loss=counts([0.0]))
    assert float(sweep.positive_share) == 1.0 and float(sweep.pooled_positive_share()) == 1.0
    assert float(sweep.positive_rate) == pytest.approx(5 / 300) and float(sweep.net_rate) == pytest.approx(5 / 300)


def test_a_generation_without_sentiment_words_has_no_share():
    """Issue 19's dry run: in bfloat16 steer's generations held no sentiment word at all, and the pooled positive
    share read 0.0 (all negative) where float32's one positive word read 1.0; with no words there is no share."""
    counts = lambda x: torch.tensor(x, dtype=torch.float).view(1, 1, -1)  # noqa: E731
    sweep = steering.SteeringSweep([4.0], 1.0, logit_diff=counts([0.0, 0.0]), positive_words=counts([0.0, 0.0]),
                                   negative_words=counts([0.0, 0.0]), generated=counts([6.0, 6.0]),
                                   lm_loss=counts([0.0, 0.0]))
    assert torch.isnan(sweep.pooled_positive_share()).all() and torch.isnan(sweep.positive_share).all()
    assert float(sweep.net_rate.nanmean()) == 0.0


def test_strength_zero_reproduces_the_unsteered_generation(engine, sentiment_vector, negative_batch):
    plain = engine.generate(negative_batch, max_new_tokens=8)
    steered = steering.generate(engine, negative_batch, LAYER, 0 * sentiment_vector, max_new_tokens=8)
    assert torch.equal(plain, steered)
    assert not torch.equal(plain, steering.generate(engine, negative_batch, LAYER, 4 * sentiment_vector, 8))


@pytest.mark.parametrize("from_position", [0, 1, 5])
def test_kv_cache_and_no_cache_generate_the_same_steered_tokens(engine, sentiment_vector, negative_batch,
                                                                from_position):
    per_row = torch.stack([s * sentiment_vector for s in torch.linspace(0, 8, len(negative_batch))])
    for vector in (4 * sentiment_vector, per_row):
        with_cache = steering.generate(engine, negative_batch, LAYER, vector, 8, from_position, True)
        without = steering.generate(engine, negative_batch, LAYER, vector, 8, from_position, False)
        assert torch.equal(with_cache, without)


def test_per_row_vectors_equal_each_row_steered_alone(toy_engine, sentiment_vector, negative_batch):
    strengths = torch.linspace(0, 8, len(negative_batch))
    together = steering.generate(toy_engine, negative_batch, LAYER, strengths[:, None] * sentiment_vector, 8)
    for i, s in enumerate(strengths):
        alone = steering.generate(toy_engine, negative_batch[i:i + 1], LAYER, s * sentiment_vector, 8)
        assert torch.equal(together[i:i + 1], alone), i


def test_a_position_indexing_hook_breaks_under_the_kv_cache(toy_model, sentiment_vector, negative_batch):
    """The pitfall the tests above guard against: `resid[:, 5:] += v` steers no generated token under the cache."""
    def naive(resid, hook):
        resid[:, 5:] += 4 * sentiment_vector
        return resid

    outputs = []
    for cache in (True, False):
        with toy_model.hooks(fwd_hooks=[(steering.hook_name(LAYER), naive)]):
            outputs.append(toy_model.generate(negative_batch, max_new_tokens=8, do_sample=False, verbose=False,
                                              use_past_kv_cache=cache))
    assert not torch.equal(*outputs)


def test_batching_changes_nothing(toy_engine, sentiment_vector, held_out_rows, word_ids):
    """Chunks of 7 rows (directions x strengths x prompts split across forwards and generations) give the numbers of
    one batch; strength 0 computed once is the same for every direction."""
    neutral = [toy_engine.to_tokens(t)[0] for t in ["the old cat sees the dog .", "mary likes to swim in the park ."]]
    kwargs = dict(max_new_tokens=4, n_random=3, seed=1, neutral=neutral)
    a = steering.steering_sweep(toy_engine, held_out_rows[:5], LAYER, sentiment_vector, [0, 3], *word_ids, **kwargs)
    b = steering.steering_sweep(toy_engine, held_out_rows[:5], LAYER, sentiment_vector, [0, 3], *word_ids,
                                batch_size=7, **kwargs)
    for name in ("logit_diff", "positive_words", "negative_words", "generated", "lm_loss"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-4, rtol=1e-4, equal_nan=True)
    assert a.generations == b.generations
    assert torch.equal(a.logit_diff[:, 0], a.logit_diff[:1, 0].expand(4, -1))


def test_side_effect_loss_at_strength_zero_is_the_models_own_loss(toy_model, sentiment_vector):
    """The model's own loss over the predictions steering can change: not the one made from BOS (issue 17: it
    was counted, though steering from position 1 never changes it, diluting the side effect); from position 2
    on with from_position=2."""
    texts = ["the old cat sees the dog . mary likes to swim in the park .", "the quick brown fox jumps over the lazy dog ."]
    rows = [toy_model.to_tokens(t)[0] for t in texts]
    for start in (1, 2):
        mine = steering.lm_loss(toy_model, rows, LAYER, torch.zeros_like(sentiment_vector), from_position=start)
        for i, t in enumerate(texts):
            tokens = toy_model.to_tokens(t)
            with torch.no_grad():
                expected = F.cross_entropy(toy_model(tokens)[0, start:-1], tokens[0, start + 1:])
            assert float(mine[i]) == pytest.approx(float(expected), abs=1e-4)
    # steering from position 1 leaves the prediction made from BOS as it was
    direction = steering.random_direction_like(sentiment_vector, seed=0)
    with torch.no_grad():
        logits = steering.steered_logits(toy_model, rows, LAYER, 8 * direction, 1, last_only=False)
        torch.testing.assert_close(logits[:, 0], toy_model(torch.stack([r[:1] for r in rows]))[:, 0].float())
    # a large random direction costs the language model; the loss grows with the strength
    direction = steering.random_direction_like(sentiment_vector, seed=0)
    losses = [float(steering.lm_loss(toy_model, rows, LAYER, s * direction).mean()) for s in (0, 4, 8)]
    assert losses[0] < losses[1] < losses[2]


def test_mean_difference_matches_the_cache(toy_model):
    pos, neg = toy_model.to_tokens("i love this !"), toy_model.to_tokens("i really dislike this !")
    name = steering.hook_name(LAYER)
    _, c_pos = toy_model.run_with_cache(pos, names_filter=name)
    _, c_neg = toy_model.run_with_cache(neg, names_filter=name)
    last = steering.mean_difference(toy_model, [pos[0]], [neg[0]], LAYER, "last")
    mean = steering.mean_difference(toy_model, [pos[0]], [neg[0]], LAYER, "mean")
    torch.testing.assert_close(last, c_pos[name][0, -1] - c_neg[name][0, -1])
    torch.testing.assert_close(mean, c_pos[name][0, 1:].mean(0) - c_neg[name][0, 1:].mean(0))
    controls = steering.random_directions_like(last, 10, seed=0)
    torch.testing.assert_close(controls.norm(dim=-1), last.norm().expand(10))
    cosines = torch.cosine_similarity(controls, last[None], dim=-1).abs()
    assert float(cosines.max()) < 0.5 and len({tuple(c.tolist()) for c in controls}) == 10


def test_steer_cli_default_has_the_controls_a_careful_researcher_uses(tmp_path, capsys):
    """Issue 8: >= 10 random directions with their spread and the vector's place among them, held-out prompts,
    the side-effect loss at every strength, a per-token rate, intervals; every file the docstring names exists."""
    assert main(["steer", "--strengths", "0,4", "--max-new-tokens", "6", "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    summary = out["summary"]
    run_dir = tmp_path / out["run_dir"].split("/")[-1]
    assert summary["n_random"] >= 10 and summary["held_out"] is True and "held-out openers" in summary["split"]
    zero, four = summary["effects"]
    assert zero["logit_diff"]["mean"] < 0 < four["logit_diff"]["mean"]
    assert four["logit_diff"]["beats"] == 1.0 and four["logit_diff"]["random_std"] > 0
    assert four["logit_diff"]["ci"][0] > four["logit_diff"]["random_max"]
    assert four["net_rate"]["mean"] > 0 and four["net_rate"]["ci"][0] <= four["net_rate"]["mean"]
    assert zero["lm_loss_increase"]["mean"] == pytest.approx(0, abs=1e-6)
    assert four["lm_loss_increase"]["mean"] is not None and four["lm_loss_increase"]["random_mean"] is not None
    named = set(re.findall(r"[\w]+\.(?:png|csv|json)", steer_command.__doc__))
    assert named and named <= {p.name for p in run_dir.iterdir()}, named - {p.name for p in run_dir.iterdir()}
    assert len(out["summary"]["effects"]) == 2 and len(json.dumps(out)) < 20_000


def test_structured_controls_spread_wider_and_the_vector_is_judged_against_them(tmp_path, capsys):
    """Issue 17: differences of mean residuals of random halves of neutral texts (same norm) move the logit diff
    far more than isotropic Gaussians (measured at strength 2, 10 of each: SD 1.27 vs 0.49); steer reports each
    strength against the wider kind, with an empirical p-value (10 controls: at best 1/11)."""
    assert main(["steer", "--strengths", "0,2", "--max-new-tokens", "2", "--out", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["n_random"] == 10 and summary["n_structured"] == 10
    gaussian, structured = (summary["controls_by_kind"][k][1] for k in ("gaussian", "structured"))
    assert structured["random_std"] > 2 * gaussian["random_std"], (structured, gaussian)
    two = summary["effects"][1]["logit_diff"]
    assert two["control"] == "structured" and two["random_std"] == structured["random_std"]
    assert two["p_value"] == pytest.approx(1 / 11, abs=1e-3) and two["z"] < gaussian["z"]


def test_structured_directions_have_the_vectors_norm_and_differ(toy_engine, sentiment_vector):
    neutral = [toy_engine.to_tokens(t)[0] for t in tasks.neutral_texts(toy_engine)]
    d = steering.structured_directions(toy_engine, neutral, LAYER, sentiment_vector, 5, seed=0)
    torch.testing.assert_close(d.norm(dim=-1).cpu(), sentiment_vector.norm().cpu().expand(5))
    assert len({tuple(x.tolist()) for x in d}) == 5
    # one split by hand: the mean residual of one half minus the other's
    residuals = steering.text_residuals(toy_engine, neutral, LAYER, "last")
    order = torch.randperm(len(neutral), generator=torch.Generator().manual_seed(0))
    half = len(neutral) // 2
    by_hand = residuals[order[:half]].mean(0) - residuals[order[half:2 * half]].mean(0)
    torch.testing.assert_close(d[0].cpu(), (by_hand * sentiment_vector.norm().cpu() / by_hand.norm()).cpu())


def test_steer_cli_own_prompts_say_when_they_are_not_held_out(tmp_path, capsys):
    args = ["steer", "--strengths", "0,4", "--max-new-tokens", "4", "--n-random", "10", "--positive", "i love this !",
            "--negative", "i hate this !", "--prompt", "i hate this ! it ' s absolutely", "--prompt",
            "i really dislike this ! it ' s so", "--out", str(tmp_path), "--json"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["held_out"] is False and any("not held out" in n for n in summary["notes"])
    assert summary["effects"][1]["logit_diff"]["beats"] == 1.0


def test_steer_cli_direction_file(tmp_path, capsys, sentiment_vector):
    torch.save(sentiment_vector.cpu(), tmp_path / "v.pt")
    assert main(["steer", "--direction", str(tmp_path / "v.pt"), "--strengths", "4", "--max-new-tokens", "4",
                 "--n-random", "3", "--prompt", "i hate this ! it ' s absolutely", "--out", str(tmp_path), "--json"]) == 0
    effect = json.loads(capsys.readouterr().out)["summary"]["effects"][0]
    assert effect["logit_diff"]["mean"] > 0 and effect["net_rate"]["mean"] > 0


@pytest.mark.parametrize("extra, message", [
    (["--layer", "7"], "out of range"),
    (["--layer", "0", "--positive", "i love this !", "--negative", "i hate this !"], "steering vector is zero"),
    (["--strengths", "a,b"], "--strengths"),
    (["--strengths", "nan,4"], "finite"),
    (["--direction", "missing.pt"], "does not exist"),
    (["--direction", "wrong.pt"], "must be a tensor of shape [128]"),
    (["--direction", "nan.pt"], "non-finite"),
    (["--from-position", "50"], "--from-position"),
    (["--positive-words", "zzz,qqq"], "positive"),
    (["--prompt", ""], "empty"),
    (["--n-random", "-1"], "--n-random"),
    (["--positive", "i love this !"], "both --positive and --negative"),
    (["--prompts", "missing.jsonl"], "does not exist"),
])
def test_steer_bad_inputs(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    torch.save(torch.zeros(3), tmp_path / "wrong.pt")
    torch.save(torch.full((128,), float("nan")), tmp_path / "nan.pt")
    code = main(["steer", *extra, "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_engines_agree_on_the_steering_effect(engine, toy_engine, split, held_out_rows, word_ids):
    """The vector built on each engine (its own residual basis) steers the same tokens and the same logit diffs as
    on the transformer-lens engine, beyond every random direction."""
    positive, negative, _, _ = split
    results = []
    for e in (engine, toy_engine):
        v = steering.mean_difference(e, [e.to_tokens(p)[0] for p in positive], [e.to_tokens(p)[0] for p in negative],
                                     LAYER)
        results.append(steering.steering_sweep(e, held_out_rows, LAYER, v, [0, 4], *word_ids, max_new_tokens=5,
                                               n_random=0, seed=0))
    mine, reference = results
    torch.testing.assert_close(mine.logit_diff, reference.logit_diff, atol=1e-4, rtol=1e-4)
    assert mine.generations == reference.generations
    assert float(mine.logit_diff[0, 1].mean()) > 0 > float(mine.logit_diff[0, 0].mean())

"""Activation addition: the love - hate vector turns the bundled model's negative prompts positive, far
more than a random direction of the same norm; strength 0 changes nothing; the KV cache changes nothing."""
import json

import pytest
import torch

from mechscope.cli import main
from mechscope.techniques import steering
from mechscope.toy import card, corpus

LAYER = 1


@pytest.fixture(scope="module")
def love_hate(toy_model):
    return steering.mean_difference(toy_model, [toy_model.to_tokens("i love this !")[0]],
                                    [toy_model.to_tokens("i hate this !")[0]], LAYER)


@pytest.fixture(scope="module")
def negative_batch(toy_model):
    """The 24 negative sentiment prompts of 9 tokens ("i hate this ! it ' s absolutely", ...)."""
    rows = [toy_model.to_tokens(p)[0] for p in card.sentiment_prompts(positive=False)]
    return torch.stack([r for r in rows if len(r) == 9])


def test_love_hate_vector_turns_negative_prompts_positive(toy_model, love_hate):
    rows = [toy_model.to_tokens(p)[0] for p in card.sentiment_prompts(positive=False)]
    pos = [toy_model.to_single_token(w) for w in corpus.POSITIVE_WORDS]
    neg = [toy_model.to_single_token(w) for w in corpus.NEGATIVE_WORDS]
    result = steering.steering_sweep(toy_model, rows, LAYER, love_hate, [0, 4], pos, neg, max_new_tokens=6)
    assert result.positive_share[0] <= 0.1 and result.logit_diff[0] < 0  # unsteered: negative continuations
    assert result.positive_share[1] >= 0.8 and result.logit_diff[1] > 0
    assert result.positive_share[1] - result.control_positive_share[1] >= 0.6
    assert result.logit_diff[1] - result.control_logit_diff[1] >= 3.0


def test_strength_zero_reproduces_the_unsteered_generation(toy_model, love_hate, negative_batch):
    plain = toy_model.generate(negative_batch, max_new_tokens=8, do_sample=False, verbose=False)
    steered = steering.generate(toy_model, negative_batch, LAYER, 0 * love_hate, max_new_tokens=8)
    assert torch.equal(plain, steered)
    assert not torch.equal(plain, steering.generate(toy_model, negative_batch, LAYER, 4 * love_hate, max_new_tokens=8))


@pytest.mark.parametrize("from_position", [0, 1, 5])
def test_kv_cache_and_no_cache_generate_the_same_steered_tokens(toy_model, love_hate, negative_batch, from_position):
    with_cache = steering.generate(toy_model, negative_batch, LAYER, 4 * love_hate, 8, from_position, True)
    without = steering.generate(toy_model, negative_batch, LAYER, 4 * love_hate, 8, from_position, False)
    assert torch.equal(with_cache, without)


def test_a_position_indexing_hook_breaks_under_the_kv_cache(toy_model, love_hate, negative_batch):
    """The pitfall the test above guards against: `resid[:, 5:] += v` steers no generated token under the cache."""
    def naive(resid, hook):
        resid[:, 5:] += 4 * love_hate
        return resid

    outputs = []
    for cache in (True, False):
        with toy_model.hooks(fwd_hooks=[(steering.hook_name(LAYER), naive)]):
            outputs.append(toy_model.generate(negative_batch, max_new_tokens=8, do_sample=False, verbose=False,
                                              use_past_kv_cache=cache))
    assert not torch.equal(*outputs)


def test_mean_difference_matches_the_cache(toy_model):
    pos, neg = toy_model.to_tokens("i love this !"), toy_model.to_tokens("i really dislike this !")
    name = steering.hook_name(LAYER)
    _, c_pos = toy_model.run_with_cache(pos, names_filter=name)
    _, c_neg = toy_model.run_with_cache(neg, names_filter=name)
    last = steering.mean_difference(toy_model, [pos[0]], [neg[0]], LAYER, "last")
    mean = steering.mean_difference(toy_model, [pos[0]], [neg[0]], LAYER, "mean")
    torch.testing.assert_close(last, c_pos[name][0, -1] - c_neg[name][0, -1])
    torch.testing.assert_close(mean, c_pos[name][0, 1:].mean(0) - c_neg[name][0, 1:].mean(0))
    control = steering.random_direction_like(last, seed=0)
    assert abs(float(control.norm() - last.norm())) < 1e-4 and abs(float(torch.cosine_similarity(control, last, 0))) < 0.5


def test_steer_cli(tmp_path, capsys):
    args = ["steer", "--strengths", "0,4", "--max-new-tokens", "5", "--prompt", "i hate this ! it ' s absolutely",
            "--prompt", "i really dislike this ! it ' s so", "--out", str(tmp_path), "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    run_dir = tmp_path / out["run_dir"].split("/")[-1]
    assert {"steering.csv", "positive_share_vs_strength.png", "logit_diff_vs_strength.png"} <= {
        p.name for p in run_dir.iterdir()}
    zero, four = out["summary"]["effects"]
    assert zero["positive_share"] <= 0.1 and four["positive_share"] >= 0.8
    assert four["logit_diff"] - four["control_logit_diff"] >= 3.0


def test_steer_cli_direction_file(tmp_path, capsys, toy_model, love_hate):
    torch.save(love_hate.cpu(), tmp_path / "v.pt")
    assert main(["steer", "--direction", str(tmp_path / "v.pt"), "--strengths", "4", "--max-new-tokens", "4",
                 "--prompt", "i hate this ! it ' s absolutely", "--out", str(tmp_path), "--json"]) == 0
    effect = json.loads(capsys.readouterr().out)["summary"]["effects"][0]
    assert effect["positive_share"] >= 0.8 and effect["logit_diff"] > 0


@pytest.mark.parametrize("extra, message", [
    (["--layer", "7"], "out of range"),
    (["--layer", "0"], "steering vector is zero"),  # "i love this !" / "i hate this !" both end in "!" at 4
    (["--strengths", "a,b"], "--strengths"),
    (["--direction", "missing.pt"], "does not exist"),
    (["--direction", "wrong.pt"], "must be a tensor of shape [128]"),
    (["--from-position", "50"], "--from-position"),
    (["--positive-words", "zzz,qqq"], "positive"),
    (["--prompt", ""], "empty"),
])
def test_steer_bad_inputs(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    torch.save(torch.zeros(3), tmp_path / "wrong.pt")
    code = main(["steer", *extra, "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err

"""Tuned lens: identity at init (= the logit lens), lower held-out KL than the logit lens at every layer
on the bundled model, final-layer KL 0, deterministic training for a seed, save/load, and the command."""
import json

import pytest
import torch

from mechscope.cli import main
from mechscope.techniques.tuned_lens import TunedLens, corpus_tokens, kl_per_entry, train_tuned_lens
from mechscope.toy.corpus import corpus_text


@pytest.fixture(scope="module")
def corpus(toy_model):
    """(train [rows, 64], held-out [rows, 64]) token ids from different seeds of the generated corpus."""
    return (corpus_tokens(toy_model, " ".join(corpus_text(300, seed=0))),
            corpus_tokens(toy_model, " ".join(corpus_text(100, seed=1000))))


@pytest.fixture(scope="module")
def trained(toy_model, corpus):
    return train_tuned_lens(toy_model, corpus[0], steps=60, lr=1e-2, batch_tokens=256, seed=0)


def test_untrained_translators_are_the_logit_lens(toy_model, corpus):
    n, d = 2 * toy_model.cfg.n_layers, toy_model.cfg.d_model
    identity = TunedLens(labels=[str(i) for i in range(n)], weight=torch.zeros(n, d, d), bias=torch.zeros(n, d))
    held = corpus[1][:4]
    assert torch.allclose(kl_per_entry(toy_model, held, identity), kl_per_entry(toy_model, held), atol=1e-6)


def test_tuned_lens_beats_logit_lens_on_held_out_text(toy_model, corpus, trained):
    """Measured (60 steps on 3.3k tokens, 1.1k held out): KL in nats per entry 0_pre..2_mid, logit lens
    6.12 5.24 1.93 1.48 0.69 0.50, tuned lens 1.30 0.54 0.37 0.18 0.10 0.05; 0 at final_post for both."""
    logit, tuned = kl_per_entry(toy_model, corpus[1]), kl_per_entry(toy_model, corpus[1], trained)
    assert logit[-1] < 1e-5 and tuned[-1] < 1e-5
    assert (tuned[:-1] < 0.6 * logit[:-1]).all()
    assert (logit[:-1] > 0.3).all()                              # the logit lens is far off before the end
    assert trained.losses[-1] < 0.5 * trained.losses[0]


def test_training_is_deterministic_for_a_seed(toy_model, corpus):
    tokens = corpus[0][:8]
    a = train_tuned_lens(toy_model, tokens, steps=5, batch_tokens=64, seed=3)
    b = train_tuned_lens(toy_model, tokens, steps=5, batch_tokens=64, seed=3)
    c = train_tuned_lens(toy_model, tokens, steps=5, batch_tokens=64, seed=4)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias) and a.losses == b.losses
    assert not torch.equal(a.weight, c.weight)


def test_training_leaves_the_model_alone(toy_model, corpus):
    """No gradients accumulate in the (frozen) model and requires_grad flags come back as they were."""
    def state():
        return [(p.requires_grad, None if p.grad is None else p.grad.clone()) for p in toy_model.parameters()]
    before = state()
    train_tuned_lens(toy_model, corpus[0][:4], steps=2, batch_tokens=32)
    after = state()
    assert [f for f, _ in before] == [f for f, _ in after]
    assert all((a is None and b is None) or torch.equal(a, b) for (_, a), (_, b) in zip(before, after))


def test_save_and_load(trained, tmp_path):
    trained.save(tmp_path / "t.safetensors")
    loaded = TunedLens.load(tmp_path / "t.safetensors")
    assert loaded.labels == ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre", "2_mid"]
    assert torch.equal(loaded.weight, trained.weight) and torch.equal(loaded.bias, trained.bias)


def test_tuned_lens_command(tmp_path, capsys):
    assert main(["tuned-lens", "--out", str(tmp_path), "--json", "--sentences", "150", "--steps", "30",
                 "--prompt", "The capital of France is"]) == 0
    out = json.loads(capsys.readouterr().out)
    summary = out["summary"]
    logit, tuned = summary["kl_logit_lens"], summary["kl_tuned_lens"]
    assert logit[-1] < 1e-4 and all(t < l for t, l in zip(tuned[:-1], logit[:-1]))
    assert summary["top1"]["logit lens"]["final_post"] == "paris" == summary["top1"]["tuned lens"]["final_post"]
    run = tmp_path / out["run_dir"].split("/")[-1]
    for name in ("translators.safetensors", "kl.png", "result.json", "meta.json"):
        assert (run / name).exists(), name
    assert TunedLens.load(run / "translators.safetensors").weight.shape == (6, 128, 128)


def test_tuned_lens_command_text_file(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(corpus_text(120, seed=5)))
    assert main(["tuned-lens", "--out", str(tmp_path), "--json", "--text-file", str(text), "--steps", "10"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["held_out_tokens"] > 0 and summary["kl_logit_lens"][-1] < 1e-4


@pytest.mark.parametrize("args,words", [
    (["--text-file", "/nonexistent/x.txt"], "does not exist"),
    (["--steps", "0"], "--steps"),
    (["--seq-len", "4"], "--seq-len"),
    (["--sentences", "5"], "--sentences"),
    (["--sentences", "30", "--seq-len", "128"], "no held-out row"),
])
def test_tuned_lens_bad_input(args, words, tmp_path, capsys):
    assert main(["tuned-lens", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_tuned_lens_text_file_too_short(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("the cat sees the dog .")
    assert main(["tuned-lens", "--out", str(tmp_path), "--text-file", str(short)]) == 2
    err = capsys.readouterr().err
    assert "longer file" in err and len(err.strip().splitlines()) == 1


def test_logit_lens_kl_agrees_across_engines(toy_on, toy_engine, corpus):
    """The same held-out logit-lens KL per entry on every engine: residuals and the read-out come from the
    engine API (transformer-lens centres the residual of LayerNorm models, Hugging Face does not; the final
    LayerNorm removes the difference). Translators are fitted to one engine's basis: train on the engine used."""
    held = corpus[1][:6]
    torch.testing.assert_close(kl_per_entry(toy_on, held), kl_per_entry(toy_engine, held), atol=1e-4, rtol=1e-3)

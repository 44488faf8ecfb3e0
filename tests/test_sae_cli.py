"""The sae-* commands: bad input is one line on stderr with exit 2 (no traceback), and each command writes what it
says on the shipped SAE."""
import json
from pathlib import Path

import pytest

from mechscope.cli import main


@pytest.fixture(scope="module")
def bad_saes(toy_engine, tmp_path_factory):
    """SAE directories that do not fit the bundled model, one way each."""
    from test_sae import random_sae

    root = tmp_path_factory.mktemp("bad_saes")
    cases = {"wide": dict(), "hook": dict(), "model": dict(), "processing": dict()}
    out = {}
    for name in cases:
        sae = random_sae(toy_engine)
        if name == "wide":
            from sae_lens import StandardSAE, StandardSAEConfig
            sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=32, metadata=sae.cfg.metadata))
        elif name == "hook":
            sae.cfg.metadata.hook_name = "blocks.9.hook_resid_pre"
        elif name == "model":
            sae.cfg.metadata.model_name = "gpt2-small"
        else:
            sae.cfg.metadata.model_from_pretrained_kwargs = {"center_writing_weights": False}
        sae.save_model(root / name)
        out[name] = str(root / name)
    return out


def _run(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


BAD = [
    (["sae-eval", "--sae", "/no/such/sae"], "does not exist"),
    (["sae-eval", "--sae", "{wide}"], "d_in = 64"),
    (["sae-eval", "--sae", "{hook}"], "blocks.9.hook_resid_pre"),
    (["sae-eval", "--sae", "{model}"], "trained on 'gpt2-small'"),
    (["sae-eval", "--sae", "{processing}"], "center_writing_weights=False"),
    (["sae-eval", "--sae", "no-such-release:blocks.0.hook_resid_pre"], "unknown SAE"),
    (["sae-eval", "--data", "/no/such/text.txt"], "does not exist"),
    (["sae-eval", "--context", "1"], "--context must be"),
    (["sae-eval", "--n-tokens", "0"], "--n-tokens must be"),
    (["sae-features", "--features", "99999"], "out of range"),
    (["sae-features", "--features", "-1"], "out of range"),
    (["sae-features", "--features", "bogus"], "cannot read feature"),
    (["sae-features", "--window", "3"], "--window"),
    (["sae-features", "--prompt", "the capital of france is", "--position", "40"], "--position 40"),
    (["sae-features", "--prompt", ""], "empty"),
    (["sae-steer", "--feature", "3", "--strengths", "nan,1"], "finite"),
    (["sae-steer", "--feature", "3", "--strengths", "1,inf"], "finite"),
    (["sae-steer", "--feature", "3", "--strengths", "big"], "not a comma-separated"),
    (["sae-steer", "--feature", "3", "--prompt", "the capital of", "--target-words", "notaword"], "not a single token"),
    (["sae-steer", "--feature", "3", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["sae-ablate", "--prompt", "the capital of france is"], "needs --answer"),
    (["sae-ablate", "--features", "3", "--positions", "99"], "--positions must be"),
    (["sae-ablate", "--features", "3", "--positions", "x"], "--positions"),
    (["sae-ablate", "--prompt", "the capital of france is", "--prompt", "the capital of the france is",
      "--answer", "paris"], "one token count"),
    (["sae-train", "--k", "0"], "--k must be"),
    (["sae-train", "--lr", "nan"], "positive finite"),
    (["sae-train", "--l1-coefficient", "inf", "--architecture", "standard"], "positive finite"),
    (["sae-train", "--training-tokens", "10"], "--training-tokens"),
    (["sae-train", "--hook", "blocks.7.hook_resid_pre"], "blocks.7.hook_resid_pre"),
    (["sae-train", "--resume", "/no/such/checkpoint"], "not a checkpoint directory"),
    (["sae-train", "--architecture", "gated"], "invalid choice"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, bad_saes, argv, message):
    argv = [a.format(**bad_saes) for a in argv]
    code, out, err = _run(capsys, argv + ["--out", str(tmp_path)])
    assert code == 2, err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _json(capsys, argv, tmp_path):
    code, out, err = _run(capsys, argv + ["--out", str(tmp_path), "--json"])
    assert code == 0, err
    payload = json.loads(out)
    run_dir = Path(payload["run_dir"])
    assert json.loads((run_dir / "result.json").read_text())  # strict JSON
    assert list(payload)[0] == "headline" and payload["headline"] == payload["summary"]["headline"]
    return payload["summary"], run_dir


def test_sae_eval_command(capsys, tmp_path):
    summary, run_dir = _json(capsys, ["sae-eval", "--n-tokens", "3000"], tmp_path)
    assert summary["l0"] <= summary["sae"]["k"] and summary["explained_variance"] > 0.8
    assert summary["ce_recovered"] > 0.9 and summary["n_tokens"] < 3000          # BOS positions left out
    assert (run_dir / "density_histogram.png").exists() and (run_dir / "density.csv").exists()
    lo, hi = summary["ce_recovered_ci"]
    assert f"recovers {summary['ce_recovered']:.3f} [{lo:.3f}, {hi:.3f}] of the CE loss" in summary["headline"]
    assert f"({summary['n_tokens']} held-out tokens)" in summary["headline"]
    # the loss the SAE costs, in nats, beside the share recovered: ce_recovered = 1 - increase / (zero - clean)
    assert summary["ce_loss_increase"] == pytest.approx(summary["ce_spliced"] - summary["ce_clean"], abs=2e-5)
    assert summary["ce_recovered"] == pytest.approx(
        1 - summary["ce_loss_increase"] / (summary["ce_zero"] - summary["ce_clean"]), abs=1e-4)
    assert summary["ce_loss_increase_ci"][0] <= summary["ce_loss_increase"] <= summary["ce_loss_increase_ci"][1]


def test_sae_train_names_its_two_dead_fractions_apart(capsys, tmp_path):
    """The training window's dead features (sae-lens's mask) and the never-active features on held-out tokens
    are different counts: they once shared the name dead_fraction in one summary."""
    summary, run_dir = _json(capsys, ["sae-train", "--d-sae", "64", "--k", "4", "--training-tokens", "2048",
                                      "--batch-tokens", "512", "--eval-tokens", "1000", "--log-every", "1"], tmp_path)
    assert "dead_fraction" not in summary["final"] and 0 <= summary["final"]["dead_fraction_training_window"] <= 1
    assert "dead_fraction_training_window" not in summary["evaluation"]
    density = [float(line.split(",")[1]) for line in (run_dir / "density.csv").read_text().splitlines()[1:]]
    assert summary["evaluation"]["dead_fraction"] == pytest.approx(sum(d == 0 for d in density) / 64, abs=1e-5)
    assert "dead_fraction_training_window" in (run_dir / "curves.csv").read_text().splitlines()[0].split(",")
    assert "ce_loss_increase" in summary["evaluation"]


def test_sae_features_command_writes_an_offline_page(capsys, tmp_path):
    summary, run_dir = _json(capsys, ["sae-features", "--n-tokens", "5000", "--top", "3"], tmp_path)
    assert summary["top_features"]["tokens_at_position"] == ["france"]
    assert len(summary["features"]) >= 1 and summary["features"][0]["top_contexts"]
    page = (run_dir / "features.html").read_text()
    assert "<script" not in page and "http" not in page.replace("https://neuronpedia.org", "")
    assert page.count("<section") == summary["n_features"]
    top = summary["top_features"]["features"][0]
    assert summary["headline"].startswith(f"feature {top['feature']} is the most active at position "
                                          f"{summary['top_features']['position']}: mean activation {top['mean']:.3f}")


def test_sae_steer_command_defaults_to_a_named_feature(capsys, tmp_path):
    summary, run_dir = _json(capsys, ["sae-steer", "--controls", "2", "--max-new-tokens", "4"], tmp_path)
    assert summary["name"] == "capital_of" and [e["strength"] for e in summary["effects"]] == [0, 20]
    off, on = summary["effects"]
    assert on["log_mass"] > off["log_mass"] + 3 and on["log_mass"] > on["controls_range"]["random_direction"]["log_mass"][1]
    assert (run_dir / "steering.csv").exists() and (run_dir / "log_mass_vs_strength.png").exists()
    lo, hi = on["controls_range"]["random_direction"]["log_mass"]
    assert f"at strength 20 moves log P(target words) to {on['log_mass']:+.2f}" in summary["headline"]
    assert f"random direction: log P {lo:+.2f} to {hi:+.2f}" in summary["headline"]


def test_sae_ablate_command_attribution_and_ablation(capsys, tmp_path):
    summary, run_dir = _json(capsys, ["sae-ablate", "--top", "4"], tmp_path)
    assert len(summary["top"]) == 4 and summary["agreement"]["n"] == 4
    assert all(r["exact"] == r["exact"] for r in summary["top"]) and (run_dir / "attribution.csv").exists()
    assert summary["headline"].startswith(f"feature {summary['top'][0]['feature']} at position "
                                          f"{summary['top'][0]['position']}")
    summary, _ = _json(capsys, ["sae-ablate", "--task", "ioi", "--n", "16", "--features", "person_name",
                                "--positions", "IO,S1,S2", "--controls", "2"], tmp_path)
    assert summary["features"] and summary["n_prompts"] == 16 and summary["controls"]["n"] == 2
    assert summary["effect"]["ci_low"] <= summary["effect"]["mean"] <= summary["effect"]["ci_high"]
    e = summary["effect"]
    assert f"by {e['mean']:+.2f} [{e['ci_low']:+.2f}, {e['ci_high']:+.2f}] (2 random active sets" in summary["headline"]
    assert summary["headline"].endswith("of 16 prompts")


def test_sae_ablate_command_agrees_with_the_technique(capsys, tmp_path, toy_engine):
    """Known answers: the effect equals techniques.sae_interventions.ablate on the same prompts, and the share
    of prompts with the feature active where it is ablated counts prompts (capital_of fires at "of", the last
    token of the second prompt only: 1 of 2; it was computed over all prompts' positions at once, giving 1)."""
    import torch

    from mechscope.commands.sae_ablate import make_metric
    from mechscope.techniques import sae as saes
    from mechscope.techniques import sae_interventions as si

    prompts = ["the capital of france is", "the capital of"]
    argv = ["sae-ablate", "--features", "capital_of", "--positions", "last", "--answer", "paris", "--controls", "0"]
    summary, _ = _json(capsys, argv + [a for p in prompts for a in ("--prompt", p)], tmp_path)
    assert summary["prompts_with_feature_active"] == 0.5
    sae = saes.load_sae("mechscope-toy")
    rows = [toy_engine.to_tokens(p)[0] for p in prompts]
    last = torch.tensor([len(r) - 1 for r in rows])
    tokens = torch.stack([torch.cat([r, r.new_zeros(5 - len(r) + 1)]) for r in rows])  # right-padded
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[torch.arange(2), last] = True
    answer = torch.full((2,), toy_engine.model.to_single_token("paris"))
    clean, ablated = si.ablate(toy_engine, sae, tokens, make_metric(answer, None, last), [237], mask)
    assert summary["effect"]["mean"] == pytest.approx(float((ablated - clean).mean()), abs=1e-4)


def test_sae_eval_text_is_disjoint_from_training_by_sentence(capsys, tmp_path, toy_engine):
    """Issue 17: the bundled corpus is template language, so another seed's sentences recur verbatim in the
    training text (measured 44% against 1M tokens, 28% against 100k). Held-out text now leaves every training
    sentence out, and sae-eval's summary says so."""
    from mechscope.techniques import sae as saes

    training = saes.training_sentences(100_000, 64, seed=0)
    plain, _ = saes._corpus_ids(toy_engine, 5_000, 1000, set())
    held, _ = saes._corpus_ids(toy_engine, 5_000, 1000, training)
    assert sum(s in training for s in plain) / len(plain) > 0.25          # measured 0.28
    assert not set(held) & training and len(held) > 100
    rows, ids = saes.corpus_rows(toy_engine, 5_000, 64, 1000, exclude=training), saes._corpus_ids(toy_engine, 79 * 63, 1000, training)[1]
    assert rows[:, 1:].flatten().tolist() == ids[: rows[:, 1:].numel()]
    summary, _ = _json(capsys, ["sae-eval", "--n-tokens", "2000"], tmp_path)
    assert "disjoint from training by sentence" in summary["held_out"] and "1,000,000 tokens" in summary["held_out"]

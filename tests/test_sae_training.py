"""SAE training (sae-lens's runner) and evaluation: metadata that describes the model, curves, checkpoints and
resuming, recovery of known synthetic features, and evaluation numbers equal to sae-lens's run_evals."""
import json
import types

import pytest
import torch

from mechscope.cli import main
from mechscope.errors import BadInput
from mechscope.techniques import sae as saes
from mechscope.techniques import sae_training as st

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture(scope="module")
def tiny_sae(toy_engine, tmp_path_factory):
    """A TopK SAE trained for a few steps (enough to learn something, not to be good)."""
    rows = saes.corpus_rows(toy_engine, 12_000, 32, seed=0)
    out = tmp_path_factory.mktemp("sae")
    sae, curves = st.train_on_model(toy_engine, HOOK, rows, out, "topk", d_sae=64, sparsity=4, training_tokens=16_384,
                                    batch_tokens=1024, log_every=4)
    return sae, curves, out


def test_saved_metadata_describes_the_model_as_it_was_run(toy_engine, toy_model_unfolded, tiny_sae):
    from mechscope.models import as_engine

    sae, _, out = tiny_sae
    meta = json.loads((out / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == HOOK and meta["model_name"] == "mechscope-toy"
    assert meta["context_size"] == 32 and meta["prepend_bos"] is True and meta["exclude_special_tokens"] is True
    # sae-lens's default {"center_writing_weights": False} would misdescribe the folded model; mechscope never
    # folds value biases (so hook_z equals the output projection's input on every engine)
    assert meta["model_from_pretrained_kwargs"] == {"fold_ln": True, "center_writing_weights": True,
                                                    "center_unembed": True, "fold_value_biases": False}
    assert type(sae).__name__ == "TopKSAE" and sae.cfg.k == 4
    saes.check_fits(sae, toy_engine)
    with pytest.raises(BadInput, match="center_writing_weights"):
        saes.check_fits(sae, as_engine(toy_model_unfolded))


def test_curves_are_recorded_and_training_learns(tiny_sae):
    _, curves, _ = tiny_sae
    assert [p["step"] for p in curves] == [1, 4, 8, 12, 16]
    assert set(curves[0]) == {"step", "tokens", "loss", "l0", "mse", "explained_variance",
                               "dead_fraction_training_window"}
    assert all(p["l0"] <= 4 for p in curves)
    assert curves[-1]["explained_variance"] > curves[0]["explained_variance"] + 0.2
    assert curves[-1]["mse"] < curves[0]["mse"]


def test_the_command_offers_every_trainable_architecture():
    from mechscope.commands import sae_train

    assert sae_train.ARCHITECTURES == st.ARCHITECTURES


def test_training_refuses_other_engines():
    with pytest.raises(BadInput, match="--backend tl"):
        st.require_trainable(types.SimpleNamespace(name="nnsight"), HOOK)


def test_evaluation_agrees_with_sae_lens_run_evals(toy_engine, tiny_sae):
    """L0, explained variance, MSE and the CE losses with / without the SAE are sae-lens's numbers on the same rows."""
    import datasets
    from sae_lens import ActivationsStore, run_evals
    from sae_lens.evals import EvalConfig
    from sae_lens.training.activation_scaler import ActivationScaler

    sae = tiny_sae[0]
    rows = saes.corpus_rows(toy_engine, 2_000, 32, seed=7)
    ours = st.evaluate(toy_engine, sae, rows, batch_size=16)
    store = ActivationsStore.from_sae(toy_engine.model, sae, datasets.Dataset.from_dict({"tokens": rows.tolist()}),
                                      context_size=32, streaming=False, store_batch_size_prompts=len(rows))
    config = EvalConfig(batch_size_prompts=len(rows), n_eval_reconstruction_batches=1, n_eval_sparsity_variance_batches=1,
                        compute_ce_loss=True, compute_variance_metrics=True, compute_sparsity_metrics=True,
                        compute_kl=False, compute_l2_norms=False)
    with saes.quiet_sae_lens():
        theirs, _ = run_evals(sae, store, toy_engine.model, ActivationScaler(), config, exclude_special_tokens=True)
    assert ours.l0 == pytest.approx(theirs["sparsity"]["l0"], rel=1e-5)
    assert ours.explained_variance == pytest.approx(theirs["reconstruction_quality"]["explained_variance"], abs=1e-4)
    assert ours.mse == pytest.approx(theirs["reconstruction_quality"]["mse"], rel=1e-4)
    perf = theirs["model_performance_preservation"]
    assert ours.ce_clean == pytest.approx(perf["ce_loss_without_sae"], rel=1e-5)
    assert ours.ce_spliced == pytest.approx(perf["ce_loss_with_sae"], rel=1e-5)
    assert ours.ce_clean < ours.ce_spliced < ours.ce_zero
    assert ours.ce_recovered_ci[0] <= ours.ce_recovered <= ours.ce_recovered_ci[1]
    assert sum(d == 0 for d in ours.density) / len(ours.density) == pytest.approx(ours.dead_fraction)
    assert ours.ce_loss_increase == pytest.approx(perf["ce_loss_with_sae"] - perf["ce_loss_without_sae"], rel=1e-4)


def test_synthetic_features_are_recovered_and_survive_save_and_load(tmp_path):
    """Known features in superposition (sae_lens.synthetic): the recipe recovers them (mean max cosine >= 0.9) and
    the SAE reloaded from disk scores the same; an untrained SAE of the same shape does not."""
    from sae_lens.synthetic import ConstantFiringProbabilityConfig, SyntheticModel, SyntheticModelConfig
    from sae_lens.util import cosine_similarities

    result = st.synthetic_recovery("topk", num_features=64, hidden_dim=32, d_sae=128, sparsity=3,
                                   training_samples=200_000, seed=0, out_dir=tmp_path)
    assert result["mean_max_cosine"] >= 0.9 and result["mcc"] >= 0.85
    assert abs(result["sae_l0"] - result["true_l0"]) < 1.0
    reloaded = saes.load_sae(str(tmp_path))
    assert torch.equal(reloaded.W_dec, result["sae"].W_dec)
    truth = SyntheticModel(SyntheticModelConfig(num_features=64, hidden_dim=32, seed=0,
                                                firing_probability=ConstantFiringProbabilityConfig(probability=0.05)))
    untrained = st.sae_config("topk", 32, 128, 3)
    from sae_lens import TopKTrainingSAE
    torch.manual_seed(0)
    baseline = cosine_similarities(truth.feature_dict.feature_vectors, TopKTrainingSAE(untrained).W_dec).max(1).values
    assert baseline.mean() < 0.7                                       # the score can fail


@pytest.mark.slow
@pytest.mark.parametrize("architecture, sparsity", [("topk", 4), ("batchtopk", 4), ("jumprelu", 4), ("standard", 0.6)])
def test_synthetic_recovery_per_architecture_at_matched_l0(architecture, sparsity):
    """Every architecture sae-lens trains recovers the true features at L0 matched to the data's (~3.2)."""
    result = st.synthetic_recovery(architecture, num_features=128, hidden_dim=48, d_sae=256, sparsity=sparsity,
                                   firing_probability=0.025, training_samples=1_000_000, seed=0)
    print(architecture, {k: v for k, v in result.items() if k != "sae"})
    assert result["mean_max_cosine"] >= 0.9
    assert 0.6 * result["true_l0"] <= result["sae_l0"] <= 1.6 * result["true_l0"]


def test_sae_train_command_checkpoints_and_resumes(tmp_path, capsys):
    common = ["--training-tokens", "8192", "--batch-tokens", "1024", "--n-tokens", "6000", "--context", "32",
              "--d-sae", "64", "--k", "4", "--eval-tokens", "1000", "--log-every", "2", "--out", str(tmp_path), "--json"]
    assert main(["sae-train", *common, "--checkpoints", "1", "--save-to", str(tmp_path / "copy")]) == 0
    out = json.loads(capsys.readouterr().out)
    run_dir = tmp_path / out["run_dir"].split("/")[-1]
    summary = out["summary"]
    assert (run_dir / "sae" / "cfg.json").exists() and (run_dir / "curves.csv").exists()
    assert (tmp_path / "copy" / "sae_weights.safetensors").exists()
    assert summary["final"]["step"] == 8 and summary["evaluation"]["l0"] <= 4
    assert len(summary["checkpoints"]) == 1
    e = summary["evaluation"]                     # the headline quotes the summary's numbers
    assert out["headline"] == summary["headline"] and summary["headline"].startswith("trained a topk SAE (64 features)")
    assert f"L0 {summary['final']['l0']:.2f}" in summary["headline"] and \
        f"recovered {e['ce_recovered']:.3f} [{e['ce_recovered_ci'][0]:.3f}, {e['ce_recovered_ci'][1]:.3f}] ({e['n_tokens']} tokens)" in summary["headline"]
    checkpoint = run_dir / summary["checkpoints"][0]
    assert main(["sae-train", *common, "--resume", str(checkpoint)]) == 0
    resumed = json.loads(capsys.readouterr().out)["summary"]
    curve = (tmp_path / resumed["sae_dir"].split("/")[-2] / "curves.csv").read_text().splitlines()
    steps = [int(line.split(",")[0]) for line in curve[1:]]
    assert steps[0] >= 4 and steps[-1] >= 6                            # it continued from the checkpoint's step


def test_sae_train_holds_out_its_evaluation_rows_from_a_data_file(toy_engine, tmp_path, capsys):
    """With --data the evaluation rows are cut off before training (they used to be the last training rows)."""
    from mechscope.toy.corpus import corpus_text

    data = tmp_path / "text.txt"
    data.write_text(" ".join(corpus_text(600, seed=3)))
    n_rows = len(saes.rows_from_file(toy_engine, str(data), 32))
    assert main(["sae-train", "--data", str(data), "--context", "32", "--n-tokens", str(32 * n_rows),
                 "--training-tokens", "2048", "--batch-tokens", "1024", "--d-sae", "32", "--k", "4",
                 "--eval-tokens", "640", "--out", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["corpus_tokens"] == 32 * (n_rows - 640 // 32)

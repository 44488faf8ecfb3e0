"""QK/OV circuits: copying scores on hand-built heads with known eigenvalues, agreement of the composition
scores with transformer-lens, the bundled model's previous-token -> induction K-composition on every engine
with transformer-lens weights (tl, bridge) and a one-line refusal elsewhere (nnsight), the command."""
import json

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mechscope.cli import main
from mechscope.engines.base import Engine
from mechscope.errors import BadInput
from mechscope.techniques import circuits
from tests.conftest import BACKENDS


def _tiny(d_vocab=12, d_model=8, n_layers=1, n_heads=1, d_head=8, seed=0):
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head, d_vocab=d_vocab,
                                  n_ctx=16, attn_only=True, normalization_type=None, act_fn="gelu", seed=seed)
    return HookedTransformer(cfg)


def _set_ov(model, W_V, W_O, W_E, W_U):
    with torch.no_grad():
        model.blocks[0].attn.W_V[0] = W_V
        model.blocks[0].attn.W_O[0] = W_O
        model.embed.W_E[:] = W_E
        model.unembed.W_U[:] = W_U


def test_identity_ov_head_has_copying_score_one():
    """OV = I and W_U = W_E^T: the full OV circuit W_E W_E^T is positive semi-definite, so every eigenvalue is
    positive (both scores 1), and with unit-norm embeddings each token's own logit is its row's maximum."""
    model = _tiny()
    W_E = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    W_E = W_E / W_E.norm(dim=-1, keepdim=True)
    _set_ov(model, torch.eye(8), torch.eye(8), W_E, W_E.T)
    torch.testing.assert_close(circuits.ov_circuit(model, 0, 0).AB, W_E @ W_E.T)
    scores = circuits.copying_scores(model)
    assert scores.eig_ratio.item() == pytest.approx(1.0, abs=1e-5)
    assert scores.positive_fraction.item() == 1.0
    assert circuits.self_copy_fractions(circuits.ov_circuit(model, 0, 0), torch.arange(12)) == {"top1": 1.0, "top5": 1.0}
    _set_ov(model, torch.eye(8), -torch.eye(8), W_E, W_E.T)                 # anti-copying
    scores = circuits.copying_scores(model)
    assert scores.eig_ratio.item() == pytest.approx(-1.0, abs=1e-5) and scores.positive_fraction.item() == 0.0


def test_copying_scores_of_known_eigenvalues():
    """W_E = W_U = I and OV = diag(+1 x6, -1 x2): eig_ratio = (6 - 2) / 8, positive fraction = 6 / 8."""
    model = _tiny(d_vocab=8)
    signs = torch.tensor([1.0] * 6 + [-1.0] * 2)
    rotation = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(1))).Q
    _set_ov(model, rotation, torch.diag(signs) @ rotation.T, torch.eye(8), torch.eye(8))   # OV = R diag(s) R^T
    scores = circuits.copying_scores(model)
    assert scores.eig_ratio.item() == pytest.approx(0.5, abs=1e-5)
    assert scores.positive_fraction.item() == 0.75


def test_top_tokens_and_self_copy_agree_with_the_full_matrix():
    model = _tiny(d_vocab=40, n_layers=2, n_heads=2, d_head=4, seed=3)
    ov, qk = circuits.ov_circuit(model, 1, 1), circuits.qk_circuit(model, 1, 1)
    full = circuits.full_matrix(ov, max_bytes=1e6)
    assert full.shape == (40, 40)
    allowed = torch.arange(3, 40)
    values, ids = circuits.top_tokens(ov, torch.tensor([5, 9]), allowed, k=4)
    expected = full[[5, 9]][:, allowed].topk(4)
    torch.testing.assert_close(values, expected.values)
    assert torch.equal(ids, allowed[expected.indices])
    sub = full[allowed][:, allowed]
    rank = (sub > sub.diagonal()[:, None]).sum(-1)
    got = circuits.self_copy_fractions(ov, allowed, chunk=7)
    assert got == pytest.approx({"top1": float((rank == 0).float().mean()), "top5": float((rank < 5).float().mean())})
    W_E, W_Q, W_K = model.W_E, model.W_Q[1, 1], model.W_K[1, 1]
    torch.testing.assert_close(circuits.full_matrix(qk, 1e6), (W_E @ W_Q) @ (W_E @ W_K).T)
    with pytest.raises(ValueError, match="needs"):
        circuits.full_matrix(ov, max_bytes=1000)


@pytest.mark.parametrize("mode", circuits.MODES)
def test_composition_agrees_with_transformer_lens(mode, toy_model):
    random_model = _tiny(d_vocab=30, d_model=32, n_layers=3, n_heads=3, d_head=8, seed=2)
    for model in (toy_model, random_model):
        ours = circuits.composition_scores(model, mode, n_seeds=2).scores
        theirs = model.all_composition_scores(mode)
        torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=1e-4)


def test_random_baseline_is_the_score_of_random_heads():
    """A random model's composition scores average to the Gaussian baseline (same shapes), ~1/sqrt(d_model)."""
    model = _tiny(d_vocab=30, d_model=64, n_layers=2, n_heads=8, d_head=16, seed=4)
    for mode in circuits.MODES:
        comp = circuits.composition_scores(model, mode, n_seeds=3)
        assert comp.scores[0, :, 1, :].mean() == pytest.approx(comp.baseline, rel=0.05)
        assert comp.baseline == pytest.approx(64 ** -0.5, rel=0.1) and comp.baseline_std < 0.01
        assert (comp.scores[1] == 0).all() and (comp.scores[:, :, 0] == 0).all()   # only later layers read


@pytest.fixture(scope="module")
def card_heads(toy_card):
    """(previous-token head, induction head) of the model card: L1H2 and L2H1 on the shipped weights."""
    card = toy_card["induction"]
    return tuple(card["previous_token_head"]), tuple(card["induction_head"])


def test_induction_head_k_composes_with_the_previous_token_head(toy_model, card_heads):
    """Measured: K-composition L1H2 -> L2H1 = 0.141 vs baseline 0.088 (std 0.0002 over seeds); the largest of
    all 48 pairs; the same pair's Q- and V-composition are at or below the baseline."""
    (pl, ph), (il, ih) = card_heads
    k = circuits.composition_scores(toy_model, "K")
    pair = k.scores[pl, ph, il, ih].item()
    assert pair - k.baseline > 0.03 and k.baseline_std < 0.002
    valid = k.scores[circuits.later_layer_mask(*k.scores.shape[:2])]
    assert (valid < pair).float().mean() >= 0.95
    assert k.top(1)[0][:4] == (pl, ph, il, ih)
    for mode in ("Q", "V"):
        other = circuits.composition_scores(toy_model, mode, n_seeds=2)
        assert other.scores[pl, ph, il, ih] < pair - 0.03


def test_composition_and_copying_agree_across_engines(toy_on, toy_engine, card_heads):
    """tl and bridge read the same processed weights: the same K-composition scores and copying scores, and
    the same top pair; engines without transformer-lens weights (nnsight) refuse in one line."""
    if toy_on.name == "nnsight":
        with pytest.raises(BadInput, match="--backend tl or --backend bridge"):
            circuits.composition_scores(toy_on, "K")
        return
    (pl, ph), (il, ih) = card_heads
    k = circuits.composition_scores(toy_on, "K", n_seeds=2)
    torch.testing.assert_close(k.scores, circuits.composition_scores(toy_engine, "K", n_seeds=2).scores,
                               atol=1e-4, rtol=1e-3)
    assert k.top(1)[0][:4] == (pl, ph, il, ih)
    torch.testing.assert_close(circuits.copying_scores(toy_on).eig_ratio, circuits.copying_scores(toy_engine).eig_ratio,
                               atol=1e-4, rtol=1e-3)


def test_engines_without_weights_are_refused():
    class WeightlessEngine(Engine):
        name = "nnsight"

    with pytest.raises(BadInput, match="the nnsight engine has none: use --backend tl or --backend bridge"):
        circuits.weight_model(WeightlessEngine())


def test_induction_head_is_the_strongest_copying_head(toy_model, card_heads):
    """An induction head copies the attended token: measured eig_ratio 0.79 (positive fraction 0.72) for L2H1,
    the highest of all heads; the previous-token head L1H2 does not copy (-0.20)."""
    (pl, ph), (il, ih) = card_heads
    scores = circuits.copying_scores(toy_model)
    assert scores.eig_ratio.argmax().item() == il * toy_model.cfg.n_heads + ih
    assert scores.eig_ratio[il, ih] > 0.6 and scores.positive_fraction[il, ih] > 0.6
    assert scores.eig_ratio[pl, ph] < 0.2


def test_effective_embedding_is_what_the_heads_read(toy_model):
    """Exact identity: effective_embedding(layer)[t] @ W_V + b_V is hook_v at position 1 of [BOS, t]."""
    layer, toks = 2, torch.tensor([[1, 50], [1, 200]])
    embedding = circuits.effective_embedding(toy_model, layer, batch_size=100)
    _, cache = toy_model.run_with_cache(toks, names_filter=f"blocks.{layer}.attn.hook_v")
    predicted = torch.einsum("bm,hmd->bhd", embedding[[50, 200]], toy_model.W_V[layer]) + toy_model.b_V[layer]
    torch.testing.assert_close(predicted, cache["v", layer][:, 1], atol=1e-5, rtol=1e-5)
    assert (embedding[toy_model.tokenizer.all_special_ids] == 0).all()


def test_induction_head_copies_tokens_as_its_layer_sees_them(toy_model, card_heads):
    """Measured with the effective embedding: L2H1 eig_ratio 0.99 and 46% of tokens have their own logit on top
    (raw W_E: 0.79 and 5%, since layer-2 heads do not read raw embeddings)."""
    _, (il, ih) = card_heads
    allowed = torch.tensor([i for i in range(toy_model.cfg.d_vocab) if i not in toy_model.tokenizer.all_special_ids])
    effective = circuits.ov_circuit(toy_model, il, ih, circuits.effective_embedding(toy_model, il))
    raw = circuits.ov_circuit(toy_model, il, ih)
    ratio, fraction = circuits.eigenvalue_copying(effective)
    assert ratio > 0.9 and fraction > 0.8
    assert circuits.self_copy_fractions(effective, allowed)["top1"] > 0.3
    assert circuits.self_copy_fractions(raw, allowed)["top1"] < 0.2


def test_circuits_command(toy_model, card_heads, tmp_path, capsys):
    (pl, ph), (il, ih) = card_heads
    assert main(["circuits", "--out", str(tmp_path), "--json", f"--heads={il}.{ih}", "--tokens", "mary,paris",
                 "--top-k", "3", "--save-full", "--baseline-seeds", "3", "--embedding", "effective"]) == 0
    out = json.loads(capsys.readouterr().out)
    run_dir = tmp_path / out["run_dir"].split("/")[-1]
    summary = out["summary"]
    for name in summary["files"] + ["result.json", "meta.json"]:
        assert (run_dir / name).stat().st_size > 0, name
    k_top = summary["composition"]["K"]["top_pairs"][0]
    assert (k_top["A"], k_top["B"]) == (f"L{pl}H{ph}", f"L{il}H{ih}")
    expected = toy_model.all_composition_scores("K")[pl, ph, il, ih].item()
    assert k_top["score"] == pytest.approx(expected, abs=1e-3)
    rows = [r.split(",") for r in (run_dir / "composition.csv").read_text().splitlines()[1:]]
    assert len(rows) == 3 * 3 * 16                                   # 3 modes x 3 layer pairs x 4 x 4 heads
    row = next(r for r in rows if r[:5] == ["K", str(pl), str(ph), str(il), str(ih)])
    assert float(row[5]) == pytest.approx(expected, abs=1e-5)
    copying = [r.split(",") for r in (run_dir / "copying.csv").read_text().splitlines()[1:]]
    assert len(copying) == 12
    head = summary["heads"][f"L{il}H{ih}"]
    assert set(head["ov_top_outputs"]) == {"mary", "paris"} and head["self_copy"]["top1"] > 0.3
    assert summary["copying_top_heads"][0] == {"head": f"L{il}H{ih}", "eig_ratio": pytest.approx(0.99, abs=0.05),
                                               "positive_fraction": pytest.approx(0.9, abs=0.1)}
    from safetensors.torch import load_file
    full = load_file(str(run_dir / "full_circuits.safetensors"))
    ov = full[f"ov.L{il}H{ih}"]
    assert ov.shape == (toy_model.cfg.d_vocab, toy_model.cfg.d_vocab)
    embedding = circuits.effective_embedding(toy_model, il)
    torch.testing.assert_close(ov, embedding @ toy_model.W_V[il, ih] @ toy_model.W_O[il, ih] @ toy_model.W_U,
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_circuits_command_on_every_engine(backend, card_heads, tmp_path, capsys):
    (pl, ph), (il, ih) = card_heads
    code = main(["circuits", "--out", str(tmp_path), "--json", "--backend", backend, "--baseline-seeds", "2"])
    captured = capsys.readouterr()
    if backend == "nnsight":
        assert code == 2 and len(captured.err.strip().splitlines()) == 1 and "--backend tl" in captured.err
        return
    assert code == 0
    k_top = json.loads(captured.out)["summary"]["composition"]["K"]["top_pairs"][0]
    assert (k_top["A"], k_top["B"]) == (f"L{pl}H{ph}", f"L{il}H{ih}")


@pytest.mark.parametrize("args, words", [
    (["--heads", "3.0"], "layer 3 is out of range"),
    (["--tokens", "mary,zzzqqq"], "not a single token"),
    (["--tokens", ","], "--tokens is empty"),
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--heads", "1.1", "--save-full", "--max-gb", "0.0001"], "raise --max-gb"),
])
def test_circuits_bad_input(args, words, tmp_path, capsys):
    assert main(["circuits", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err

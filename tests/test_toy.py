"""The bundled model meets its model card (MODEL_CARD.md): these are the ground truths other tests use."""
import json
import random

import pytest

from mechscope.cli import main
from mechscope.toy import corpus
from tests.conftest import BACKENDS


def test_ioi_on_held_out_combinations(toy_card):
    assert toy_card["ioi"]["accuracy"] >= 0.95
    assert toy_card["ioi"]["mean_logit_diff"] >= 3.0


def test_facts(toy_card):
    assert toy_card["facts"]["accuracy"] >= 0.9


def test_induction_copying_and_heads(toy_card):
    ind = toy_card["induction"]
    assert ind["second_copy_loss"] <= 1.0
    assert ind["first_copy_loss"] >= 4.0
    assert ind["previous_token_score"] >= 0.5
    assert ind["induction_score"] >= 0.5
    # the previous-token head must sit in an earlier layer than the induction head it feeds
    assert ind["previous_token_head"][0] < ind["induction_head"][0]
    assert ind["ablation_loss_increase"]["zero"] >= 1.0
    assert ind["ablation_loss_increase"]["mean"] >= 1.0


def test_model_card_gives_one_measured_number_per_ablation(toy_card):
    """Every "+x.xx / +y.yy nats" ablation in MODEL_CARD.md is model-card's measurement, and the prose repeats
    the table (it once gave +5.2 / +5.1 for the table's +4.97 / +4.99: two setups, two numbers)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "MODEL_CARD.md").read_text()
    ind = toy_card["induction"]
    measured = {"L2H1": ind["ablation_loss_increase"], **ind["circuit_ablation_loss_increase"]}
    prose = dict(re.findall(r"(L\dH\d|MLP0)\s+\+(\d\.\d\d / \+\d\.\d\d)", text))
    assert set(prose) == set(measured)
    for part, numbers in measured.items():
        assert prose[part] == f"{numbers['zero']:.2f} / +{numbers['mean']:.2f}", part
    table = re.findall(r"\| \+(\d\.\d\d)(?: / \+(\d\.\d\d))? nats", text)
    assert {x for row in table for x in row if x} == {f"{v:.2f}" for n in measured.values() for v in n.values()}
    assert not re.search(r"\+\d\.\d (\(zero\)|/)", text)       # no one-decimal second measurement left


def test_sentiment_continuations(toy_card):
    assert toy_card["sentiment"]["positive"] >= 0.9
    assert toy_card["sentiment"]["negative"] >= 0.9


def test_held_out_ioi_combinations_never_appear_in_training():
    rng = random.Random(1)
    train = [corpus.ioi_example(rng, held_out=False) for _ in range(3000)]
    test = [corpus.ioi_example(rng, held_out=True) for _ in range(3000)]
    train_keys = {(t, frozenset((io, s))) for t, _, io, s in train}
    test_keys = {(t, frozenset((io, s))) for t, _, io, s in test}
    assert not train_keys & test_keys
    assert len({t for t, *_ in test}) == len(corpus.IOI_TEMPLATES)  # every template is tested


def test_tokenizer_matches_corpus_ids(toy_model):
    rng = random.Random(0)
    vocab = {w: i for i, w in enumerate(corpus.vocabulary())}
    for _ in range(50):
        words = corpus.random_sentence(rng)
        ids = toy_model.to_tokens(" ".join(words), prepend_bos=False)[0].tolist()
        assert ids == [vocab[w] for w in words]
    assert toy_model.to_str_tokens("I love this! It's absolutely wonderful and", prepend_bos=False)[:6] == \
        ["i", "love", "this", "!", "it", "'"]


def test_hugging_face_export_is_exact_and_loads_offline(toy_model_unfolded, tmp_path):
    """The shipped GPT-2 export (toy/hf/) holds exactly the bundled weights, loads with AutoModelForCausalLM,
    and gives the unfolded HookedTransformer's logits; re-exporting reproduces it."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechscope.toy import export

    hf = AutoModelForCausalLM.from_pretrained(str(export.HF_DIR)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(export.HF_DIR))
    text = "when mary and john went to the store , john gave a drink to"
    ids = [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = toy_model_unfolded.to_tokens(text)
    assert ids == tokens[0].tolist()          # BOS prepended by hand: the tokenizer does not add it
    with torch.no_grad():
        assert (hf(tokens).logits - toy_model_unfolded(tokens)).abs().max() < 1e-5
    shipped = load_file(str(export.HF_DIR / "model.safetensors"))
    fresh = load_file(str(export.export(tmp_path) / "model.safetensors"))
    assert shipped.keys() == fresh.keys() and all(torch.equal(shipped[k], fresh[k]) for k in shipped)


def test_export_refuses_an_unembedding_bias(toy_model_unfolded):
    import copy

    import pytest
    import torch

    from mechscope.toy import export

    model = copy.deepcopy(toy_model_unfolded)
    with torch.no_grad():
        model.unembed.b_U[0] = 1.0
    with pytest.raises(ValueError, match="b_U"):
        export.gpt2_state_dict(model)

@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_card_command_on_every_engine(backend, toy_card, tmp_path, capsys):
    """`mechscope model-card --backend X` measures the same card on every engine (same weights; the HF export
    on bridge / nnsight): the same heads, accuracies and, to float error, losses."""
    assert main(["model-card", "--backend", backend, "--out", str(tmp_path), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)["summary"]
    for key in ("previous_token_head", "induction_head"):
        assert card["induction"][key] == toy_card["induction"][key]
    assert card["ioi"]["accuracy"] == toy_card["ioi"]["accuracy"] and card["facts"] == toy_card["facts"]
    assert card["sentiment"] == toy_card["sentiment"]
    for key in ("first_copy_loss", "second_copy_loss", "induction_score"):
        assert card["induction"][key] == pytest.approx(toy_card["induction"][key], abs=1e-4)
    for kind in ("zero", "mean"):
        assert card["induction"]["ablation_loss_increase"][kind] == pytest.approx(
            toy_card["induction"]["ablation_loss_increase"][kind], abs=1e-3)
    assert card["ioi"]["mean_logit_diff"] == pytest.approx(toy_card["ioi"]["mean_logit_diff"], abs=1e-3)

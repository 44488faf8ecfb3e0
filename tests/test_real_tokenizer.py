"""Defaults and task generators on a real BPE vocabulary (GPT-2's, capitalised words with a leading space),
not only on the bundled model's lowercase word-level one: on a GPT-2 checkpoint `mechscope logit-lens`
once refused its own default answer ('paris' is ['par', 'is']). The checkpoint has random weights and GPT-2's
real tokenizer (conftest.gpt2_bpe_dir); Pythia's and Llama's vocabularies split the same words the same way
(" Paris", " Mary" one token each), which this file cannot check offline."""
import json

import pytest

from mechscope import inputs, tasks
from mechscope.cli import main
from mechscope.models import load_model

IOI = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def gpt2(gpt2_bpe_dir):
    return load_model(str(gpt2_bpe_dir), backend="tl", device="cpu")


def test_the_checkpoint_has_gpt2s_own_token_ids(gpt2):
    """Known answer: GPT-2's ids for the IOI sentence (its tokenizer, not an imitation)."""
    assert gpt2.to_tokens(IOI, prepend_bos=False)[0].tolist() == \
        [2215, 5335, 290, 1757, 1816, 284, 262, 3650, 11, 1757, 2921, 257, 4144, 284]
    assert gpt2.cfg.d_vocab == 50257


@pytest.mark.parametrize("argv, key", [
    (["logit-lens"], "targets"),
    (["dla"], "answer"),
    (["patch", "--component", "resid_pre"], "components"),
])
def test_command_defaults_work_on_a_gpt2_tokenizer(gpt2_bpe_dir, tmp_path, capsys, argv, key):
    assert main([*argv, "--model", str(gpt2_bpe_dir), "--backend", "tl", "--out", str(tmp_path), "--json"]) == 0, \
        capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert key in json.dumps(summary)
    if argv[0] == "logit-lens":
        assert list(summary["targets"]) == ["Paris"]


@pytest.mark.parametrize("word", ["Paris", "Mary", "John"])
def test_default_answers_are_one_gpt2_token_with_the_leading_space(gpt2, word):
    assert gpt2.to_tokens(" " + word, prepend_bos=False).shape[1] == 1
    assert inputs.single_token(gpt2, word) == gpt2.to_tokens(" " + word, prepend_bos=False)[0, 0]


def test_ioi_generator_on_gpt2(gpt2):
    """Pairs of equal length that differ at one token (S2), answers one token each, named positions on their words."""
    ps = tasks.load_task(gpt2, "ioi", n=40)
    assert len(ps) >= 30
    rows, positions = ps.tokens(gpt2)
    corrupted, _ = ps.tokens(gpt2, corrupted=True)
    for i, p in enumerate(ps.prompts):
        clean, twin = rows[i], corrupted[i]
        assert len(clean) == len(twin) and int((clean != twin).sum()) == 1
        assert int((clean != twin).nonzero()[0]) == int(positions["S2"][i])
        for name, word in (("IO", p.answer), ("S1", p.wrong), ("S2", p.wrong)):
            assert gpt2.to_str_tokens(clean)[int(positions[name][i])] == " " + word
        assert inputs.single_token(gpt2, p.answer) != inputs.single_token(gpt2, p.wrong)


def test_facts_generator_on_gpt2(gpt2):
    ps = tasks.load_task(gpt2, "facts", n=40)
    assert len(ps) >= 10
    rows, positions = ps.tokens(gpt2)
    corrupted, _ = ps.tokens(gpt2, corrupted=True)
    for i, p in enumerate(ps.prompts):
        assert len(rows[i]) == len(corrupted[i]) and tasks.CAPITALS[p.group] == p.answer
        assert gpt2.to_str_tokens(rows[i])[int(positions["SUBJECT"][i])] == " " + p.group
        assert gpt2.to_str_tokens(rows[i])[int(positions["RELATION"][i])] == " capital"
        assert gpt2.to_tokens(" " + p.answer, prepend_bos=False).shape[1] == 1


def test_sentiment_generator_on_gpt2(gpt2):
    ps = tasks.load_task(gpt2, "sentiment", n=60)
    assert {p.label for p in ps.prompts} == {"positive", "negative"} and len(ps) == 60
    for p in ps.prompts:   # every prompt is text GPT-2 reads without its unknown / end-of-text token
        assert 50256 not in gpt2.to_tokens(p.text, prepend_bos=False)[0].tolist()

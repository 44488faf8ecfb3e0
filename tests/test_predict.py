"""predict: right-padded prompt sets give each prompt's own next-token prediction; on the bundled tasks the
accuracy is the model card's (IOI and facts near 1) with intervals; --top-k is checked against the
vocabulary; every engine predicts the bundled model's known answers."""
import csv
import json

import pytest
import torch

from mechscope.cli import main
from tests.conftest import BACKENDS


def _run(tmp_path, capsys, *args):
    assert main(["predict", "--out", str(tmp_path), "--json", *args]) == 0
    out = json.loads(capsys.readouterr().out)
    return out["summary"], tmp_path / out["run_dir"].split("/")[-1]


@pytest.mark.parametrize("task", ["ioi", "facts"])
def test_task_accuracy_with_intervals(task, tmp_path, capsys):
    """Model card: IOI accuracy 1.00 on held-out prompts, facts 37/37."""
    summary, run = _run(tmp_path, capsys, "--task", task, "--n", "40")
    answers = summary["answers"]
    for s in answers.values():
        assert s["ci_low"] <= s["mean"] <= s["ci_high"]
    assert answers["correct"]["mean"] >= 0.9 and answers["answer_rank"]["median"] == 0
    assert answers["logit_diff"]["ci_low"] > 0
    rows = list(csv.DictReader(open(run / "predictions.csv")))
    assert len(rows) == summary["n_prompts"] * 5
    assert len(summary["predictions"]) == 20


def test_prompt_set_predictions_are_each_prompts_own(toy_engine, tmp_path, capsys):
    """Prompts of different lengths in one padded batch: each top-1 equals the prompt run alone."""
    prompts = ["the capital of france is", "When Mary and John went to the store, John gave a drink to",
               "The quick brown fox jumps over the lazy", "i love this !"]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(prompts))
    summary, _ = _run(tmp_path, capsys, "--prompts", str(path), "--top-k", "3")
    assert "answers" not in summary
    with torch.no_grad():
        alone = [toy_engine.to_single_str_token(int(toy_engine.run(toy_engine.to_tokens(p))[0][0, -1].argmax()))
                 for p in prompts]
    assert [r["top1"] for r in summary["predictions"]] == alone
    assert alone[:3] == ["paris", "mary", "dog"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_engine_predicts_the_known_answers(backend, tmp_path, capsys):
    summary, _ = _run(tmp_path, capsys, "--backend", backend)
    top1 = {r["prompt"]: r["top1"] for r in summary["predictions"]}
    assert top1["The capital of France is"] == "paris" and top1["The Colosseum is in the city of"] == "rome"
    assert top1["The quick brown fox jumps over the lazy"] == "dog"


def test_top_k_up_to_the_vocabulary(toy_engine, tmp_path, capsys):
    vocab = toy_engine.cfg.d_vocab
    summary, run = _run(tmp_path, capsys, "--prompt", "the capital of france is", "--top-k", str(vocab))
    result = json.loads((run / "result.json").read_text())
    assert len(result["predictions"][0]["top"]) == vocab
    assert main(["predict", "--out", str(tmp_path), "--top-k", str(vocab + 1)]) == 2
    err = capsys.readouterr().err
    assert f"1..{vocab}" in err and len(err.strip().splitlines()) == 1

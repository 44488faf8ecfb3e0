"""Logit lens: the final entry equals the model's logits on the folded AND unfolded bundled model, on every
engine (tiny checkpoints of five architectures: test_reading_engines.py); every entry agrees with transformer-lens's
accumulated_resid(apply_ln=True); the prompt-set lens equals the one-prompt lens; the layer at which
answers become top-1 matches where last-position patching and DLA say the information arrives; the command
on one prompt and on prompt sets (intervals), and its bad input."""
import json
import random

import pytest
import torch

from mechscope import tasks
from mechscope.cli import main
from mechscope.techniques.logit_lens import (answer_lens, lens_logits, logit_lens, resid_hook_names, residual_stack,
                                             stack_labels)
from mechscope.toy import corpus

IOI = "When Mary and John went to the store, John gave a drink to"
LABELS = ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre", "2_mid", "final_post"]


@pytest.fixture(params=["folded", "unfolded"])
def model(request, toy_model, toy_model_unfolded):
    return toy_model if request.param == "folded" else toy_model_unfolded


@pytest.mark.parametrize("prompt", [IOI, "The Eiffel Tower is in the city of"])
def test_final_entry_is_the_models_logits(model, prompt):
    lens = logit_lens(model, model.to_tokens(prompt), [model.to_single_token("paris")])
    assert lens.labels == LABELS
    assert torch.allclose(lens.lens_final, lens.model_logits, atol=1e-4)
    assert lens.target_rank[-1, 0] == int((lens.model_logits[-1] > lens.model_logits[-1, lens.target_ids[0]]).sum())


def test_ln_weight_matters_on_the_unfolded_model(toy_model_unfolded):
    """Centring and scaling without ln_final's trained weight and bias (what a parameter-free LN would
    do) does not give the logits: the lens must use the whole final LayerNorm."""
    model = toy_model_unfolded
    stack, logits = residual_stack(model, model.to_tokens(IOI))
    x = stack[-1, 0] - stack[-1, 0].mean(-1, keepdim=True)
    bare = (x / (x.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()) @ model.W_U + model.b_U
    assert (bare - logits[0]).abs().max() > 1.0
    assert torch.allclose(lens_logits(model, stack[-1:, 0])[0], logits[0], atol=1e-4)


def test_agrees_with_transformer_lens_accumulated_resid(model):
    toks = model.to_tokens(IOI)
    _, cache = model.run_with_cache(toks, names_filter=resid_hook_names(model))
    theirs, labels = cache.accumulated_resid(incl_mid=True, apply_ln=True, return_labels=True)
    assert labels == stack_labels(model)
    ours = lens_logits(model, residual_stack(model, toks)[0][:, 0])
    assert torch.allclose(ours, model.unembed(theirs[:, 0]).detach(), atol=1e-4)


def _answer_ranks(model, prompts: list[str], answers: list[str]) -> torch.Tensor:
    """[n_prompts, 7] rank of each answer in the lens at the last position (one right-padded batch)."""
    rows = [model.to_tokens(p)[0] for p in prompts]
    tokens, lengths = tasks.padded(model, rows)
    ids = torch.tensor([model.to_single_token(a) for a in answers])
    return answer_lens(model, tokens, lengths - 1, ids).rank


def test_final_entry_is_the_logits_on_every_engine(toy_on):
    ps = tasks.load_task(toy_on, "facts", n=16, seed=0)
    rows, where = ps.tokens(toy_on)
    tokens, _ = tasks.padded(toy_on, rows)
    answers, wrongs = ps.answer_ids(toy_on)
    lens = answer_lens(toy_on, tokens, where["END"], answers, wrongs, rows_per_forward=5)
    assert lens.labels == LABELS and lens.final_error < 1e-4
    assert (lens.rank[:, -1] == 0).float().mean() >= 0.9 and (lens.logit_diff[:, -1] > 0).all()
    assert lens.prob.shape == (16, 7) and ((lens.prob >= 0) & (lens.prob <= 1)).all()


def test_prompt_set_lens_equals_the_one_prompt_lens(toy_engine):
    ps = tasks.load_task(toy_engine, "ioi", n=6, seed=2)
    rows, where = ps.tokens(toy_engine)
    tokens, lengths = tasks.padded(toy_engine, rows)
    answers, wrongs = ps.answer_ids(toy_engine)
    assert len(set(lengths.tolist())) > 1
    lens = answer_lens(toy_engine, tokens, where["END"], answers, wrongs)
    for i in range(len(rows)):
        one = logit_lens(toy_engine, rows[i][None], [int(answers[i]), int(wrongs[i])])
        assert torch.equal(lens.rank[i], one.target_rank[:, 0])
        torch.testing.assert_close(lens.prob[i], one.target_prob[:, 0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(lens.logit_diff[i], one.target_logit[:, 0] - one.target_logit[:, 1], atol=1e-4,
                                   rtol=1e-4)


def _patch_recovery(model, clean: str, corrupted: str, answer: int, wrong: int, hook_name: str) -> float:
    """Logit-diff recovery (0 corrupted .. 1 clean) when the clean `hook_name` activation of the LAST
    position only is patched into the corrupted run."""
    clean_logits, cache = model.run_with_cache(model.to_tokens(clean), names_filter=hook_name)
    corrupted_toks = model.to_tokens(corrupted)
    diff = lambda logits: float(logits[0, -1, answer] - logits[0, -1, wrong])  # noqa: E731

    def patch(x, hook):
        x[:, -1] = cache[hook_name][:, -1]
        return x
    patched = model.run_with_hooks(corrupted_toks, fwd_hooks=[(hook_name, patch)])
    return (diff(patched) - diff(model(corrupted_toks))) / (diff(clean_logits) - diff(model(corrupted_toks)))


@torch.no_grad()
def test_capitals_become_top1_right_after_layer0(toy_model):
    """Measured: the country reaches the last position in layer 0's attention (patching the last position's
    resid_mid 0 from "france" into "italy" recovers 1.00 of the paris-rome difference), and the layer-0 MLP
    looks the capital up: over the 23 capital prompts the median rank of the answer is 23 at 0_mid and 0 from
    1_pre on, top-1 in 65% of prompts at 1_pre and in all of them from 2_mid."""
    model = toy_model
    paris, rome = model.to_single_token("paris"), model.to_single_token("rome")
    recovery = _patch_recovery(model, "the capital of france is", "the capital of italy is", paris, rome,
                               "blocks.0.hook_resid_mid")
    assert recovery > 0.9
    facts = [(p, a) for p, a in corpus.fact_prompts() if p.startswith("the capital")]
    ranks = _answer_ranks(model, *zip(*facts))                                                     # [23, 7]
    median = ranks.median(0).values
    assert median[1] >= 10 and (median[2:] == 0).all()
    top1 = (ranks == 0).float().mean(0)
    assert top1[1] < 0.2 and top1[2] >= 0.5 and (top1[5:] == 1).all()


@torch.no_grad()
def test_ioi_answer_becomes_top1_in_layer_2(toy_model):
    """Measured: which name is S reaches the last position already in layer 0's attention (patching the last
    position's resid_mid 0 recovers ~1.0 of the IO-S difference), but the answer is written late: DLA puts
    most of it on the layer-2 MLP (tests/test_dla.py). The lens agrees: over these 60 held-out prompts the IO
    name's median rank is 156, 111, 134, 8, 10 up to 2_pre, 1 at 2_mid (after layer 2's attention) and 0 at
    the output; it is top-1 in at most 7% of prompts before 2_mid, 40% at 2_mid, 100% at the end."""
    model = toy_model
    rng = random.Random(1)
    items = [corpus.ioi_prompt(rng, held_out=True) for _ in range(60)]
    for prompt, io, s in items[:4]:
        words = prompt.split()
        words[len(words) - 1 - words[::-1].index(s)] = io           # S2 -> IO: the answer flips to S
        recovery = _patch_recovery(model, prompt, " ".join(words), model.to_single_token(io),
                                   model.to_single_token(s), "blocks.0.hook_resid_mid")
        assert recovery > 0.9
    ranks = _answer_ranks(model, [p for p, _, _ in items], [io for _, io, _ in items])
    median = ranks.median(0).values
    assert (median[:3] >= 50).all() and (median[3:5] >= 5).all() and median[5] <= 3 and median[6] == 0
    top1 = (ranks == 0).float().mean(0)
    assert (top1[:5] <= 0.15).all() and 0.1 <= top1[5] <= 0.7 and top1[6] == 1


def test_logit_lens_command(tmp_path, capsys):
    assert main(["logit-lens", "--out", str(tmp_path), "--json", "--prompt", "The capital of France is",
                 "--target", "paris", "--target", "rome"]) == 0
    out = json.loads(capsys.readouterr().out)
    summary = out["summary"]
    assert summary["final_lens_vs_logits_max_abs_diff"] < 1e-4
    paris = summary["targets"]["paris"]
    assert paris["top1_from"] == "2_pre" and paris["rank"][-1] == 0 and paris["prob"][-1] > 0.9
    assert summary["targets"]["rome"]["rank"][-1] > 0
    assert [row["layer"] for row in summary["layers"]] == LABELS and summary["layers"][-1]["top"][0][0] == "paris"
    run = tmp_path / out["run_dir"].split("/")[-1]
    for name in ("logit_lens.png", "targets.png", "result.json", "meta.json"):
        assert (run / name).exists(), name
    result = json.loads((run / "result.json").read_text())
    assert result["top1_token"][-1][-1] == "paris" and len(result["top1_prob"]) == 7


def test_logit_lens_command_default_and_pos(tmp_path, capsys):
    assert main(["logit-lens", "--out", str(tmp_path), "--json", "--pos", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["position"] == 2 and summary["token"] == "eiffel" and "Paris" in summary["targets"]


def test_logit_lens_command_on_a_task(tmp_path, capsys):
    """--task facts: per-entry intervals contain their means, the answer is top-1 at the output in every
    prompt and the logit difference is positive there; every prompt x entry is in the CSV."""
    assert main(["logit-lens", "--out", str(tmp_path), "--json", "--task", "facts", "--n", "20"]) == 0
    out = json.loads(capsys.readouterr().out)
    summary = out["summary"]
    assert summary["n_prompts"] == 20 and summary["labels"] == LABELS
    assert summary["final_lens_vs_logits_max_abs_diff"] < 1e-4
    prob, share, diff = summary["answer_prob"], summary["answer_top1_share"], summary["logit_diff"]
    for s in (prob, share, diff):
        assert all(lo <= m <= hi for lo, m, hi in zip(s["ci_low"], s["mean"], s["ci_high"]))
    assert share["mean"][-1] >= 0.9 and diff["ci_low"][-1] > 0 and summary["answer_median_rank"][-1] == 0
    assert summary["majority_top1_from"] in LABELS
    run = tmp_path / out["run_dir"].split("/")[-1]
    rows = (run / "lens_per_prompt.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 20 * 7
    for name in summary["files"]:
        assert (run / name).stat().st_size > 0


@pytest.mark.parametrize("args,words", [
    (["--target", "new york"], "not a single token"),
    (["--task", "ioi", "--target", "mary"], "go with --prompt"),
    (["--top-k", "100000"], "the vocabulary size"),
    (["--pos", "40"], "out of range"),
    (["--prompt", ""], "empty"),
    (["--top-k", "0"], "--top-k"),
])
def test_logit_lens_bad_input(args, words, tmp_path, capsys):
    assert main(["logit-lens", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err

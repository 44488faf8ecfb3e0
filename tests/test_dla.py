"""Direct logit attribution: the parts sum to the model's logit (difference) on the folded AND the unfolded
bundled model (trained LayerNorm weights), the tutorial versions without the LN scale / weight do not,
heads sum to their layer, agreement with transformer-lens's stack_head_results + apply_ln_to_stack,
the heads and MLPs measured to write the IOI answer, and the `dla` command."""
import csv
import json
import random

import pytest
import torch

from mechscope.cli import main
from mechscope.techniques.dla import dla, hook_names
from mechscope.toy import corpus

IOI = "When Mary and John went to the store, John gave a drink to"
PROMPTS = [(IOI, "mary", "john"), ("The Louvre is in the city of", "paris", "rome"),
           ("The capital of France is", "paris", None), ("I love this! It's absolutely wonderful and", "lovely", None)]


@pytest.fixture(params=["folded", "unfolded"])
def model(request, toy_model, toy_model_unfolded):
    return toy_model if request.param == "folded" else toy_model_unfolded


def _ids(model, *words):
    return [model.to_single_token(w) if w is not None else None for w in words]


@pytest.mark.parametrize("prompt,answer,wrong", PROMPTS)
def test_parts_sum_to_the_models_logit(model, prompt, answer, wrong):
    a, b = _ids(model, answer, wrong)
    result = dla(model, model.to_tokens(prompt), a, b)
    assert float(result.metric.abs()) > 1.0      # a real logit (difference), not a near-zero one
    assert torch.allclose(result.total(), result.metric, rtol=1e-3, atol=1e-4)
    # the same identity with heads + b_O in place of the attention layers
    parts = (result.embed + result.pos_embed + result.heads.sum((1, 2)) + result.attn_bias.sum(1)
             + result.mlp.sum(1) + result.ln_bias + result.unembed_bias)
    assert torch.allclose(parts, result.metric, rtol=1e-3, atol=1e-4)
    # and with every neuron + b_out in place of the MLP layers
    b_out = torch.stack([model.blocks[layer].mlp.b_out.detach() for layer in range(model.cfg.n_layers)])
    assert torch.allclose(result.neurons.sum(-1) + result.read @ b_out.T, result.mlp, rtol=1e-4, atol=1e-4)


def test_unfolded_model_has_trained_ln_weights_and_bias_terms(toy_model_unfolded):
    """The unfolded model is the case that catches a missing LN weight: its ln_final is far from (w=1, b=0)."""
    ln = toy_model_unfolded.ln_final
    assert (ln.w - 1).abs().max() > 0.1 and ln.b.abs().max() > 0.01
    a, b = _ids(toy_model_unfolded, "mary", "john")
    result = dla(toy_model_unfolded, toy_model_unfolded.to_tokens(IOI), a, b)
    assert float(result.ln_bias.abs()) > 1e-3


def test_naive_dla_without_the_final_layernorm_is_off(toy_model_unfolded):
    """Tutorial DLA: (1) raw components dotted with W_U (no LN at all), (2) transformer-lens's
    apply_ln_to_stack (scale, no ln_final.w / b) on an unfolded model. Neither sums to the logit difference."""
    model = toy_model_unfolded
    a, b = _ids(model, "mary", "john")
    toks = model.to_tokens(IOI)
    logits, cache = model.run_with_cache(toks)
    target = float(logits[0, -1, a] - logits[0, -1, b])
    stack = cache.decompose_resid(layer=-1, pos_slice=-1)                   # [parts, 1, d_model]
    direction = model.W_U[:, a] - model.W_U[:, b]
    bias = float(model.b_U[a] - model.b_U[b])
    no_ln = float((stack @ direction).sum()) + bias
    scale_only = float((cache.apply_ln_to_stack(stack, layer=-1, pos_slice=-1) @ direction).sum()) + bias
    ours = float(dla(model, toks, a, b).total())
    assert abs(ours - target) < 1e-3 * abs(target)
    assert abs(no_ln - target) > 0.2 * abs(target)
    assert abs(scale_only - target) > 0.05 * abs(target)


def test_heads_sum_to_attn_out_minus_b_O(model):
    toks = model.to_tokens(IOI)
    _, cache = model.run_with_cache(toks, names_filter=hook_names(model))
    for layer in range(model.cfg.n_layers):
        per_head = torch.einsum("bphk,hkd->bphd", cache[f"blocks.{layer}.attn.hook_z"], model.W_O[layer])
        expected = cache[f"blocks.{layer}.hook_attn_out"] - model.b_O[layer]
        assert torch.allclose(per_head.sum(2), expected, atol=1e-4)
    a, b = _ids(model, "mary", "john")
    result = dla(model, toks, a, b)
    assert torch.allclose(result.heads.sum(-1) + result.attn_bias, result.attn, atol=1e-4)


def test_agrees_with_transformer_lens_stack_head_results(toy_model):
    """transformer-lens's own route (folded LN, where its apply_ln_to_stack is complete) gives the same heads."""
    model = toy_model
    toks = model.to_tokens(IOI)
    a, b = _ids(model, "mary", "john")
    _, cache = model.run_with_cache(toks)
    heads = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)   # [L*H, 1, d_model]
    theirs = heads @ (model.W_U[:, a] - model.W_U[:, b])
    ours = dla(model, toks, a, b).heads[0].flatten()
    assert torch.allclose(ours, theirs[:, 0].detach(), atol=1e-4)
    layers = cache.decompose_resid(layer=-1, pos_slice=-1, mode="all", apply_ln=True, return_labels=True)
    theirs_layers = dict(zip(layers[1], (layers[0] @ (model.W_U[:, a] - model.W_U[:, b]))[:, 0].tolist()))
    result = dla(model, toks, a, b)
    for layer in range(model.cfg.n_layers):
        assert result.attn[0, layer] == pytest.approx(theirs_layers[f"{layer}_attn_out"], abs=1e-4)
        assert result.mlp[0, layer] == pytest.approx(theirs_layers[f"{layer}_mlp_out"], abs=1e-4)
    assert result.embed[0] == pytest.approx(theirs_layers["embed"], abs=1e-4)


def test_ioi_answer_is_written_by_L2_mlp_and_name_copying_heads(toy_model):
    """Measured on held-out IOI prompts (logit diff IO - S, mean 10.7): the layer-2 MLP writes most of it
    directly (mean 7.5 of 10.9); attention layers' direct total is ~0. No head writes the IO name regardless
    of name order: L1H2 writes the FIRST name of "A and B" (mean +1.08 when IO is first, -1.04 when it is
    second); the second name is spread over several heads."""
    model = toy_model
    rng = random.Random(0)
    by_length = {}                                   # prompts of one token length run as one batch
    for _ in range(80):
        prompt, io, s = corpus.ioi_prompt(rng, held_out=True)
        toks = model.to_tokens(prompt)
        words = prompt.split()
        by_length.setdefault(toks.shape[1], []).append((toks, *_ids(model, io, s), words.index(io) < words.index(s)))
    heads, mlp, metric, io_first = [], [], [], []
    for items in by_length.values():
        toks, io, s, first = zip(*items)
        result = dla(model, torch.cat(toks), torch.tensor(io), torch.tensor(s))
        heads.append(result.heads), mlp.append(result.mlp), metric.append(result.metric)
        io_first += first
    heads, io_first = torch.cat(heads), torch.tensor(io_first)
    assert torch.cat(mlp).mean(0)[2] > 0.5 * torch.cat(metric).mean()
    first_name, second_name = heads[io_first].mean(0), heads[~io_first].mean(0)   # [L, H]
    # L1H2 writes the first name of "A and B": the top head when IO comes first (+1.08), the most negative
    # when it comes second (-1.04); no other head's mean passes +-0.5 in either order (measured <= 0.45:
    # the second name is written by several heads, L2H2 +0.40, L1H0 +0.35, L2H3 +0.22)
    assert divmod(int(first_name.argmax()), model.cfg.n_heads) == (1, 2) and first_name[1, 2] > 0.7
    assert divmod(int(second_name.argmin()), model.cfg.n_heads) == (1, 2) and second_name[1, 2] < -0.7
    for grid in (first_name, second_name):
        others = grid.clone()
        others[1, 2] = 0
        assert others.abs().max() < 0.5


def test_dla_command(tmp_path, capsys):
    assert main(["dla", "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    summary = out["summary"]
    assert summary["answer"] == "mary" and summary["wrong"] == "john"
    assert summary["sum_error"] < 1e-3 * abs(summary["model_value"]) and summary["model_value"] > 5
    assert summary["top"][0][0] == "L2 mlp"
    run = tmp_path / out["run_dir"].split("/")[-1]
    for name in ("dla.csv", "dla_top.png", "dla_heads.png", "result.json", "meta.json"):
        assert (run / name).exists(), name
    with open(run / "dla.csv") as f:
        table = list(csv.DictReader(f))
    totals = sum(float(r["value"]) for r in table if r["kind"] in ("embed", "pos_embed", "attn", "mlp", "ln_bias",
                                                                  "unembed_bias"))
    assert totals == pytest.approx(summary["model_value"], rel=1e-3)
    assert sum(r["kind"] == "head" for r in table) == 12


def test_dla_command_answer_defaults_to_top_prediction(tmp_path, capsys):
    assert main(["dla", "--out", str(tmp_path), "--json", "--prompt", "The capital of France is"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["answer"] == "paris" and summary["wrong"] is None


@pytest.mark.parametrize("args,words", [
    (["--answer", "new york"], "not a single token"),
    (["--prompt", "the capital of france is", "--answer", "paris", "--wrong", "paris"], "same token"),
    (["--prompt", "   "], "empty"),
    (["--top", "0"], "--top"),
])
def test_dla_bad_input(args, words, tmp_path, capsys):
    assert main(["dla", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err

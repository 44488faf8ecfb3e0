"""Direct logit attribution: the parts sum to the model's logit (difference) on the folded AND the unfolded
bundled model (trained LayerNorm weights), on shortformer models (positions never enter the residual),
through Gemma-2-style post-sublayer norms and a logit soft cap (tiny checkpoints of five architectures on
every engine: test_reading_engines.py); the tutorial versions without the LN scale / weight do not sum;
heads sum to their layer; the same DLA on every engine and with or without folding; agreement with transformer-lens's stack_head_results + apply_ln_to_stack; right-padded prompt
sets equal prompt-by-prompt runs; zero-ablated heads write nothing; the heads and MLPs measured to write the
IOI answer on every engine; and the `dla` command (one prompt, --task, --prompts, --with-ablated, bad input)."""
import csv
import json

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mechscope import tasks
from mechscope.cli import main
from mechscope.techniques.ablation import parse_components
from mechscope.techniques.dla import dla, sites, with_ablated

IOI = "When Mary and John went to the store, John gave a drink to"
PROMPTS = [(IOI, "mary", "john"), ("The Louvre is in the city of", "paris", "rome"),
           ("The capital of France is", "paris", None), ("I love this! It's absolutely wonderful and", "lovely", None)]


@pytest.fixture(params=["folded", "unfolded"])
def model(request, toy_model, toy_model_unfolded):
    return toy_model if request.param == "folded" else toy_model_unfolded


def _ids(model, *words):
    return [model.to_single_token(w) if w is not None else None for w in words]


def _assert_identities(result, atol=1e-4):
    """Parts sum to the metric; heads + b_O = each attention layer."""
    assert torch.allclose(result.total(), result.metric, rtol=1e-3, atol=atol)
    torch.testing.assert_close(result.heads.sum(-1) + result.attn_bias, result.attn, atol=atol, rtol=1e-3)


@pytest.mark.parametrize("prompt,answer,wrong", PROMPTS)
def test_parts_sum_to_the_models_logit(model, prompt, answer, wrong):
    a, b = _ids(model, answer, wrong)
    result = dla(model, model.to_tokens(prompt), a, b)
    assert float(result.metric.abs()) > 1.0      # a real logit (difference), not a near-zero one
    _assert_identities(result)
    # the same identity with heads + b_O in place of the attention layers
    parts = (result.embed + result.pos_embed + result.heads.sum((1, 2)) + result.attn_bias.sum(1)
             + result.mlp.sum(1) + result.unembed_bias)
    assert torch.allclose(parts, result.metric, rtol=1e-3, atol=1e-4)
    # and with every neuron + b_out in place of the MLP layers
    b_out = torch.stack([model.blocks[layer].mlp.b_out.detach() for layer in range(model.cfg.n_layers)])
    assert torch.allclose(result.neurons.sum(-1) + result.read @ b_out.T, result.mlp, rtol=1e-4, atol=1e-4)
    # the embedding part is the token embedding: pos_embed is its own part
    _, cache = model.run_with_cache(model.to_tokens(prompt), names_filter=["hook_embed", "hook_pos_embed"])
    assert result.embed[0] == pytest.approx(float(cache["hook_embed"][0, -1] @ result.read[0]), abs=1e-4)
    assert result.pos_embed[0] == pytest.approx(float(cache["hook_pos_embed"][0, -1] @ result.read[0]), abs=1e-4)


def _trained_looking(model, seed=0, zero_biases=False):
    """Weights drawn away from their init: norm weights ~ 1 + 0.5 N(0, 1), positions 2 N(0, 1), the rest
    0.3 N(0, 1) (biases 0 with zero_biases). A config's init (norm weight 1, bias 0) hides norm bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(".w"):
                p.copy_(1 + 0.5 * noise)
            elif zero_biases and name.split(".")[-1].startswith("b"):
                p.zero_()
            else:
                p.copy_((2.0 if name.startswith("pos_embed") else 0.3) * noise)
    return model


def test_shortformer_positions_are_not_in_the_residual():
    """Regression (issue 8): shortformer models (transformer-lens's attn-only-Nl) add hook_pos_embed to
    queries and keys only. Counting it as a residual part broke the sum (by ~0.2-0.3 logits here)."""
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_vocab=50, n_ctx=16, attn_only=True,
                                  positional_embedding_type="shortformer", normalization_type="LN", seed=0)
    model = _trained_looking(HookedTransformer(cfg))
    tokens = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(1))
    result = dla(model, tokens, torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6]))
    assert (result.metric.abs() > 0.3).all()
    _assert_identities(result)
    assert (result.pos_embed == 0).all()
    _, cache = model.run_with_cache(tokens, names_filter=["hook_embed", "hook_pos_embed"])
    torch.testing.assert_close(result.embed, (cache["hook_embed"][:, -1] * result.read).sum(-1), atol=1e-5, rtol=1e-4)
    assert (cache["hook_pos_embed"][:, -1] * result.read).sum(-1).abs().max() > 0.1   # what used to be added


def test_post_sublayer_norms_and_logit_soft_cap():
    """Gemma 2's layout: an RMS norm after each sublayer (hook_attn_out / hook_mlp_out after it), grouped-query
    attention, no biases, and a final logit soft cap. Heads go through the post-attention norm with its scale
    frozen (checked against ln1_post.hook_scale and its weight); the parts sum to the logit difference before
    the cap, which is the model's own logits with the cap undone."""
    cap = 3.0
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=16,
                                  normalization_type="RMS", use_normalization_before_and_after=True,
                                  output_logits_soft_cap=cap, positional_embedding_type="rotary", gated_mlp=True,
                                  act_fn="gelu_pytorch_tanh", n_key_value_heads=2, seed=0)
    model = _trained_looking(HookedTransformer(cfg), zero_biases=True)
    tokens = torch.randint(0, 50, (3, 10), generator=torch.Generator().manual_seed(1))
    answer, wrong = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    result = dla(model, tokens, answer, wrong)
    logits, cache = model.run_with_cache(tokens)
    uncapped = cap * torch.atanh(logits[:, -1] / cap)
    rows = torch.arange(3)
    torch.testing.assert_close(result.readout, (uncapped[rows, answer] - uncapped[rows, wrong]).detach(),
                               atol=1e-3, rtol=1e-3)
    assert (result.readout - result.metric).abs().min() > 1e-3     # the cap bends the logit difference
    torch.testing.assert_close(result.total(), result.readout, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.heads.sum(-1) + result.attn_bias, result.attn, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(result.neurons.sum(-1), result.mlp, atol=1e-4, rtol=1e-4)
    for layer in range(2):
        block = model.blocks[layer]
        head_out = torch.einsum("bhk,hkd->bhd", cache[f"blocks.{layer}.attn.hook_z"][:, -1], model.W_O[layer])
        frozen = head_out * block.ln1_post.w / cache[f"blocks.{layer}.ln1_post.hook_scale"][:, -1, None]
        torch.testing.assert_close(result.heads[:, layer], (frozen * result.read[:, None]).sum(-1).detach(),
                                   atol=1e-4, rtol=1e-3)


def test_unfolded_model_has_trained_ln_weights_and_bias_terms(toy_model_unfolded):
    """The unfolded model is the case that catches a missing LN weight: its ln_final is far from (w=1, b=0)."""
    ln = toy_model_unfolded.ln_final
    assert (ln.w - 1).abs().max() > 0.1 and ln.b.abs().max() > 0.01
    a, b = _ids(toy_model_unfolded, "mary", "john")
    result = dla(toy_model_unfolded, toy_model_unfolded.to_tokens(IOI), a, b)
    ln_term = (toy_model_unfolded.W_U[:, a] - toy_model_unfolded.W_U[:, b]) @ ln.b   # folded into the constant
    assert float(ln_term.abs()) > 1e-3
    assert float(result.unembed_bias) == pytest.approx(float(ln_term + toy_model_unfolded.b_U[a]
                                                              - toy_model_unfolded.b_U[b]), abs=1e-5)


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
    _, cache = model.run_with_cache(toks, names_filter=sites(model))
    for layer in range(model.cfg.n_layers):
        per_head = torch.einsum("bphk,hkd->bphd", cache[f"blocks.{layer}.attn.hook_z"], model.W_O[layer])
        expected = cache[f"blocks.{layer}.hook_attn_out"] - model.b_O[layer]
        assert torch.allclose(per_head.sum(2), expected, atol=1e-4)


def test_agrees_with_transformer_lens_stack_head_results(toy_model):
    """transformer-lens's own route (folded LN, where its apply_ln_to_stack is complete) gives the same heads."""
    model = toy_model
    toks = model.to_tokens(IOI)
    a, b = _ids(model, "mary", "john")
    _, cache = model.run_with_cache(toks)
    heads = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)   # [L*H, 1, d_model]
    theirs = heads @ (model.W_U[:, a] - model.W_U[:, b])
    result = dla(model, toks, a, b)
    assert torch.allclose(result.heads[0].flatten(), theirs[:, 0].detach(), atol=1e-4)
    layers = cache.decompose_resid(layer=-1, pos_slice=-1, mode="all", apply_ln=True, return_labels=True)
    theirs_layers = dict(zip(layers[1], (layers[0] @ (model.W_U[:, a] - model.W_U[:, b]))[:, 0].tolist()))
    for layer in range(model.cfg.n_layers):
        assert result.attn[0, layer] == pytest.approx(theirs_layers[f"{layer}_attn_out"], abs=1e-4)
        assert result.mlp[0, layer] == pytest.approx(theirs_layers[f"{layer}_mlp_out"], abs=1e-4)
    assert result.embed[0] == pytest.approx(theirs_layers["embed"], abs=1e-4)


def _ioi_set(engine, n=80, seed=0):
    ps = tasks.load_task(engine, "ioi", n=n, seed=seed)
    rows, where = ps.tokens(engine)
    tokens, lengths = tasks.padded(engine, rows)
    answers, wrongs = ps.answer_ids(engine)
    return ps, tokens, lengths, where, answers, wrongs


def test_padded_prompt_set_equals_one_prompt_at_a_time(toy_engine):
    """Prompts of different lengths share right-padded forwards; each is read at its own END."""
    ps, tokens, lengths, where, answers, wrongs = _ioi_set(toy_engine, n=12, seed=3)
    assert len(set(lengths.tolist())) > 1
    batched = dla(toy_engine, tokens, answers, wrongs, where["END"], rows_per_forward=5)
    for i in (0, int(lengths.argmin()), int(lengths.argmax())):
        alone = dla(toy_engine, tokens[i:i + 1, :lengths[i]], answers[i], wrongs[i])
        torch.testing.assert_close(batched.select([i]).heads, alone.heads, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(batched.select([i]).metric, alone.metric, atol=1e-4, rtol=1e-4)
    _assert_identities(batched)


def test_zero_ablated_head_writes_nothing_and_the_rest_is_recomputed(toy_engine):
    """Held zero-ablated, a head's z is 0, so its direct effect is exactly 0; heads in earlier layers run
    before it, so their z is unchanged and their direct effects change only by the final norm's new scale
    (one factor per prompt); the identity still holds in the ablated run."""
    ps, tokens, lengths, where, answers, wrongs = _ioi_set(toy_engine, n=16, seed=4)
    clean, ablated = with_ablated(toy_engine, tokens, answers, wrongs, parse_components(toy_engine, "1.2"), "zero",
                                  where["END"], lengths)
    assert (ablated.heads[:, 1, 2] == 0).all() and clean.heads[:, 1, 2].abs().max() > 0.1
    rescale = ablated.read.norm(dim=-1) / clean.read.norm(dim=-1)          # scale_clean / scale_ablated
    assert (rescale - 1).abs().max() > 1e-3
    torch.testing.assert_close(ablated.heads[:, 0], clean.heads[:, 0] * rescale[:, None], atol=1e-5, rtol=1e-4)
    assert (ablated.heads[:, 2] - clean.heads[:, 2]).abs().max() > 1e-3
    _assert_identities(ablated)


def test_mean_ablation_writes_the_mean_over_real_positions(toy_engine):
    """Mean-ablated, a head's z is its mean over the prompts' real (non-BOS, non-padding) positions."""
    ps, tokens, lengths, where, answers, wrongs = _ioi_set(toy_engine, n=16, seed=5)
    _, ablated = with_ablated(toy_engine, tokens, answers, wrongs, parse_components(toy_engine, "2.1"), "mean",
                              where["END"], lengths)
    _, acts = toy_engine.run(tokens, read=["blocks.2.attn.hook_z"])
    z = acts["blocks.2.attn.hook_z"][:, :, 1]
    mean_z = torch.cat([z[i, 1:lengths[i]] for i in range(len(z))]).mean(0)
    expected = (mean_z @ toy_engine.W_O(2)[1])[None] @ ablated.read.T
    torch.testing.assert_close(ablated.heads[:, 2, 1], expected[0], atol=1e-4, rtol=1e-4)


def test_ioi_answer_is_written_by_L2_mlp_and_name_copying_heads(toy_on):
    """On every engine. Measured on 80 held-out IOI prompts (tasks "ioi", seed 0): the layer-2 MLP writes most
    of the logit difference IO - S directly; attention layers' direct total is ~0. No head writes the IO name
    regardless of name order: L1H2 writes the FIRST name of "A and B" (the top head when IO comes first, the
    most negative when it comes second: +1.16 / -1.17); the second name is spread over several heads (no
    other head's mean passes 0.6 in either order; measured at most 0.51: L2H2 -0.51 / +0.25, L1H3 -0.44 / +0.32)."""
    engine = toy_on
    ps, tokens, lengths, where, answers, wrongs = _ioi_set(engine)
    result = dla(engine, tokens, answers, wrongs, where["END"])
    _assert_identities(result)
    io_first = where["IO"] < where["S1"]
    assert 0.2 < float(io_first.float().mean()) < 0.8
    assert result.mlp.mean(0)[2] > 0.5 * result.metric.mean()
    first_name, second_name = result.heads[io_first].mean(0), result.heads[~io_first].mean(0)   # [L, H]
    assert divmod(int(first_name.argmax()), engine.cfg.n_heads) == (1, 2) and first_name[1, 2] > 0.7
    assert divmod(int(second_name.argmin()), engine.cfg.n_heads) == (1, 2) and second_name[1, 2] < -0.7
    for grid in (first_name, second_name):
        others = grid.clone()
        others[1, 2] = 0
        assert others.abs().max() < 0.6


def test_dla_agrees_across_engines_and_folding(toy_on, toy_model_unfolded):
    """The same weights give the same DLA on every engine and with or without folded LayerNorm: metric,
    embed, pos_embed, every attention layer and head, MLP layer, neuron and the bias terms together, to 1e-4.
    Per-head parts agree because no engine folds the value biases into b_O (mechscope.models): a head's
    b_V @ W_O stays in its z everywhere."""
    from mechscope.models import as_engine

    unfolded = as_engine(toy_model_unfolded)
    ps, tokens, lengths, where, answers, wrongs = _ioi_set(toy_on, n=16, seed=6)
    ours = dla(toy_on, tokens, answers, wrongs, where["END"])
    ref = dla(unfolded, tokens, answers, wrongs, where["END"])
    close = dict(atol=1e-4, rtol=1e-4)
    for field in ("metric", "embed", "pos_embed", "attn", "heads", "mlp", "neurons"):
        torch.testing.assert_close(getattr(ours, field), getattr(ref, field), **close, msg=field)
    torch.testing.assert_close(ours.unembed_bias, ref.unembed_bias, **close)
    m = toy_model_unfolded  # the value-bias terms that folding would have moved out of the heads are not small
    value_bias = torch.stack([torch.einsum("hk,hkd,bd->bh", torch.einsum("d,hdk->hk", m.blocks[layer].ln1.b,
                                                                         m.W_V[layer]) + m.b_V[layer],
                                           m.W_O[layer], ref.read) for layer in range(3)], 1)
    assert value_bias.abs().max() > 1e-3


def _run(tmp_path, capsys, *args):
    assert main(["dla", "--out", str(tmp_path), "--json", *args]) == 0
    out = json.loads(capsys.readouterr().out)
    return out["summary"], tmp_path / out["run_dir"].split("/")[-1]


def test_dla_command(tmp_path, capsys):
    summary, run = _run(tmp_path, capsys)
    assert summary["answer"] == "mary" and summary["wrong"] == "john" and summary["n_prompts"] == 1
    assert summary["sum_error"] < 1e-3 * abs(summary["model_value"]) and summary["model_value"] > 5
    assert summary["top"][0][0] == "L2 mlp"
    for name in ("dla.csv", "dla_per_prompt.csv", "dla_top.png", "dla_heads.png", "result.json", "meta.json"):
        assert (run / name).exists(), name
    with open(run / "dla.csv") as f:
        table = list(csv.DictReader(f))
    totals = sum(float(r["value"]) for r in table if r["kind"] in ("embed", "pos_embed", "attn", "mlp",
                                                                  "unembed_bias"))
    assert totals == pytest.approx(summary["model_value"], rel=1e-3)
    assert sum(r["kind"] == "head" for r in table) == 12


def test_dla_command_answer_defaults_to_top_prediction(tmp_path, capsys):
    summary, _ = _run(tmp_path, capsys, "--prompt", "The capital of France is")
    assert summary["answer"] == "paris" and summary["wrong"] is None


def test_dla_command_on_a_task(tmp_path, capsys):
    """--task ioi: per-prompt values in a CSV that sums to each prompt's metric, intervals that contain
    their mean, the L2 MLP first with every prompt agreeing in sign, and rank stability."""
    summary, run = _run(tmp_path, capsys, "--task", "ioi", "--n", "40")
    assert summary["n_prompts"] == 40 and summary["sum_error"] < 1e-3
    first = summary["components"][0]
    assert first["name"] == "L2 mlp" and first["ci_low"] <= first["mean"] <= first["ci_high"]
    assert first["ci_low"] > 0 and first["sign_share"] > 0.9
    layers = summary["rank_stability"]["layers"]
    assert layers["top_k"][0] == "L2 mlp" and layers["in_top_k_frequency"]["L2 mlp"] == 1.0
    heads = summary["rank_stability"]["heads"]
    assert len(heads["top_k"]) == heads["k"] == min(3, heads["n_ranked"])  # only heads whose interval excludes 0
    with open(run / "dla_per_prompt.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40
    for r in rows[:5]:
        parts = float(r["embed"]) + float(r["pos_embed"]) + sum(float(r[f"L{la} {k}"]) for la in range(3)
                                                                for k in ("attn", "mlp"))
        parts += float(r["unembed bias"])
        assert parts == pytest.approx(float(r["metric"]), abs=1e-3)
    assert len(json.dumps(summary)) < 20_000


def test_dla_command_prompt_file(tmp_path, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in [
        {"prompt": "The capital of France is", "answer": "paris", "wrong": "rome"},
        {"prompt": "The Louvre is in the city of", "answer": "paris", "wrong": "rome"},
        {"prompt": "The Colosseum is in the city of", "answer": "rome", "wrong": "paris"}]))
    summary, run = _run(tmp_path, capsys, "--prompts", str(path))
    assert summary["n_prompts"] == 3 and summary["prompt_set"] == "prompts.jsonl" and summary["sum_error"] < 1e-3
    assert summary["model_value"] > 1


def test_dla_command_backup(tmp_path, capsys):
    """--with-ablated 2.1 (zero): the held head writes 0 and is flagged, not listed as changed; the final norm's
    scale changes (final_norm_rescale != 1), and at the clean scale every component upstream of the head or
    beside it in layer 2 writes exactly what it wrote before (change 0): only the layer-2 MLP can change."""
    summary, run = _run(tmp_path, capsys, "--task", "ioi", "--n", "24", "--with-ablated", "2.1", "--ablation", "zero")
    backup = summary["backup"]
    assert backup["ablated"] == ["L2H1"] and backup["method"] == "zero"
    change = backup["metric_change"]
    assert change["ci_low"] <= change["mean"] <= change["ci_high"]
    assert abs(backup["final_norm_rescale"]["mean"] - 1) > 1e-3
    assert {r["name"] for r in backup["changed"]} <= {"L2 mlp"}
    assert all(r["ci_low"] > 0 or r["ci_high"] < 0 for r in backup["changed"])
    with open(run / "dla_backup.csv") as f:
        rows = {r["component"]: r for r in csv.DictReader(f)}
    assert float(rows["L2H1"]["ablated"]) == 0.0 and rows["L2H1"]["held_ablated"] == "True"
    assert rows["L2 attn"]["held_ablated"] == "True"
    for name, r in rows.items():
        if name not in ("L2H1", "L2 attn", "L2 mlp"):
            assert abs(float(r["change"])) < 1e-3, name
            assert r["held_ablated"] == "False"
    assert (run / "dla_backup_heads.png").exists()
    assert backup["n_tests"] == len(rows) - 2 and backup["multiplicity"].startswith("Benjamini-Hochberg")
    assert all(r["p_adjusted"] < 0.05 for r in backup["changed"])


def test_dla_command_backup_on_one_prompt_flags_nothing(tmp_path, capsys):
    """One prompt has no spread: no interval and no test, so no component is called changed (c14c93b called 7
    components "changed (95% CI excludes 0)" here, with zero-width intervals such as [-0.007, -0.007])."""
    summary, run = _run(tmp_path, capsys, "--with-ablated", "1.2")
    backup = summary["backup"]
    assert backup["n_changed"] == 0 and backup["changed"] == [] and backup["n_tests"] == 0
    assert backup["multiplicity"].startswith("no test")


@pytest.mark.parametrize("args,words", [
    (["--answer", "new york"], "not a single token"),
    (["--prompt", "the capital of france is", "--answer", "paris", "--wrong", "paris"], "same token"),
    (["--prompt", "   "], "empty"),
    (["--top", "0"], "--top"),
    (["--task", "ioi", "--answer", "mary"], "go with --prompt"),
    (["--task", "ioi", "--n", "0"], "--n must be at least 1"),
    (["--task", "ioi", "--with-ablated", "9.9"], "out of range"),
    (["--prompt", "the capital of france is", "--wrong", "rome"], "--wrong needs --answer"),
])
def test_dla_bad_input(args, words, tmp_path, capsys):
    assert main(["dla", "--out", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_dla_bad_prompt_files(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "the capital of france is", "answer": "paris", "wrong": "rome"}\n'
                    '{"prompt": "the capital of italy is", "answer": "rome"}\n')
    assert main(["dla", "--out", str(tmp_path), "--prompts", str(path)]) == 2
    err = capsys.readouterr().err
    assert "1 of 2 prompts have a \"wrong\"" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        main(["dla", "--out", str(tmp_path), "--prompt", "x", "--task", "ioi"])
    assert e.value.code == 2

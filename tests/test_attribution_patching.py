"""Attribution patching: exact where the metric is linear in the patched activation, and measured agreement
with exact patching (transformer_lens.patching, a second implementation) on the bundled model's IOI task."""
import json
import random

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens import patching as tl_patching

from mechscope import inputs, metrics
from mechscope.cli import main
from mechscope.techniques import patching
from mechscope.techniques.attribution_patching import (SITES, agreement, attribution_patch, exact_effects,
                                                       exact_neuron_effects)
from mechscope.toy import corpus

TL_EXACT = {"resid_pre": "resid_pre", "attn_out": "attn_out", "mlp_out": "mlp_out",
            "head_out": "attn_head_out_all_pos", "head_out_by_pos": "attn_head_out_by_pos",
            "head_q": "attn_head_q_all_pos", "head_q_by_pos": "attn_head_q_by_pos",
            "head_k": "attn_head_k_all_pos", "head_k_by_pos": "attn_head_k_by_pos",
            "head_v": "attn_head_v_all_pos", "head_v_by_pos": "attn_head_v_by_pos"}


def tl_exact(model, clean, corrupted, metric, names, layer=None):
    """metric(corrupted + clean patch) - metric(corrupted) from transformer_lens.patching (one forward per cell),
    for every layer, or for one `layer` only (the grids then lack their layer axis)."""
    def scalar(logits):
        return metric(logits).mean()
    sizes = {"layer": 1, "pos": clean.shape[1], "head": model.cfg.n_heads}
    out = {}
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
        base = scalar(model(corrupted))
        for name in names:
            fn = getattr(tl_patching, f"get_act_patch_{TL_EXACT[name]}")
            if layer is None:
                out[name] = fn(model, corrupted, cache, scalar) - base
                continue
            axes = ["layer"] + (["pos"] if "head" not in name or "by_pos" in name else []) + \
                   (["head"] if "head" in name else [])
            cells = tl_patching.make_df_from_ranges([sizes[a] for a in axes], axes).assign(layer=layer)
            values = fn(model, corrupted, cache, scalar, index_axis_names=None, index_df=cells)
            out[name] = (values - base).reshape([sizes[a] for a in axes[1:]])
    return out


def random_model(attn_only: bool, seed: int = 0):
    """2 layers, no normalisation anywhere: a logit is linear in the last layer's outputs."""
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=None if attn_only else 64,
                                  n_ctx=16, d_vocab=40, act_fn="gelu", attn_only=attn_only,
                                  normalization_type=None, initializer_range=0.3, seed=seed)
    return HookedTransformer(cfg).eval()


def token_pair(seed: int = 0, batch: int = 2, seq: int = 6):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 40, (batch, seq), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(0, 40, (batch,), generator=gen)
    corrupted[:, 4] = torch.randint(0, 40, (batch,), generator=gen)
    return clean, corrupted


def last_logit_diff(logits, prompts=None):
    return logits[:, -1, 3] - logits[:, -1, 7]


def test_atp_equals_exact_patching_where_the_metric_is_linear():
    """Attention-only, no LayerNorm: a logit is linear in the last layer's attn_out, head outputs z and values v,
    and, for AtP*, in its attention pattern, so AtP (and AtP* for q / k) must equal exact patching there."""
    model = random_model(attn_only=True)
    clean, corrupted = token_pair()
    result = attribution_patch(model, clean, corrupted, last_logit_diff, sites=SITES, atp_star=True)
    exact = tl_exact(model, clean, corrupted, last_logit_diff, list(TL_EXACT.keys() - {"mlp_out", "resid_pre"}), layer=1)
    assert exact["head_out"].abs().max() > 0.3 and exact["head_k_by_pos"].abs().max() > 0.1  # not trivial
    for name in exact:
        torch.testing.assert_close(result.scores[name][-1], exact[name], atol=1e-4, rtol=0, msg=name)
    # through a softmax AtP is only an approximation: plain AtP misses q / k effects, and resid_pre of layer 1
    plain = attribution_patch(model, clean, corrupted, last_logit_diff, sites=["qkv"])
    assert (plain.scores["head_k_by_pos"][-1] - exact["head_k_by_pos"]).abs().max() > 1e-2
    resid = tl_exact(model, clean, corrupted, last_logit_diff, ["resid_pre"], layer=1)["resid_pre"]
    assert (result.scores["resid_pre"][-1] - resid).abs().max() > 1e-3
    engine = exact_effects(model, clean, corrupted, patching.logit_diff_metric(3, 7), ["head_out_by_pos", "head_k"])
    for name, values in engine.items():  # the command's exact engine, reshaped like the AtP grids
        torch.testing.assert_close(values[-1], exact[name], atol=1e-4, rtol=1e-4)


def test_atp_equals_exact_patching_for_the_last_mlp_and_its_neurons():
    model = random_model(attn_only=False, seed=1)
    clean, corrupted = token_pair(seed=1)
    result = attribution_patch(model, clean, corrupted, last_logit_diff, sites=["mlp_out", "neurons"])
    exact = tl_exact(model, clean, corrupted, last_logit_diff, ["mlp_out"], layer=1)
    torch.testing.assert_close(result.scores["mlp_out"][-1], exact["mlp_out"], atol=1e-4, rtol=0)
    neurons = [(1, i) for i in range(64)]
    checked = exact_neuron_effects(model, clean, corrupted, patching.logit_diff_metric(3, 7), neurons)
    assert checked.abs().max() > 0.05
    torch.testing.assert_close(result.scores["neurons"][1], checked, atol=1e-4, rtol=0)


def test_agreement_numbers():
    a = torch.tensor([[1.0, 0.0], [3.0, -2.0]])
    out = agreement(a, 2 * a, k=2)
    assert out["pearson_r"] == pytest.approx(1.0) and out["top_k_overlap"] == 1.0
    assert out["max_abs_error"] == pytest.approx(3.0)
    assert agreement(a, -a, k=2)["pearson_r"] == pytest.approx(-1.0)


def ioi_pair(model, rng):
    """A held-out IOI prompt and its corruption (the second subject replaced by the IO) -> tokens, io, s."""
    prompt, io, s = corpus.ioi_prompt(rng, held_out=True)
    words = prompt.split()
    last_s = len(words) - 1 - words[::-1].index(s)
    corrupted = " ".join(words[:last_s] + [io] + words[last_s + 1:])
    clean, corrupted = inputs.paired_tokens(model, prompt, corrupted)
    return clean, corrupted, inputs.single_token(model, io), inputs.single_token(model, s)


@pytest.fixture(scope="module")
def ioi_agreement(toy_model):
    """AtP vs exact patching (the `patch` engine) on 6 held-out IOI prompts: one agreement per prompt and grid."""
    rng = random.Random(0)
    out = {"resid_pre": [], "attn_out": [], "mlp_out": [], "head_out": []}
    for _ in range(6):
        clean, corrupted, io, s = ioi_pair(toy_model, rng)
        result = attribution_patch(toy_model, clean, corrupted, lambda logits, _: metrics.logit_diff(logits, io, s),
                                   sites=["resid", "attn_out", "mlp_out", "heads"])
        assert result.clean_metric > 0 > result.corrupted_metric  # the model does IOI on held-out prompts
        exact = exact_effects(toy_model, clean, corrupted, patching.logit_diff_metric(io, s), list(out))
        for name in out:
            out[name].append(agreement(result.scores[name], exact[name], k=5))
    return out


def test_atp_agrees_with_exact_patching_on_ioi(ioi_agreement):
    r = {name: torch.tensor([a["pearson_r"] for a in rows]) for name, rows in ioi_agreement.items()}
    overlap = {name: torch.tensor([a["top_k_overlap"] for a in rows]) for name, rows in ioi_agreement.items()}
    print({name: [round(v, 3) for v in values.tolist()] for name, values in r.items()})
    print({name: values.tolist() for name, values in overlap.items()})
    assert r["resid_pre"].min() > 0.8
    for name in r:
        assert r[name].mean() > 0.9, name


def test_exact_effects_match_transformer_lens(toy_model):
    """The command's exact comparison (the `patch` engine, reshaped like the AtP grids) equals transformer_lens.
    (The by-position head grids are checked on the small random model in the linear test.)"""
    clean, corrupted, io, s = ioi_pair(toy_model, random.Random(1))
    ours = exact_effects(toy_model, clean, corrupted, patching.logit_diff_metric(io, s), ["resid_pre", "head_out"])
    theirs = tl_exact(toy_model, clean, corrupted, lambda lg: metrics.logit_diff(lg, io, s), ours, layer=1)
    for name in ours:
        torch.testing.assert_close(ours[name][1], theirs[name], atol=1e-4, rtol=1e-4)


def test_cli_attribution_patch(tmp_path, capsys):
    code = main(["attribution-patch", "--sites", "resid,neurons", "--top-k", "5",
                 "--out", str(tmp_path), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    run_dir = tmp_path / printed["run_dir"].split("/")[-1]
    summary = printed["summary"]
    assert summary["clean_metric"] > 0 > summary["corrupted_metric"]
    assert summary["compared_exact"]
    assert summary["grids"]["resid_pre"]["agreement"]["pearson_r"] > 0.5
    for name in ("resid_pre.png", "resid_pre.csv", "neurons.png", "agreement.png", "result.json"):
        assert (run_dir / name).exists(), name
    result = json.loads((run_dir / "result.json").read_text())
    neurons = result["grids"]["neurons"]["top"]
    assert len(neurons) == 5 and all("exact" in t for t in neurons)
    # every neuron's estimate is in neurons.csv (and each prompt's in a safetensors file), not in result.json
    import csv

    from safetensors.torch import load_file
    rows = {f"L{r['layer']}N{r['neuron']}": float(r["atp"]) for r in csv.DictReader(open(run_dir / "neurons.csv"))}
    per_prompt = load_file(run_dir / "neurons_per_prompt.safetensors")["atp"]
    assert len(rows) == per_prompt[0].numel() and result["grids"]["neurons"]["values"] == "neurons.csv"
    for t in neurons:   # one prompt: the mean estimate is that prompt's, as in the csv and the tensor
        layer, unit = map(int, t["neuron"][1:].split("N"))
        assert rows[t["neuron"]] == pytest.approx(t["atp"], abs=1e-4) == float(per_prompt[0, layer, unit])


@pytest.mark.parametrize("argv, message", [
    (["--sites", "resid,bogus"], "unknown site"),
    (["--clean", "The capital of France is"], "--clean needs"),
    (["--clean", "The capital of France is", "--corrupted", "The capital of the big France is",
      "--answer", "paris", "--wrong", "rome"], "same number of tokens"),
    (["--top-k", "0"], "--top-k"),
    (["--stability-k", "0"], "--stability-k"),
    (["--answer", "zzzzqqq"], "single token"),
    (["--task", "facts", "--n", "0"], "--n must be at least 1"),
    (["--task", "ioi", "--pairs", "p.jsonl"], "pass one of --task"),
])
def test_cli_attribution_patch_bad_input(tmp_path, capsys, argv, message):
    assert main(["attribution-patch", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


# ------------------------------------------------------------------------- prompt sets and engines
from tests.conftest import BACKENDS as ENGINES  # noqa: E402  every engine


def test_padded_prompt_set_equals_each_prompt_alone(toy_engine):
    """AtP over a right-padded prompt set: each prompt's estimates are those of the prompt run alone (padding
    positions NaN), and the exact per-prompt effects likewise."""
    from mechscope.tasks import load_task

    batch = patching.pair_batch(toy_engine, load_task(toy_engine, "ioi", n=6, seed=0))
    assert len(set(batch.lengths.tolist())) > 1
    read = batch.lengths - 1
    together = attribution_patch(toy_engine, batch.clean, batch.corrupted,
                                 lambda lg, rows: metrics.logit_diff(lg, batch.answer[rows], batch.wrong[rows],
                                                                     pos=read[rows]),
                                 sites=["resid", "heads", "neurons"], lengths=batch.lengths)
    exact = exact_effects(toy_engine, batch.clean, batch.corrupted, patching.logit_diff_metric(batch.answer, batch.wrong),
                          ["resid_pre", "head_out"], lengths=batch.lengths, per_prompt=True)
    for i in (0, 3):
        n = int(batch.lengths[i])
        clean, corrupted = batch.clean[i:i + 1, :n], batch.corrupted[i:i + 1, :n]
        a, w = int(batch.answer[i]), int(batch.wrong[i])
        alone = attribution_patch(toy_engine, clean, corrupted, lambda lg, _: metrics.logit_diff(lg, a, w),
                                  sites=["resid", "heads", "neurons"])
        for name, value in alone.per_prompt.items():
            got = together.per_prompt[name][i]
            if name in ("resid_pre", "head_out_by_pos"):
                assert got[:, n:].isnan().all()
                got = got[:, :n]
            torch.testing.assert_close(got, value[0], atol=1e-4, rtol=1e-4, msg=name)
        alone_exact = exact_effects(toy_engine, clean, corrupted, patching.logit_diff_metric(a, w), ["resid_pre"])
        torch.testing.assert_close(exact["resid_pre"][i][:, :n], alone_exact["resid_pre"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend", ENGINES)
def test_cli_prompt_set_agreement(backend, tmp_path, capsys):
    """--task ioi: named-position columns, intervals, and AtP's agreement with exact patching per prompt (the
    bundled model: r > 0.9 for the residual stream and the heads)."""
    assert main(["attribution-patch", "--backend", backend, "--task", "ioi", "--n", "8", "--sites", "resid,heads",
                 "--out", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["columns"] == "named positions" and summary["n_pairs"] == 8
    for name in ("resid_pre", "head_out"):
        grid = summary["grids"][name]
        assert grid["agreement_per_prompt"]["pearson_r"]["mean"] > 0.9 and grid["agreement"]["pearson_r"] > 0.9
        top = grid["top"][0]
        assert top["ci"][0] <= top["atp"] <= top["ci"][1]
    assert summary["grids"]["resid_pre"]["top"][0]["col"] == "END"
    assert summary["grids"]["head_out"]["top"][0]["row"] == "L0" and summary["grids"]["head_out"]["top"][0]["col"] == "H2"


def test_cli_intervals_resample_templates(toy_engine, tmp_path, capsys):
    """Issue 17: IOI prompts share templates, so the command's intervals and rank stability resample templates
    (cluster bootstrap), as patch does; before, they resampled prompts. The top head's interval is the cluster
    interval of its per-prompt estimates, and rank stability is reported for k = 1..--stability-k."""
    from mechscope import stats
    from mechscope.tasks import load_task

    assert main(["attribution-patch", "--task", "ioi", "--n", "16", "--sites", "heads", "--stability-k", "2",
                 "--out", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert 1 < summary["n_groups"] < summary["n_pairs"] == 16
    grid = summary["grids"]["head_out"]
    assert grid["stability"]["k"] <= 2 and len(grid["stability"]["set_frequency_by_k"]) == grid["stability"]["k"]
    prompt_set = load_task(toy_engine, "ioi", n=16, seed=0)
    batch = patching.pair_batch(toy_engine, prompt_set)
    read = batch.lengths - 1
    result = attribution_patch(toy_engine, batch.clean, batch.corrupted,
                               lambda lg, rows: metrics.logit_diff(lg, batch.answer[rows], batch.wrong[rows],
                                                                   pos=read[rows]), sites=["heads"],
                               lengths=batch.lengths)
    top = grid["top"][0]
    layer, head = int(top["row"][1:]), int(top["col"][1:])
    values = result.per_prompt["head_out"][:, layer, head][:, None]
    _, low, high = stats.interval(values, seed=0, groups=prompt_set.groups)
    _, naive_low, naive_high = stats.interval(values, seed=0)
    assert top["ci"] == pytest.approx([float(low), float(high)], abs=1e-4)
    assert (float(naive_low), float(naive_high)) != pytest.approx((float(low), float(high)), abs=1e-4)

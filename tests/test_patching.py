"""Activation patching: cell-for-cell agreement with transformer_lens.patching, exact identities, the sign
conventions of noising / denoising, padded batches, and the information flow measured on the bundled model."""
import json

import pytest
import torch
import transformer_lens as tl
from transformer_lens import patching as tlp

from mechscope.cli import main
from mechscope.techniques import patching

IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
FACT_CLEAN, FACT_CORRUPTED = "The Louvre is in the city of", "The Colosseum is in the city of"

# transformer-lens' function for (component, by_position), and how to permute its result to ours
TL_SWEEPS = {
    ("resid_pre", True): (tlp.get_act_patch_resid_pre, None),
    ("resid_mid", True): (tlp.get_act_patch_resid_mid, None),
    ("attn_out", True): (tlp.get_act_patch_attn_out, None),
    ("mlp_out", True): (tlp.get_act_patch_mlp_out, None),
    ("z", True): (tlp.get_act_patch_attn_head_out_by_pos, (0, 2, 1)),
    ("q", True): (tlp.get_act_patch_attn_head_q_by_pos, (0, 2, 1)),
    ("k", True): (tlp.get_act_patch_attn_head_k_by_pos, (0, 2, 1)),
    ("v", True): (tlp.get_act_patch_attn_head_v_by_pos, (0, 2, 1)),
    ("pattern", True): (tlp.get_act_patch_attn_head_pattern_by_pos, None),
    ("z", False): (tlp.get_act_patch_attn_head_out_all_pos, None),
    ("q", False): (tlp.get_act_patch_attn_head_q_all_pos, None),
    ("k", False): (tlp.get_act_patch_attn_head_k_all_pos, None),
    ("v", False): (tlp.get_act_patch_attn_head_v_all_pos, None),
    ("pattern", False): (tlp.get_act_patch_attn_head_pattern_all_pos, None),
}


def tl_reference(model, clean, corrupted, answer, wrong, component, by_position, mode="denoise"):
    """transformer_lens.patching's sweep with the mean logit difference at the last position, in our layout."""
    fn, perm = TL_SWEEPS[(component, by_position)]
    source, target = (clean, corrupted) if mode == "denoise" else (corrupted, clean)
    rows = torch.arange(len(clean))

    def metric(logits):
        return (logits[rows, -1, answer] - logits[rows, -1, wrong]).mean()
    _, cache = model.run_with_cache(source)
    with torch.no_grad():
        out = fn(model, target, cache, metric)
    return out.permute(*perm) if perm else out


def tiny_model(**overrides):
    cfg = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=32, d_vocab=50, act_fn="gelu",
               normalization_type="LN", seed=3)
    return tl.HookedTransformer(tl.HookedTransformerConfig(**(cfg | overrides))).eval()


def tiny_pair(n=2, seq=7):
    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(4, 50, (n, seq), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 2] = (corrupted[:, 2] + 1) % 50
    corrupted[-1, 4] = (corrupted[-1, 4] + 3) % 50
    return clean, corrupted, torch.tensor([5, 6][:n]), torch.tensor([8, 9][:n])


@pytest.fixture(scope="module")
def ioi(toy_model):
    batch = patching.pair_batch(toy_model, [{"clean": IOI_CLEAN, "corrupted": IOI_CORRUPTED, "answer": "mary",
                                             "wrong": "john"}])
    return batch, patching.logit_diff_metric(batch.answer, batch.wrong)


@pytest.fixture(scope="module")
def fact(toy_model):
    batch = patching.pair_batch(toy_model, [{"clean": FACT_CLEAN, "corrupted": FACT_CORRUPTED, "answer": "paris",
                                             "wrong": "rome"}])
    return batch, patching.logit_diff_metric(batch.answer, batch.wrong)


# ------------------------------------------------------------------ agreement with transformer-lens
@pytest.mark.parametrize("component,by_position", list(TL_SWEEPS))
def test_tiny_model_matches_transformer_lens(component, by_position):
    model = tiny_model()
    clean, corrupted, answer, wrong = tiny_pair()
    ours = patching.patch_sweep(model, clean, corrupted, component, patching.logit_diff_metric(answer, wrong),
                                by_position=by_position, batch_size=6)  # several chunks per layer
    ref = tl_reference(model, clean, corrupted, answer, wrong, component, by_position)
    assert ours.values.shape == ref.shape
    assert torch.allclose(ours.values, ref, atol=1e-4)


@pytest.mark.parametrize("component,by_position", list(TL_SWEEPS))
def test_generic_path_matches_transformer_lens(component, by_position):
    """The path every engine has (engine.run with edits, cells of all layers as batch rows), run on tl."""
    model = tiny_model()
    clean, corrupted, answer, wrong = tiny_pair()
    ours = patching.patch_sweep(model, clean, corrupted, component, patching.logit_diff_metric(answer, wrong),
                                by_position=by_position, batch_size=6, implementation="generic")
    ref = tl_reference(model, clean, corrupted, answer, wrong, component, by_position)
    assert ours.meta["implementation"] == "generic (tl)"
    assert torch.allclose(ours.values, ref, atol=1e-4)


@pytest.mark.parametrize("implementation", patching.IMPLEMENTATIONS)
@pytest.mark.parametrize("component", ["resid_pre", "k"])
def test_rotary_grouped_query_model_matches_transformer_lens(component, implementation):
    """Suffix-only runs read cached keys of the prefix: check them where keys are rotated and grouped."""
    model = tiny_model(positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=2)
    clean, corrupted, answer, wrong = tiny_pair()
    for mode in ("denoise", "noise"):
        ours = patching.patch_sweep(model, clean, corrupted, component, patching.logit_diff_metric(answer, wrong),
                                    mode=mode, implementation=implementation)
        ref = tl_reference(model, clean, corrupted, answer, wrong, component, True, mode)
        assert torch.allclose(ours.values, ref, atol=1e-4), mode


def test_generic_path_skips_cells_with_equal_activations(toy_model, ioi):
    """Cells whose source and target activations are equal are the target's own value: before the first
    differing token (position 10 of the IOI pair) nothing runs, and the grid is still exact."""
    batch, metric = ioi
    fast = patching.patch_sweep(toy_model, batch.clean, batch.corrupted, "resid_pre", metric)
    generic = patching.patch_sweep(toy_model, batch.clean, batch.corrupted, "resid_pre", metric,
                                   implementation="generic")
    torch.testing.assert_close(generic.values, fast.values, atol=1e-5, rtol=0)
    n_layers, seq = generic.values.shape
    assert generic.meta["cells_run"] <= n_layers * (seq - 10)


@pytest.mark.parametrize("component,by_position", [("resid_pre", True), ("attn_out", True), ("mlp_out", True),
                                                   ("z", True), ("z", False), ("pattern", False)])
def test_bundled_model_matches_transformer_lens(toy_model, ioi, fact, component, by_position):
    batch, metric = fact if component == "z" else ioi  # the shorter prompt for heads: TL runs 1 forward per cell
    ours = patching.patch_sweep(toy_model, batch.clean, batch.corrupted, component, metric, by_position=by_position)
    ref = tl_reference(toy_model, batch.clean, batch.corrupted, batch.answer, batch.wrong, component, by_position)
    assert torch.allclose(ours.values, ref, atol=1e-4)


def test_suffix_groups_and_chunks_do_not_change_results(toy_model, ioi):
    batch, metric = ioi
    runs = [patching.patch_sweep(toy_model, batch.clean, batch.corrupted, "k", metric, suffix_groups=g,
                                 batch_size=b).values for g, b in ((1, None), (5, 7))]
    assert torch.allclose(runs[0], runs[1], atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"output_logits_soft_cap": 2.0}])
@pytest.mark.parametrize("component,by_position", [("resid_pre", True), ("z", True), ("z", False)])
def test_packed_path_with_two_logits_matches_transformer_lens(overrides, component, by_position):
    """The packed path (one matmul per block over every cell's suffix rows) with the logit-difference readout
    (two unembedding columns per cell, soft cap included) and with a metric on the full logits: both equal
    transformer_lens.patching; chunked runs (batch_size) change nothing."""
    model = tiny_model(**overrides)
    clean, corrupted, answer, wrong = tiny_pair()
    pair_metric = patching.logit_diff_metric(answer, wrong)
    full_metric = patching.Metric("logit_diff", pair_metric.score)  # no logit_pair: scores full logits
    ref = tl_reference(model, clean, corrupted, answer, wrong, component, by_position)
    for metric, batch_size in ((pair_metric, None), (full_metric, None), (pair_metric, 3)):
        ours = patching.patch_sweep(model, clean, corrupted, component, metric, by_position=by_position,
                                    batch_size=batch_size)
        assert ours.meta["implementation"] == "packed suffixes (tl)"
        torch.testing.assert_close(ours.values, ref, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- exact identities
def test_patching_the_whole_residual_restores_clean_logits(toy_model, ioi):
    batch, _ = ioi
    for metric in (patching.kl_to_clean_metric(), patching.logit_diff_metric(batch.answer, batch.wrong),
                   patching.answer_prob_metric(batch.answer)):
        every = patching.patch_sweep(toy_model, batch.clean, batch.corrupted, "resid_pre", metric, by_position=False)
        assert torch.allclose(every.values, every.clean.expand_as(every.values), atol=1e-5)
        final = patching.patch_sweep(toy_model, batch.clean, batch.corrupted, "resid_post", metric)
        assert torch.allclose(final.values[-1, -1], final.clean[0], atol=1e-5)  # last layer, answer position
        if metric.name == "kl_to_clean":  # 0 for the clean run itself, large for the corrupted one
            assert every.clean.abs().max() < 1e-5 and every.values.abs().max() < 1e-5 and every.corrupted.min() > 1


def test_noising_and_denoising_conventions(toy_model, ioi):
    batch, metric = ioi
    runs = {mode: patching.patch_sweep(toy_model, batch.clean, batch.corrupted, "resid_pre", metric, mode=mode,
                                       by_position=False) for mode in ("denoise", "noise")}
    assert runs["denoise"].clean.mean() > runs["denoise"].corrupted.mean()       # mary is the clean answer
    assert torch.allclose(runs["denoise"].recovery, torch.ones(3), atol=1e-5)    # all of clean -> clean
    assert torch.allclose(runs["noise"].recovery, torch.zeros(3), atol=1e-5)     # all of corrupted -> corrupted
    by_pos = {mode: patching.patch_sweep(toy_model, batch.clean, batch.corrupted, "resid_pre", metric, mode=mode)
              for mode in ("denoise", "noise")}
    s2 = 10  # [bos] when mary and john went to the store , JOHN
    assert by_pos["denoise"].recovery[0, s2] > 0.8 and by_pos["noise"].recovery[0, s2] < 0.2
    unchanged = by_pos["noise"].recovery[:, :s2]  # before the corrupted token: nothing changes
    assert torch.allclose(unchanged, torch.ones_like(unchanged), atol=1e-5)


# --------------------------------------------------------------------------------- batches
def test_padded_batch_equals_each_pair_alone(toy_model):
    pairs = [{"clean": IOI_CLEAN, "corrupted": IOI_CORRUPTED, "answer": "mary", "wrong": "john"},
             {"clean": FACT_CLEAN, "corrupted": FACT_CORRUPTED, "answer": "paris", "wrong": "rome"}]
    batch = patching.pair_batch(toy_model, pairs)
    assert batch.lengths.tolist() == [15, 8]
    n_short = 8
    for component in ("resid_pre", "z"):
        alones = []
        together = patching.patch_sweep(toy_model, batch.clean, batch.corrupted, component,
                                        patching.logit_diff_metric(batch.answer, batch.wrong), lengths=batch.lengths)
        for i, pair in enumerate(pairs):
            one = patching.pair_batch(toy_model, [pair])
            alone = patching.patch_sweep(toy_model, one.clean, one.corrupted, component,
                                         patching.logit_diff_metric(one.answer, one.wrong))
            n = one.clean.shape[1]
            assert torch.allclose(together.per_prompt[i][..., :n], alone.values, atol=1e-5)
            assert torch.isnan(together.per_prompt[i][..., n:]).all()
            if i == 0:  # positions 8..14 only the IOI pair has: its values and its own recovery
                torch.testing.assert_close(together.values[..., n_short:], alone.values[..., n_short:])
                torch.testing.assert_close(together.recovery[..., n_short:], alone.recovery[..., n_short:])
            alones.append(alone)
        # positions both pairs have: ratio of means over the two (issue 8: was normalised over all pairs)
        a, b = alones
        numerator = (a.values[..., :n_short] - a.corrupted) + (b.values - b.corrupted)
        expected = numerator / ((a.clean - a.corrupted) + (b.clean - b.corrupted))
        torch.testing.assert_close(together.recovery[..., :n_short], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together.values[..., :n_short], (a.values[..., :n_short] + b.values) / 2)


def test_different_token_lengths_are_refused(toy_model):
    from mechscope.errors import BadInput

    eiffel = {"clean": "The Eiffel Tower is in the city of", "corrupted": "The Colosseum is in the city of",
              "answer": "paris", "wrong": "rome"}
    with pytest.raises(BadInput, match="same number of tokens"):
        patching.pair_batch(toy_model, [eiffel])
    with pytest.raises(BadInput, match="same shape"):
        patching.patch_sweep(toy_model, torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long),
                             "resid_pre", patching.kl_to_clean_metric())


def test_bfloat16_close_to_float32():
    model = tiny_model()
    clean, corrupted, answer, wrong = tiny_pair()
    metric = patching.logit_diff_metric(answer, wrong)
    full = patching.patch_sweep(model, clean, corrupted, "z", metric).values
    half = patching.patch_sweep(model.to(torch.bfloat16), clean, corrupted, "z", metric).values
    assert half.dtype == torch.float32 and (half - full).abs().max() < 0.05 * full.abs().max()


# --------------------------------------------------------------- flow measured on the bundled model
def test_ioi_flow(toy_model, ioi):
    """Clean and corrupted differ in the S2 name (position 10): the information sits there in layer 0 and
    has moved to the final position by the last layer."""
    batch, metric = ioi
    rec = patching.patch_sweep(toy_model, batch.clean, batch.corrupted, "resid_pre", metric).recovery
    assert rec.argmax(1).tolist()[0] == 10 and rec.argmax(1).tolist()[-1] == 14
    assert rec[0, 10] > 0.9 and rec[-1, 14] > 0.5
    heads = patching.patch_sweep(toy_model, batch.clean, batch.corrupted, "z", metric, by_position=False).recovery
    assert heads.argmax().item() == 2 and heads[0, 2] > 0.5  # measured: head 0.2 moves it (0.67; next 0.0: 0.15)


def test_fact_flow(toy_model, fact):
    """The landmark token (position 2) carries the fact early; the final position late."""
    batch, metric = fact
    rec = patching.patch_sweep(toy_model, batch.clean, batch.corrupted, "resid_pre", metric).recovery
    assert rec.argmax(1).tolist()[0] == 2 and rec.argmax(1).tolist()[-1] == 7


# --------------------------------------------------------------------------------------- command
def test_command_writes_heatmaps_and_numbers(tmp_path, capsys):
    code = main(["patch", "--component", "resid_post,z", "--out", str(tmp_path), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    run_dir = tmp_path / out["run_dir"].split("/")[-1]
    for name in ("resid_post.png", "resid_post.csv", "z.png", "z.csv", "result.json", "meta.json"):
        assert (run_dir / name).exists(), name
    summary = out["summary"]["components"]
    assert summary["resid_post"]["top_position_per_layer"][-1] == "14 to"
    result = json.loads((run_dir / "result.json").read_text())
    assert abs(result["results"]["resid_post"]["values"][-1][-1] - 1.0) < 1e-4  # last layer, answer position
    assert len(result["results"]["z"]["row_labels"]) == 12  # 3 layers x 4 heads, by position


def test_noise_mode_ranks_cells_by_effect_and_says_which_way_is_an_effect(tmp_path, capsys):
    """Noise mode: recovery 0 is the strongest effect and 1 none; the top cells are ranked by |recovery - 1|,
    each carries its effect, and the summary says how to read it (a "top" list once mixed 0s and 1s unexplained).
    Known answer: at layer 0 the residual where the prompts differ (S2) carries everything (recovery 0)."""
    assert main(["patch", "--mode", "noise", "--task", "ioi", "--n", "4", "--component", "resid_pre,attn_out",
                 "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "recovery 0" in out["summary"]["effect"] and "recovery 1" in out["summary"]["effect"]
    for component in ("resid_pre", "attn_out"):
        top = out["summary"]["components"][component]["top"]
        assert all(c["effect"] == pytest.approx(c["value"] - 1, abs=2e-3) for c in top)
        sizes = [abs(c["effect"]) for c in top]
        assert sizes == sorted(sizes, reverse=True)
    s2 = [c for c in out["summary"]["components"]["resid_pre"]["top"] if c["row"] == "L0" and c["col"] == "S2"]
    assert s2 and s2[0]["effect"] == pytest.approx(-1, abs=1e-3)


def test_command_reads_a_pairs_file(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(p) for p in [
        {"clean": FACT_CLEAN, "corrupted": FACT_CORRUPTED, "answer": "paris", "wrong": "rome"},
        {"clean": IOI_CLEAN, "corrupted": IOI_CORRUPTED, "answer": "mary", "wrong": "john"}]) + "\n")
    code = main(["patch", "--pairs", str(pairs), "--component", "resid_pre", "--all-positions", "--metric", "kl",
                 "--out", str(tmp_path), "--json"])
    assert code == 0
    entry = json.loads(capsys.readouterr().out)["summary"]["components"]["resid_pre"]
    assert entry["shape"] == [3] and entry["clean"] < 1e-5 and entry["corrupted"] > 0.1


@pytest.mark.parametrize("argv,message", [
    (["--clean", "The Eiffel Tower is in the city of", "--corrupted", "The Colosseum is in the city of",
      "--answer", "paris", "--wrong", "rome"], "same number of tokens"),
    (["--component", "resid"], "unknown component"),
    (["--clean", FACT_CLEAN, "--corrupted", FACT_CORRUPTED, "--answer", "paris"], "--wrong"),
    (["--clean", FACT_CLEAN, "--corrupted", FACT_CORRUPTED, "--answer", "paris rome", "--wrong", "rome"],
     "not a single token"),
    (["--pairs", "/nonexistent/pairs.jsonl"], "does not exist"),
    (["--task", "ioi", "--n", "0"], "--n must be at least 1"),
    (["--task", "ioi", "--clean", FACT_CLEAN], "pass one of --task, --pairs FILE or --clean/--corrupted"),
    (["--with-ablated", "7.1"], "out of range"),
    (["--with-ablated", "mlpx"], "cannot read component"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
])
def test_command_bad_inputs(tmp_path, capsys, argv, message):
    assert main(["patch", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("content,message", [
    ('{"clean": "a b"\n', "JSON"),
    ('{"clean": "the capital of france is", "corrupted": "the capital of italy is", "answer": "paris"}\n',
     "lacks wrong"),
    ('{"clean": "the capital of france is", "corrupted": "the capital of italy is", "answer": "paris", '
     '"wrong": "rome", "positions": {"X": "zebra"}}\n', "not in the prompt"),
    ('{"clean": "the capital of france is", "corrupted": "the big capital of italy is", "answer": "paris", '
     '"wrong": "rome"}\n', "same number of tokens"),
])
def test_command_bad_pairs_file(tmp_path, capsys, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    assert main(["patch", "--pairs", str(bad), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


# ------------------------------------------------------------------------- components a model lacks
@pytest.mark.parametrize("overrides,component,message", [
    (dict(attn_only=True), "mlp_out", "no MLP layers"),
    (dict(attn_only=True), "resid_mid", "no resid_mid"),
    (dict(parallel_attn_mlp=True), "resid_mid", "no resid_mid"),
])
def test_missing_components_are_refused(overrides, component, message):
    """Issue 8: a bare KeyError (exit 1) before; now one line naming the site and what to use instead."""
    from mechscope.errors import BadInput

    model = tiny_model(**overrides)
    clean, corrupted, answer, wrong = tiny_pair()
    for implementation in patching.IMPLEMENTATIONS:
        with pytest.raises(BadInput, match=message):
            patching.patch_sweep(model, clean, corrupted, component, patching.logit_diff_metric(answer, wrong),
                                 implementation=implementation)


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory):
    """A tiny random GPT-NeoX checkpoint (parallel attention and MLP: no resid_mid), saved locally."""
    from tests.test_models import _save_tiny

    directory = tmp_path_factory.mktemp("neox")
    _save_tiny("neox", directory)
    return directory


def test_command_refuses_or_skips_missing_components(neox_dir, tmp_path, capsys):
    argv = ["patch", "--model", str(neox_dir), "--backend", "tl", "--clean", "the capital of france is",
            "--corrupted", "the capital of italy is", "--answer", "paris", "--wrong", "rome", "--out", str(tmp_path)]
    assert main(argv + ["--component", "resid_mid"]) == 2
    err = capsys.readouterr().err.strip()  # (transformers' loading bar may come first: not ours)
    line = err.splitlines()[-1]
    assert line.startswith("mechscope patch: error:") and "resid_mid" in line and "parallel" in line
    assert "Traceback" not in err
    assert main(argv + ["--component", "all", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert "resid_mid" in summary["skipped"] and "resid_mid" not in summary["components"]
    assert {"resid_pre", "mlp_out", "z", "pattern"} <= set(summary["components"])


# ------------------------------------------------------------------------- prompt sets and uncertainty
@pytest.fixture(scope="module")
def ioi_set(toy_engine):
    """16 held-out IOI prompts of several templates and lengths, with named positions IO, S1, S2, END."""
    from mechscope.tasks import load_task

    batch = patching.pair_batch(toy_engine, load_task(toy_engine, "ioi", n=16, seed=0))
    assert len(set(batch.lengths.tolist())) > 1 and not batch.same_layout
    return batch, patching.logit_diff_metric(batch.answer, batch.wrong)


def test_named_positions_gather_each_prompts_own_cells(toy_engine, ioi_set):
    """at_positions takes each prompt's values at its own IO / S1 / S2 / END index: the same numbers as the
    prompt patched alone, read at those indices."""
    batch, metric = ioi_set
    full = patching.patch_sweep(toy_engine, batch.clean, batch.corrupted, "resid_pre", metric, lengths=batch.lengths)
    named = full.at_positions(batch.positions)
    assert named.values.shape == (3, 4) and named.meta["position_names"] == ["IO", "S1", "S2", "END"]
    assert not named.per_prompt.isnan().any()
    for i in (0, 5):
        n = int(batch.lengths[i])
        alone = patching.patch_sweep(toy_engine, batch.clean[i:i + 1, :n], batch.corrupted[i:i + 1, :n], "resid_pre",
                                     patching.logit_diff_metric(batch.answer[i], batch.wrong[i]))
        index = torch.tensor([int(v[i]) for v in batch.positions.values()])
        torch.testing.assert_close(named.per_prompt[i], alone.values[:, index], atol=1e-5, rtol=0)


def test_ioi_flow_over_a_prompt_set(toy_engine, ioi_set):
    """The model card's IOI pattern on every prompt: S2 carries the name in layer 0, END in the last layer."""
    batch, metric = ioi_set
    named = patching.patch_sweep(toy_engine, batch.clean, batch.corrupted, "resid_pre", metric,
                                 lengths=batch.lengths).at_positions(batch.positions)
    cells = patching.cell_summary(named)
    s2, end = 2, 3
    assert cells["mean"][0].argmax() == s2 and cells["mean"][-1].argmax() == end
    assert cells["ci_low"][0, s2] > 0.9 and cells["ci_low"][-1, end] > 0.9 and cells["sign_share"][0, s2] == 1
    assert cells["stability"]["top_k_set_frequency"] > 0.2


def test_recovery_interval_is_fiellers(toy_engine, ioi_set):
    """cell_summary's interval for recovery is Fieller's for the ratio of means (stats.ratio_interval on
    patched - corrupted over clean - corrupted, the same prompts); one prompt gives no interval."""
    from mechscope import stats

    batch, metric = ioi_set
    result = patching.patch_sweep(toy_engine, batch.clean, batch.corrupted, "z", metric, by_position=False)
    cells = patching.cell_summary(result, seed=3)
    numerator = (result.per_prompt - result.corrupted[:, None, None]).flatten(1)  # [n, cells]
    denominator = (result.clean - result.corrupted)[:, None].expand_as(numerator)
    _, low, high = stats.ratio_interval(numerator, denominator)
    torch.testing.assert_close(cells["ci_low"].flatten(), low)
    torch.testing.assert_close(cells["mean"], result.recovery)
    assert (cells["ci_low"] <= cells["mean"] + 1e-6).all() and (cells["mean"] <= cells["ci_high"] + 1e-6).all()
    single = patching.cell_summary(patching.patch_sweep(toy_engine, batch.clean[:1, :int(batch.lengths[0])],
                                                        batch.corrupted[:1, :int(batch.lengths[0])], "z",
                                                        metric, by_position=False))
    assert single["ci_low"].isnan().all() and single["ci_high"].isnan().all()


def test_sign_share_describes_the_ratio_of_means():
    """5 prompts whose patched - corrupted are all > 0, two with a gap of -0.02: the reported recovery is the
    ratio of means (+0.743 here), and every prompt's term in it is positive, so the sign share is 1
    (c14c93b: 0.40, from the per-prompt ratios, two of which are negative)."""
    gap = torch.tensor([1.0, 1.0, 1.0, -0.02, -0.02])
    patched = torch.tensor([0.5, 0.6, 0.7, 0.3, 0.1])
    result = patching.PatchResult(patched.mean().view(1), patched.view(5, 1), gap, torch.zeros(5), "z", "denoise",
                                  "logit_diff", ("layer",))
    cells = patching.cell_summary(result)
    assert cells["mean"].item() == pytest.approx(2.2 / 2.96)
    assert cells["sign_share"].item() == 1.0


# ------------------------------------------------------------------------- backup: components held ablated
def test_mean_ablation_reference_leaves_out_padding(toy_engine, ioi_set):
    from mechscope.techniques import ablation

    batch, _ = ioi_set
    head = ablation.parse_components(toy_engine, "0.2")
    (site, fn), = ablation.ablation_edits(toy_engine, head, "mean", reference=batch.clean, lengths=batch.lengths)
    _, acts = toy_engine.run(batch.clean, read=[site])
    real = torch.cat([acts[site][i, 1:int(n), 2] for i, n in enumerate(batch.lengths)])  # BOS and padding out
    written = fn(torch.zeros_like(acts[site][:1]))[0, 0, 2]
    torch.testing.assert_close(written, real.mean(0))


def test_backup_heads_with_a_head_held_ablated(toy_engine, ioi_set):
    """Wang et al.'s backup test on the bundled model. Identity: with head 0.2 held ablated in every run,
    patching its own output does nothing, so its change is minus its effect, prompt by prompt. Measured:
    head 0.0 then carries more (its effect rises by ~0.1 of the clean - corrupted gap); the layer-1 heads,
    which carry nothing, do not change."""
    from mechscope.techniques import ablation

    batch, metric = ioi_set
    edits = ablation.ablation_edits(toy_engine, ablation.parse_components(toy_engine, "0.2"), "mean",
                                    reference=batch.clean, lengths=batch.lengths)
    runs = [patching.patch_sweep(toy_engine, batch.clean, batch.corrupted, "z", metric, by_position=False,
                                 lengths=batch.lengths, edits=e) for e in ((), edits)]
    change = patching.effect_change(*runs)
    torch.testing.assert_close(change["per_prompt"][:, 0, 2], -runs[0].effect_per_prompt()[:, 0, 2], atol=1e-5, rtol=0)
    assert change["ci_low"][0, 0] > 0.03                          # head 0.0 takes over part of 0.2's job
    assert change["mean"][1].abs().max() < 0.02                   # layer 1: no change
    generic = patching.patch_sweep(toy_engine, batch.clean, batch.corrupted, "z", metric, by_position=False,
                                   lengths=batch.lengths, edits=edits, implementation="generic")
    torch.testing.assert_close(generic.per_prompt, runs[1].per_prompt, atol=1e-4, rtol=0)


def test_backup_change_is_a_ratio_of_means_like_recovery():
    """A prompt whose clean and corrupted runs nearly agree must not dominate the change: the mean is
    mean(change) / mean(gap), as recovery is (the per-prompt ratio gave (0.1 / 1 + 0.1 / 0.001) / 2 = 50)."""
    def result(patched):
        per_prompt = torch.tensor(patched).view(2, 1)
        return patching.PatchResult(per_prompt.mean(0), per_prompt, torch.tensor([1.0, 0.001]), torch.zeros(2),
                                    "z", "denoise", "logit_diff", ("layer",))
    change = patching.effect_change(result([0.5, 0.0005]), result([0.6, 0.1005]))
    assert change["mean"].item() == pytest.approx(0.2 / 1.001)
    assert change["ci_low"].item() <= change["mean"].item() <= change["ci_high"].item()
    assert change["per_prompt"][:, 0].tolist() == pytest.approx([0.1, 100.0])


def test_command_backup_option(tmp_path, capsys):
    assert main(["patch", "--task", "ioi", "--n", "8", "--component", "z", "--all-positions",
                 "--with-ablated", "0.2", "--ablation", "zero", "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    backup = out["summary"]["components"]["z"]["backup"]
    assert backup["changed"][0]["row"] == "L0" and backup["changed"][0]["col"] == "H2"
    assert backup["changed"][0]["change"] < -0.3 and backup["changed"][0]["ci"][1] < 0
    assert out["summary"]["with_ablated"] == {"components": ["0.2"], "ablation": "zero", "reference": None}
    assert backup["n_tests"] == 12 and "Benjamini-Hochberg over 12 cells" in backup["multiplicity"]
    assert backup["changed"][0]["p_adjusted"] < 0.05 and backup["changed"][0]["p"] <= backup["changed"][0]["p_adjusted"]
    run_dir = tmp_path / out["run_dir"].split("/")[-1]
    assert (run_dir / "z_backup.png").exists() and (run_dir / "z_backup.csv").exists()


def test_command_backup_option_on_one_prompt_flags_nothing(tmp_path, capsys):
    """One prompt has no spread: no interval, no test, no cell called "changed" (c14c93b flagged every cell
    whose change passed 0.02, with a zero-width interval)."""
    assert main(["patch", "--component", "z", "--all-positions", "--with-ablated", "0.2", "--ablation", "zero",
                 "--out", str(tmp_path), "--json"]) == 0
    backup = json.loads(capsys.readouterr().out)["summary"]["components"]["z"]["backup"]
    assert backup["n_changed"] == 0 and backup["n_tests"] == 0 and backup["multiplicity"].startswith("no test")


# ------------------------------------------------------------------------- engines
from tests.conftest import BACKENDS as ENGINES  # noqa: E402  every engine


@pytest.mark.parametrize("backend", ENGINES)
def test_each_engine_finds_the_ioi_patching_pattern(backend, tmp_path, capsys):
    """The model card's IOI pattern through `mechscope patch --task ioi` on each engine: the S2 position
    carries the name in layer 0, the final position in the later layers, recovery near 1."""
    assert main(["patch", "--backend", backend, "--task", "ioi", "--n", "8", "--component", "resid_pre",
                 "--out", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    entry = summary["components"]["resid_pre"]
    assert summary["positions"] == ["IO", "S1", "S2", "END"] and summary["columns"] == "named positions"
    assert entry["top_position_per_layer"] == ["S2", "END", "END"]
    heatmap = torch.tensor(entry["heatmap"])
    assert heatmap[0, 2] > 0.9 and (heatmap[1:, 3] > 0.9).all() and heatmap[:, :2].abs().max() < 0.05


def test_engines_give_the_same_heatmaps(tmp_path, capsys):
    """`mechscope patch --backend X` on the bundled model: the same JSON heatmaps on every engine."""
    heatmaps = {}
    for backend in ENGINES:
        assert main(["patch", "--backend", backend, "--component", "resid_pre,attn_out,mlp_out,z",
                     "--out", str(tmp_path), "--json"]) == 0
        components = json.loads(capsys.readouterr().out)["summary"]["components"]
        heatmaps[backend] = {name: torch.tensor(entry["heatmap"]) for name, entry in components.items()}
    for backend, maps in heatmaps.items():
        for name, grid in maps.items():
            torch.testing.assert_close(grid, heatmaps["tl"][name], atol=2e-4, rtol=0, msg=f"{backend} {name}")


@pytest.mark.parametrize("component,by_position", [("resid_pre", True), ("attn_out", True), ("mlp_out", True),
                                                   ("z", True), ("z", False), ("v", True), ("pattern", False)])
def test_generic_path_on_the_bundled_model_prompt_set(toy_engine, ioi_set, component, by_position):
    """The generic path (what bridge and nnsight run) equals the suffix-only engine on a padded prompt set."""
    batch, metric = ioi_set
    runs = [patching.patch_sweep(toy_engine, batch.clean[:6], batch.corrupted[:6], component,
                                 patching.logit_diff_metric(batch.answer[:6], batch.wrong[:6]),
                                 by_position=by_position, lengths=batch.lengths[:6], implementation=impl)
            for impl in patching.IMPLEMENTATIONS]
    torch.testing.assert_close(runs[1].per_prompt, runs[0].per_prompt, atol=1e-4, rtol=0, equal_nan=True)


def test_command_summary_stays_bounded(tmp_path, capsys):
    """Every component of the bundled model in one --json summary: all there, under the stdout limit."""
    from mechscope.cli import MAX_STDOUT_CHARS

    assert main(["patch", "--component", "all", "--out", str(tmp_path), "--json"]) == 0
    text = capsys.readouterr().out
    assert len(text) < MAX_STDOUT_CHARS
    assert set(json.loads(text)["summary"]["components"]) == set(patching.COMPONENTS)


@pytest.mark.parametrize("component", ["resid_pre", "resid_mid"])
def test_suffix_only_runs_are_exact_with_qk_norm(component):
    """Qwen3 / Gemma 3 normalise q and k after hook_k (use_qk_norm): suffix-only runs must not reuse cached
    hook_k as the prefix's keys (they did: max |difference| to the generic path 0.65-0.89 on this model)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=32, d_head=8, n_heads=4, d_vocab=50, d_mlp=64,
                                  act_fn="silu", gated_mlp=True, normalization_type="RMS", use_qk_norm=True,
                                  positional_embedding_type="rotary", rotary_dim=8, seed=0)
    model = HookedTransformer(cfg).eval()
    with torch.no_grad():  # norms away from 1, so that skipping them shows
        for block in model.blocks:
            for norm in (block.attn.q_norm, block.attn.k_norm):
                norm.w.mul_(torch.rand(norm.w.shape, generator=torch.Generator().manual_seed(1)) * 3)
    clean = torch.randint(1, 50, (2, 10), generator=torch.Generator().manual_seed(0))
    corrupted = clean.clone()
    corrupted[:, 3] = (corrupted[:, 3] + 7) % 50
    metric = patching.logit_diff_metric(torch.tensor([1, 2]), torch.tensor([3, 4]))
    fast = patching.patch_sweep(model, clean, corrupted, component, metric)
    generic = patching.patch_sweep(model, clean, corrupted, component, metric, implementation="generic")
    torch.testing.assert_close(fast.per_prompt, generic.per_prompt, atol=1e-5, rtol=0)


def test_compare_backend_reports_the_largest_difference_of_two_engines(tmp_path, capsys):
    """--compare-backend ENGINE replaces the hand-written CSV diff an assistant needed: its largest difference is
    the one between the two engines' own runs (known: tl and nnsight agree to ~1e-6 on the bundled model)."""
    def run(*argv):
        assert main(["patch", "--task", "ioi", "--n", "4", "--component", "resid_pre,z", "--out", str(tmp_path),
                     "--json", *argv]) == 0, capsys.readouterr().err
        out = json.loads(capsys.readouterr().out)
        return out["summary"], json.loads((tmp_path / out["run_dir"].split("/")[-1] / "result.json").read_text())["results"]

    summary, tl = run("--backend", "tl", "--compare-backend", "nnsight")
    _, nnsight = run("--backend", "nnsight")
    by_hand = {c: float((torch.tensor(tl[c]["values"]) - torch.tensor(nnsight[c]["values"])).abs().nan_to_num(0).max())
               for c in ("resid_pre", "z")}
    compared = summary["compare_backend"]
    assert compared["engine"] == "nnsight" and compared["max_abs_difference"] < 1e-4
    for c, value in by_hand.items():   # result.json rounds nothing; the summary rounds to 1e-8
        assert compared["per_component"][c] == pytest.approx(value, abs=1e-6)
    assert main(["patch", "--backend", "tl", "--compare-backend", "tl", "--out", str(tmp_path / "x")]) == 2
    assert "is the engine this run uses" in capsys.readouterr().err and not (tmp_path / "x").exists()

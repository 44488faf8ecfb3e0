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


@pytest.mark.parametrize("component", ["resid_pre", "k"])
def test_rotary_grouped_query_model_matches_transformer_lens(component):
    """Suffix-only runs read cached keys of the prefix: check them where keys are rotated and grouped."""
    model = tiny_model(positional_embedding_type="rotary", rotary_dim=8, n_key_value_heads=2)
    clean, corrupted, answer, wrong = tiny_pair()
    for mode in ("denoise", "noise"):
        ours = patching.patch_sweep(model, clean, corrupted, component, patching.logit_diff_metric(answer, wrong),
                                    mode=mode)
        ref = tl_reference(model, clean, corrupted, answer, wrong, component, True, mode)
        assert torch.allclose(ours.values, ref, atol=1e-4), mode


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
    for component in ("resid_pre", "z"):
        together = patching.patch_sweep(toy_model, batch.clean, batch.corrupted, component,
                                        patching.logit_diff_metric(batch.answer, batch.wrong), lengths=batch.lengths)
        for i, pair in enumerate(pairs):
            one = patching.pair_batch(toy_model, [pair])
            alone = patching.patch_sweep(toy_model, one.clean, one.corrupted, component,
                                         patching.logit_diff_metric(one.answer, one.wrong))
            n = one.clean.shape[1]
            assert torch.allclose(together.per_prompt[i][..., :n], alone.values, atol=1e-5)
            assert torch.isnan(together.per_prompt[i][..., n:]).all()


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
    assert heads.argmax().item() == 2 and heads[0, 2] > 0.5  # measured: head 0.2 moves it (0.68; next 0.0: 0.38)


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
])
def test_command_bad_inputs(tmp_path, capsys, argv, message):
    assert main(["patch", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_command_bad_pairs_file(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clean": "a b"\n')
    assert main(["patch", "--pairs", str(bad), "--out", str(tmp_path)]) == 2
    assert "JSON" in capsys.readouterr().err

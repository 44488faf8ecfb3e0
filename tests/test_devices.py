"""Ready for the machines users have (issue 19), checked on the CPU: an activation on another device (torch's fake
tensors stand in for two GPUs), accelerate's disk offload, bfloat16 / float16 runs, chunked against unchunked."""
import copy
import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from conftest import BACKENDS


def _on_first_gpu(engine):
    """A copy of engine that gathers reads on cuda:0 (as under a device_map; nothing runs on it)."""
    engine = copy.copy(engine)
    engine.cfg = dataclasses.replace(engine.cfg, device="cuda:0")
    engine._sites_cache = None
    return engine


def _edit_applied(engine, site, fn, act):
    """The engine's own application of edit fn at site to activation act (a layer's value on its device)."""
    if engine.name == "nnsight":
        from mechscope.engines.nnsight import _apply

        op = engine._plan(edits=[(site, fn)])[0].ops[0]
        return _apply(op, act, {"batch": len(act)}, {})
    (_, hook), = engine._hooks([(site, fn)])
    return hook(act, None)


@pytest.mark.parametrize("toy_on", BACKENDS, indirect=True)
def test_an_edit_runs_where_its_tensors_are_and_returns_to_the_layers_device(toy_on):
    """Under a device_map a later layer's activation is on cuda:1 while an edit's tensors (a patched clean
    activation, an SAE, a mask) were gathered on cuda:0: the engine moves the activation in and the result back.
    Before: 'Expected all tensors to be on the same device ... cuda:1 and cuda:0' from every edit past the first GPU."""
    engine = _on_first_gpu(toy_on)
    site = "blocks.1.hook_resid_post"
    with FakeTensorMode(allow_non_fake_inputs=True):
        clean = torch.ones(2, 3, engine.cfg.d_model, device="cuda:0")
        act = torch.zeros(2, 3, engine.cfg.d_model, device="cuda:1")
        new = _edit_applied(engine, site, lambda a: a + clean, act)
    assert new.device == torch.device("cuda:1") and new.shape == act.shape


def test_ablate_and_metrics_read_half_precision_logits_in_float32():
    """log p(answer) of bfloat16 logits taken in bfloat16 was off by ~1e-3 (the effects of `ablate` without
    --wrong); logit_diff and answer_logit now upcast before they subtract."""
    from mechscope import metrics
    from mechscope.commands.ablate import _answer_metric

    logits = (torch.randn(4, 3, 50, generator=torch.Generator().manual_seed(0)) * 8).bfloat16()
    rows = [torch.zeros(3, dtype=torch.long)] * 4
    exact = logits[:, -1].float().log_softmax(-1)[torch.arange(4), torch.tensor([1, 2, 3, 4])]
    metric, _ = _answer_metric(None, rows, [1, 2, 3, 4], None)
    assert torch.allclose(metric(logits), exact, atol=1e-6)
    diff = metrics.logit_diff(logits, torch.tensor([1, 2, 3, 4]), 5)
    assert diff.dtype == torch.float32
    assert torch.equal(diff, logits[torch.arange(4), -1, torch.tensor([1, 2, 3, 4])].float() - logits[:, -1, 5].float())
    assert metrics.answer_logit(logits, 1).dtype == torch.float32


@pytest.fixture(scope="module")
def toy_offloaded(tmp_path_factory):
    """mechscope-toy on nnsight with its blocks, final norm and lm_head offloaded to disk by accelerate (their
    parameters are meta tensors; accelerate's hooks load them for each forward), as GPU + CPU offload leaves them."""
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechscope.engines.nnsight import NNsightEngine
    from mechscope.toy.export import HF_DIR

    where = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h": "disk", "transformer.ln_f": "disk",
             "lm_head": "disk"}
    hf = AutoModelForCausalLM.from_pretrained(str(HF_DIR), device_map=where, attn_implementation="eager",
                                              offload_folder=str(tmp_path_factory.mktemp("offload")),
                                              dtype=torch.float32)
    assert hf.lm_head.weight.is_meta and hf.transformer.h[1].attn.c_proj.weight.is_meta
    return NNsightEngine(TransformersModel(hf.eval(), tokenizer=AutoTokenizer.from_pretrained(str(HF_DIR))),
                         model_name="mechscope-toy")


@pytest.fixture(scope="module")
def toy_nnsight():
    from mechscope.models import load_model

    return load_model("mechscope-toy", backend="nnsight", device="cpu")


def test_offloaded_weights_are_read_through_accelerates_hooks(toy_offloaded, toy_nnsight):
    """Before: every weight accessor of an offloaded module refused with "this model's weights are on NDIF ...
    (drop --remote)", so DLA, the lenses and every SAE command failed under CPU offload. Now the offloaded
    matrices are read through accelerate's hooks: the same weights, the same readout, the same DLA."""
    from mechscope.techniques.dla import dla

    off, full = toy_offloaded, toy_nnsight
    assert torch.equal(off.W_U, full.W_U) and torch.equal(off.b_U, full.b_U)
    assert torch.equal(off.W_O(1), full.W_O(1)) and torch.equal(off.b_O(1), full.b_O(1))
    assert torch.equal(off.W_out(2), full.W_out(2))
    assert torch.equal(off.final_norm.weight, full.final_norm.weight)
    assert torch.equal(off.final_norm.bias, full.final_norm.bias)
    resid = torch.randn(3, full.cfg.d_model, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(off.readout(resid), full.readout(resid), atol=1e-5)
    tokens = full.to_tokens(["When Mary and John went to the store, John gave a drink to"])
    answer, wrong = full.to_tokens(" Mary", prepend_bos=False)[0, 0], full.to_tokens(" John", prepend_bos=False)[0, 0]
    a, b = dla(off, tokens, answer, wrong), dla(full, tokens, answer, wrong)
    assert torch.allclose(a.heads, b.heads, atol=1e-4) and torch.allclose(a.neurons, b.neurons, atol=1e-4)
    assert torch.allclose(a.metric, b.metric, atol=1e-4)


def test_meta_weights_without_an_offload_hook_say_so_not_ndif(toy_offloaded, monkeypatch):
    """A meta weight nothing holds (no accelerate hook) on a local run: the message names the meta device, not NDIF."""
    from mechscope.errors import BadInput

    monkeypatch.delattr(toy_offloaded.hf.lm_head, "_hf_hook")
    with pytest.raises(BadInput, match="meta device") as e:
        toy_offloaded.W_U
    assert "NDIF" not in str(e.value)


@pytest.fixture(scope="module")
def toy_half():
    """mechscope-toy on transformer-lens in each half precision."""
    from mechscope.models import load_model

    return {dtype: load_model("mechscope-toy", backend="tl", device="cpu", dtype=dtype)
            for dtype in ("bfloat16", "float16")}


IOI = ["When Mary and John went to the store, John gave a drink to",
       "When Tom and Anna went to the park, Tom gave a ball to"]


def _ioi(engine):
    tokens = engine.to_tokens(IOI)
    ids = lambda names: torch.tensor([engine.to_tokens(n, prepend_bos=False)[0, 0] for n in names])  # noqa: E731
    return tokens, ids([" Mary", " Anna"]), ids([" John", " Tom"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dla_in_half_precision_finds_float32s_neurons(toy_engine, toy_half, dtype):
    """In bfloat16 the post-norm check compared float32 copies with a float32 tolerance (1e-3, below bfloat16
    rounding): a post-norm gain was applied to a model without post-norms (top-5 neurons unlike float32's,
    |attribution| 2.4 against 0.96). Now the tolerance follows the activations' dtype."""
    from mechscope.techniques.dla import dla

    tokens, answer, wrong = _ioi(toy_engine)
    exact, half = dla(toy_engine, tokens, answer, wrong), dla(toy_half[dtype], tokens, answer, wrong)
    top = lambda r: set(r.neurons.mean(0).flatten().abs().topk(5).indices.tolist())  # noqa: E731
    assert top(half) == top(exact)
    assert torch.allclose(half.neurons, exact.neurons, atol=0.05)
    assert torch.allclose(half.heads, exact.heads, atol=0.1)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dla_soft_cap_note_stays_off_in_half_precision(toy_half, dtype):
    """The toy has no soft cap: `mechscope dla --dtype bfloat16` said "the logits are soft-capped" because the
    readout (float32) and the bfloat16 logits differ by rounding beyond a float32 tolerance."""
    from mechscope.commands.dla import soft_capped
    from mechscope.techniques.dla import dla

    engine = toy_half[dtype]
    assert not soft_capped(dla(engine, *_ioi(engine)), engine.cfg.dtype)


def test_resolve_dtype_keeps_gemma_2_and_3_out_of_float16(monkeypatch):
    """On a GPU without bfloat16 'auto' fell back to float16 for every architecture; Gemma 2 / 3 overflow there
    upstream. Now: float32 for them (float16 for others), and an explicit float16 is refused."""
    from mechscope.errors import BadInput
    from mechscope.models import resolve_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda", 9e9, "Gemma2ForCausalLM") == torch.float32
    assert resolve_dtype("auto", "cuda", 4e9, "google/gemma-3-4b-pt") == torch.float32
    assert resolve_dtype("auto", "cuda", 8e9, "LlamaForCausalLM") == torch.float16
    with pytest.raises(BadInput, match="overflows in float16"):
        resolve_dtype("float16", "cuda", 9e9, "Gemma3ForCausalLM")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda", 9e9, "Gemma2ForCausalLM") == torch.bfloat16


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("component,by_position", [("resid_pre", True), ("z", False)])
def test_packed_and_generic_sweeps_agree_within_the_stated_half_precision_tolerance(toy_engine, toy_half, dtype,
                                                                                     component, by_position):
    """"The same numbers as transformer_lens.patching" holds in float32; in half precision the suffix-only (packed)
    and generic sweeps agree to patching.HALF_AGREEMENT per prompt, and each to float32's cell means."""
    from mechscope.tasks import load_task
    from mechscope.techniques import patching

    per_prompt, cell_mean = patching.HALF_AGREEMENT[dtype]
    batch = patching.pair_batch(toy_engine, load_task(toy_engine, "ioi", n=8, seed=0))

    def sweep(engine, implementation):
        return patching.patch_sweep(engine, batch.clean, batch.corrupted, component,
                                    patching.logit_diff_metric(batch.answer, batch.wrong), by_position=by_position,
                                    lengths=batch.lengths, implementation=implementation)

    exact = sweep(toy_engine, "generic")
    packed, generic = sweep(toy_half[dtype], "auto"), sweep(toy_half[dtype], "generic")
    torch.testing.assert_close(packed.per_prompt, generic.per_prompt, atol=per_prompt, rtol=0, equal_nan=True)
    for run in (packed, generic):
        torch.testing.assert_close(run.values, exact.values, atol=cell_mean, rtol=0, equal_nan=True)
        assert (run.per_prompt - exact.per_prompt).abs().nan_to_num().max() <= per_prompt


def _gpu_check():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("gpu_check", Path(__file__).parents[1] / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_compares_summaries_with_the_stated_tolerances():
    """bench/gpu_check.py's comparison: numbers within atol + rtol |ref| per dtype, strings in float32 only,
    run directories and timings ignored, a missing key fails."""
    check = _gpu_check()
    ref = {"model_value": 3.2, "top": [["L2H1", 1.5]], "run_dir": "a", "seconds": 1.0}
    assert check.compare(ref, {"model_value": 3.2009, "top": [["L2H1", 1.5]], "run_dir": "b", "seconds": 9.0},
                         "float32")[0]
    assert not check.compare(ref, {"model_value": 3.21, "top": [["L2H1", 1.5]]}, "float32")[0]
    assert not check.compare(ref, {"model_value": 3.2, "top": [["L2H2", 1.5]]}, "float32")[0]
    assert check.compare(ref, {"model_value": 3.5, "top": [["L2H2", 1.6]]}, "bfloat16")[0]
    assert not check.compare(ref, {"model_value": 4.5, "top": [["L2H1", 1.5]]}, "bfloat16")[0]
    assert not check.compare(ref, {"model_value": 3.2}, "bfloat16")[0]
    # a top-k overlap of near-ties: compared in float32, not in bfloat16 (issue 19's dry run: AtP's top-10 overlap
    # with exact patching read 0.4 vs 1.0 in bfloat16, where most cells are 0 +- one bfloat16 step)
    ranked = {"agreement": {"top_k_overlap": {"mean": 1.0}, "pearson_r": 0.99}}
    assert check.compare(ranked, {"agreement": {"top_k_overlap": {"mean": 0.4}, "pearson_r": 0.95}}, "bfloat16")[0]
    assert not check.compare(ranked, {"agreement": {"top_k_overlap": {"mean": 0.4}, "pearson_r": 0.99}}, "float32")[0]
    tied = {"net_rate": {"mean": 0.0083, "p_value": 0.0909}}   # steer: a tie with its controls in bfloat16
    assert check.compare(tied, {"net_rate": {"mean": 0.0, "p_value": 0.5455}}, "bfloat16")[0]
    assert not check.compare(tied, {"net_rate": {"mean": 0.0083, "p_value": 0.5455}}, "float32")[0]
    spread = {"gaussian": [{"z": 438.6, "mean": 3.7}]}    # steer: z over 2 controls a few bfloat16 steps apart
    assert check.compare(spread, {"gaussian": [{"z": 282.2, "mean": 3.7}]}, "bfloat16")[0]
    assert not check.compare(spread, {"gaussian": [{"z": 282.2, "mean": 3.7}]}, "float32")[0]
    # a ranked list whose near-tied entries swap in bfloat16 (sae-ablate's top[4]: position 2 vs 1): entries are
    # matched by identity there; in float32 the order must hold; sharing under half the entries fails
    top = {"top": [{"position": 1, "feature": 7, "estimate": 0.30, "exact": -4.0},
                   {"position": 2, "feature": 7, "estimate": 0.29, "exact": -1.0}]}
    swapped = {"top": top["top"][::-1]}
    assert check.compare(top, swapped, "bfloat16")[0] and not check.compare(top, swapped, "float32")[0]
    other = {"top": [{"position": 3, "feature": 9, "estimate": 0.3, "exact": -4.0},
                     {"position": 2, "feature": 7, "estimate": 0.29, "exact": -1.0}]}
    assert check.compare(top, other, "bfloat16")[0]
    assert not check.compare(top, {"top": other["top"][:1]}, "bfloat16")[0]


@pytest.mark.slow
def test_gpu_check_dry_run_passes(tmp_path):
    """`bench/gpu_check.py --dry-run` on CPU stand-ins: dla in bfloat16 and on nnsight against CPU float32."""
    import json

    report = tmp_path / "report.json"
    assert _gpu_check().main(["--dry-run", "--commands", "dla", "--configs", "cpu-bf16,nnsight-cpu-fp32",
                              "--report", str(report)]) == 0
    rows = json.loads(report.read_text())
    assert [r["verdict"] for r in rows] == ["pass", "pass"]


def test_tuned_lens_gives_the_same_numbers_chunked_and_not(toy_engine):
    """Memory: the tuned lens's KL and training run in chunks of token positions by a memory budget (a fixed
    2048 positions over every entry and the whole vocabulary ran out of memory on one 24 GB card); chunked and
    unchunked give the same translators and KL."""
    from mechscope.techniques import tuned_lens as tl

    tokens = tl.corpus_tokens(toy_engine, "the cat sat on the mat and the dog ran to the park. " * 20, seq_len=32)
    whole = tl.train_tuned_lens(toy_engine, tokens, steps=4, lr=1e-2, batch_tokens=96, seed=0, chunk_tokens=96)
    chunked = tl.train_tuned_lens(toy_engine, tokens, steps=4, lr=1e-2, batch_tokens=96, seed=0, chunk_tokens=7)
    torch.testing.assert_close(chunked.weight, whole.weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(chunked.losses), torch.tensor(whole.losses), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tl.kl_per_entry(toy_engine, tokens, whole, batch_tokens=5),
                               tl.kl_per_entry(toy_engine, tokens, whole, batch_tokens=10_000), atol=1e-6, rtol=1e-5)
    assert tl.tokens_per_chunk(toy_engine, 33, budget=16 * 33 * toy_engine.cfg.d_vocab * 100) == 100


def test_sae_eval_gives_the_same_numbers_in_small_and_large_batches(toy_engine):
    """sae-eval holds one full-vocabulary logits tensor at a time (was three) and its batches are the memory
    knob: rows in batches of 3 and of 24 give the same CE losses, L0 and variance explained."""
    from mechscope.techniques import sae as saes
    from mechscope.techniques.sae_training import evaluate

    sae, rows = saes.load_sae("mechscope-toy"), saes.corpus_rows(toy_engine, 1500, 64, seed=1000)
    small, large = evaluate(toy_engine, sae, rows, batch_size=3), evaluate(toy_engine, sae, rows, batch_size=24)
    for key in ("ce_clean", "ce_spliced", "ce_zero", "l0", "mse", "explained_variance"):
        assert getattr(small, key) == pytest.approx(getattr(large, key), rel=1e-5, abs=1e-6), key

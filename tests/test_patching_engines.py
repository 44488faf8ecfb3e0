"""Activation patching, attribution patching and path patching agree across engines on the same local weights:
tiny random checkpoints of GPT-2, GPT-NeoX (parallel and sequential blocks, rotary), Llama (RMS, grouped-query),
Qwen2 (q/k/v biases) and Gemma 2 (post-sublayer norms, soft caps) with norm weights and biases drawn away from
their init, and the bundled model's GPT-2 export.

Reference: transformer-lens's HookedTransformer with LayerNorm unfolded, through the suffix-only sweep; the
others (the folded load, also through the suffix-only sweep; nnsight and the bridge, through the generic path
over engine.run) must give the same per-prompt numbers to 1e-4 on a right-padded batch. Logit differences do
not see the engines' basis differences (centring, folded value biases), so every grid is comparable."""
import pytest
import torch

from mechscope import metrics
from mechscope.errors import BadInput
from mechscope.techniques import attribution_patching as atp
from mechscope.techniques import patching
from mechscope.techniques.path_patching import path_patch
from tests.test_engines import four_engines, tokens_for

KINDS = ["gpt2", "neox", "neox_sequential", "llama", "qwen2", "gemma2", "toy"]
CLOSE = dict(atol=1e-4, rtol=1e-4)
SWEEPS = [("resid_pre", True), ("resid_mid", True), ("resid_post", True), ("attn_out", True), ("mlp_out", True),
          ("z", True), ("q", True), ("k", True), ("v", True), ("z", False), ("q", False), ("pattern", False)]


def _sharpen(directory, scale: float = 10.0) -> None:
    """Every weight matrix x scale (initialiser std 0.02 -> 0.2): logits and patching effects of order 1, so
    a 1e-4 agreement means something."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(directory))
    with torch.no_grad():
        for parameter in hf.parameters():
            if parameter.ndim == 2:
                parameter.mul_(scale)
    hf.save_pretrained(str(directory))


@pytest.fixture(scope="module", params=KINDS)
def engines(request, tmp_path_factory):
    """{name: engine} on one checkpoint (tests.test_engines.four_engines)."""
    kind = request.param
    directory = tmp_path_factory.mktemp(f"patching_{KINDS.index(kind)}")
    return four_engines(kind, directory, prepare=_sharpen)


@pytest.fixture(scope="module")
def task(engines):
    """Right-padded clean / corrupted rows (lengths 10, 7, 10; two tokens swapped), answers and wrongs."""
    ref = engines["tl"]
    clean = tokens_for(ref, batch=3, length=10, seed=1)
    corrupted = clean.clone()
    corrupted[:, 3] = tokens_for(ref, batch=3, length=10, seed=2)[:, 3]
    corrupted[0, 6] = tokens_for(ref, batch=3, length=10, seed=3)[0, 6]
    return clean, corrupted, torch.tensor([10, 7, 10]), clean[:, 1], clean[:, 2]


@pytest.mark.parametrize("other", ["tl_folded", "nnsight", "bridge"])
@pytest.mark.parametrize("component,by_position", SWEEPS)
def test_patching_agrees(engines, task, other, component, by_position):
    ref, engine = engines["tl"], engines[other]
    site = patching.COMPONENTS[component].format(0)
    if not ref.has_site(site):
        assert not engine.has_site(site)  # e.g. resid_mid on parallel blocks: refused alike
        with pytest.raises(BadInput, match="resid_mid"):
            patching.patch_sweep(engine, task[0], task[1], component, patching.kl_to_clean_metric())
        return
    clean, corrupted, lengths, answer, wrong = task
    metric = patching.logit_diff_metric(answer, wrong)
    if component == "pattern" and other == "nnsight":  # nnsight reads attention patterns but cannot edit them
        with pytest.raises(BadInput, match="cannot edit"):
            patching.patch_sweep(engine, clean, corrupted, component, metric, by_position=by_position, lengths=lengths)
        return
    a = patching.patch_sweep(ref, clean, corrupted, component, metric, by_position=by_position, lengths=lengths)
    b = patching.patch_sweep(engine, clean, corrupted, component, metric, by_position=by_position, lengths=lengths)
    assert b.meta["implementation"].endswith("(tl)" if other == "tl_folded" else f"generic ({other})")
    assert b.meta.get("restarts_at_patched_layer", False) == (other != "tl_folded")  # blocks before it skipped
    assert a.effect_per_prompt(normalise=False).nan_to_num().abs().max() > 0.05     # the patches do something
    torch.testing.assert_close(b.per_prompt, a.per_prompt, **CLOSE, equal_nan=True)
    torch.testing.assert_close(torch.stack([b.clean, b.corrupted]), torch.stack([a.clean, a.corrupted]), **CLOSE)


@pytest.mark.parametrize("other", ["tl_folded", "nnsight", "bridge"])
def test_attribution_patching_agrees(engines, task, other):
    ref, engine = engines["tl"], engines[other]
    clean, corrupted, lengths, answer, wrong = task

    def metric(logits, rows):
        return metrics.logit_diff(logits, answer[rows], wrong[rows], pos=(lengths - 1)[rows])
    a = atp.attribution_patch(ref, clean, corrupted, metric, sites=atp.SITES, lengths=lengths)
    b = atp.attribution_patch(engine, clean, corrupted, metric, sites=atp.SITES, lengths=lengths)
    assert set(a.per_prompt) == set(b.per_prompt) and a.per_prompt["head_out"].abs().max() > 0.05
    for name in a.per_prompt:
        torch.testing.assert_close(b.per_prompt[name], a.per_prompt[name], **CLOSE, equal_nan=True, msg=name)
    if other in ("nnsight", "bridge"):  # AtP* reads attention scores: the tl engine only
        with pytest.raises(BadInput, match="--backend tl"):
            atp.attribution_patch(engine, clean, corrupted, metric, sites=["qkv"], atp_star=True)


@pytest.mark.parametrize("other", ["tl_folded", "nnsight", "bridge"])
def test_path_patching_agrees(engines, task, other):
    ref, engine = engines["tl"], engines[other]
    clean, corrupted, lengths, answer, wrong = task

    def metric(logits):
        repeat = len(logits) // len(answer)
        return metrics.logit_diff(logits, answer.repeat(repeat), wrong.repeat(repeat), pos=(lengths - 1).repeat(repeat))
    senders = [(0, h) for h in range(ref.cfg.n_heads)]
    grouped = ref.cfg.n_key_value_heads not in (None, ref.cfg.n_heads)
    receivers = [(1, 0, "q"), (1, 2, "q")] + ([] if grouped else [(1, 1, "k"), (1, 3, "v")])
    largest = 0.0
    for target in ("logits", "logits-direct", receivers):
        a = path_patch(ref, clean, corrupted, senders, target, metric)
        b = path_patch(engine, clean, corrupted, senders, target, metric)
        largest = max(largest, float(a.per_prompt.abs().max()))
        torch.testing.assert_close(b.per_prompt, a.per_prompt, **CLOSE, msg=str(target))
    assert largest > 0.05  # some path carries something


@pytest.mark.parametrize("other", ["nnsight", "bridge"])
def test_run_from_skips_blocks_exactly(engines, task, other):
    """run_from(l, resid_pre l of the same tokens) gives run()'s logits and reads; the skipped blocks are really
    skipped (a wrong resid changes the logits), edits before l are dropped, reads before l refused, and the
    model computes normally afterwards."""
    engine = engines[other]
    clean = task[0]
    layer = engine.cfg.n_layers - 1
    site, later = f"blocks.{layer}.hook_resid_pre", f"blocks.{layer}.hook_resid_post"
    logits, acts = engine.run(clean, read=[site, later])
    start_logits, start_acts = engine.run_from(layer, acts[site], clean, read=[later],
                                               edits=[("blocks.0.hook_resid_pre", lambda x: x * 0)])
    torch.testing.assert_close(start_logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(start_acts[later], acts[later], atol=1e-5, rtol=1e-5)
    wrong, _ = engine.run_from(layer, acts[site] * 0, clean)
    assert (wrong - logits).abs().max() > 1e-3
    with pytest.raises(ValueError, match="skipped"):
        engine.run_from(layer, acts[site], clean, read=["blocks.0.hook_resid_post"])
    torch.testing.assert_close(engine.run(clean)[0], logits, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("other", ["nnsight", "bridge"])
def test_restart_applies_held_edits_at_the_patched_layer_once(engines, task, other):
    """A held edit at resid_pre of a patched layer is inside the target residual the restart starts from: it
    must not be applied a second time (the generic path on tl, which runs every block, is the reference)."""
    clean, corrupted, lengths, answer, wrong = task
    metric = patching.logit_diff_metric(answer, wrong)
    held = [("blocks.1.hook_resid_pre", lambda x: x * 0.5)]
    a = patching.patch_sweep(engines["tl"], clean, corrupted, "resid_pre", metric, lengths=lengths, edits=held,
                             implementation="generic")
    b = patching.patch_sweep(engines[other], clean, corrupted, "resid_pre", metric, lengths=lengths, edits=held)
    assert b.meta["restarts_at_patched_layer"]
    torch.testing.assert_close(b.per_prompt, a.per_prompt, **CLOSE, equal_nan=True)

"""DLA, the logit lens and attention read-outs agree across engines on the same local weights: tiny random
checkpoints of GPT-2, GPT-NeoX (parallel blocks, rotary), Llama (RMS, grouped-query), Qwen2 (q/k/v biases) and
Gemma 2 (post-sublayer norms, (1 + w) norms, logit soft cap) with norm weights and biases drawn away from
their init, and the bundled model's GPT-2 export.

Reference: transformer-lens's HookedTransformer with LayerNorm unfolded (the raw weights). DLA's layer parts
agree on every engine to 1e-4 (folding and centring do not change what a part writes along the read
direction); per-head parts agree between engines with the same value-bias convention (nnsight keeps b_V in z
like the unfolded load; the folded load and the bridge's processed weights move it into b_O)."""
import pytest
import torch

from mechscope.techniques.dla import dla
from mechscope.techniques.heads import attention_readout
from mechscope.techniques.logit_lens import answer_lens
from tests.test_engines import four_engines, tokens_for

KINDS = ["gpt2", "neox", "llama", "qwen2", "gemma2", "toy"]
CLOSE = dict(atol=1e-4, rtol=1e-4)
LAYER_PARTS = ("metric", "readout", "embed", "pos_embed", "attn", "mlp")


@pytest.fixture(scope="module", params=KINDS)
def engines(request, tmp_path_factory):
    """{name: engine} on one checkpoint (tests.test_engines.four_engines)."""
    kind = request.param
    directory = tmp_path_factory.mktemp(f"reading_{KINDS.index(kind)}")
    return four_engines(kind, directory)


@pytest.fixture(params=["tl_folded", "nnsight", "bridge"])
def pair(request, engines):
    """(name, reference engine, the other engine, tokens, positions, answers, wrongs): right-padded rows of
    two lengths, read at their own last token."""
    ref = engines["tl"]
    tokens = tokens_for(ref, batch=4, length=10, seed=1)
    return request.param, ref, engines[request.param], tokens, torch.tensor([9, 6, 9, 4]), tokens[:, 2], tokens[:, 3]


def test_dla_agrees(pair, engines):
    name, ref, other, tokens, positions, answers, wrongs = pair
    a = dla(ref, tokens, answers, wrongs, positions)
    b = dla(other, tokens, answers, wrongs, positions)
    for result in (a, b):   # the identity on every engine: parts sum to the (pre-soft-cap) logit difference
        torch.testing.assert_close(result.total(), result.readout, **CLOSE)
        torch.testing.assert_close(result.heads.sum(-1) + result.attn_bias, result.attn, **CLOSE)
    assert a.metric.abs().max() > 1e-3
    if ref.cfg.positional_embedding_type != "standard":     # rotary: no position vector in the residual
        assert (a.pos_embed == 0).all() and (b.pos_embed == 0).all()
    assert a.neurons.shape[-1] == ref.cfg.d_mlp             # transformer-lens offers mlp.hook_post everywhere
    for field in LAYER_PARTS:
        torch.testing.assert_close(getattr(b, field), getattr(a, field), **CLOSE, msg=field)
    torch.testing.assert_close(b.unembed_bias, a.unembed_bias, **CLOSE)   # one constant term, not two rows
    if b.neurons.shape[-1] and a.neurons.shape[-1]:
        torch.testing.assert_close(b.neurons, a.neurons, **CLOSE)
    same_value_bias = {"nnsight": a, "bridge": dla(engines["tl_folded"], tokens, answers, wrongs, positions)}
    if name in same_value_bias:
        torch.testing.assert_close(b.heads, same_value_bias[name].heads, **CLOSE)


def test_single_answer_quantities_agree(pair, engines):
    """With one answer, DLA and the logit lens's target_logit report the centred logit (logit - mean logit over
    the vocabulary) on every engine: a raw logit differs by a constant per position between an engine that
    centres the unembedding and one that does not (on the toy 16.316 on tl, 16.189 on nnsight before)."""
    from mechscope.techniques.logit_lens import logit_lens

    name, ref, other, tokens, positions, answers, _ = pair
    a, b = dla(ref, tokens, answers, None, positions), dla(other, tokens, answers, None, positions)
    for result in (a, b):
        torch.testing.assert_close(result.total(), result.readout, **CLOSE)
    for field in LAYER_PARTS + ("unembed_bias",):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), **CLOSE, msg=field)
    same_value_bias = {"nnsight": a, "bridge": dla(engines["tl_folded"], tokens, answers, None, positions)}
    if name in same_value_bias:
        torch.testing.assert_close(b.heads, same_value_bias[name].heads, **CLOSE)
        assert a.components()[0] == b.components()[0]
        torch.testing.assert_close(b.components()[1], same_value_bias[name].components()[1], **CLOSE)
    targets = answers[:2].tolist()
    lens_a, lens_b = logit_lens(ref, tokens[:1], targets), logit_lens(other, tokens[:1], targets)
    torch.testing.assert_close(lens_b.target_logit, lens_a.target_logit, **CLOSE)
    torch.testing.assert_close(lens_b.target_prob, lens_a.target_prob, **CLOSE)


def test_logit_lens_agrees(pair):
    _, ref, other, tokens, positions, answers, wrongs = pair
    a = answer_lens(ref, tokens, positions, answers, wrongs)
    b = answer_lens(other, tokens, positions, answers, wrongs)
    assert a.labels == b.labels and a.final_error < 1e-4 and b.final_error < 1e-4
    assert len(a.labels) == (1 if ref.cfg.parallel_attn_mlp else 2) * ref.cfg.n_layers + 1   # no resid_mid if parallel
    torch.testing.assert_close(b.prob, a.prob, **CLOSE)
    torch.testing.assert_close(b.logit_diff, a.logit_diff, **CLOSE)
    assert (b.rank - a.rank).abs().max() <= 1                  # ranks flip only between near-equal logits


def test_attention_readout_agrees(pair):
    _, ref, other, tokens, positions, _, _ = pair
    keys = {"BOS": torch.zeros(4, dtype=torch.long), "PREV": positions - 1, "SELF": positions}
    torch.testing.assert_close(attention_readout(other, tokens, positions, keys),
                               attention_readout(ref, tokens, positions, keys), **CLOSE)

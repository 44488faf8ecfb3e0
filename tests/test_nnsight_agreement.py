"""A second implementation: nnsight on the Hugging Face module tree and transformer-lens (as load_model
builds it) agree on the same local weights — activations, logits, and an intervention."""
import pytest
import torch

from mechscope.models import load_model
from tests.test_models import _save_tiny

PROMPT = "the capital of france is paris"


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("gpt2")
    _save_tiny("gpt2", directory)
    tl_model = load_model(str(directory), backend="tl", device="cpu", fold_ln=False).model  # unprocessed weights: same residual basis
    nn_model = TransformersModel(str(directory), tokenizer=AutoTokenizer.from_pretrained(str(directory)),
                                 task="text-generation")
    return tl_model, nn_model


def test_residual_stream_and_logits_agree(both):
    tl_model, nn_model = both
    tokens = tl_model.to_tokens(PROMPT, prepend_bos=False)
    resid = []
    with nn_model.trace(tokens):
        for block in nn_model.transformer.h:
            resid.append(block.output.save())  # transformers 5: a GPT2Block returns a Tensor
        logits = nn_model.lm_head.output.save()
    with torch.no_grad():
        ref_logits, cache = tl_model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert len(resid) == tl_model.cfg.n_layers
    for layer in range(tl_model.cfg.n_layers):  # HF's last block output is before ln_f, like TL's resid_post
        torch.testing.assert_close(resid[layer], cache["resid_post", layer], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_zero_ablating_layer0_attention_agrees(both):
    tl_model, nn_model = both
    tokens = tl_model.to_tokens(PROMPT, prepend_bos=False)
    with nn_model.trace(tokens):
        nn_model.transformer.h[0].attn.output[0][:] = 0  # the attention module still returns a tuple
        ablated = nn_model.lm_head.output.save()

    def zero(activation, hook):
        return torch.zeros_like(activation)

    with torch.no_grad():
        clean = tl_model(tokens)
        ref = tl_model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_attn_out", zero)])
    assert (ref - clean).abs().max() > 1e-3  # the intervention does something
    torch.testing.assert_close(ablated, ref, atol=1e-4, rtol=1e-4)

"""The nnsight engine's own contract: weights in transformer-lens's shapes (equal to the unfolded
HookedTransformer's and summing back to the sites), BOS handling equal to transformer-lens's, the remote path
through nnsight's local stand-in, loading options (device_map, max_memory, quantization, hub, NDIF), and
one-line BadInput for what it cannot do. Cross-engine agreement of sites, edits, gradients and generation
is in test_engines.py."""
from __future__ import annotations

import time

import pytest
import torch

from mechscope.errors import BadInput
from mechscope.models import as_engine, load_model
from tests.test_engines import TOL, _load_tl, export_toy, save_tiny, steer, tokens_for

KINDS = ["gpt2", "neox", "llama", "gemma2"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{kind: directory} of tiny random checkpoints, and the bundled model's export under "toy"."""
    dirs = {}
    for i, kind in enumerate(KINDS):
        dirs[kind] = tmp_path_factory.mktemp(f"nn_{i}")
        save_tiny(kind, dirs[kind])
    dirs["toy"] = export_toy(tmp_path_factory.mktemp("nn_toy"))
    return dirs


@pytest.fixture(scope="module")
def nn(checkpoints):
    return {kind: load_model(str(d), backend="nnsight", device="cpu") for kind, d in checkpoints.items()}


@pytest.fixture(scope="module")
def tl(checkpoints):
    """The unfolded HookedTransformer engines of the same checkpoints (weights in the same basis)."""
    return {kind: _load_tl(d, fold_ln=False) for kind, d in checkpoints.items()}


# ---------------------------------------------------------------- weights

@pytest.mark.parametrize("kind", KINDS + ["toy"])
def test_weights_equal_the_unfolded_hooked_transformers(nn, tl, kind):
    a, b = nn[kind], tl[kind]
    for layer in range(a.cfg.n_layers):
        torch.testing.assert_close(a.W_O(layer), b.W_O(layer))
        torch.testing.assert_close(a.b_O(layer), b.b_O(layer))
        torch.testing.assert_close(a.W_out(layer), b.W_out(layer))
    torch.testing.assert_close(a.W_U, b.W_U)
    torch.testing.assert_close(a.b_U, b.b_U)
    fa, fb = a.final_norm, b.final_norm
    assert (fa.kind, fa.eps) == (fb.kind, fb.eps)
    torch.testing.assert_close(fa.weight, fb.weight)  # Gemma: 1 + w, as transformer-lens converts it
    if fb.bias is not None:
        torch.testing.assert_close(fa.bias, fb.bias)


@pytest.mark.parametrize("kind", ["gpt2", "neox", "llama", "toy"])
def test_head_outputs_through_W_O_sum_to_attn_out_and_neurons_through_W_out_to_mlp_out(nn, kind):
    engine = nn[kind]
    tokens = tokens_for(engine)
    sites = ["blocks.1.attn.hook_z", "blocks.1.hook_attn_out", "blocks.1.mlp.hook_post", "blocks.1.hook_mlp_out"]
    with torch.no_grad():
        _, acts = engine.run(tokens, read=sites)
    heads = torch.einsum("bphd,hdm->bpm", acts["blocks.1.attn.hook_z"], engine.W_O(1)) + engine.b_O(1)
    torch.testing.assert_close(heads, acts["blocks.1.hook_attn_out"], **TOL)
    bias = acts["blocks.1.hook_mlp_out"] - acts["blocks.1.mlp.hook_post"] @ engine.W_out(1)  # = the MLP's b_out
    torch.testing.assert_close(bias, bias[:1, :1].expand_as(bias), **TOL)


@pytest.mark.parametrize("kind", KINDS + ["toy"])
def test_final_norm_and_unembedding_reproduce_the_logits(nn, kind):
    engine = nn[kind]
    tokens = tokens_for(engine)
    last = f"blocks.{engine.cfg.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        logits, acts = engine.run(tokens, read=[last])
    resid, norm = acts[last], engine.final_norm
    x = resid - resid.mean(-1, keepdim=True) if norm.centres else resid
    x = x / norm.scale(resid) * norm.weight + (norm.bias if norm.bias is not None else 0)
    manual = x @ engine.W_U + engine.b_U
    cap = getattr(engine.hf.config, "final_logit_softcapping", None)
    manual = cap * torch.tanh(manual / cap) if cap else manual
    torch.testing.assert_close(manual, logits, **TOL)


# ---------------------------------------------------------------- tokens

def test_to_tokens_and_strings_equal_transformer_lens(nn, tl):
    a, b = nn["toy"], tl["toy"]
    prompts = ["when mary and john went to the store , john gave a drink to", "the capital of france is"]
    for prompt in prompts:
        for bos in (True, False):
            assert a.to_tokens(prompt, prepend_bos=bos).tolist() == b.to_tokens(prompt, prepend_bos=bos).tolist()
        assert a.to_str_tokens(prompt) == b.to_str_tokens(prompt)
        assert a.to_string(a.to_tokens(prompt)[0]) == b.to_string(b.to_tokens(prompt)[0])
    assert a.to_tokens(prompts).tolist() == b.to_tokens(prompts).tolist()  # right-padded batch
    assert a.to_tokens(prompts[0])[0, 0] == a.bos_token_id != a.to_tokens(prompts[0], prepend_bos=False)[0, 0]
    assert a.special_token_ids == b.special_token_ids


# ---------------------------------------------------------------- the bundled model

def test_bundled_export_predicts_the_model_card_answers(nn):
    engine = nn["toy"]
    for prompt, answer in [("the capital of france is", "paris"),
                           ("when mary and john went to the store , john gave a drink to", "mary")]:
        with torch.no_grad():
            logits, _ = engine.run(engine.to_tokens(prompt), positions=[-1 % len(engine.to_tokens(prompt)[0])])
        assert engine.to_single_str_token(int(logits[0].argmax())) == answer


def test_bundled_model_on_nnsight_matches_the_shipped_hooked_transformer(toy_engine):
    from mechscope.toy.export import HF_DIR

    if not (HF_DIR / "config.json").exists():
        pytest.skip("the bundled model's hf/ export is not shipped in this checkout")
    engine = load_model("mechscope-toy", backend="nnsight", device="cpu")
    tokens = toy_engine.to_tokens("when mary and john went to the store , john gave a drink to")
    assert engine.to_tokens("when mary and john went to the store , john gave a drink to").tolist() == tokens.tolist()
    with torch.no_grad():
        a, _ = engine.run(tokens)
        b, _ = toy_engine.run(tokens)
    torch.testing.assert_close(a.log_softmax(-1), b.log_softmax(-1), **TOL)


# ---------------------------------------------------------------- what the engine refuses

def test_missing_sites_and_pattern_edits_are_bad_input(nn):
    neox, gpt2 = nn["neox"], nn["gpt2"]
    tokens = tokens_for(gpt2)
    assert neox.cfg.parallel_attn_mlp and not neox.has_site("blocks.0.hook_resid_mid")
    with pytest.raises(BadInput, match="parallel-block"):
        neox.run(tokens, read=["blocks.0.hook_resid_mid"])
    with pytest.raises(BadInput, match="hook_pos_embed"):
        neox.require(["hook_pos_embed"])
    with pytest.raises(BadInput, match="cannot edit"):
        gpt2.run(tokens, edits=[("blocks.0.attn.hook_pattern", lambda p: p)])
    with pytest.raises(BadInput, match="cannot edit"):
        gpt2.generate(tokens, edits=[("blocks.0.attn.hook_pattern", lambda p: p)], max_new_tokens=1)
    with pytest.raises(BadInput, match="--backend tl"):
        gpt2.run_with_grads(tokens, lambda lg: lg[:, -1, 0], ["blocks.0.attn.hook_pattern"])
    with pytest.raises(BadInput, match="blocks.9"):
        gpt2.run(tokens, read=["blocks.9.hook_resid_pre"])


def test_patterns_need_eager_attention_and_raw_nnsight_models_are_wrapped(checkpoints):
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = str(checkpoints["gpt2"])
    hf = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa").eval()
    engine = as_engine(TransformersModel(hf, tokenizer=AutoTokenizer.from_pretrained(d)))
    assert engine.name == "nnsight" and engine.has_site("blocks.0.attn.hook_z")
    with pytest.raises(BadInput, match="eager"):
        engine.require(["blocks.0.attn.hook_pattern"])


def test_an_architecture_without_a_module_map_is_bad_input(tmp_path):
    from transformers import AutoModelForCausalLM, OPTConfig

    AutoModelForCausalLM.from_config(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                               num_attention_heads=2, word_embed_proj_dim=16)).save_pretrained(tmp_path)
    with pytest.raises(BadInput, match="no module map for OPTForCausalLM"):
        load_model(str(tmp_path), backend="nnsight", device="cpu")


def test_weights_of_a_model_whose_weights_are_elsewhere_are_bad_input(checkpoints):
    from nnsight.modeling.transformers import TransformersModel
    from transformers import AutoTokenizer

    d = str(checkpoints["gpt2"])
    # not dispatched: a meta-device skeleton, as a remote model is
    meta = as_engine(TransformersModel(d, task="text-generation", tokenizer=AutoTokenizer.from_pretrained(d)))
    assert meta.cfg.n_layers == 2
    with pytest.raises(BadInput, match="not dispatched"):
        meta.W_U


# ---------------------------------------------------------------- remote (NDIF) through the local stand-in

def test_remote_path_through_the_local_stand_in_gives_the_local_results(nn, monkeypatch):
    from nnsight.intervention.backends import local

    from mechscope.engines.nnsight import NNsightEngine

    calls = []
    original = local.LocalSimulationBackend.__call__
    def counted(self, tracer):
        calls.append(1)
        return original(self, tracer)

    monkeypatch.setattr(local.LocalSimulationBackend, "__call__", counted)
    here = nn["gpt2"]
    remote = NNsightEngine(here.model, remote="local")
    tokens = tokens_for(here)
    edits = [("blocks.0.attn.hook_z", lambda z: z * 0.5), ("blocks.1.hook_resid_mid", lambda x: x + 1.0)]
    read = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_pattern", "blocks.1.hook_resid_mid"]
    with torch.no_grad():
        a_logits, a = here.run(tokens, read, edits, positions=[3, 8])
        b_logits, b = remote.run(tokens, read, edits, positions=[3, 8])
    assert len(calls) == 1  # it went through the serialise / deserialise path
    torch.testing.assert_close(b_logits, a_logits)
    for site in read:
        torch.testing.assert_close(b[site], a[site])
    metric = lambda logits: logits[:, -1, 3] - logits[:, -1, 4]  # noqa: E731
    va, _, ga = here.run_with_grads(tokens, metric, read[:1] + read[2:], edits)
    vb, _, gb = remote.run_with_grads(tokens, metric, read[:1] + read[2:], edits)
    torch.testing.assert_close(vb, va)
    torch.testing.assert_close(gb["blocks.1.hook_resid_mid"], ga["blocks.1.hook_resid_mid"])
    vector = torch.randn(here.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (remote.generate(tokens, [("blocks.1.hook_resid_pre", steer(vector))], 4).tolist()
                == here.generate(tokens, [("blocks.1.hook_resid_pre", steer(vector))], 4).tolist())
    assert len(calls) == 3


def test_remote_needs_an_ndif_key_and_a_hub_id(monkeypatch, capsys, tmp_path):
    from mechscope.cli import main

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    with pytest.raises(BadInput, match="NDIF_API_KEY"):
        load_model("meta-llama/Llama-3.1-8B", backend="nnsight", remote=True)
    with pytest.raises(BadInput, match="hub id"):
        load_model("mechscope-toy", backend="nnsight", remote=True)
    assert main(["predict", "--model", "meta-llama/Llama-3.1-8B", "--remote", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "NDIF_API_KEY" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- loading options

def test_device_map_and_max_memory_load_and_run_on_cpu(checkpoints, nn):
    tokens = tokens_for(nn["llama"])
    with torch.no_grad():
        expected, _ = nn["llama"].run(tokens)
        for options in ({"device_map": "cpu"}, {"device_map": "auto"},
                        {"device_map": "auto", "max_memory": {"cpu": "2GiB"}}):
            engine = load_model(str(checkpoints["llama"]), backend="nnsight", device="cpu", **options)
            got, _ = engine.run(tokens)
            torch.testing.assert_close(got, expected)


def test_quantization_without_bitsandbytes_says_how_to_install_it(checkpoints, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    for bits in ("8bit", "4bit"):
        with pytest.raises(BadInput, match="pip install bitsandbytes"):
            load_model(str(checkpoints["gpt2"]), backend="nnsight", device="cpu", quantization=bits)


def test_a_hub_id_offline_fails_in_one_line_quickly(monkeypatch):
    from mechscope import hub

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "_probe", None)
    start = time.time()
    assert hub.offline_reason() is not None
    with pytest.raises(BadInput, match="cannot reach the Hugging Face hub") as error:
        load_model("mechscope-nobody/no-such-model", backend="nnsight", device="cpu")
    assert time.time() - start < 10 and "\n" not in str(error.value)


@pytest.mark.parametrize("edited", [False, True])
def test_generation_continues_with_eos_and_stops_like_transformer_lens(nn, tl, edited):
    """With "." as EOS, row 0 emits it at its 2nd new token and row 1 at its 5th: row 0 continues with EOS and
    generation stops once both have (transformer-lens's rule), with and without the KV cache."""
    a, b = nn["toy"], tl["toy"]
    tokens = a.to_tokens(["the capital of france is", "the eiffel tower is in"])
    edits = [("blocks.1.hook_resid_pre", lambda x: x * 1.0)] if edited else []
    eos = a.tokenizer.eos_token
    try:
        a.tokenizer.eos_token = b.tokenizer.eos_token = "."
        with torch.no_grad():
            expected = b.generate(tokens, edits, max_new_tokens=8)
            for cache in (True, False):
                assert a.generate(tokens, edits, 8, use_kv_cache=cache).tolist() == expected.tolist()
    finally:
        a.tokenizer.eos_token = b.tokenizer.eos_token = eos
    assert [a.to_str_tokens(row[tokens.shape[1]:]) for row in expected] == [
        ["paris", ".", ".", ".", "."], ["the", "city", "of", "paris", "."]]


def test_gemma3_sites_add_up_and_logits_equal_the_hugging_face_forward(tmp_path):
    """Gemma 3 (q/k norms, post-norms, scaled embeddings): transformer-lens 3.9 converts it from official names
    only, so check the engine against Hugging Face's own forward and the residual identities."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig

    from mechscope.toy import model as toy

    tok = AutoTokenizer.from_pretrained(str(toy.WEIGHTS_DIR))
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(Gemma3TextConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    engine = load_model(str(tmp_path), backend="nnsight", device="cpu")
    tokens = tokens_for(engine)
    with torch.no_grad():
        logits, acts = engine.run(tokens, read=engine.sites())
        expected = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()(tokens).logits
        ablated, _ = engine.run(tokens, edits=[("blocks.0.hook_attn_out", torch.zeros_like)])
    torch.testing.assert_close(logits, expected, **TOL)
    assert (ablated - logits).abs().max() > 1e-3
    torch.testing.assert_close(acts["hook_embed"], acts["blocks.0.hook_resid_pre"])
    for layer in range(2):
        pre, mid, post = (acts[f"blocks.{layer}.hook_resid_{k}"] for k in ("pre", "mid", "post"))
        torch.testing.assert_close(mid, pre + acts[f"blocks.{layer}.hook_attn_out"], **TOL)
        torch.testing.assert_close(post, mid + acts[f"blocks.{layer}.hook_mlp_out"], **TOL)
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"], acts["blocks.1.hook_resid_pre"])
    norm = engine.final_norm
    last = acts["blocks.1.hook_resid_post"]
    torch.testing.assert_close(last / norm.scale(last) * norm.weight @ engine.W_U, logits, **TOL)


def test_generation_ignores_the_checkpoints_sampling_settings(nn, tl):
    """Greedy as transformer-lens does it, whatever generation_config.json asks for (sampling, penalties)."""
    a, b = nn["toy"], tl["toy"]
    tokens = a.to_tokens("the quick brown fox jumps over the lazy")  # the toy repeats this sentence
    config = a.hf.generation_config
    saved = config.to_dict()
    try:
        config.update(do_sample=True, temperature=5.0, repetition_penalty=3.0, no_repeat_ngram_size=2,
                      min_new_tokens=6)
        with torch.no_grad():
            got = a.generate(tokens, max_new_tokens=10)
    finally:
        config.update(**saved)
    with torch.no_grad():
        expected = b.generate(tokens, max_new_tokens=10)
    assert got.tolist() == expected.tolist()
    # a repeat of the prompt, which the penalties would have blocked
    assert a.to_str_tokens(expected[0, tokens.shape[1]:])[:4] == ["dog", ".", "the", "quick"]

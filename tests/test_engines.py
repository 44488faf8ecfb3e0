"""Cross-engine agreement at the site level: every engine, loaded from the same local weights, gives the same
logits, activations at every site both offer, edits, gradients and steered generations as the reference
(transformer-lens's HookedTransformer with LayerNorm unfolded) to 1e-4 in float32.

Checkpoints: tiny random GPT-2, GPT-NeoX (parallel and sequential blocks), Llama and Mistral (grouped-query),
Qwen2 (q/k/v biases), Qwen3 (q/k norms) and Gemma 2 (post-norms, soft caps) saved with save_pretrained, with
random norm weights (unit norms hide missing norm weights), and the bundled model's GPT-2 export.

To add an engine, add a loader to ENGINES (and its name to CENTRED if its residual basis is transformer-lens's
folded one, where LayerNorm models' residual vectors are centred and their unembedding centred).
"""
from __future__ import annotations

import pytest
import torch

from mechscope.models import load_model

TOL = dict(atol=1e-4, rtol=1e-4)
REFERENCE = "tl"
ENGINES = {
    "tl": lambda d: _load_tl(d, fold_ln=False),
    "tl_folded": lambda d: _load_tl(d, fold_ln=True),
    "bridge": lambda d: load_model(str(d), backend="bridge", device="cpu"),
    "nnsight": lambda d: load_model(str(d), backend="nnsight", device="cpu"),
}
CENTRED = {"tl_folded", "bridge"}
RESIDUAL_KINDS = ("hook_embed", "hook_pos_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post",
                  "hook_attn_out", "hook_mlp_out")
CHECKPOINTS = ["gpt2", "neox", "neox_sequential", "llama", "mistral", "qwen2", "qwen3", "gemma2", "toy"]


# ---------------------------------------------------------------- checkpoints

def hf_config(kind: str, tokenizer):
    """A tiny config of one family (2 layers, d_model 32, 4 heads), special ids from the tokenizer."""
    import transformers as tf

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    small = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64, **ids)
    if kind == "gpt2":
        return tf.GPT2Config(vocab_size=320, n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=4, **ids)
    if kind in ("neox", "neox_sequential"):
        return tf.GPTNeoXConfig(**small, use_parallel_residual=kind == "neox")
    if kind == "llama":
        return tf.LlamaConfig(**small, num_key_value_heads=2)
    if kind == "mistral":
        return tf.MistralConfig(**small, num_key_value_heads=2, head_dim=8, sliding_window=None)
    if kind == "qwen2":
        return tf.Qwen2Config(**small, num_key_value_heads=2)
    if kind == "qwen3":
        return tf.Qwen3Config(**small, num_key_value_heads=2, head_dim=8)
    if kind == "gemma2":  # query_pre_attn_scalar = head_dim: transformer-lens scales scores by sqrt(d_head)
        return tf.Gemma2Config(**small, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=32)
    raise ValueError(kind)


def save_tiny(kind: str, directory, bias_noise: float = 0.0) -> None:
    """A tiny random checkpoint of `kind` (norm weights randomised too; with bias_noise, every other bias
    drawn away from its init 0 by bias_noise * N(0, 1)) + the bundled word-level tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechscope.toy import model as toy

    tokenizer = AutoTokenizer.from_pretrained(str(toy.WEIGHTS_DIR))
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(hf_config(kind, tokenizer)).eval()
    with torch.no_grad():
        for name, module in hf.named_modules():
            if "norm" in type(module).__name__.lower():
                module.weight.add_(0.2 * torch.randn_like(module.weight))
                if getattr(module, "bias", None) is not None:
                    module.bias.add_(0.1 * torch.randn_like(module.bias))
            elif bias_noise and isinstance(getattr(module, "bias", None), torch.nn.Parameter):
                module.bias.add_(bias_noise * torch.randn_like(module.bias))
        if kind == "gemma2":  # final norm gain (1 + w) ~ 300: logits of ~30 reach the soft cap (30), where a
            hf.model.norm.weight.add_(300.0)  # constant added before the cap (a centred unembedding) shows
    hf.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


def export_toy(directory):
    """The bundled model's Hugging Face export: the shipped hf/ when present, else an export of the trained
    weights with the unembedding bias zeroed (GPT-2 has none) into `directory`."""
    from mechscope.toy import export, model as toy

    if (export.HF_DIR / "config.json").exists():
        return export.HF_DIR
    from transformers import GPT2LMHeadModel

    tl = toy.load(fold_ln=False)
    with torch.no_grad():
        tl.unembed.b_U.zero_()
    hf = GPT2LMHeadModel(export.gpt2_config(tl, tl.tokenizer)).eval()
    hf.load_state_dict(export.gpt2_state_dict(tl), strict=False)
    hf.save_pretrained(str(directory))
    tl.tokenizer.save_pretrained(str(directory))
    return directory


def _gemma2_tl_config(directory) -> dict:
    """transformer-lens 3.9 builds Gemma configs from official model names only: its google/gemma-2-2b dict
    (loading_from_pretrained.convert_hf_model_config) with this checkpoint's sizes."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(str(directory))
    return {"d_model": c.hidden_size, "d_head": c.head_dim, "n_heads": c.num_attention_heads,
            "d_mlp": c.intermediate_size, "n_layers": c.num_hidden_layers, "n_ctx": c.max_position_embeddings,
            "eps": c.rms_norm_eps, "d_vocab": c.vocab_size, "act_fn": "gelu_pytorch_tanh", "initializer_range": 0.02,
            "normalization_type": "RMS", "rotary_base": c.rope_parameters["rope_theta"],
            "positional_embedding_type": "rotary", "use_attn_scale": True, "n_key_value_heads": c.num_key_value_heads,
            "window_size": c.sliding_window, "use_local_attn": True,
            "attn_types": ["local", "global"] * (c.num_hidden_layers // 2),
            "attn_scores_soft_cap": c.attn_logit_softcapping, "output_logits_soft_cap": c.final_logit_softcapping,
            "gated_mlp": True, "final_rms": True, "use_normalization_before_and_after": True,
            "original_architecture": "Gemma2ForCausalLM", "quantization_method": None, "tokenizer_name": str(directory)}


def _load_tl(directory, fold_ln: bool):
    import json

    from transformer_lens import loading_from_pretrained

    if json.loads((directory / "config.json").read_text())["model_type"] != "gemma2":
        return load_model(str(directory), backend="tl", device="cpu", fold_ln=fold_ln)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loading_from_pretrained, "convert_hf_model_config", lambda name, **kw: _gemma2_tl_config(directory))
        return load_model(str(directory), backend="tl", device="cpu", fold_ln=fold_ln)


def four_engines(kind: str, directory, prepare=None) -> dict:
    """{tl (unfolded: the reference), tl_folded, nnsight, bridge} on one checkpoint saved in `directory`: the
    bundled model's export (kind "toy") or a tiny random `kind` with biases away from 0 (b_O, b_out parts), then
    prepare(directory). (Directory names must avoid "llama" / "gemma": transformer-lens 3.9 reads the
    architecture from such a path.)"""
    if kind == "toy":
        directory = export_toy(directory)
    else:
        save_tiny(kind, directory, bias_noise=0.2)
        if prepare is not None:
            prepare(directory)
    return {"tl": _load_tl(directory, fold_ln=False), "tl_folded": _load_tl(directory, fold_ln=True),
            "nnsight": load_model(str(directory), backend="nnsight", device="cpu"),
            "bridge": load_model(str(directory), backend="bridge", device="cpu")}


@pytest.fixture(scope="module", params=CHECKPOINTS)
def engines(request, tmp_path_factory):
    """{engine name: engine} on one checkpoint. (Directory names avoid "llama" / "gemma": transformer-lens
    3.9 picks the architecture from a path containing them.)"""
    kind = request.param
    directory = tmp_path_factory.mktemp(f"ckpt_{CHECKPOINTS.index(kind)}")
    directory = export_toy(directory) if kind == "toy" else directory
    if kind != "toy":
        save_tiny(kind, directory)
    return {name: load(directory) for name, load in ENGINES.items()}


OTHERS = [name for name in ENGINES if name != REFERENCE]


@pytest.fixture(params=OTHERS)
def pair(request, engines):
    """(reference engine, another engine, whether the other's residual basis is centred)."""
    return engines[REFERENCE], engines[request.param], request.param in CENTRED


def tokens_for(engine, batch: int = 2, length: int = 9, seed: int = 0):
    """[batch, length] random non-special token ids after BOS."""
    g = torch.Generator().manual_seed(seed)
    words = torch.tensor([i for i in range(len(engine.tokenizer)) if i not in engine.special_token_ids])
    ids = words[torch.randint(len(words), (batch, length - 1), generator=g)]
    return torch.cat([torch.full((batch, 1), engine.bos_token_id), ids], 1)


def centred(x):
    return x - x.mean(-1, keepdim=True)


def comparable(site: str, ref, other, is_centred: bool):
    kind = site.split(".", 2)[-1] if site.startswith("blocks.") else site
    if is_centred and ref.cfg.normalization_type == "LN" and kind in RESIDUAL_KINDS:
        return centred
    return lambda x: x


# ---------------------------------------------------------------- agreement

def test_logits_agree(pair):
    ref, other, _ = pair
    tokens = tokens_for(ref)
    with torch.no_grad():
        a, _ = ref.run(tokens)
        b, _ = other.run(tokens)
        b_last, _ = other.run(tokens, positions=torch.tensor([8, 5]))
    # a folded, centred unembedding shifts every logit of a position by one constant: compare log-probs
    torch.testing.assert_close(b.log_softmax(-1), a.log_softmax(-1), **TOL)
    torch.testing.assert_close(b_last.log_softmax(-1), a[[0, 1], [8, 5]].log_softmax(-1), **TOL)


def test_model_facts_agree(pair):
    ref, other, _ = pair
    same = ("n_layers", "n_heads", "d_model", "d_head", "d_mlp", "d_vocab", "n_key_value_heads",  # not n_ctx:
            "parallel_attn_mlp", "gated_mlp", "positional_embedding_type", "original_architecture")  # TL caps it
    assert {k: getattr(other.cfg, k) for k in same} == {k: getattr(ref.cfg, k) for k in same}
    assert other.cfg.normalization_type.removesuffix("Pre") == ref.cfg.normalization_type
    assert other.bos_token_id == ref.bos_token_id


def test_every_common_site_agrees(pair):
    ref, other, is_centred = pair
    sites = sorted(set(ref.sites()) & set(other.sites()))
    kinds = {s.split(".", 2)[-1] for s in sites if s.startswith("blocks.")}
    assert {"hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "attn.hook_q", "attn.hook_k",
            "attn.hook_pattern", "mlp.hook_post"} <= kinds
    tokens = tokens_for(ref)
    with torch.no_grad():
        _, a = ref.run(tokens, read=sites)
        _, b = other.run(tokens, read=sites)
    for site in sites:
        view = comparable(site, ref, other, is_centred)
        assert b[site].shape == a[site].shape, site
        torch.testing.assert_close(view(b[site]), view(a[site]), **TOL, msg=lambda m: f"{site}: {m}")


def _zero_head(z):
    z = z.clone()
    z[:, :, 1] = 0
    return z


def test_edits_give_the_same_logits(pair):
    ref, other, is_centred = pair
    tokens, source = tokens_for(ref), tokens_for(ref, seed=1)
    g = torch.Generator().manual_seed(2)
    vector = 3 * torch.randn(ref.cfg.d_model, generator=g)
    mid = "blocks.0.hook_resid_mid" if ref.has_site("blocks.0.hook_resid_mid") else "blocks.0.hook_attn_out"
    with torch.no_grad():
        clean, _ = ref.run(tokens)
        cases = zip(_edits(ref, source, vector, mid, is_centred), _edits(other, source, vector, mid, is_centred))
        for ref_edits, other_edits in cases:
            a, _ = ref.run(tokens, edits=ref_edits)
            b, _ = other.run(tokens, edits=other_edits)
            assert (a - clean).abs().max() > 1e-3  # the edit does something
            torch.testing.assert_close(b.log_softmax(-1), a.log_softmax(-1), **TOL)


def _edits(engine, source, vector, mid, is_centred):
    """[edits] per case: zero head 1's z, patch position 4 of resid_pre 1 from `source`,
    add `vector` to resid_mid 0 (or attn_out 0 on parallel blocks) at every position."""
    _, cache = engine.run(source, read=["blocks.1.hook_resid_pre"])
    patch = cache["blocks.1.hook_resid_pre"]

    def patch_position(resid):
        resid = resid.clone()
        resid[:, 4] = patch[:, 4]
        return resid

    cases = [[("blocks.1.hook_resid_pre", patch_position)], [(mid, lambda x: x + vector)]]
    return [[("blocks.0.attn.hook_z", _zero_head)]] + cases


def test_gradients_agree(pair):
    ref, other, is_centred = pair
    tokens = tokens_for(ref)
    sites = [s for s in ["hook_embed", "blocks.0.hook_resid_pre", "blocks.0.attn.hook_q", "blocks.0.attn.hook_z",
                         "blocks.0.hook_attn_out", "blocks.0.hook_resid_mid", "blocks.1.mlp.hook_post",
                         "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post"] if ref.has_site(s)]

    def metric(logits):  # a logit difference at the last position: invariant to a centred unembedding
        return logits[:, -1, 5] - logits[:, -1, 7]

    edits = [("blocks.0.hook_resid_pre", lambda x: x * 1.5)]
    va, acts_a, ga = ref.run_with_grads(tokens, metric, sites, edits)
    vb, acts_b, gb = other.run_with_grads(tokens, metric, sites, edits)
    torch.testing.assert_close(vb, va, **TOL)
    for site in sites:
        view = comparable(site, ref, other, is_centred)
        assert ga[site].abs().max() > 0, site
        torch.testing.assert_close(gb[site], ga[site], **TOL, msg=lambda m: f"grad {site}: {m}")
        torch.testing.assert_close(view(acts_b[site]), view(acts_a[site]), **TOL)


def steer(vector, from_position: int = 1):
    """Add `vector` at every position >= from_position (techniques/steering.add_vector_edit's rule)."""
    def edit(resid):
        if resid.shape[1] == 1:  # a KV-cache step: one generated position
            return resid + vector
        return torch.cat([resid[:, :from_position], resid[:, from_position:] + vector], 1)
    return edit


def test_steered_generation_agrees_with_and_without_kv_cache(pair):
    ref, other, _ = pair
    tokens = tokens_for(ref, length=5)
    g = torch.Generator().manual_seed(3)
    edits = [("blocks.1.hook_resid_pre", steer(4 * torch.randn(ref.cfg.d_model, generator=g)))]
    with torch.no_grad():
        expected = ref.generate(tokens, edits, max_new_tokens=6)
        assert expected.tolist() != ref.generate(tokens, max_new_tokens=6).tolist()  # the vector steers
        for cache in (True, False):
            got = other.generate(tokens, edits, max_new_tokens=6, use_kv_cache=cache)
            assert got.tolist() == expected.tolist(), f"use_kv_cache={cache}"


def test_readout_is_the_logits_of_the_final_residual(pair):
    ref, other, _ = pair
    tokens = tokens_for(ref)
    last = f"blocks.{ref.cfg.n_layers - 1}.hook_resid_post"
    for engine in (ref, other):
        with torch.no_grad():
            logits, acts = engine.run(tokens, read=[last])
            torch.testing.assert_close(engine.readout(acts[last][:, -1]), logits[:, -1], **TOL)

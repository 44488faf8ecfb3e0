"""The tl engine's fast patching sweep equals the generic path (engine.run with edits, the definition) on every
architecture transformer-lens 3.9 loads from a local tiny config, with random norm weights (unit norms hide a
norm the fast path skips), or falls back to the per-layer path where it cannot be exact.

transformer-lens converts these from a local directory; Gemma, Gemma 3, OLMo and OLMo 2 it builds from official
hub names only, and Gemma 2 is loaded with the config transformer-lens gives google/gemma-2-2b
(tests.test_engines._load_tl). OLMoE's q/k norms are applied by architecture name: the packed path computed it
without them (packed - generic 0.08 on this checkpoint) before PACKED_ARCHITECTURES became a positive list.
"""
import pytest
import torch

from mechscope.engines import hooked_sweep
from mechscope.techniques import patching

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _config(kind: str):
    import transformers as tf

    return {
        "gpt2": lambda: tf.GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4),
        "gpt_neo": lambda: tf.GPTNeoConfig(vocab_size=64, max_position_embeddings=64, hidden_size=32, num_layers=2,
                                           num_heads=4, attention_types=[[["global", "local"], 1]], window_size=4),
        "opt": lambda: tf.OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32),
        "gptj": lambda: tf.GPTJConfig(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4),
        "neox": lambda: tf.GPTNeoXConfig(**SMALL),
        "bloom": lambda: tf.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4),
        "llama": lambda: tf.LlamaConfig(**SMALL, num_key_value_heads=2),
        "mistral": lambda: tf.MistralConfig(**SMALL, num_key_value_heads=2, head_dim=8, sliding_window=None),
        "mixtral": lambda: tf.MixtralConfig(**SMALL, num_key_value_heads=2, num_local_experts=4,
                                            num_experts_per_tok=2),
        "qwen2": lambda: tf.Qwen2Config(**SMALL, num_key_value_heads=2),
        "qwen3": lambda: tf.Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=8),
        "phi": lambda: tf.PhiConfig(**SMALL, partial_rotary_factor=0.5),
        "phi3": lambda: tf.Phi3Config(**SMALL),
        "olmo3": lambda: tf.Olmo3Config(**SMALL, num_key_value_heads=2),
        "olmoe": lambda: tf.OlmoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2),
        "gpt_oss": lambda: tf.GptOssConfig(**SMALL, num_key_value_heads=2, head_dim=8, num_local_experts=4),
        "apertus": lambda: tf.ApertusConfig(**SMALL),
        "gemma2": lambda: tf.Gemma2Config(**SMALL, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                                          sliding_window=32),
    }[kind]()


KINDS = ["gpt2", "gpt_neo", "opt", "gptj", "neox", "bloom", "llama", "mistral", "mixtral", "qwen2", "qwen3", "phi",
         "phi3", "olmo3", "olmoe", "gpt_oss", "apertus", "gemma2"]


def _tiny(kind: str, directory):
    """A HookedTransformer (LayerNorm not folded) of a tiny random `kind` with norm weights drawn away from 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechscope.toy import model as toy
    from tests.test_engines import _load_tl

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_config(kind)).eval()
    with torch.no_grad():
        for module in hf.modules():
            if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                module.weight.add_(0.5 * torch.randn_like(module.weight))
    hf.save_pretrained(str(directory))
    AutoTokenizer.from_pretrained(str(toy.WEIGHTS_DIR)).save_pretrained(str(directory))
    return _load_tl(directory, fold_ln=False).model


@pytest.mark.parametrize("kind", KINDS)
def test_fast_sweep_equals_the_generic_path(kind, tmp_path):
    model = _tiny(kind, tmp_path)
    clean = torch.randint(4, 60, (2, 6), generator=torch.Generator().manual_seed(0))
    corrupted = clean.clone()
    corrupted[:, 2] = (corrupted[:, 2] + 5) % 60
    metric = patching.logit_diff_metric(torch.tensor([5, 6]), torch.tensor([8, 9]))
    for component in ("resid_pre", "z"):
        fast = patching.patch_sweep(model, clean, corrupted, component, metric)
        generic = patching.patch_sweep(model, clean, corrupted, component, metric, implementation="generic")
        assert generic.per_prompt.nan_to_num().abs().max() > 1e-3, component   # the patches do something
        torch.testing.assert_close(fast.per_prompt, generic.per_prompt, atol=1e-5, rtol=0, msg=component)
        packed = fast.meta["implementation"] == "packed suffixes (tl)"
        assert packed == (model.cfg.original_architecture in hooked_sweep.PACKED_ARCHITECTURES
                          and hooked_sweep.keys_are_cached(model.cfg)), component


def test_every_packed_architecture_is_checked_here():
    """PACKED_ARCHITECTURES lists only the architectures checked above (and models built from a config)."""
    from transformers import AutoModelForCausalLM

    checked = {type(AutoModelForCausalLM.from_config(_config(kind))).__name__ for kind in KINDS}
    assert set(hooked_sweep.PACKED_ARCHITECTURES) - {None, "mechscope-toy"} <= checked
    assert "OlmoeForCausalLM" in checked and "OlmoeForCausalLM" not in hooked_sweep.PACKED_ARCHITECTURES


@pytest.fixture(scope="module")
def ioi_pair(toy_model):
    from tests.test_patching import IOI_CLEAN, IOI_CORRUPTED

    batch = patching.pair_batch(toy_model, [{"clean": IOI_CLEAN, "corrupted": IOI_CORRUPTED, "answer": "mary",
                                             "wrong": "john"}])
    return batch.clean, batch.corrupted, patching.logit_diff_metric(batch.answer, batch.wrong)


def _auto_and_generic(model, pair, component):
    clean, corrupted, metric = pair
    return [patching.patch_sweep(model, clean, corrupted, component, metric, implementation=implementation)
            for implementation in ("auto", "generic")]


@pytest.mark.parametrize("component", ["resid_pre", "z"])
def test_hooks_attached_by_the_user_are_never_skipped(toy_model, ioi_pair, component):
    """A permanent hook zeroing L2H2's z (model.add_hook) fires in every cell's run: the fast sweep falls back
    from the packed path (which skipped it: auto - generic 3.35 on resid_pre) and says so."""
    clean, corrupted, metric = ioi_pair
    plain, _ = _auto_and_generic(toy_model, ioi_pair, component)

    def zero_l2h2(z, hook):
        z[:, :, 2] = 0
        return z
    toy_model.add_hook("blocks.2.attn.hook_z", zero_l2h2, is_permanent=True)
    try:
        auto, generic = _auto_and_generic(toy_model, ioi_pair, component)
        assert toy_model.blocks[2].attn.hook_z.fwd_hooks  # still attached after the sweeps
    finally:
        toy_model.reset_hooks(including_permanent=True)
    assert (generic.values - plain.values).abs().max() > 0.5    # the hook changes the answer
    torch.testing.assert_close(auto.per_prompt, generic.per_prompt, atol=1e-4, rtol=0)
    assert auto.meta["implementation"] != "packed suffixes (tl)" and "blocks.2.attn.hook_z" in auto.meta["note"]


def test_an_sae_spliced_in_by_sae_lens_is_never_skipped(toy_model, ioi_pair):
    """sae-lens's add_sae replaces a hook point by a module: the fast sweep runs it in every cell too."""
    from sae_lens import HookedSAETransformer, StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    model = HookedSAETransformer(toy_model.cfg, tokenizer=toy_model.tokenizer)
    model.load_state_dict(toy_model.state_dict())
    model.eval()
    d = toy_model.cfg.d_model
    sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=4 * d, metadata=SAEMetadata(hook_name="blocks.1.hook_mlp_out")))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
    model.add_sae(sae)
    assert hooked_sweep.user_hooks(model) == ["blocks.1.hook_mlp_out"]
    auto, generic = _auto_and_generic(model, ioi_pair, "z")
    torch.testing.assert_close(auto.per_prompt, generic.per_prompt, atol=1e-4, rtol=0)
    plain, _ = _auto_and_generic(toy_model, ioi_pair, "z")
    assert (generic.values - plain.values).abs().max() > 1e-2   # the SAE changes the answer

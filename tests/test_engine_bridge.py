"""The TransformerBridge engine against two references on the same local weights, for tiny random
checkpoints of GPT-2, GPT-NeoX, Llama, Qwen2 and Gemma 2 and the bundled model's GPT-2 export (toy/hf/):

- the transformer-lens HookedTransformer engine (transformer-lens 3 only; not Gemma 2, which it cannot load
  from a local directory; for the bundled model, the bundled HookedTransformer itself): config, tokens,
  every site, weights, edits, gradients and generation;
- the Hugging Face model itself, edited with plain torch hooks on its modules (every environment: `make
  test-tl4` runs this file with transformer-lens 4, which has no HookedTransformer).

Logits are compared up to a constant per position and residual vectors after centring (transformer-lens
centres the unembedding and the writing weights of LayerNorm models; Hugging Face does not), to 1e-4.
"""
import functools
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from mechscope import catalog, models
from mechscope.errors import BadInput
from mechscope.models import load_model

HAS_HOOKED = models._hooked_transformer_available()
needs_hooked = pytest.mark.skipif(not HAS_HOOKED, reason="transformer-lens 4 has no HookedTransformer")
KINDS = ["gpt2", "neox", "llama", "qwen2", "gemma2", "toy"]  # gemma2: bridge only (TL 3.9 cannot load it locally)
# (decoder blocks, attention output projection inside a block) of each Hugging Face architecture
HF_PATHS = {"gpt2": ("transformer.h", "attn.c_proj"), "neox": ("gpt_neox.layers", "attention.dense"),
            "llama": ("model.layers", "self_attn.o_proj"), "qwen2": ("model.layers", "self_attn.o_proj"),
            "gemma2": ("model.layers", "self_attn.o_proj")}
HF_PATHS["toy"] = HF_PATHS["gpt2"]
CLEAN = "when mary and john went to the store , john gave a drink to"
CORRUPT = "when mary and john went to the store , mary gave a drink to"
LAYER, HEAD = 1, 2
ATOL = 1e-4


@functools.lru_cache(maxsize=None)
def _toy_tokenizer():
    from transformers import AutoTokenizer

    from mechscope.toy import model as toy

    return AutoTokenizer.from_pretrained(str(toy.WEIGHTS_DIR))


def _ids(text: str, bos: bool = True):
    """[1, seq] ids of the toy tokenizer (every checkpoint here has its vocabulary), BOS first. Not the
    engines' own tokenizers: transformers 5 loads a qwen2 directory's word-level tokenizer as a BPE
    Qwen2Tokenizer, which reads these words as 'a'. The engines' tokenization is compared on its own."""
    tok = _toy_tokenizer()
    return torch.tensor([[tok.bos_token_id] * bos + tok(text).input_ids])


def _tiny_config(kind: str):
    import transformers as T

    common = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    if kind == "gpt2":  # transformers 5: n_ctx = n_positions, or transformer-lens's conversion fails
        return T.GPT2Config(vocab_size=320, n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=4)
    if kind == "neox":
        return T.GPTNeoXConfig(**common)
    if kind == "llama":
        return T.LlamaConfig(**common, num_key_value_heads=2)
    if kind == "gemma2":  # soft-capped attention and logits, sliding window, extra norms, scaled embeddings
        return T.Gemma2Config(**common, num_key_value_heads=2, head_dim=8, sliding_window=8)
    return T.Qwen2Config(**common, num_key_value_heads=2)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """kind -> (HookedEngine or None, BridgeEngine, Hugging Face model), all on the same weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechscope.toy import export, model as toy

    out = {}
    for kind in KINDS:
        if kind == "toy":  # the bundled model's shipped export; its reference is the bundled HookedTransformer
            directory, spec, reference = export.HF_DIR, "mechscope-toy", "mechscope-toy"
        else:
            directory = tmp_path_factory.mktemp(f"ckpt{KINDS.index(kind)}")  # no "llama" in the path: TL reads it
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(_tiny_config(kind)).save_pretrained(directory)
            AutoTokenizer.from_pretrained(str(toy.WEIGHTS_DIR)).save_pretrained(directory)
            spec = reference = str(directory)
        hf = AutoModelForCausalLM.from_pretrained(str(directory)).eval()
        bridge = load_model(spec, backend="bridge", device="cpu")
        hooked = load_model(reference, backend="tl", device="cpu") if HAS_HOOKED and kind != "gemma2" else None
        out[kind] = (hooked, bridge, hf)
    return out


def _get(engines, kind, reference):
    hooked, bridge, hf = engines[kind]
    if reference == "tl" and hooked is None:
        pytest.skip("transformer-lens 4 has no HookedTransformer" if not HAS_HOOKED else
                    f"transformer-lens 3.9 cannot convert a local {kind} checkpoint")
    return hooked, bridge, hf


def _centre(x):
    return x - x.mean(-1, keepdim=True)


def _close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


# ---------------------------------------------------------------- Hugging Face with plain torch hooks

def _hf_block(hf, kind, layer):
    return hf.get_submodule(HF_PATHS[kind][0])[layer]


def _hf_out_proj(hf, kind, layer):
    return _hf_block(hf, kind, layer).get_submodule(HF_PATHS[kind][1])


def _replace_input(module, fn):
    """A forward pre-hook on `module` that replaces its first input (hidden states / z) by fn(input)."""
    def hook(mod, args, kwargs):
        if args:
            return (fn(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
    return module.register_forward_pre_hook(hook, with_kwargs=True)


def _hf_logits(hf, tokens, edits=()):
    """logits of the Hugging Face model with edits [(module, fn(input) -> input)] on module inputs."""
    handles = [_replace_input(module, fn) for module, fn in edits]
    try:
        return hf(tokens).logits
    finally:
        for h in handles:
            h.remove()


def _hf_resid_pre(hf, tokens, layer):
    with torch.no_grad():
        return hf(tokens, output_hidden_states=True).hidden_states[layer]


# ---------------------------------------------------------------- the same edits on both sides

def _vector(d_model):
    return 6.0 * torch.randn(d_model, generator=torch.Generator().manual_seed(1))


def _edits(kind, engine, hf, tokens, corrupt, reference):
    """name -> (engine edits, reference edits): zero one head's z, patch the residual at the position where
    the prompts differ from the corrupted run, add a vector to the residual stream at every position."""
    d, dh = engine.cfg.d_model, engine.cfg.d_head
    source = engine.run(corrupt, read=[f"blocks.{LAYER}.hook_resid_pre"])[1][f"blocks.{LAYER}.hook_resid_pre"]
    v = _vector(d)
    pos = int((tokens != corrupt)[0].nonzero()[0])  # the subject's second mention: john vs mary

    def zero_head(z):
        z = z.clone()
        z[:, :, HEAD] = 0
        return z

    def patch(resid, src=source):
        resid = resid.clone()
        resid[:, pos] = src[:, pos]
        return resid

    ours = {"zero_head": [(f"blocks.{LAYER}.attn.hook_z", zero_head)],
            "patch_resid": [(f"blocks.{LAYER}.hook_resid_pre", patch)],
            "add_vector": [(f"blocks.{LAYER}.hook_resid_pre", lambda r: r + v)]}
    if reference == "tl":
        return {name: (edit, edit) for name, edit in ours.items()}

    def zero_head_flat(z):  # the engines keep value biases unfolded: their z is this input of the output projection
        z = z.clone()
        z[..., HEAD * dh:(HEAD + 1) * dh] = 0
        return z

    hf_source = _hf_resid_pre(hf, corrupt, LAYER)
    theirs = {"zero_head": [(_hf_out_proj(hf, kind, LAYER), zero_head_flat)],
              "patch_resid": [(_hf_block(hf, kind, LAYER), lambda r: patch(r, hf_source))],
              "add_vector": [(_hf_block(hf, kind, LAYER), lambda r: r + v)]}
    return {name: (ours[name], theirs[name]) for name in ours}


# ---------------------------------------------------------------- transformer-lens's own engine as reference

@needs_hooked
@pytest.mark.parametrize("kind", KINDS)
def test_config_tokens_sites_and_weights_match_hooked_transformer(engines, kind):
    hooked, bridge, _ = _get(engines, kind, "tl")
    skip = {"model_name", "original_architecture", "n_params"}  # names and parameter counting conventions differ
    assert {k: v for k, v in bridge.cfg.to_dict().items() if k not in skip} == \
        {k: v for k, v in hooked.cfg.to_dict().items() if k not in skip}
    if kind != "toy":  # the bundled model calls its architecture mechscope-toy; its export is a GPT2LMHeadModel
        assert bridge.cfg.original_architecture == hooked.cfg.original_architecture
    tokens = hooked.to_tokens(CLEAN)
    assert torch.equal(bridge.to_tokens(CLEAN), tokens) and int(tokens[0, 0]) == hooked.bos_token_id
    assert torch.equal(bridge.to_tokens(CLEAN, prepend_bos=False), hooked.to_tokens(CLEAN, prepend_bos=False))
    assert bridge.to_str_tokens(tokens) == hooked.to_str_tokens(tokens) and bridge.to_string(tokens[0, 1:]) == \
        hooked.to_string(tokens[0, 1:])
    assert bridge.bos_token_id == hooked.bos_token_id and bridge.special_token_ids == hooked.special_token_ids
    assert sorted(bridge.sites()) == sorted(hooked.sites())
    for layer in range(hooked.cfg.n_layers):
        _close(bridge.W_O(layer), hooked.W_O(layer))
        _close(bridge.b_O(layer), hooked.b_O(layer))
        _close(bridge.W_out(layer), hooked.W_out(layer))
    _close(bridge.W_U, hooked.W_U)
    _close(bridge.b_U, hooked.b_U)


@needs_hooked
@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_every_site_match_hooked_transformer(engines, kind):
    """Two prompts of different lengths, right-padded into one batch (the pad token included)."""
    hooked, bridge, _ = _get(engines, kind, "tl")
    short = _ids("the capital of france is")
    tokens = _ids(CLEAN).repeat(2, 1)
    tokens[1] = hooked.tokenizer.pad_token_id
    tokens[1, :short.shape[1]] = short[0]
    sites = hooked.sites()
    with torch.no_grad():
        ref_logits, ref = hooked.run(tokens, read=sites)
        logits, acts = bridge.run(tokens, read=sites)
    _close(_centre(logits), _centre(ref_logits))
    for site in sites:
        a, b = acts[site], ref[site]
        assert a.shape == b.shape, site
        if site.endswith(("resid_pre", "resid_mid", "resid_post", "hook_embed", "hook_pos_embed")):
            a, b = _centre(a), _centre(b)
        _close(a, b)
    rows = torch.tensor([tokens.shape[1] - 1, short.shape[1] - 1])
    _close(_centre(bridge.run(tokens, positions=rows)[0]), _centre(ref_logits[torch.arange(2), rows]))


@needs_hooked
@pytest.mark.parametrize("kind", KINDS)
def test_final_norm_matches_hooked_transformer(engines, kind):
    hooked, bridge, _ = _get(engines, kind, "tl")
    a, b = bridge.final_norm, hooked.final_norm
    assert (a.kind, a.centres, a.eps) == (b.kind, b.centres, b.eps)
    resid = torch.randn(5, bridge.cfg.d_model, generator=torch.Generator().manual_seed(0))
    _close(a.scale(resid), b.scale(resid))


# ---------------------------------------------------------------- transformer-lens and Hugging Face as references

@pytest.mark.parametrize("reference", ["tl", "hf"])
@pytest.mark.parametrize("kind", KINDS)
def test_edits_match(engines, kind, reference):
    hooked, bridge, hf = _get(engines, kind, reference)
    tokens, corrupt = _ids(CLEAN), _ids(CORRUPT)
    plain = bridge.run(tokens)[0]
    with torch.no_grad():
        for name, (ours, theirs) in _edits(kind, bridge, hf, tokens, corrupt, reference).items():
            logits = bridge.run(tokens, edits=ours)[0]
            expected = hooked.run(tokens, edits=theirs)[0] if reference == "tl" else _hf_logits(hf, tokens, theirs)
            _close(_centre(logits), _centre(expected))
            assert (logits - plain).abs().max() > 1e-3, f"{name} changed nothing: the edit was not applied"


@pytest.mark.parametrize("reference", ["tl", "hf"])
@pytest.mark.parametrize("kind", KINDS)
def test_run_with_grads_match(engines, kind, reference):
    """d(logit of token a - logit of token b at the last position) / d(resid_pre, z) of one layer."""
    hooked, bridge, hf = _get(engines, kind, reference)
    tokens = _ids(CLEAN)
    a, b = int(_ids("mary", bos=False)[0, 0]), int(_ids("john", bos=False)[0, 0])

    def metric(logits):
        return logits[:, -1, a] - logits[:, -1, b]

    sites = [f"blocks.{LAYER}.hook_resid_pre", f"blocks.{LAYER}.attn.hook_z"]
    value, _, grads = bridge.run_with_grads(tokens, metric, read=sites)
    if reference == "tl":
        ref_value, _, ref_grads = hooked.run_with_grads(tokens, metric, read=sites)
    else:
        ref_grads = {}
        for site, module in zip(sites, [_hf_block(hf, kind, LAYER), _hf_out_proj(hf, kind, LAYER)]):
            leaf = {}

            def keep(x, leaf=leaf):
                leaf["x"] = x.detach().requires_grad_(True)
                return leaf["x"]

            ref_value = metric(_hf_logits(hf, tokens, [(module, keep)]))
            grad = torch.autograd.grad(ref_value.sum(), leaf["x"])[0]
            ref_grads[site] = grad.reshape(grads[site].shape)  # z: heads concatenated -> [batch, pos, head, d_head]
    _close(value, ref_value.detach())
    for site in sites:
        assert grads[site].abs().max() > 0, site
        _close(grads[site], ref_grads[site])


def _until_eos(ids, eos, prompt_len):
    """Token ids up to and including the first EOS after the prompt (engines may stop there)."""
    ids = ids[0].tolist()
    tail = ids[prompt_len:]
    return ids[:prompt_len + tail.index(eos) + 1] if eos in tail else ids


def _reference_generate(reference, hooked, hf, kind, tokens, edits, n, use_kv_cache):
    if reference == "tl":
        return hooked.generate(tokens, edits=edits, max_new_tokens=n, use_kv_cache=use_kv_cache)
    handles = [_replace_input(_hf_block(hf, kind, LAYER), fn) for _, fn in edits]  # edits at resid_pre LAYER
    try:
        with torch.no_grad():
            return hf.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=n, do_sample=False,
                               use_cache=use_kv_cache, pad_token_id=hf.config.eos_token_id)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("use_kv_cache", [True, False], ids=["kv-cache", "no-cache"])
@pytest.mark.parametrize("reference", ["tl", "hf"])
@pytest.mark.parametrize("kind", KINDS)
def test_generation_with_and_without_an_added_vector_matches(engines, kind, reference, use_kv_cache):
    """Greedy, 6 new tokens. transformer-lens 3.9 / 4.3's own cached bridge generation is wrong for GPT-2 and
    Llama-family models with transformers 5.2x (BridgeEngine.kv_cache_exact); the engine must not be."""
    hooked, bridge, hf = _get(engines, kind, reference)
    tokens, n, eos = _ids("the capital of france is"), 6, bridge.tokenizer.eos_token_id
    v = _vector(bridge.cfg.d_model)
    results = {}
    for name, edits in [("plain", []), ("steered", [(f"blocks.{LAYER}.hook_resid_pre", lambda r: r + v)])]:
        ours = bridge.generate(tokens, edits=edits, max_new_tokens=n, use_kv_cache=use_kv_cache)
        theirs = _reference_generate(reference, hooked, hf, kind, tokens, edits, n, use_kv_cache)
        results[name] = _until_eos(ours, eos, tokens.shape[1])
        assert results[name] == _until_eos(theirs, eos, tokens.shape[1]), name
    assert results["steered"] != results["plain"], "the vector changed nothing"


@pytest.mark.parametrize("kind", KINDS)
def test_readout_of_the_final_residual_gives_the_logits(engines, kind):
    """readout = final norm + unembedding, and final_norm's parts reproduce it (the identity DLA relies on)."""
    _, bridge, hf = _get(engines, kind, "hf")
    tokens = _ids(CLEAN)
    last = f"blocks.{bridge.cfg.n_layers - 1}.hook_resid_post"
    with torch.no_grad():
        logits, acts = bridge.run(tokens, read=[last])
        resid = acts[last][0]
        _close(bridge.readout(resid), logits[0])
        _close(_centre(logits), _centre(hf(tokens).logits))
        norm = bridge.final_norm
        x = resid - resid.mean(-1, keepdim=True) if norm.centres else resid
        x = x / norm.scale(resid) * (norm.weight if norm.weight is not None else 1)
        x = x + (norm.bias if norm.bias is not None else 0)
        _close(x @ bridge.W_U + bridge.b_U, logits[0])


def test_bundled_model_on_the_bridge_keeps_its_answers(engines):
    """The model card's answers: IOI -> mary (logit difference well above 0), facts -> paris."""
    _, bridge, _ = _get(engines, "toy", "hf")
    assert bridge.cfg.model_name == "mechscope-toy" and bridge.name == "bridge"
    assert torch.equal(bridge.to_tokens(CLEAN), _ids(CLEAN))
    with torch.no_grad():
        ioi = bridge.run(bridge.to_tokens(CLEAN))[0][0, -1]
        fact = bridge.run(bridge.to_tokens("the capital of france is"))[0][0, -1]
    mary, john = (int(bridge.to_tokens(w, prepend_bos=False)[0, 0]) for w in ("mary", "john"))
    assert int(ioi.argmax()) == mary and float(ioi[mary] - ioi[john]) > 3
    assert bridge.to_single_str_token(int(fact.argmax())) == "paris"


def _second_copy_loss(engine, tokens, edits=()):
    """Mean next-token loss over the second copy of [BOS, r, r] (predicting r[1:] from the first copy)."""
    n = (tokens.shape[1] - 1) // 2
    with torch.no_grad():
        logits = engine.run(tokens, edits=edits)[0]
    logprobs = logits[:, n + 1:-1].log_softmax(-1)
    return -logprobs.gather(-1, tokens[:, n + 2:, None]).mean()


def test_bundled_induction_head_on_the_bridge(engines):
    """The model card's induction head: zero-ablating L2H1's z raises the second-copy loss by ~5 nats (card:
    +4.97 on its sequences; here 8 sequences of 20 random words, so at least 1), as on HookedTransformer."""
    hooked, bridge, _ = _get(engines, "toy", "hf")
    generator = torch.Generator().manual_seed(0)
    words = torch.tensor(sorted(set(range(bridge.cfg.d_vocab)) - bridge.special_token_ids))
    r = words[torch.randint(len(words), (8, 20), generator=generator)]
    tokens = torch.cat([torch.full((8, 1), bridge.bos_token_id), r, r], 1)

    def zero_l2h1(z):
        z = z.clone()
        z[:, :, 1] = 0
        return z

    ablate = [("blocks.2.attn.hook_z", zero_l2h1)]
    clean, ablated = _second_copy_loss(bridge, tokens), _second_copy_loss(bridge, tokens, ablate)
    assert clean < 1 and ablated - clean > 1
    if hooked is not None:
        _close(ablated - clean, _second_copy_loss(hooked, tokens, ablate) - _second_copy_loss(hooked, tokens))


# ---------------------------------------------------------------- loading, wrapping and refusals

def test_as_engine_wraps_a_compatibility_mode_bridge_and_refuses_a_raw_one(engines):
    from transformer_lens.model_bridge import TransformerBridge

    _, bridge, _ = _get(engines, "gpt2", "hf")
    directory = bridge.model.cfg.model_name
    raw = TransformerBridge.boot_transformers(directory, device="cpu")
    with pytest.raises(BadInput, match="enable_compatibility_mode"):
        models.as_engine(raw)
    raw.enable_compatibility_mode(disable_warnings=True)
    wrapped = models.as_engine(raw)
    assert wrapped.name == "bridge" and wrapped.cfg == bridge.cfg


def test_bundled_export_missing_is_one_clear_error(tmp_path, monkeypatch):
    from mechscope.toy import export

    monkeypatch.setattr(export, "HF_DIR", tmp_path / "hf")
    with pytest.raises(BadInput, match="mechscope.toy.export"):
        load_model("mechscope-toy", backend="bridge", device="cpu")


def test_auto_is_the_bridge_where_hooked_transformer_is_gone(engines, monkeypatch):
    _, bridge, _ = _get(engines, "gpt2", "hf")
    directory = bridge.model.cfg.model_name
    monkeypatch.setattr(catalog, "_hooked_transformer_available", lambda: False)  # transformer-lens 4
    assert load_model(directory, device="cpu").name == "bridge"
    with pytest.raises(BadInput, match="--backend bridge"):
        load_model(directory, backend="tl", device="cpu")


def test_cli_refuses_backend_tl_without_hooked_transformer(monkeypatch, capsys, tmp_path):
    from mechscope.cli import main

    monkeypatch.setattr(catalog, "_hooked_transformer_available", lambda: False)
    assert main(["predict", "--backend", "tl", "--device", "cpu", "--json", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "HookedTransformer" in err and "Traceback" not in err


def test_cli_runs_the_bundled_model_on_the_bridge(tmp_path, capsys):
    """`mechscope predict --backend bridge` (what --backend auto is with transformer-lens 4) gives the card's answers."""
    from mechscope.cli import main

    assert main(["predict", "--backend", "bridge", "--device", "cpu", "--json", "--out", str(tmp_path)]) == 0
    top1 = [p["top1"] for p in json.loads(capsys.readouterr().out)["summary"]["predictions"]]
    assert top1[:2] == ["mary", "paris"]


BLOCK_SAE_LENS = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "sae_lens" or name.startswith("sae_lens."):
            raise ImportError("sae_lens is not installed (blocked by the test)")
sys.meta_path.insert(0, Block())
"""


def test_package_cli_and_help_work_without_sae_lens(tmp_path):
    """`import mechscope`, `mechscope --help`, every command's --help and `detect --json` with sae_lens
    unimportable (as in the transformer-lens 4 environment, where sae-lens cannot be installed)."""
    from mechscope.cli import COMMANDS

    script = BLOCK_SAE_LENS + textwrap.dedent(f"""
        import contextlib, io, json
        import mechscope
        from mechscope.cli import main
        for argv in [["--help"]] + [[c, "--help"] for c in {sorted(COMMANDS)!r}]:
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    main(argv)
                except SystemExit as e:
                    assert e.code == 0, argv
        assert "torch" not in sys.modules, "--help imported torch"
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["detect", "--json"]) == 0
        assert json.loads(out.getvalue())["summary"]["models"][0]["model"] == "mechscope-toy"
        assert "sae_lens" not in sys.modules
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]

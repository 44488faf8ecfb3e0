"""SAEs on the engine API, checked against sae-lens's own HookedSAETransformer (the second implementation) and
exact identities: the error term restores the model, TopK uses <= k features, attribution equals exact
ablation for a linear metric, the max-activating search equals a brute-force sort."""
import pytest
import torch

from mechscope.errors import BadInput
from mechscope.techniques import sae as saes
from mechscope.techniques import sae_features as sf
from mechscope.techniques import sae_interventions as si

HOOK = "blocks.1.hook_resid_pre"
PROMPTS = ["the capital of france is", "when mary and john went to the store , john gave a drink to",
           "i love this ! it ' s absolutely wonderful and"]


def random_sae(engine, hook=HOOK, d_sae=256, k=None, seed=0, **metadata):
    """An untrained sae-lens SAE on hook whose metadata says it was trained on this engine's model (identities
    hold for any weights)."""
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=hook, model_name=engine.cfg.model_name,
                       model_from_pretrained_kwargs=saes.weight_processing(engine), prepend_bos=True, **metadata)
    torch.manual_seed(seed)
    shape = dict(d_in=saes.site_width(engine, hook), d_sae=d_sae, metadata=meta,
                 reshape_activations="hook_z" if hook.endswith("hook_z") else "none")
    sae = TopKSAE(TopKSAEConfig(k=k, **shape)) if k else StandardSAE(StandardSAEConfig(**shape))
    d_in = shape["d_in"]
    with torch.no_grad():  # biases that make features fire on some tokens and not others
        sae.b_enc.copy_(torch.randn(d_sae) * 0.5 - 0.5)
        sae.b_dec.copy_(torch.randn(d_in) * 0.1)
    return sae.eval()


@pytest.fixture(scope="module")
def hooked_sae_model(toy_model):
    from sae_lens import HookedSAETransformer

    model = HookedSAETransformer(toy_model.cfg, tokenizer=toy_model.tokenizer)
    model.load_state_dict(toy_model.state_dict())
    return model.eval()


@pytest.fixture(scope="module")
def tokens(toy_engine):
    from mechscope import tasks

    return tasks.padded(toy_engine, [toy_engine.to_tokens(p)[0] for p in PROMPTS])[0]


@pytest.mark.parametrize("hook", [HOOK, "blocks.2.hook_mlp_out", "blocks.1.attn.hook_z"])
def test_splice_identities_agree_with_hooked_sae_transformer(toy_engine, hooked_sae_model, tokens, hook):
    sae = random_sae(toy_engine, hook)
    with torch.no_grad():
        clean = toy_engine.run(tokens)[0]
        with_error = toy_engine.run(tokens, edits=[(hook, saes.splice(sae, tokens, toy_engine))])[0]
        assert (with_error - clean).abs().max() < 1e-4                # the error term restores the model
        recon = toy_engine.run(tokens, edits=[(hook, saes.splice(sae, tokens, toy_engine, error_term=False))])[0]
        theirs = hooked_sae_model.run_with_saes(tokens, saes=[sae], use_error_term=False, exclude_special_tokens=True)
        assert (recon - clean).abs().max() > 0.1                       # the reconstruction does change the model
        assert (recon - theirs).abs().max() < 1e-4
        _, cache = hooked_sae_model.run_with_cache_with_saes(tokens, saes=[sae], exclude_special_tokens=True)
        ours = saes.feature_acts(toy_engine, sae, tokens)
    keep = ~saes.special_mask(toy_engine, tokens)
    assert keep[:, 0].logical_not().all() and keep[:, 1:].all()        # BOS only
    assert torch.allclose(ours[keep], cache[f"{hook}.hook_sae_acts_post"][keep], atol=1e-5)
    assert (ours[~keep] == 0).all() and (ours > 0).any()


def test_feature_ablation_with_error_term_agrees_with_hooked_sae_transformer(toy_engine, hooked_sae_model, tokens):
    sae = random_sae(toy_engine)
    acts = saes.feature_acts(toy_engine, sae, tokens)
    feature = int(acts[:, 1:].sum((0, 1)).argmax())

    def kill(a, hook):
        a[..., feature] = 0.0
        return a
    with torch.no_grad():
        ours = toy_engine.run(tokens, edits=[(HOOK, saes.splice(sae, tokens, toy_engine,
                                                                 edit=si.zero_features([feature])))])[0]
        hooked_sae_model.add_sae(sae, use_error_term=True, exclude_special_tokens=True)
        try:
            theirs = hooked_sae_model.run_with_hooks(tokens, fwd_hooks=[(f"{HOOK}.hook_sae_acts_post", kill)])
        finally:
            hooked_sae_model.reset_saes()
        clean = toy_engine.run(tokens)[0]
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - clean).abs().max() > 1e-3                           # the ablation did something
    # with a linear decoder, ablating with the error term kept = subtracting f * W_dec[feature]
    direct = toy_engine.run(tokens, edits=[(HOOK, lambda x: x - acts[..., feature, None] * sae.W_dec[feature])])[0]
    assert (ours - direct).abs().max() < 1e-4


def test_topk_decode_uses_at_most_k_features(toy_engine, tokens):
    k = 8
    sae = random_sae(toy_engine, k=k)
    x = saes.hook_activations(toy_engine, sae, tokens)
    f = sae.encode(x)
    assert ((f != 0).sum(-1) <= k).all() and ((f != 0).sum(-1) == k).any()
    top = f.topk(k, dim=-1)
    sparse_decode = torch.einsum("bpk,bpkd->bpd", top.values, sae.W_dec[top.indices]) + sae.b_dec
    assert torch.allclose(sae.decode(f), sparse_decode, atol=1e-5)


def test_attribution_equals_exact_ablation_for_a_linear_metric():
    """SAE on the final residual of a model without a final norm: the logit diff is linear in the hook."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from mechscope.models import as_engine

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64, n_ctx=16, d_vocab=50,
                                  act_fn="gelu", normalization_type=None, seed=0)
    engine = as_engine(HookedTransformer(cfg).eval())
    hook = "blocks.1.hook_resid_post"
    sae = random_sae(engine, hook, d_sae=64)
    tokens = torch.randint(4, 50, (3, 7), generator=torch.Generator().manual_seed(0))
    metric = lambda logits: logits[:, -1, 5] - logits[:, -1, 7]  # noqa: E731
    estimate, acts = si.attribute(engine, sae, tokens, metric)
    active = [tuple(x) for x in (acts.mean(0) != 0).nonzero().tolist()]
    items = [x for x in active if x[0] == 6][:20] + [x for x in active if x[0] < 6][:20]
    assert len(items) == 40
    exact = si.exact_ablations(engine, sae, tokens, metric, items)             # [items, batch]
    est = torch.stack([estimate[:, p, f] for p, f in items])
    assert torch.allclose(est, exact, atol=1e-4) and est.abs().max() > 1e-2
    assert (est[[i for i, (p, _) in enumerate(items) if p < 6]] == 0).all()   # only the last position matters


def test_attribution_is_the_first_order_term_on_the_toy(toy_engine, tokens):
    """On the real model the estimate is the limit of exact partial ablation: (m(f - eps f) - m(f)) / eps -> estimate."""
    sae = random_sae(toy_engine)
    metric = lambda logits: logits[:, -1, 10] - logits[:, -1, 11]  # noqa: E731
    estimate, acts = si.attribute(toy_engine, sae, tokens, metric)
    p, f = [int(i) for i in divmod(int(estimate[0].abs().argmax()), estimate.shape[2])]
    clean = metric(toy_engine.run(tokens)[0])

    def scaled(eps):
        def edit(a):
            a[:, p, f] = a[:, p, f] * (1 - eps)
            return a
        return (metric(toy_engine.run(tokens, edits=[(HOOK, saes.splice(sae, tokens, toy_engine, edit=edit))])[0])
                - clean) / eps
    errors = [float((scaled(eps)[0] - estimate[0, p, f]).abs()) for eps in (1e-1, 1e-2)]
    assert errors[1] < 0.2 * errors[0] + 1e-4                          # first-order convergence
    assert errors[1] < 0.05 * abs(float(estimate[0, p, f]))


# ------------------------------------------------------------------------------------ fit to the model
def _value_biases_folded(model):
    """A copy of a HookedTransformer with b_V folded into b_O (what from_pretrained does by default)."""
    import copy

    folded = copy.deepcopy(model)
    folded.load_state_dict(folded.fold_value_biases(folded.state_dict()))
    return folded


def test_weight_processing_is_measured(toy_engine, toy_model_unfolded):
    from mechscope.models import as_engine

    folded = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True, "fold_value_biases": False}
    assert saes.weight_processing(toy_engine) == folded       # the engines keep b_V in hook_z
    assert saes.weight_processing(as_engine(toy_model_unfolded)) == dict.fromkeys(saes.PROCESSING, False)
    assert saes.weight_processing(as_engine(_value_biases_folded(toy_engine.model)))["fold_value_biases"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_weight_processing_is_measured_in_half_precision(toy_engine, dtype):
    """Issue 19's dry run: loaded in bfloat16 the bundled model's centred embeddings read as uncentred (their
    means are bfloat16 rounding, above the float32 tolerance), so every SAE command refused the shipped SAE.
    The tolerance follows the weights' dtype; an unprocessed model still reads as unprocessed."""
    from mechscope.models import load_model

    half = load_model("mechscope-toy", backend="tl", device="cpu", dtype=dtype)
    assert saes.weight_processing(half) == saes.weight_processing(toy_engine)
    saes.check_fits(saes.load_sae("mechscope-toy"), half)
    raw = load_model("mechscope-toy", backend="nnsight", device="cpu", dtype=dtype)
    assert not saes.weight_processing(raw)["center_writing_weights"]


@pytest.mark.parametrize("site", ["blocks.1.hook_resid_pre", "blocks.0.hook_attn_out", "blocks.1.attn.hook_z",
                                  "blocks.1.mlp.hook_post"])
def test_processing_table_says_which_sites_change(toy_engine, toy_model_unfolded, tokens, site):
    """A site's activations differ between two loads exactly when a flag that differs between them is listed for
    the site: center_writing_weights for residual-stream writes, fold_value_biases for hook_z; fold_ln and
    center_unembed for none."""
    from mechscope.models import as_engine

    reference = saes.weight_processing(toy_engine)
    for other in (as_engine(toy_model_unfolded), as_engine(_value_biases_folded(toy_engine.model))):
        differing = [f for f, v in saes.weight_processing(other).items() if v != reference[f]]
        expected = any(site.endswith(saes.PROCESSING_THAT_MATTERS.get(f, ())) for f in differing)
        a = toy_engine.run(tokens, read=[site])[1][site]
        b = other.run(tokens, read=[site])[1][site]
        assert bool((a - b).abs().max() > 1e-3) == expected, (site, differing)


def test_check_fits_refuses_what_does_not_match(toy_engine, toy_model_unfolded):
    from mechscope.models import as_engine

    saes.check_fits(random_sae(toy_engine), toy_engine)
    saes.check_fits(random_sae(toy_engine, "blocks.1.mlp.hook_post"), as_engine(toy_model_unfolded))  # unchanged site
    cases = [(random_sae(toy_engine), as_engine(toy_model_unfolded), "center_writing_weights"),
             (random_sae(toy_engine, "blocks.1.hook_mlp_in_typo"), toy_engine, "does not offer"),
             (random_sae(toy_engine, hook_head_index=1), toy_engine, "one head")]
    wide = random_sae(toy_engine)
    wide.cfg.d_in = 64
    other = random_sae(toy_engine)
    other.cfg.metadata.model_name = "gpt2-small"
    for sae, engine, message in cases + [(wide, toy_engine, "d_in = 64"), (other, toy_engine, "gpt2-small")]:
        with pytest.raises(BadInput, match=message):
            saes.check_fits(sae, engine)


def test_loading_refuses_bad_specs(tmp_path):
    for spec, message in (("", "empty"), ("./no/such/dir", "does not exist"), ("no-such-release:x", "unknown SAE"),
                          ("gpt2-small-res-jb:blocks.99.hook_resid_pre", "has no SAE"),
                          ("mechscope-toy:blocks.7.hook_resid_pre", "no shipped SAE")):
        with pytest.raises(BadInput, match=message):
            saes.load_sae(spec)
    with pytest.raises(BadInput, match="no cfg.json"):
        saes.load_sae(str(tmp_path))


def test_pretrained_release_offline_is_one_bad_input(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BadInput, match="could not fetch SAE gpt2-small-res-jb:blocks.8.hook_resid_pre"):
        saes.load_sae("gpt2-small-res-jb:blocks.8.hook_resid_pre")


def test_neuronpedia_links_for_releases_that_have_them(toy_engine):
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    np_id = get_pretrained_saes_directory()["gpt2-small-res-jb"].neuronpedia_id["blocks.8.hook_resid_pre"]
    sae = random_sae(toy_engine, neuronpedia_id=np_id)
    assert saes.neuronpedia_url(sae, 17) == f"https://neuronpedia.org/{np_id}/17"
    assert saes.neuronpedia_url(random_sae(toy_engine), 17) is None


# -------------------------------------------------------------------------------------- features
def test_max_activating_search_equals_a_brute_force_sort(toy_engine):
    sae = random_sae(toy_engine)
    rows = saes.corpus_rows(toy_engine, 3000, 32, seed=3)
    assert (rows[:, 0] == toy_engine.bos_token_id).all() and rows.shape[1] == 32
    features = [3, 50, 200]
    result = sf.max_activating(toy_engine, sae, rows, features, k=10, n_sample=40, batch_size=7)
    everything = saes.feature_acts(toy_engine, sae, rows)[..., features].reshape(-1, 3).T   # [3, tokens]
    assert result.n_tokens == rows.numel() - len(rows)
    for j in range(3):
        assert torch.allclose(result.top_values[j], everything[j].topk(10).values, atol=1e-5)
        assert torch.allclose(everything[j][result.top_index[j]], result.top_values[j], atol=1e-5)
        assert result.count[j] == (everything[j] > 0).sum()
        assert torch.isclose(result.total[j], everything[j].sum(), rtol=1e-4)
        sampled = result.sample_index[j][result.sample_values[j] > 0]
        assert len(sampled) == min(40, int(result.count[j])) and len(set(sampled.tolist())) == len(sampled)
        assert (everything[j][sampled] > 0).all()
        bands = sf.quantile_examples(result, j, per_band=2)
        assert [b["band"] for b in bands] == ["0-25%", "25-50%", "50-75%", "75-100%"]
        assert all(b["low"] <= v <= b["high"] for b in bands for v, _ in b["examples"])
    windows = sf.contexts(toy_engine, sae, rows, features[0], result.top_index[0][:3].tolist(), before=4, after=2)
    assert [w["values"][w["at"]] for w in windows] == pytest.approx(result.top_values[0][:3].tolist(), abs=1e-4)


def test_logit_effect_is_the_readout_change_at_frozen_scale(toy_engine):
    """For a residual r whose centred part is orthogonal to the direction d, the final norm's scale does not
    move to first order, so (readout(r + eps d) - readout(r)) / eps equals the logit effect at r's scale."""
    sae = random_sae(toy_engine)
    d = sf.residual_directions(toy_engine, sae, [5])[0]
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(toy_engine.cfg.d_model, generator=gen) * 3
    dc = d - d.mean()
    r = r - r.mean()
    r = r - (r @ dc) / (dc @ dc) * dc                                   # centred r orthogonal to centred d
    scale = float(toy_engine.final_norm.scale(r))
    eps = 0.05                                                          # central difference: error O(eps^2)
    change = (toy_engine.readout((r + eps * d)[None]) - toy_engine.readout((r - eps * d)[None]))[0] / (2 * eps)
    effect = sf.logit_effects(toy_engine, sae, [5], scale)[0]
    assert torch.allclose(change, effect, atol=1e-2 * effect.abs().max())
    unscaled = sf.logit_effects(toy_engine, sae, [5], 1.0)[0]        # the scale matters (a control that can fail)
    assert not torch.allclose(change, unscaled, atol=1e-2 * effect.abs().max())


# -------------------------------------------------------------------------------------- steering
def test_feature_steering_is_kv_cache_correct(toy_engine):
    sae = random_sae(toy_engine)
    tokens = toy_engine.to_tokens("i hate this ! it ' s")
    edit = [(HOOK, si.add_direction(6.0 * sae.W_dec[3].detach(), from_position=1))]
    cached = toy_engine.generate(tokens, edits=edit, max_new_tokens=8, use_kv_cache=True)
    uncached = toy_engine.generate(tokens, edits=edit, max_new_tokens=8, use_kv_cache=False)
    plain = toy_engine.generate(tokens, max_new_tokens=8)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain)                              # the steering changed the text


def test_control_directions_have_the_features_norm(toy_engine):
    sae = random_sae(toy_engine)
    live = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    live[10:20] = True
    controls = si.control_directions(sae, 12, 5, live)
    norm = sae.W_dec[12].norm()
    for kind in si.CONTROL_KINDS:
        assert controls[kind].shape == (5, sae.cfg.d_in)
        assert torch.allclose(controls[kind].norm(dim=1), norm.expand(5), rtol=1e-5)
    rows = {tuple(r.tolist()) for r in (sae.W_dec[10:20] / sae.W_dec[10:20].norm(dim=1, keepdim=True) * norm)}
    assert all(any(torch.allclose(c, torch.tensor(r), atol=1e-5) for r in rows) for c in controls["random_feature"])
    assert not any(torch.allclose(c, sae.W_dec[12], atol=1e-5) for c in controls["random_feature"])


# ------------------------------------------------------------------------------------- every engine
def test_splice_and_features_on_every_engine(toy_on, toy_engine, toy_model_unfolded, hooked_sae_model, tokens):
    """On tl, bridge and nnsight: the error term restores the model, and features and the reconstruction's logits
    equal HookedSAETransformer's on the transformer-lens model with the same weight processing."""
    from sae_lens import HookedSAETransformer

    sae = random_sae(toy_on)
    raw = saes.weight_processing(toy_on)["center_writing_weights"] is False
    if raw:  # nnsight runs the Hugging Face weights unprocessed: compare with the unfolded transformer-lens model
        reference = HookedSAETransformer(toy_model_unfolded.cfg, tokenizer=toy_model_unfolded.tokenizer)
        reference.load_state_dict(toy_model_unfolded.state_dict())
        reference.eval()
    else:
        reference = hooked_sae_model
    with torch.no_grad():
        clean = toy_on.run(tokens)[0]
        exact = toy_on.run(tokens, edits=[(HOOK, saes.splice(sae, tokens, toy_on))])[0]
        recon = toy_on.run(tokens, edits=[(HOOK, saes.splice(sae, tokens, toy_on, error_term=False))])[0]
        theirs = reference.run_with_saes(tokens, saes=[sae], exclude_special_tokens=True)
        _, cache = reference.run_with_cache_with_saes(tokens, saes=[sae], exclude_special_tokens=True)
    assert (exact - clean).abs().max() < 1e-4
    centred = lambda x: x - x.mean(-1, keepdim=True)  # noqa: E731  (engines' logits agree up to a constant)
    assert (centred(recon) - centred(theirs)).abs().max() < 1e-3
    keep = ~saes.special_mask(toy_on, tokens)
    ours = saes.feature_acts(toy_on, sae, tokens)
    assert torch.allclose(ours[keep], cache[f"{HOOK}.hook_sae_acts_post"][keep], atol=1e-4)
    edit = [(HOOK, si.add_direction(6.0 * sae.W_dec[3].detach(), from_position=1))]
    start = toy_on.to_tokens("i hate this ! it ' s")
    assert torch.equal(toy_on.generate(start, edits=edit, max_new_tokens=6, use_kv_cache=True),
                       toy_on.generate(start, edits=edit, max_new_tokens=6, use_kv_cache=False))
    shipped = saes.load_sae("mechscope-toy")
    if raw:
        with pytest.raises(BadInput, match="center_writing_weights=True but this nnsight model"):
            saes.check_fits(shipped, toy_on)
    else:
        saes.check_fits(shipped, toy_on)


def test_data_files_become_bos_first_rows(toy_engine, tmp_path):
    import json

    import datasets
    import numpy as np

    text = " ".join(["the capital of france is paris ."] * 40)
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": text[i:i + 60]}) for i in range(0, len(text), 60)))
    ids = toy_engine.to_tokens(text, prepend_bos=False)[0]
    torch.save(ids, tmp_path / "a.pt")
    np.save(tmp_path / "rows.npy", saes.text_rows(toy_engine, [text], 16).numpy())
    datasets.Dataset.from_dict({"text": [text]}).save_to_disk(str(tmp_path / "ds"))
    expected = saes.text_rows(toy_engine, [text], 16)
    for name in ("a.txt", "a.pt", "rows.npy", "ds"):
        rows = saes.rows_from_file(toy_engine, str(tmp_path / name), 16)
        assert torch.equal(rows, expected), name
    assert (saes.rows_from_file(toy_engine, str(tmp_path / "a.jsonl"), 16)[:, 0] == toy_engine.bos_token_id).all()
    assert (expected[:, 0] == toy_engine.bos_token_id).all() and (expected[:, 1:] != toy_engine.bos_token_id).all()
    torch.save(torch.tensor([1, 2, 999]), tmp_path / "bad.pt")
    with pytest.raises(BadInput, match="token ids must be in 0..305"):
        saes.rows_from_file(toy_engine, str(tmp_path / "bad.pt"), 16)

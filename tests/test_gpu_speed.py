"""Slow on a GPU (issue 19 §3), checked on the CPU: what crosses to the host (a spy on .cpu() / .to("cpu") stands in
for a GPU-to-host copy, one on .tolist() / float() for a wait on the device), which layers a weight read touches,
whether the unembedding runs, whether autograd records, which KV-cache agreement the bridge accepts in half
precision; each against the values of the slow path."""
import pytest
import torch

from conftest import BACKENDS

IOI = ["When Mary and John went to the store, John gave a drink to",
       "When Tom and Anna went to the park, Tom gave a ball to"]


@pytest.fixture
def host_copies(monkeypatch):
    """numel of every tensor that .cpu() or .to(<cpu>) is called on while the test runs (on a GPU: a copy to the
    host, and a wait for the device)."""
    sizes = []
    cpu, to = torch.Tensor.cpu, torch.Tensor.to

    def spy_cpu(self, *args, **kwargs):
        sizes.append(self.numel())
        return cpu(self, *args, **kwargs)

    def spy_to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **{k: v for k, v in kwargs.items() if k != "copy"})[0]
        if device is not None and device.type == "cpu":
            sizes.append(self.numel())
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", spy_cpu)
    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    return sizes


def _ids(engine, words):
    return torch.tensor([engine.to_tokens(w, prepend_bos=False)[0, 0] for w in words])


# ------------------------------------------------------------------------------------------- 1. DLA
def test_dla_copies_no_layer_weight_to_the_host(toy_engine, host_copies):
    """Each layer's head and neuron projections run where W_O / W_out live; only [batch, ...] results come to the
    CPU. Before: every layer's W_O and W_out were copied to the host in float32 for every chunk of prompts."""
    from mechscope.techniques.dla import dla

    tokens = toy_engine.to_tokens(["When Mary and John went", "When Tom and Anna went"])
    answer, wrong = _ids(toy_engine, [" Mary", " Anna"]), _ids(toy_engine, [" John", " Tom"])
    result = dla(toy_engine, tokens, answer, wrong)
    smallest_weight = min(toy_engine.W_O(0).numel(), toy_engine.W_out(0).numel())
    assert host_copies and max(host_copies) < smallest_weight, max(host_copies)
    assert torch.allclose(result.total(), result.metric, atol=1e-4)      # the parts still sum to the logit diff


# --------------------------------------------------------------------------------- 2. one layer's weights
def test_tl_weights_of_one_layer_read_that_layer_alone(toy_engine):
    """W_O(l), b_O(l), W_out(l) on transformer-lens index block l (O(1) in the layers). Before: model.W_O[l], which
    stacks every layer's W_O on each call (O(L) per call, O(L^2) over a DLA)."""
    model = toy_engine.model
    expected = [(model.W_O[layer], model.b_O[layer], model.W_out[layer]) for layer in range(model.cfg.n_layers)]
    seen = []

    class Blocks(torch.nn.ModuleList):
        def __getitem__(self, i):
            seen.append(i)
            return super().__getitem__(i)

        def __iter__(self):
            pytest.fail("a weight of one layer iterated over every block")

    blocks, model.blocks = model.blocks, Blocks(list(model.blocks))   # (monkeypatch would delete a submodule)
    try:
        for layer, (W_O, b_O, W_out) in enumerate(expected):
            seen.clear()
            got = toy_engine.W_O(layer), toy_engine.b_O(layer), toy_engine.W_out(layer)
            assert seen == [layer] * 3
            assert torch.equal(got[0], W_O) and torch.equal(got[1], b_O) and torch.equal(got[2], W_out)
    finally:
        model.blocks = blocks


# ------------------------------------------------------------------------------ 3. max-activating search
@pytest.fixture(scope="module")
def shipped_sae():
    from mechscope.techniques import sae as saes

    return saes.load_sae("mechscope-toy")


def test_max_activating_copies_only_the_kept_entries_to_the_host(toy_engine, shipped_sae, host_copies):
    """The top-k and the sample run where the activations are; only [F, k] / [F, n_sample] come to the CPU. Before:
    every batch's [batch, seq, F] activations were copied to the CPU (~4.3 GB a batch for a 131k-wide SAE)."""
    from mechscope.techniques import sae as saes
    from mechscope.techniques import sae_features as sf

    rows = saes.corpus_rows(toy_engine, 500, 16, seed=3)[:16]
    k, n_sample, batch_size = 5, 8, 4
    host_copies.clear()
    result = sf.max_activating(toy_engine, shipped_sae, rows, None, k=k, n_sample=n_sample, batch_size=batch_size)
    d_sae = shipped_sae.cfg.d_sae
    assert result.top_values.shape == (d_sae, k)
    activations = batch_size * rows.shape[1] * d_sae                     # one batch's [batch, seq, d_sae]
    assert d_sae * max(k, n_sample) <= max(host_copies) < activations, max(host_copies)   # the results: yes


def test_max_activating_gives_the_cpu_paths_results_in_any_batch_size(toy_engine, shipped_sae):
    """One batch and batches of one row keep the same top activations, counts and sums; the sample is the one the
    CPU path drew (the same keys from the same seeded generator, the n_sample largest of them)."""
    from mechscope.techniques import sae as saes
    from mechscope.techniques import sae_features as sf

    rows = saes.corpus_rows(toy_engine, 600, 16, seed=4)
    features, k, n_sample = [3, 17, 40, 101, 200], 6, 12
    whole = sf.max_activating(toy_engine, shipped_sae, rows, features, k=k, n_sample=n_sample, batch_size=len(rows))
    tiny = sf.max_activating(toy_engine, shipped_sae, rows, features, k=k, n_sample=n_sample, batch_size=1)
    assert torch.equal(whole.top_values, tiny.top_values) and torch.equal(whole.count, tiny.count)
    assert torch.allclose(whole.total, tiny.total, rtol=1e-5) and whole.n_tokens == tiny.n_tokens
    alive = whole.top_values > 0
    assert alive.any() and torch.equal(whole.top_index[alive], tiny.top_index[alive])
    # the CPU path's sample for batch_size=3: per batch, keys drawn in order from one seeded CPU generator
    gen, keys, values = torch.Generator().manual_seed(0), [], []
    for batch in rows.split(3):
        v = saes.feature_acts(toy_engine, shipped_sae, batch)[..., features].reshape(-1, len(features)).T
        keys.append(torch.where(v > 0, 1 - torch.rand(v.shape, generator=gen), torch.tensor(-1.0)))
        values.append(v)
    keys, values = torch.cat(keys, 1), torch.cat(values, 1)
    result = sf.max_activating(toy_engine, shipped_sae, rows, features, k=k, n_sample=n_sample, batch_size=3)
    for j in range(len(features)):
        chosen = keys[j].topk(n_sample).indices
        chosen = chosen[keys[j][chosen] > 0]
        kept = result.sample_index[j][result.sample_values[j] > 0]
        assert sorted(kept.tolist()) == sorted(chosen.tolist())
        assert torch.equal(result.sample_values[j][result.sample_values[j] > 0].sort().values,
                           values[j][chosen].sort().values)


# ------------------------------------------------------------------------------ 4. no logits to discard
def _logit_modules(engine):
    """The final norm and the unembedding: nothing that wants activations alone should run them."""
    if engine.name == "nnsight":
        return [engine.hf.get_submodule(engine.arch.final_norm), engine.hf.get_submodule(engine.arch.unembed)]
    return [engine.model.ln_final, engine.model.unembed]


@pytest.fixture
def logit_calls(request):
    """A function engine -> list that counts forwards of the engine's final norm and unembedding from then on."""
    calls, handles = [], []

    def watch(engine):
        for module in _logit_modules(engine):
            handles.append(module.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__)))
        return calls
    yield watch
    for handle in handles:
        handle.remove()


def _full_run(engine, monkeypatch):
    """engine.activations as the full forward it replaced (run's reads: the logits computed, then dropped)."""
    monkeypatch.setattr(engine, "activations", lambda tokens, read, edits=(): engine.run(tokens, read, edits)[1])


def _equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("toy_on", BACKENDS, indirect=True)
def test_activations_are_runs_reads_without_the_logits(toy_on, logit_calls):
    """engine.activations stops the forward once its last site is read (a hook that raises on tl and the bridge,
    nnsight's tracer.stop()): the same activations as run(), edits included, and the final norm and unembedding
    never run."""
    engine = toy_on
    tokens = engine.to_tokens(IOI)
    edit = [("blocks.0.hook_mlp_out", lambda x: 2 * x), ("blocks.2.hook_resid_post", lambda x: 0 * x)]
    cases = [(["hook_embed"], []), (["blocks.0.hook_resid_pre", "blocks.1.attn.hook_pattern"], []),
             (["blocks.1.hook_resid_mid", "blocks.1.attn.hook_z"], edit), (["blocks.2.hook_resid_post"], edit)]
    expected = [engine.run(tokens, read, edits)[1] for read, edits in cases]
    calls = logit_calls(engine)
    got = [engine.activations(tokens, read, edits) for read, edits in cases]
    assert calls == [] and engine.activations(tokens, []) == {}
    for (read, _), want, have in zip(cases, expected, got):
        assert set(have) == set(read)                                    # (run on the bridge adds alias names)
        assert all(torch.equal(want[s], have[s]) for s in read)


@pytest.mark.parametrize("toy_on", BACKENDS, indirect=True)
def test_probing_heads_sae_and_ablation_never_compute_logits(toy_on, logit_calls, shipped_sae, monkeypatch):
    """Residuals for probes, attention patterns, an SAE's input (every engine; tl already stopped early), the final
    scale and the mean-ablation reference: before, each ran the whole forward and dropped the logits. The values
    are those of the full forward."""
    from mechscope.techniques import ablation, heads, probing
    from mechscope.techniques import sae as saes
    from mechscope.techniques import sae_features as sf

    engine = toy_on
    rows = [engine.to_tokens(p)[0] for p in IOI]
    tokens = engine.to_tokens(IOI)
    queries, keys = torch.tensor([len(r) - 1 for r in rows]), {"io": torch.tensor([3, 3]), "s": torch.tensor([5, 5])}
    sites = ["blocks.0.attn.hook_z", "blocks.1.hook_mlp_out"]
    jobs = {
        "residuals_at": lambda: probing.residuals_at(engine, rows, [4, 4], ["blocks.1.hook_resid_post"]),
        "head_scores": lambda: heads.head_scores(engine, n_sequences=4, seq_len=6, batch_size=2).per_sequence,
        "attention_patterns": lambda: heads.attention_patterns(engine, tokens[:1], [(1, 0), (2, 3)]),
        "attention_readout": lambda: heads.attention_readout(engine, tokens, queries, keys),
        "feature_acts": lambda: saes.feature_acts(engine, shipped_sae, tokens),
        "final_scale": lambda: sf.final_scale(engine, tokens),
        "mean_reference": lambda: ablation.reference_values(engine, tokens, set(sites), "mean"),
    }
    calls = logit_calls(engine)
    fast = {name: job() for name, job in jobs.items()}
    assert calls == [], calls
    _full_run(engine, monkeypatch)
    slow = {name: job() for name, job in jobs.items()}
    assert len(calls) > 0                                                # the spy sees a full forward
    for name in jobs:
        assert _equal(fast[name], slow[name]), name


@pytest.mark.parametrize("toy_on", ["tl", "bridge"], indirect=True)
def test_effective_embedding_never_computes_logits(toy_on, logit_calls, monkeypatch):
    """circuits' effective embedding reads resid_pre of the layer for every token: before, with the logits of every
    [BOS, token] pair computed and dropped."""
    from mechscope.techniques import circuits

    calls = logit_calls(toy_on)
    fast = circuits.effective_embedding(toy_on, 1, batch_size=128)
    assert calls == []
    _full_run(toy_on, monkeypatch)
    assert torch.equal(fast, circuits.effective_embedding(toy_on, 1, batch_size=128))


# ---------------------------------------------------------------------------------- 5. circuits: no grad
def test_circuit_tables_build_no_autograd_graph(toy_model):
    """The OV / QK circuits, their full matrices and the tables built from them: no tensor requires grad (before:
    ov_circuit and qk_circuit ran with grad mode on over the model's parameters, so every product recorded a graph
    and full_matrix kept it)."""
    from mechscope.techniques import circuits

    assert toy_model.W_E.requires_grad and torch.is_grad_enabled()      # the situation the fix is for
    for embedding in (None, circuits.effective_embedding(toy_model, 1)):
        for circuit in (circuits.ov_circuit(toy_model, 1, 2, embedding), circuits.qk_circuit(toy_model, 1, 2, embedding),
                        circuits.ov_circuit(toy_model, 1, None, embedding)):
            assert not circuit.A.requires_grad and not circuit.B.requires_grad
            assert circuit.A.grad_fn is None and circuit.B.grad_fn is None
        assert not circuits.full_matrix(circuits.ov_circuit(toy_model, 0, 1, embedding), 1e9).requires_grad


def test_circuits_read_one_layers_weights(toy_model, monkeypatch):
    """transformer-lens' model.OV / model.QK stack every layer's W_V, W_O (W_Q, W_K) on each call: O(L^2) over
    the copying scores of every layer. The circuits now read the one layer's attention; same values."""
    from transformer_lens import HookedTransformer

    from mechscope.techniques import circuits

    expected = {(which, layer): getattr(toy_model, which)[layer].AB for which in ("OV", "QK")
                for layer in range(toy_model.cfg.n_layers)}
    for which in ("W_Q", "W_K", "W_V", "W_O"):
        monkeypatch.setattr(HookedTransformer, which, property(lambda self, w=which: pytest.fail(f"stacked {w}")))
    for layer in range(toy_model.cfg.n_layers):
        ov, qk = circuits._layer_circuit(toy_model, layer, "OV"), circuits._layer_circuit(toy_model, layer, "QK")
        torch.testing.assert_close(ov.AB, expected["OV", layer])
        torch.testing.assert_close(qk.AB, expected["QK", layer])
    d_vocab, n_heads = toy_model.cfg.d_vocab, toy_model.cfg.n_heads   # the full circuits, without the stacked weights
    assert circuits.ov_circuit(toy_model, 2, 1).shape == (d_vocab, d_vocab)
    assert circuits.qk_circuit(toy_model, 2, None).shape == (n_heads, d_vocab, d_vocab)


# ------------------------------------------------------------------------- 6. bridge KV cache in bfloat16
def _generate_logits(engine, cached):
    tokens = torch.full((1, 3), engine.bos_token_id)
    out = engine.model.generate(tokens, max_new_tokens=3, do_sample=False, stop_at_eos=False, use_past_kv_cache=cached,
                                verbose=False, output_logits=True)
    return out, torch.stack(out.logits).float()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_bridge_takes_a_kv_cache_that_agrees_within_half_precision_rounding(dtype, monkeypatch):
    """A working cache in half precision differs from uncached generation by rounding, at most by what the dtype's
    own arithmetic does: here the cached run's stand-in is float32's (exact) logits rounded to the dtype, the
    uncached one the model run in it (the same toy weights on transformer-lens). The bridge's check takes that cache
    and refuses a wrong one. Before: a float32 tolerance (atol 1e-4), later allclose(atol 0.05, rtol 0.02), both below
    bfloat16's rounding on the toy, so bfloat16 generation on the bridge always ran without its cache."""
    from mechscope.engines.bridge import KV_CACHE_TOLERANCE
    from mechscope.models import load_model

    half = getattr(torch, dtype)
    bridge = load_model("mechscope-toy", backend="bridge", device="cpu", dtype=dtype)
    exact = load_model("mechscope-toy", backend="tl", device="cpu")
    rounded = load_model("mechscope-toy", backend="tl", device="cpu", dtype=dtype)
    assert bridge.cfg.dtype == rounded.cfg.dtype == half

    def rounding_only(tokens, *, use_past_kv_cache, **kwargs):
        if not use_past_kv_cache:
            return rounded.model.generate(tokens, use_past_kv_cache=False, **kwargs)
        out = exact.model.generate(tokens, use_past_kv_cache=True, **kwargs)
        out.logits = tuple(x.to(half) for x in out.logits)
        return out

    (cached_out, cached), (uncached_out, uncached) = _generate_logits(exact, True), _generate_logits(rounded, False)
    assert torch.equal(cached_out.sequences, uncached_out.sequences)     # the same greedy tokens
    share = float((cached.to(half).float() - uncached).abs().max() / uncached.abs().max())
    assert KV_CACHE_TOLERANCE[torch.float32] < share < KV_CACHE_TOLERANCE[half] / 2, share
    if dtype == "bfloat16":                                              # (float16's rounding passed the old check)
        assert not torch.allclose(cached.to(half).float(), uncached, atol=5e-2, rtol=2e-2)
    monkeypatch.setattr(bridge.model, "generate", rounding_only)
    bridge._kv_cache_exact = None
    assert bridge.kv_cache_exact()

    def wrong(tokens, *, use_past_kv_cache, **kwargs):                  # cached steps predict other tokens
        out = rounding_only(tokens, use_past_kv_cache=use_past_kv_cache, **kwargs)
        if use_past_kv_cache:
            out.logits = out.logits[:1] + tuple(x.flip(-1) for x in out.logits[1:])
        return out
    monkeypatch.setattr(bridge.model, "generate", wrong)
    bridge._kv_cache_exact = None
    with pytest.warns(UserWarning, match="KV cache is wrong"):
        assert not bridge.kv_cache_exact()


# ------------------------------------------------------------------------ 7. one transfer per batch, not per row
@pytest.fixture
def reads(monkeypatch):
    """How often a tensor is read into Python as a list or a float (on a GPU: each a wait for the device)."""
    import collections

    counts = collections.Counter()
    for name in ("tolist", "__float__"):
        def spy(self, *args, _original=getattr(torch.Tensor, name), _name=name, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, spy)
    return counts


def test_generations_come_to_python_once_per_batch(toy_engine, shipped_sae, reads):
    """steering's and SAE steering's generated ids: one .tolist() per batch. Before: one per row (4 rows here; 16 in
    the sweep: 4 jobs x 4 prompts). Their numbers are checked in test_steering.py and test_sae.py."""
    from mechscope.techniques import sae_interventions as si
    from mechscope.techniques import steering

    rows = [toy_engine.to_tokens(p)[0] for p in ["i love this ! it", "i hate that ! it", "the food was bad and",
                                                 "the film was good and"]]
    assert len({len(r) for r in rows}) == 1                              # one length: one batch
    si.steer_measure(toy_engine, "blocks.1.hook_resid_pre", rows, 4 * shipped_sae.W_dec[3].detach(),
                     torch.tensor([5, 6]), max_new_tokens=4)
    assert reads["tolist"] == 1, reads
    reads.clear()
    steering.steering_sweep(toy_engine, rows, 1, torch.randn(toy_engine.cfg.d_model), [0, 2], [5], [6],
                            max_new_tokens=4, n_random=2)
    assert reads["tolist"] == 1, reads


def test_tuned_lens_training_reads_its_losses_once(toy_engine, reads):
    """The loss of every step stays on the device and is read once, after the last step. Before: float(loss) at
    every step. Deterministic training and the divergence checks: test_tuned_lens.py, test_hostile.py."""
    from mechscope.techniques.tuned_lens import corpus_tokens, train_tuned_lens
    from mechscope.toy.corpus import corpus_text

    tokens = corpus_tokens(toy_engine, " ".join(corpus_text(40, seed=0)))
    lens = train_tuned_lens(toy_engine, tokens, steps=12, batch_tokens=64)
    assert len(lens.losses) == 12 and all(isinstance(x, float) for x in lens.losses)
    assert reads["__float__"] == 0 and reads["tolist"] == 1, reads

"""Edge-level circuit discovery (techniques/edges.py, `mechscope discover`), against known answers on the
bundled model's induction task (32 sequences [BOS, r, r], r of 10 words, the first copy re-drawn in the
corrupted run): exact direct-edge effects into the induction head L2H1, identities of exact edge patching
(all edges = clean, none = corrupted, one edge = path-patch --freeze-mlps), EAP against a finite difference,
the discovered circuit, and IOI's L0 heads -> MLP -> logits circuit; and the same scores and exact effects on
the nnsight engine (the toy's Hugging Face export, tiny random Llama- and NeoX-shaped checkpoints) as on tl."""
import json
from types import SimpleNamespace

import pytest
import torch

from mechscope.errors import BadInput
from mechscope.techniques import edges
from mechscope.techniques.path_patching import induction_task, path_patch


@pytest.fixture(scope="module")
def toy_nnsight():
    from mechscope.models import load_model

    return load_model("mechscope-toy", backend="nnsight", device="cpu")


@pytest.fixture(scope="module")
def induction(toy_engine):
    clean, corrupted, metric = induction_task(toy_engine, 32, 10, seed=0)
    scores = edges.edge_scores(toy_engine, clean, corrupted, metric, steps=5)
    return clean, corrupted, metric, scores


def removed_one(graph, names):
    keep = torch.ones(len(names), len(graph.edges), dtype=torch.bool)
    for row, name in enumerate(names):
        keep[row, graph.index(name)] = False
    return keep


def test_the_graph_of_the_bundled_model():
    cfg = SimpleNamespace(n_layers=3, n_heads=4, n_key_value_heads=None, attn_only=False, parallel_attn_mlp=False)
    graph = edges.build_graph(cfg)
    assert len(graph.senders) == 16 and len(graph.receivers) == 40
    # per layer-l head input: input + 5 per earlier layer; MLP l: also its own heads; logits: every sender
    assert len(graph.edges) == 12 * 1 + 5 + 12 * 6 + 10 + 12 * 11 + 15 + 16 == 262
    assert "L2H1 -> MLP2" in graph.names and "L2H1 -> L2H2.q" not in graph.names and "MLP1 -> MLP1" not in graph.names
    with pytest.raises(BadInput, match="grouped-query"):
        edges.build_graph(SimpleNamespace(**{**vars(cfg), "n_key_value_heads": 2}))


def test_connected_keeps_only_paths_from_the_input_to_the_logits():
    cfg = SimpleNamespace(n_layers=2, n_heads=2, n_key_value_heads=None, attn_only=False, parallel_attn_mlp=False)
    graph = edges.build_graph(cfg)
    names = ["input -> L0H1.k", "L0H1 -> MLP0", "MLP0 -> logits",   # a path
             "L1H0 -> logits",                                      # its sender reads nothing kept
             "input -> MLP1",                                       # MLP1 reaches no logits
             "L0H0 -> L1H1.q"]                                      # neither
    keep = torch.zeros(1, len(graph.edges), dtype=torch.bool)
    for name in names:
        keep[0, graph.index(name)] = True
    kept = [graph.names[i] for i in edges.connected(graph, keep)[0].nonzero()[:, 0]]
    assert kept == names[:3]


def test_all_edges_is_the_clean_run_and_no_edges_the_corrupted_run(toy_engine, induction):
    clean, corrupted, metric, scores = induction
    keep = torch.stack([torch.ones(len(scores.graph.edges), dtype=torch.bool),
                        torch.zeros(len(scores.graph.edges), dtype=torch.bool)])
    values = edges.evaluate(toy_engine, clean, corrupted, metric, keep)   # its own corrupted forward
    torch.testing.assert_close(values[0], scores.clean, atol=1e-4, rtol=0)
    torch.testing.assert_close(values[1], scores.corrupted, atol=1e-4, rtol=0)
    assert not toy_engine.model.cfg.use_split_qkv_input and not toy_engine.model.cfg.use_hook_mlp_in  # restored


def test_exact_direct_edges_into_the_induction_head(toy_engine, induction):
    """The issue's known answers (fractions of the corrupted - clean gap, everything downstream recomputed)."""
    clean, corrupted, metric, scores = induction
    graph = scores.graph
    into = [name for name in graph.names if "-> L2H1." in name]
    effects = edges.single_edge_effects(toy_engine, clean, corrupted, metric, [graph.index(n) for n in into], scores)
    fraction = dict(zip(into, (effects.mean(1) / (scores.corrupted - scores.clean).mean()).tolist()))
    expected = {"MLP0 -> L2H1.v": 1.29, "MLP0 -> L2H1.k": 0.63, "L1H2 -> L2H1.k": 0.38, "MLP1 -> L2H1.k": 0.19}
    for name, value in expected.items():
        assert fraction[name] == pytest.approx(value, abs=0.01), name
    assert max(abs(v) for n, v in fraction.items() if n not in expected) < 0.035   # L1H0 -> L2H1.k: 0.031
    assert abs(fraction["L0H1 -> L2H1.k"]) < 0.01             # the previous-token head reaches the keys via MLP0


def test_one_edge_equals_path_patching_with_frozen_mlps(toy_engine, induction):
    clean, corrupted, metric, scores = induction
    graph = scores.graph
    for receiver in [(2, 1, "k"), (2, 1, "q"), (1, 2, "v")]:
        senders = [(l, h) for l in range(receiver[0]) for h in range(4)]
        pp = path_patch(toy_engine, clean, corrupted, senders, [receiver], metric, sweep="senders", freeze_mlps=True)
        names = [f"L{l}H{h} -> L{receiver[0]}H{receiver[1]}.{receiver[2]}" for l, h in senders]
        effects = edges.single_edge_effects(toy_engine, clean, corrupted, metric, [graph.index(n) for n in names],
                                            scores)
        torch.testing.assert_close(effects, pp.per_prompt, atol=1e-5, rtol=0)


def test_eap_is_the_derivative_of_removing_an_edge(toy_engine, induction):
    """EAP = d m / d eps of input_r - eps * (out_s - out_s_corrupted) at eps = 0 (a finite difference)."""
    clean, corrupted, metric, scores = induction
    with torch.no_grad():
        _, a = toy_engine.run(clean, read=["blocks.0.hook_mlp_out"])
        _, b = toy_engine.run(corrupted, read=["blocks.0.hook_mlp_out"])
        delta = a["blocks.0.hook_mlp_out"] - b["blocks.0.hook_mlp_out"]
        base = metric(toy_engine.run(clean)[0])
        eps = 1e-3

        def nudge(x):
            x = x.clone()
            x[:, :, 1] -= eps * delta
            return x
        nudged = metric(toy_engine.run(clean, edits=[("blocks.2.hook_v_input", nudge)])[0])
    estimate = scores.eap[:, scores.graph.index("MLP0 -> L2H1.v")]
    torch.testing.assert_close(estimate.mean(), ((nudged - base) / eps).mean(), rtol=0.05, atol=1e-3)


def test_the_discovered_induction_circuit(toy_engine, induction):
    clean, corrupted, metric, _ = induction
    d = edges.discover(toy_engine, clean, corrupted, metric, method="eap-ig", steps=5, target=0.9, check=40)
    graph = d.scores.graph
    circuit = {graph.names[i] for i in d.circuit.nonzero()[:, 0]}
    assert {"MLP0 -> L2H1.v", "MLP0 -> L2H1.k", "L1H2 -> L2H1.k", "MLP1 -> L2H1.k", "L0H1 -> MLP0"} <= circuit
    assert d.faithfulness[0] >= 0.9 and d.faithfulness[1] <= d.faithfulness[0] <= d.faithfulness[2]
    assert len(circuit) < len(graph.edges) / 2
    assert abs(d.completeness[0]) < 0.05                      # nothing of the behaviour is left without it
    assert d.clean == pytest.approx(d.scores.clean.mean().item(), abs=1e-4)
    # random edge sets of the same sizes carry nothing until they hold every edge; EAP-IG ranks edges better
    assert max(d.curve["random"]["mean"][:-1]) < 0.05
    assert d.agreement["eap-ig"]["spearman"] > d.agreement["eap"]["spearman"] + 0.3


def test_ioi_circuit_runs_through_the_layer0_heads_and_the_mlps(toy_engine):
    from mechscope.commands.path_patch import _task

    args = SimpleNamespace(task="ioi", n=16, seed=0, pairs=None, clean=None, corrupted=None, answer=None,
                           wrong=None, seq_len=10)
    clean, corrupted, metric, _, _ = _task(toy_engine, args)
    d = edges.discover(toy_engine, clean, corrupted, metric, target=0.9, check=20)
    circuit = {d.scores.graph.names[i] for i in d.circuit.nonzero()[:, 0]}
    assert {"input -> L0H2.v", "L0H2 -> MLP0", "L0H0 -> MLP0", "MLP0 -> MLP1", "MLP2 -> logits",
            "MLP1 -> logits"} <= circuit
    assert len(circuit) <= 20 and d.faithfulness[0] >= 0.9


def test_discover_command_writes_its_files(tmp_path, monkeypatch, toy_engine):
    from hostile import reuse_engine, run_cli

    reuse_engine(monkeypatch, toy_engine)
    code, out, err = run_cli(["discover", "--n", "8", "--check", "12", "--json", "--out", str(tmp_path)])
    assert code == 0, err
    result = json.loads(out)
    run_dir = tmp_path / result["run_dir"].split("/")[-1]
    assert {"circuit.png", "curve.png", "agreement.png", "edges.csv", "result.json"} <= {p.name for p in run_dir.iterdir()}
    summary = result["summary"]
    assert summary["faithfulness"]["mean"] >= 0.9 and "faithfulness" in summary["headline"]
    assert "(8 prompts)" in summary["headline"] and summary["agreement"]["eap-ig"]["n_edges"] == 12
    low, high = summary["faithfulness"]["ci"]     # a real 95% interval (the seed was once passed as its level)
    assert low < summary["faithfulness"]["mean"] < high and high - low > 1e-3, summary["faithfulness"]
    rows = (run_dir / "edges.csv").read_text().splitlines()
    assert len(rows) == 263 and sum(r.endswith(",1") for r in rows[1:]) == summary["circuit_edges"]


def test_nnsight_gives_the_same_scores_and_exact_edge_effects(toy_engine, toy_nnsight, induction):
    """Hugging Face attention has no per-head input: the nnsight engine derives it (each head's projection
    recomputed from its own copy of the block input). Same EAP / EAP-IG scores and exact direct-edge effects
    into L2H1 (the issue's known answers) as tl, to 1e-4 of a gap of about 5 nats."""
    clean, corrupted, metric, scores = induction
    other = edges.edge_scores(toy_nnsight, clean, corrupted, metric, steps=5)
    assert other.graph.names == scores.graph.names
    for field in ("eap", "eap_ig", "clean", "corrupted"):
        torch.testing.assert_close(getattr(other, field), getattr(scores, field), atol=1e-4, rtol=0, msg=field)
    graph = scores.graph
    picked = [graph.index(n) for n in ("MLP0 -> L2H1.v", "MLP0 -> L2H1.k", "L1H2 -> L2H1.k", "MLP1 -> L2H1.k",
                                       "L0H1 -> L2H1.k", "L0H1 -> MLP0", "input -> L0H1.q", "MLP2 -> logits")]
    a = edges.single_edge_effects(toy_engine, clean, corrupted, metric, picked, scores)
    b = edges.single_edge_effects(toy_nnsight, clean, corrupted, metric, picked, other)
    torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
    fraction = b.mean(1) / (other.corrupted - other.clean).mean()
    assert fraction[:4].tolist() == pytest.approx([1.29, 0.63, 0.38, 0.19], abs=0.01)
    every = torch.ones(len(graph.edges), dtype=torch.bool)
    ends = edges.evaluate(toy_nnsight, clean, corrupted, metric, torch.stack([every, ~every]))
    torch.testing.assert_close(ends, torch.stack([other.clean, other.corrupted]), atol=1e-4, rtol=0)


@pytest.fixture(scope="module", params=["llama", "neox"])
def tiny_pair(request, tmp_path_factory):
    """(tl unfolded, nnsight) on a tiny random checkpoint with one key / value head per head: Llama-shaped
    (rotary, RMSNorm, gated MLP, separate q / k / v projections) or NeoX (parallel blocks, q / k / v fused per
    head); norm weights and biases drawn away from their inits."""
    import test_engines
    import transformers

    from mechscope.models import load_model

    def config(kind, tokenizer):
        c = original(kind, tokenizer)
        c.num_key_value_heads = c.num_attention_heads
        return c
    original = test_engines.hf_config
    directory = tmp_path_factory.mktemp(f"edges_{len(request.param)}")  # a path naming "llama" misleads TL
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(test_engines, "hf_config", config)
        test_engines.save_tiny(request.param, directory, bias_noise=0.2)
    assert transformers.AutoConfig.from_pretrained(str(directory)).num_key_value_heads == 4
    return test_engines._load_tl(directory, fold_ln=False), load_model(str(directory), backend="nnsight", device="cpu")


def test_nnsight_agrees_with_tl_on_tiny_llama_and_neox(tiny_pair):
    from test_engines import tokens_for

    tl, nn = tiny_pair
    clean, corrupted = tokens_for(tl, batch=6, length=8, seed=0), tokens_for(tl, batch=6, length=8, seed=1)

    def metric(logits):
        logp = logits[:, -1].log_softmax(-1)
        return logp[:, 5] - logp[:, 7]
    a = edges.edge_scores(tl, clean, corrupted, metric, steps=3)
    b = edges.edge_scores(nn, clean, corrupted, metric, steps=3)
    assert a.eap_ig.abs().max() > 0.01
    for field in ("eap", "eap_ig", "clean", "corrupted"):
        torch.testing.assert_close(getattr(b, field), getattr(a, field), atol=1e-4, rtol=0, msg=field)
    every = list(range(len(a.graph.edges)))
    exact = edges.single_edge_effects(tl, clean, corrupted, metric, every, a)
    assert exact.abs().max() > 0.01
    torch.testing.assert_close(edges.single_edge_effects(nn, clean, corrupted, metric, every, b), exact,
                               atol=1e-4, rtol=0)


def test_discover_command_on_nnsight_matches_tl(tmp_path, monkeypatch, toy_engine):
    from hostile import reuse_engine, run_cli

    reuse_engine(monkeypatch, toy_engine)
    tables = {}
    for backend in ("tl", "nnsight"):
        out_dir = tmp_path / backend
        code, out, err = run_cli(["discover", "--backend", backend, "--n", "8", "--edges", "30", "--check", "12",
                                  "--json", "--out", str(out_dir)])
        assert code == 0, err
        summary = json.loads(out)["summary"]
        assert summary["engine"] == backend
        tables[backend] = (summary, (next(out_dir.iterdir()) / "edges.csv").read_text().splitlines())
    (a, rows_a), (b, rows_b) = tables["tl"], tables["nnsight"]
    assert b["faithfulness"] == a["faithfulness"] and b["circuit_edges"] == a["circuit_edges"] == 30
    assert len(rows_b) == len(rows_a) == 263
    for ra, rb in zip(rows_a[1:], rows_b[1:]):
        ea, eb = ra.split(","), rb.split(",")
        assert eb[:3] == ea[:3] and eb[-1] == ea[-1]                       # edge, sender, receiver; in_circuit
        for x, y in zip(ea[3:-1], eb[3:-1]):                               # eap, eap_ig, exact (fractions)
            assert (x == y == "") or float(y) == pytest.approx(float(x), abs=1e-4), ra


def test_the_bridge_is_refused(toy_on):
    """The tl and nnsight engines have per-head q / k / v inputs; the bridge does not (it refuses hooks on
    hook_mlp_in), nor nnsight without local weights: each refuses in one line (BadInput) before any run."""
    tokens = torch.zeros(1, 3, dtype=torch.long)
    if toy_on.name == "bridge":
        with pytest.raises(BadInput, match="hook_q_input.*bridge"):
            edges.edge_scores(toy_on, tokens, tokens, lambda logits: logits[:, -1, 0])
        return
    assert toy_on.has_site("blocks.2.hook_k_input") and toy_on.has_site("blocks.2.hook_mlp_in")
    assert not toy_on.has_site("blocks.3.hook_q_input") and "blocks.2.hook_q_input" not in toy_on.sites()
    if toy_on.name == "nnsight":
        from mechscope.engines.nnsight import NNsightEngine

        remote = NNsightEngine(toy_on.model, remote="local")
        with pytest.raises(BadInput, match="hook_q_input.*local load"):
            edges.edge_scores(remote, tokens, tokens, lambda logits: logits[:, -1, 0])


@pytest.mark.parametrize("kind", ["gpt2", "neox", "llama", "qwen2", "qwen3", "gemma2"])
def test_nnsight_per_head_inputs_rebuild_each_family_s_projections(kind, tmp_path):
    """The derived q / k / v inputs on every module layout and norm (LN, RMS, Gemma's 1 + w; biases; grouped
    k / v heads): an identity edit of every input rebuilds the same logits (each projection recomputed from
    its per-head copies), and adding to one head's copy changes that head's q / k / v alone."""
    from test_engines import save_tiny, tokens_for

    from mechscope.models import load_model

    save_tiny(kind, tmp_path, bias_noise=0.2)
    nn = load_model(str(tmp_path), backend="nnsight", device="cpu")
    tokens = tokens_for(nn)
    inputs = [f"blocks.{l}.hook_{c}_input" for l in range(2) for c in "qkv"] + ["blocks.0.hook_mlp_in",
                                                                                  "blocks.1.hook_mlp_in"]
    with torch.no_grad():
        clean, acts = nn.run(tokens, read=["blocks.1.attn.hook_q", "blocks.1.attn.hook_k", "blocks.1.attn.hook_v",
                                           "blocks.1.hook_resid_pre"])
        same, _ = nn.run(tokens, edits=[(site, lambda x: x * 1.0) for site in inputs])
        # to 1e-5 of the logits' scale (the Gemma-2 checkpoint's logits sit at its soft cap, ~30)
        torch.testing.assert_close(same, clean, atol=1e-5 * float(clean.abs().max().clamp(min=1)), rtol=0)
        vector = 3 * torch.randn(nn.cfg.d_model, generator=torch.Generator().manual_seed(0))
        for c in "qkv":
            def nudge(x):
                x = x.clone()
                x[:, :, 1] += vector
                return x
            _, moved = nn.run(tokens, read=[f"blocks.1.attn.hook_{c}"], edits=[(f"blocks.1.hook_{c}_input", nudge)])
            after, before = moved[f"blocks.1.attn.hook_{c}"], acts[f"blocks.1.attn.hook_{c}"]
            assert (after[:, :, 1] - before[:, :, 1]).abs().max() > 1e-2, c
            torch.testing.assert_close(after[:, :, [0, *range(2, after.shape[2])]],
                                       before[:, :, [0, *range(2, after.shape[2])]], atol=1e-6, rtol=0)

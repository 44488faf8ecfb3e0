"""Edge-level circuit discovery (techniques/edges.py, `mechscope discover`), against known answers on the
bundled model's induction task (32 sequences [BOS, r, r], r of 10 words, the first copy re-drawn in the
corrupted run): exact direct-edge effects into the induction head L2H1, identities of exact edge patching
(all edges = clean, none = corrupted, one edge = path-patch --freeze-mlps), EAP against a finite difference,
the discovered circuit, and IOI's L0 heads -> MLP -> logits circuit."""
import json
from types import SimpleNamespace

import pytest
import torch

from mechscope.errors import BadInput
from mechscope.techniques import edges
from mechscope.techniques.path_patching import induction_task, path_patch


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
    assert "n=8" in summary["headline"] and summary["agreement"]["eap-ig"]["n_edges"] == 12
    rows = (run_dir / "edges.csv").read_text().splitlines()
    assert len(rows) == 263 and sum(r.endswith(",1") for r in rows[1:]) == summary["circuit_edges"]


def test_engines_without_per_head_inputs_are_refused(toy_on):
    """Only the tl engine has per-head q / k / v inputs; the bridge and nnsight refuse in one line (BadInput)."""
    if toy_on.name == "tl":
        assert toy_on.has_site("blocks.2.hook_k_input") and toy_on.has_site("blocks.2.hook_mlp_in")
        return
    tokens = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(BadInput, match=f"hook_q_input.*{toy_on.name}"):
        edges.edge_scores(toy_on, tokens, tokens, lambda logits: logits[:, -1, 0])

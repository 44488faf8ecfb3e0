"""Path patching: exact identities on a model without LayerNorm, agreement with a second implementation
(transformer-lens split q/k/v inputs), direct logit attribution, and the bundled model's induction circuit
(previous-token head -> induction head through the keys, measured by techniques.heads)."""
import json
import random

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mechscope import metrics
from mechscope.cli import main
from mechscope.models import load_model
from mechscope.techniques.heads import head_scores
from mechscope.techniques.path_patching import induction_task, path_patch

IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


def no_norm_model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=4, d_head=8, n_ctx=16, d_vocab=40, attn_only=True,
                                  normalization_type=None, initializer_range=0.3, seed=seed)
    return HookedTransformer(cfg).eval()


def random_pair(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, 40, (3, 8), generator=gen)
    source = target.clone()
    source[:, 2] = torch.randint(0, 40, (3,), generator=gen)
    return target, source


def last_logit_diff(logits):
    return logits[:, -1, 3] - logits[:, -1, 7]


def test_paths_add_up_to_the_total_effect_without_layernorm():
    """2-layer attention-only model, no LayerNorm: a layer-0 head reaches the logits directly or through the
    layer-1 heads' q/k/v, and the logits are linear in the final residual, so the two path effects sum to the
    effect of patching the head's output (activation patching, run with transformer-lens hooks)."""
    model = no_norm_model()
    target, source = random_pair()
    senders = [(0, h) for h in range(4)]
    through_layer1 = path_patch(model, target, source, senders, [(1, h, c) for h in range(4) for c in "qkv"],
                                last_logit_diff)
    direct = path_patch(model, target, source, senders, "logits", last_logit_diff)
    _, source_cache = model.run_with_cache(source)
    total = []
    for layer, head in senders:
        def patch(z, hook, head=head):
            z[:, :, head] = source_cache[hook.name][:, :, head]
            return z
        patched = model.run_with_hooks(target, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", patch)])
        total.append((last_logit_diff(patched) - last_logit_diff(model(target))).mean())
    total = torch.stack(total).detach()
    assert total.abs().max() > 0.1 and through_layer1.effects.abs().max() > 0.05  # both paths carry something
    torch.testing.assert_close(through_layer1.effects + direct.effects, total, atol=1e-5, rtol=0)


def test_direct_path_equals_dla_without_layernorm():
    model = no_norm_model(seed=1)
    target, source = random_pair(seed=1)
    heads = [(layer, h) for layer in range(2) for h in range(4)]
    result = path_patch(model, target, source, heads, "logits", last_logit_diff)
    _, t_cache = model.run_with_cache(target)
    _, s_cache = model.run_with_cache(source)
    direction = model.W_U[:, 3] - model.W_U[:, 7]
    dla = torch.stack([((s_cache["z", layer][:, -1, h] - t_cache["z", layer][:, -1, h]) @ model.W_O[layer, h]
                        @ direction).mean() for layer, h in heads]).detach()
    torch.testing.assert_close(result.effects, dla, atol=1e-5, rtol=0)


def test_sweeps_are_consistent():
    """One row per sender / per receiver / one row for all give the same number when there is one of each;
    a sender after its receiver has no path (NaN)."""
    model = no_norm_model(seed=2)
    target, source = random_pair(seed=2)
    one = path_patch(model, target, source, [(0, 1)], [(1, 2, "k")], last_logit_diff, sweep="none").effects
    by_sender = path_patch(model, target, source, [(0, 1), (1, 0)], [(1, 2, "k")], last_logit_diff).effects
    by_receiver = path_patch(model, target, source, [(0, 1)], [(1, 2, "k"), (1, 3, "q")], last_logit_diff,
                             sweep="receivers").effects
    assert one.abs().item() > 1e-3
    torch.testing.assert_close(by_sender[0], one[0])
    torch.testing.assert_close(by_receiver[0], one[0])
    assert torch.isnan(by_sender[1])


@pytest.fixture(scope="module")
def ioi(toy_model):
    clean, corrupted = toy_model.to_tokens(IOI_CLEAN), toy_model.to_tokens(IOI_CORRUPTED)
    io, s = toy_model.to_single_token("mary"), toy_model.to_single_token("john")
    return clean, corrupted, lambda logits: metrics.logit_diff(logits, io, s)


def test_receiver_path_matches_split_qkv_input_implementation(ioi):
    """A second implementation on the bundled model: transformer-lens' split q/k/v inputs (hook_k_input = the
    residual entering the receiver), with the freezing done by hand, for sender L0H2 -> receiver L2H1 keys."""
    model = load_model("mechscope-toy", backend="tl", device="cpu").model  # its own copy: set_use_split_qkv_input changes the model
    model.set_use_split_qkv_input(True)
    clean, corrupted, metric = ioi
    (sl, sh), (rl, rh) = (0, 2), (2, 1)
    with torch.no_grad():
        _, t_cache = model.run_with_cache(clean)
        _, s_cache = model.run_with_cache(corrupted)

        def freeze(z, hook):
            z = t_cache[hook.name].clone()
            if hook.layer() == sl:
                z[:, :, sh] = s_cache[hook.name][:, :, sh]
            return z
        with model.hooks(fwd_hooks=[(f"blocks.{l}.attn.hook_z", freeze) for l in range(rl)]):
            _, step2 = model.run_with_cache(clean, names_filter=f"blocks.{rl}.hook_resid_pre")
        received = step2[f"blocks.{rl}.hook_resid_pre"]

        def patch_key_input(x, hook):
            x[:, :, rh] = received
            return x
        patched = model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{rl}.hook_k_input", patch_key_input)])
        expected = (metric(patched) - metric(model(clean))).item()
    ours = path_patch(model, clean, corrupted, [(sl, sh)], [(rl, rh, "k")], metric).effects.item()
    assert abs(expected) > 1e-3
    assert ours == pytest.approx(expected, abs=1e-4)


def freeze_other_heads(model, clean, corrupted, sender, freeze_mlps: bool) -> list:
    """A plain hook implementation of Wang et al.'s path patching to the logits: every head's z frozen to the
    clean run's except the sender's (from the corrupted run); MLP outputs frozen too, or recomputed."""
    _, t_cache = model.run_with_cache(clean)
    _, s_cache = model.run_with_cache(corrupted)
    sl, sh = sender

    def head_hook(z, hook):
        z = t_cache[hook.name].clone()
        if hook.layer() == sl:
            z[:, :, sh] = s_cache[hook.name][:, :, sh]
        return z
    hooks = [(f"blocks.{l}.attn.hook_z", head_hook) for l in range(model.cfg.n_layers)]
    if freeze_mlps:
        hooks += [(f"blocks.{l}.hook_mlp_out", lambda out, hook: t_cache[hook.name]) for l in range(model.cfg.n_layers)]
    return hooks


def test_path_to_logits_is_wang_et_al(toy_model, ioi):
    """Issue 8: receivers="logits" froze every MLP (the direct path only: L0H2 -0.56 on the IOI example).
    Wang et al. freeze only the other heads, and the sender reaches the logits through the recomputed MLPs
    too (L0H2 -15.3 of a clean - corrupted gap of ~20: most of layer 0's name move goes through the MLPs;
    measured on the shipped weights). Checked against a plain hook implementation for every head, with and
    without --freeze-mlps."""
    clean, corrupted, metric = ioi
    heads = [(layer, h) for layer in range(toy_model.cfg.n_layers) for h in range(toy_model.cfg.n_heads)]
    with torch.no_grad():
        base = metric(toy_model(clean))
        for freeze_mlps in (False, True):
            ours = path_patch(toy_model, clean, corrupted, heads, "logits", metric, freeze_mlps=freeze_mlps).effects
            hooks = [(metric(toy_model.run_with_hooks(clean, fwd_hooks=freeze_other_heads(
                toy_model, clean, corrupted, head, freeze_mlps))) - base).item() for head in heads]
            torch.testing.assert_close(ours, torch.tensor(hooks), atol=1e-4, rtol=0)
            if not freeze_mlps:
                wang = ours
    direct = path_patch(toy_model, clean, corrupted, heads, "logits-direct", metric).effects
    torch.testing.assert_close(direct, ours)                       # logits-direct = logits with MLPs frozen
    l0h2 = heads.index((0, 2))
    assert wang[l0h2] < -3 and abs(direct[l0h2]) < 0.25 * abs(wang[l0h2])


def test_direct_path_to_logits_on_the_bundled_model(toy_model, ioi):
    """The direct path (logits-direct) = patching the sender with every other head and every MLP frozen (hooks),
    and it agrees with DLA (the output difference through the target's final LN scale and W_U) up to the
    change of the final LN scale, which moves the logit diff by at most ~1% of its clean value here."""
    clean, corrupted, metric = ioi
    heads = [(layer, h) for layer in range(toy_model.cfg.n_layers) for h in range(toy_model.cfg.n_heads)]
    result = path_patch(toy_model, clean, corrupted, heads, "logits-direct", metric)
    with torch.no_grad():
        t_logits, t_cache = toy_model.run_with_cache(clean)
        _, s_cache = toy_model.run_with_cache(corrupted)
        frozen = []
        for sl, sh in heads[::3]:
            def head_hook(z, hook, sl=sl, sh=sh):
                z = t_cache[hook.name].clone()
                if hook.layer() == sl:
                    z[:, :, sh] = s_cache[hook.name][:, :, sh]
                return z
            hooks = [(f"blocks.{l}.attn.hook_z", head_hook) for l in range(toy_model.cfg.n_layers)]
            hooks += [(f"blocks.{l}.hook_mlp_out", lambda out, hook: t_cache[hook.name])
                      for l in range(toy_model.cfg.n_layers)]
            frozen.append((metric(toy_model.run_with_hooks(clean, fwd_hooks=hooks)) - metric(t_logits)).item())
        torch.testing.assert_close(result.effects[::3], torch.tensor(frozen), atol=1e-4, rtol=0)

        io, s = toy_model.to_single_token("mary"), toy_model.to_single_token("john")
        direction = toy_model.W_U[:, io] - toy_model.W_U[:, s]
        scale = t_cache["ln_final.hook_scale"][0, -1, 0]
        dla = torch.stack([(s_cache["z", l][0, -1, h] - t_cache["z", l][0, -1, h]) @ toy_model.W_O[l, h]
                           @ direction / scale for l, h in heads])
    assert dla.abs().max() > 0.2
    assert (result.effects - dla).abs().max() < 0.01 * abs(result.target_metric)  # measured 0.0075


@pytest.fixture(scope="module")
def induction(toy_model):
    """The heads measured by techniques.heads, and path patching into the induction layer's q / k / v."""
    scores = head_scores(toy_model)
    (prev_layer, prev_head, _), = scores.top("previous_token", 1)
    (ind_layer, ind_head, _), = scores.top("induction", 1)
    assert prev_layer < ind_layer
    clean, corrupted, metric = induction_task(toy_model, n_sequences=16, seq_len=10, seed=0)
    senders = [(layer, h) for layer in range(ind_layer) for h in range(toy_model.cfg.n_heads)]
    receivers = [(ind_layer, h, c) for h in range(toy_model.cfg.n_heads) for c in "qkv"]
    everything = path_patch(toy_model, clean, corrupted, senders, receivers, metric, sweep="receivers")
    prev = path_patch(toy_model, clean, corrupted, [(prev_layer, prev_head)], [(ind_layer, ind_head, c) for c in "qkv"],
                      metric, sweep="receivers")
    return {"prev": (prev_layer, prev_head), "induction": (ind_layer, ind_head), "senders": senders,
            "all_senders": dict(zip(receivers, everything.fraction.tolist())),
            "prev_head": dict(zip("qkv", prev.fraction.tolist())),
            "clean": clean, "corrupted": corrupted, "metric": metric}


def test_previous_token_head_feeds_the_induction_head_keys(induction):
    """Measured (fraction of the clean - corrupted second-copy log-prob): previous-token head L1H2 -> induction
    head L2H1 via k 0.44, via q 0.00, via v 0.00; all earlier heads -> L2H1 via k 0.96, via q 0.00, via v 0.08."""
    print(induction["prev_head"], induction["all_senders"])
    assert induction["prev_head"]["k"] > 0.3
    assert abs(induction["prev_head"]["q"]) < 0.05 and abs(induction["prev_head"]["v"]) < 0.05
    layer, head = induction["induction"]
    assert induction["all_senders"][(layer, head, "k")] > 0.8
    assert abs(induction["all_senders"][(layer, head, "q")]) < 0.05
    assert abs(induction["all_senders"][(layer, head, "v")]) < 0.15


def test_other_paths_carry_little(toy_model, induction):
    """All earlier heads into any other head of the induction layer (measured at most 0.23: L2H3's keys), and a random
    (sender, receiver) pair away from the measured circuit, through each of q, k, v."""
    layer, head = induction["induction"]
    others = {r: f for r, f in induction["all_senders"].items() if r[1] != head}
    assert max(abs(f) for f in others.values()) < 0.3
    rng = random.Random(0)
    sender = rng.choice([s for s in induction["senders"] if s != induction["prev"]])
    receiver = rng.choice([h for h in range(toy_model.cfg.n_heads) if h != head])
    pair = path_patch(toy_model, induction["clean"], induction["corrupted"], [sender],
                      [(layer, receiver, c) for c in "qkv"], induction["metric"], sweep="receivers")
    assert pair.fraction.abs().max() < 0.05


from tests.conftest import BACKENDS as ENGINES  # noqa: E402  every engine


@pytest.mark.parametrize("backend", ENGINES)
def test_cli_path_patch_induction(backend, tmp_path, capsys, toy_model, induction):
    """Each engine finds the bundled model's induction circuit: previous-token head -> induction head's keys."""
    ind_layer, ind_head = head_scores(toy_model).top("induction", 1)[0][:2]
    code = main(["path-patch", "--backend", backend, "--task", "induction", "--n", "16",
                 "--receivers", f"{ind_layer}.{ind_head}:k", "--out", str(tmp_path), "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    summary = printed["summary"]
    # measured on these 16 sequences: L0H1 -> L2H1 keys 0.76, L1H2 (the top previous-token score) 0.44, every other
    # head < 0.03 (0.74 / 0.42 on the default 32: MODEL_CARD.md)
    scores = head_scores(toy_model)
    layer, head = (int(x) for x in summary["top"][0]["path"][1:].split("H"))
    assert scores.previous_token[layer, head] > 0.3 and summary["top"][0]["fraction"] > 0.3
    assert summary["clean_metric"] > summary["corrupted_metric"]
    run_dir = tmp_path / printed["run_dir"].split("/")[-1]
    assert (run_dir / "effects.png").exists() and (run_dir / "effects.csv").exists()
    assert len(json.loads((run_dir / "result.json").read_text())["effects"]) == len(induction["senders"])


def test_cli_path_patch_logits(tmp_path, capsys):
    assert main(["path-patch", "--receivers", "logits-direct", "--sweep", "none", "--senders", "0.2,2.1",
                 "--out", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["top"][0]["path"] == "L0H2+L2H1 -> logits-direct" and summary["top"][0]["effect"] < -0.3
    assert summary["freeze_mlps"]


def test_cli_path_patch_prompt_set(tmp_path, capsys):
    """--task ioi: every head's path to the logits over 12 prompts; layer-0 heads 0.2 and 0.0 move the name
    (their effects negative on every prompt), with intervals and rank stability."""
    assert main(["path-patch", "--task", "ioi", "--n", "12", "--receivers", "logits", "--stability-k", "2",
                 "--out", str(tmp_path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    summary = printed["summary"]
    assert summary["n_prompts"] == 12 and not summary["freeze_mlps"]
    assert {t["path"] for t in summary["top"][:2]} == {"L0H2", "L0H0"}
    for t in summary["top"][:2]:
        assert t["effect"] < 0 and t["ci"][1] < 0 and t["sign_share"] == 1.0
    assert set(summary["stability"]["top_k"]) == {"L0H2", "L0H0"}           # --stability-k 2: k = 1, 2
    assert len(summary["stability"]["set_frequency_by_k"]) == 2
    run_dir = tmp_path / printed["run_dir"].split("/")[-1]
    assert len((run_dir / "per_prompt.csv").read_text().splitlines()) == 1 + 12 * 12


@pytest.mark.parametrize("argv, message", [
    (["--receivers", "2.1:x"], "components must be letters of qkv"),
    (["--receivers", "logits", "--stability-k", "0"], "--stability-k"),
    (["--receivers", "7.1:k"], "out of range"),
    (["--receivers", "1.1:k", "--senders", "2.0"], "no sender is before"),
    (["--receivers", "logits", "--sweep", "receivers"], "--sweep receivers needs receiver heads"),
    (["--receivers", "2.1:k", "--task", "induction", "--seq-len", "1"], "--seq-len"),
    (["--receivers", "logits-direct", "--sweep", "receivers"], "--sweep receivers needs receiver heads"),
    (["--receivers", "2.1:k", "--task", "induction", "--pairs", "p.jsonl"], "--task induction builds its own"),
    (["--receivers", "2.1:k", "--task", "ioi", "--n", "0"], "--n must be at least 1"),
    (["--receivers", "logits", "--task", "ioi", "--clean", "the capital of france is"], "pass one of --task"),
])
def test_cli_path_patch_bad_input(tmp_path, capsys, argv, message):
    assert main(["path-patch", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_path_patch_reports_rows_without_a_path(tmp_path, capsys):
    """A sender at or after the receiver's layer has no path: its effect is null (with the cli's note), and
    the text output still prints."""
    assert main(["path-patch", "--receivers", "1.0:q", "--senders", "0.2,2.1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "L2H1: null" in out and "L0H2:" in out


def test_help_names_the_model_cards_induction_head(toy_card):
    """path-patch --help's induction example names the head MODEL_CARD.md measures (L2H1), not the previous-token
    head L1H2 (the example once read `--receivers 1.2:k`)."""
    import re

    from mechscope.commands import path_patch

    layer, head = toy_card["induction"]["induction_head"]
    (line,) = [x for x in path_patch.__doc__.splitlines() if "induction head" in x]
    assert re.search(rf"--receivers {layer}\.{head}:k\b", line) and f"L{layer}H{head}" in line, line

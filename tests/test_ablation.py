"""Ablation: the bundled model's induction head breaks copying by the model card's amount; a head with ~0
direct and ~0 patching effect (both measured here with plain transformer-lens) barely matters; identities
(zero-ablating a whole layer = skipping it, resampling a prompt's own activations = no-op, per-position
mean of identical prompts = no-op); seeds reproduce; the `ablate` command and its bad inputs."""
import csv
import re
import json

import pytest
import torch

from mechscope import metrics
from mechscope.cli import main
from mechscope.techniques.ablation import (METHODS, Component, ablate, ablated_metric, parse_components,
                                           parse_groups, second_copy_loss)
from mechscope.techniques.heads import repeated_random_tokens


def ioi_tokens(model, n: int, seed: int):
    """[n, seq] held-out IOI prompts of one template length, with [n] IO and S token ids."""
    import random

    from mechscope.toy import corpus

    rng = random.Random(seed)
    rows, io, s = [], [], []
    while len(rows) < n:
        prompt, a, b = corpus.ioi_prompt(rng, held_out=True)
        toks = model.to_tokens(prompt)
        if not rows or toks.shape == rows[0].shape:
            rows.append(toks)
            io.append(model.to_single_token(a))
            s.append(model.to_single_token(b))
    return torch.cat(rows), torch.tensor(io), torch.tensor(s)


@pytest.fixture(scope="module")
def induction_batch(toy_model):
    tokens = repeated_random_tokens(toy_model, 8, 20, seed=1)
    return tokens, (lambda logits: second_copy_loss(logits, tokens, 20))


def test_induction_head_ablation_reproduces_the_model_card(toy_model, toy_card):
    """card.induction(): mean over r of 10, 15, 20 words (64 sequences, seed 0 + L) of the second-copy loss increase."""
    ind = toy_card["induction"]
    head = [[Component("head", *ind["induction_head"])]]
    for method in ("zero", "mean"):
        increases = {True: [], False: []}
        for L in (10, 15, 20):
            tokens = repeated_random_tokens(toy_model, 64, L, seed=L)
            for skip_bos in (True, False):
                result = ablate(toy_model, tokens, head, lambda lg: second_copy_loss(lg, tokens, L), method,
                                skip_bos=skip_bos)
                increases[skip_bos].append(float(result.effect[0]))
        card_way = sum(increases[False]) / 3   # card.induction takes the mean over every position, BOS included
        default = sum(increases[True]) / 3
        assert card_way == pytest.approx(ind["ablation_loss_increase"][method], abs=1e-3), method
        assert default >= 1.0, method   # measured: 4.79 (zero), 5.00 (mean; 5.02 with BOS in the mean) nats
        assert abs(default - card_way) < (1e-6 if method == "zero" else 0.2), method


def test_head_with_no_direct_or_patching_effect_barely_matters(toy_model):
    """IOI logit diff: DLA via stack_head_results + apply_ln_to_stack, and patching each head's z from other
    prompts (hand-written hooks). The head with the smallest |DLA| + |patching effect| moves the metric little."""
    model = toy_model
    tokens, io, s = ioi_tokens(model, 16, seed=0)
    metric = lambda lg: metrics.logit_diff(lg, io, s)  # noqa: E731
    with torch.no_grad():
        names = lambda n: n.endswith("hook_z") or n == "ln_final.hook_scale"  # noqa: E731
        logits, cache = model.run_with_cache(tokens, names_filter=names)
        stack = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)        # [n_heads_total, batch, d_model]
        dla = (stack * (model.W_U[:, io] - model.W_U[:, s]).T).sum(-1).mean(-1)       # [n_heads_total]
        clean = metric(logits)
        _, corrupted = model.run_with_cache(tokens.roll(1, 0), names_filter=lambda n: n.endswith("hook_z"))
        patch = []
        for layer in range(model.cfg.n_layers):
            for head in range(model.cfg.n_heads):
                def put(z, hook, head=head):
                    z[:, :, head] = corrupted[hook.name][:, :, head]
                    return z
                patched = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", put)])
                patch.append(float((metric(patched) - clean).mean()))
    quiet = int((dla.abs() + torch.tensor(patch).abs()).argmin())
    quiet_head = Component("head", quiet // model.cfg.n_heads, quiet % model.cfg.n_heads)
    small = 0.05 * float(clean.mean())   # clean logit diff ~10; measured |effect| of the quiet head (1.1) <= 0.17
    for method in METHODS:
        result = ablate(model, tokens, [[quiet_head]] + parse_groups(model, "heads"), metric, method)
        assert abs(float(result.effect[0])) < small, (method, quiet_head.label, float(result.effect[0]))
        assert float(result.effect.abs().max()) > 5 * small, method    # the loud heads (0.0, 0.2) move it by ~3-4


def test_zero_ablating_a_whole_layer_equals_skipping_it(toy_model, induction_batch):
    tokens, _ = induction_batch
    flat = lambda lg: lg.flatten(1)  # noqa: E731  [batch, seq * d_vocab]: compare every logit
    layers = range(toy_model.cfg.n_layers)
    ablated = ablated_metric(toy_model, tokens, [[Component("attn", l), Component("mlp", l)] for l in layers],
                             flat, "zero")
    for l in layers:
        saved = {}
        skip = [(f"blocks.{l}.hook_resid_pre", lambda x, hook: saved.update(pre=x.clone())),
                (f"blocks.{l}.hook_resid_post", lambda x, hook: saved["pre"])]
        with torch.no_grad():
            expected = flat(toy_model.run_with_hooks(tokens, fwd_hooks=skip))
        torch.testing.assert_close(ablated[l], expected, atol=1e-4, rtol=1e-4)


def test_zero_ablating_every_head_leaves_only_the_output_bias(toy_model, induction_batch):
    tokens, _ = induction_batch
    out = []
    with toy_model.hooks(fwd_hooks=[("blocks.1.hook_attn_out", lambda x, hook: out.append(x.clone()))]):
        ablated_metric(toy_model, tokens, [parse_components(toy_model, "1.*")], lambda lg: torch.zeros(len(lg)), "zero")
    assert len(out) == 1
    torch.testing.assert_close(out[0], toy_model.blocks[1].attn.b_O.expand_as(out[0]), atol=1e-5, rtol=0)


def test_resampling_a_prompts_own_activations_is_a_no_op(toy_model, induction_batch):
    tokens, metric = induction_batch
    groups = [[]] + parse_groups(toy_model, "0.1,2.1,attn1,mlp0,mlp1.7") + [parse_components(toy_model, "heads,mlps")]
    values = ablated_metric(toy_model, tokens, groups, metric, "resample", donors=torch.arange(len(tokens)))
    torch.testing.assert_close(values, values[:1].expand_as(values), atol=1e-5, rtol=0)


def test_per_position_mean_of_identical_prompts_is_a_no_op(toy_model, induction_batch):
    tokens, metric = induction_batch
    same = tokens[:1].repeat(4, 1)
    values = ablated_metric(toy_model, same, [[]] + parse_groups(toy_model, "heads,mlps"),
                            lambda lg: second_copy_loss(lg, same, 20), "mean", per_position=True)
    torch.testing.assert_close(values, values[:1].expand_as(values), atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["resample", "noise"])
def test_seeds_reproduce(toy_model, induction_batch, method):
    tokens, metric = induction_batch
    groups = parse_groups(toy_model, "2.1,mlp0")
    a, b, c = (ablate(toy_model, tokens, groups, metric, method, seed=seed).ablated for seed in (3, 3, 4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_ablate_command_finds_the_induction_head(toy_card, tmp_path, capsys):
    code = main(["ablate", "--components", "heads,mlp1,0.1+1.2", "--method", "zero,mean", "--n", "8",
                 "--out", str(tmp_path), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    run_dir = tmp_path / out["run_dir"].split("/")[-1]
    result = json.loads((run_dir / "result.json").read_text())
    assert len(result["effects"]) == 2 * 14
    with open(run_dir / "effects.csv") as f:
        assert len(list(csv.DictReader(f))) == 2 * 14
    for name in ("heads_zero.png", "heads_mean.png", "effects_zero.png", "effects_mean.png", "meta.json"):
        assert (run_dir / name).exists(), name
    induction_head = "{}.{}".format(*toy_card["induction"]["induction_head"])
    for method in ("zero", "mean"):
        heads = [r for r in out["summary"]["top_effects"][method] if re.fullmatch(r"\d\.\d", r["component"])]
        # measured: the induction head L2H1 and the previous-token head feeding its keys, L0H1, cost ~+5.3
        # nats each (the same to 0.1 nats); every other head < 0.4
        assert induction_head in {r["component"] for r in heads[:2]} and heads[1]["effect"] > 1.0, heads


def test_ablate_command_on_a_prompt_reports_its_logit_diff(toy_model, tmp_path, capsys):
    prompt = "When Mary and John went to the store, John gave a drink to"
    code = main(["ablate", "--prompt", prompt, "--answer", "mary", "--wrong", "john", "--components", "0.1",
                 "--method", "zero", "--out", str(tmp_path), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    with torch.no_grad():
        logits = toy_model(toy_model.to_tokens(prompt))[0, -1]
    expected = logits[toy_model.to_single_token("mary")] - logits[toy_model.to_single_token("john")]
    assert summary["clean_metric"] == pytest.approx(float(expected), abs=1e-4)


@pytest.mark.parametrize("args, words", [
    (["--components", "7.0"], "out of range"),
    (["--components", "0.9"], "out of range"),
    (["--components", "mlp1.9999"], "out of range"),
    (["--components", "head3"], "cannot read component"),
    (["--method", "zero,shuffle"], "unknown --method"),
    (["--prompt", "the capital of france is"], "needs --answer"),
    (["--prompt", "the capital of france is", "--answer", "new york"], "not a single token"),
    (["--prompt", "the capital of france is", "--answer", "paris", "--method", "mean"], "single prompt"),
    (["--prompt", "the capital of france is", "--prompt", "the capital of italy is not", "--answer", "paris",
      "--per-position"], "one token length"),
    (["--task", "ioi", "--prompt", "the capital of france is", "--answer", "paris"], "one source of prompts"),
    (["--prompts", "missing.jsonl"], "does not exist"),
    (["--prompt", "the capital of france is", "--answer", "paris", "--method", "resample"], "at least 2 prompts"),
    (["--seq-len", "1"], "--seq-len"),
])
def test_ablate_bad_input(args, words, tmp_path, capsys):
    code = main(["ablate", *args, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and words in err and err.count("\n") == 1 and "Traceback" not in err, err


# ------------------------------------------------------------------ issue 8: the no-op, prompt sets, intervals
def test_mean_ablation_of_one_prompt_without_a_reference_is_refused(tmp_path, capsys):
    """Issue 8: this exact command reported 0.0 for every head with exit 0 (the mean of one prompt's own
    positions). It must be refused with a fix, before any run directory exists."""
    code = main(["ablate", "--prompt", "when mary and john went to the store , john gave a drink to",
                 "--answer", "mary", "--components", "0.2", "--method", "mean", "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "single prompt" in err and "--reference" in err and err.count("\n") == 1, err


def test_one_prompt_with_a_reference_set_is_a_real_mean_ablation(toy_model, tmp_path, capsys):
    """The fix the refusal suggests: --reference prompts give the mean; the effect is the hand-computed one."""
    prompt = "when mary and john went to the store , john gave a drink to"
    refs = ["when tom and anna went to the park , anna gave a ball to",
            "while lucy and sam were working at the office , sam gave a pen to",
            "then , alice and bob had a long argument . afterwards bob said to"]
    assert main(["ablate", "--prompt", prompt, "--answer", "mary", "--wrong", "john", "--components", "0.2",
                 "--method", "mean", *sum((["--reference", r] for r in refs), []), "--out", str(tmp_path),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert "3 --reference prompt(s)" in summary["reference"] and "but BOS" in summary["reference"]
    with torch.no_grad():
        zs = [toy_model.run_with_cache(r, names_filter="blocks.0.attn.hook_z")[1]["blocks.0.attn.hook_z"][0, 1:, 2]
              for r in refs]
        mean = torch.cat(zs).mean(0)

        def put(z, hook):
            z[:, :, 2] = mean
            return z
        mary, john = toy_model.to_single_token("mary"), toy_model.to_single_token("john")
        clean = toy_model(prompt)[0, -1]
        ablated = toy_model.run_with_hooks(prompt, fwd_hooks=[("blocks.0.attn.hook_z", put)])[0, -1]
    expected = float((ablated[mary] - ablated[john]) - (clean[mary] - clean[john]))
    assert summary["top_effects"]["mean"][0]["effect"] == pytest.approx(expected, abs=1e-3)
    assert expected < 0   # head 0.2 moves the IOI information: its ablation hurts (measured -0.66 on this prompt)


@pytest.mark.parametrize("skip_bos", [True, False])
def test_mean_reference_excludes_bos_by_default(toy_model, induction_batch, skip_bos):
    from mechscope.techniques.ablation import reference_values

    tokens, _ = induction_batch
    site = "blocks.1.hook_attn_out"
    values = reference_values(toy_model, tokens, {site}, "mean", skip_bos=skip_bos)[site]
    _, cache = toy_model.run_with_cache(tokens, names_filter=site)
    expected = cache[site][:, 1 if skip_bos else 0:].mean((0, 1))
    torch.testing.assert_close(values[0, 0], expected, atol=1e-5, rtol=1e-5)
    # BOS is an attention sink: its activation is far from the rest, so the two means differ
    assert (cache[site][:, 0].mean(0) - cache[site][:, 1:].mean((0, 1))).norm() > 0.5 * expected.norm()


@pytest.mark.parametrize("method", ["zero", "mean", "resample"])
def test_prompts_of_different_lengths_give_each_prompts_own_effect(toy_engine, method):
    """A padded batch of IOI prompts of several lengths (read at each row's END) gives every prompt the effect it
    has alone, with the same reference / donors: padding changes nothing."""
    from mechscope import inputs, metrics, tasks

    ps = tasks.load_task(toy_engine, "ioi", 12, seed=3)
    rows, where = ps.tokens(toy_engine)
    if method == "resample":   # donors come from prompts of the same length: keep lengths that have 2+ prompts
        keep = [i for i, r in enumerate(rows) if sum(len(q) == len(r) for q in rows) > 1]
        ps.prompts = [ps.prompts[i] for i in keep]
        rows, where = ps.tokens(toy_engine)
    assert len({len(r) for r in rows}) > 1
    io = torch.tensor([inputs.single_token(toy_engine, p.answer) for p in ps.prompts])
    s = torch.tensor([inputs.single_token(toy_engine, p.wrong) for p in ps.prompts])
    groups = parse_groups(toy_engine, "0.2,2.1,mlp0,0.1+1.2")
    if method == "resample":
        from mechscope.techniques.ablation import same_length_donors
        lengths = torch.tensor([len(r) for r in rows])
        donors = same_length_donors(lengths, seed=0)
        assert all(lengths[donors] == lengths) and not any(donors == torch.arange(len(rows)))
    batched = ablated_metric(toy_engine, rows, [[]] + groups,
                             lambda lg: metrics.logit_diff(lg, io, s, pos=where["END"]), method, seed=0)
    for i, row in enumerate(rows):
        ref = {"reference": rows} if method == "mean" else {}
        if method == "resample":
            ref = {"reference": rows[donors[i]][None], "donors": torch.tensor([0])}
        alone = ablated_metric(toy_engine, row[None], [[]] + groups,
                               lambda lg: metrics.logit_diff(lg, io[i:i + 1], s[i:i + 1]), method, **ref)
        torch.testing.assert_close(batched[:, i], alone[:, 0], atol=2e-4, rtol=1e-4)


def test_ablate_json_summary_has_intervals_that_the_per_prompt_values_reproduce(toy_card, tmp_path, capsys):
    from mechscope import stats

    assert main(["ablate", "--components", "heads", "--method", "mean", "--n", "12", "--out", str(tmp_path),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    summary = out["summary"]
    assert "but BOS" in summary["reference"]
    # the model card: the induction head L2H1 and L0H1 (the previous-token head feeding its keys) cost ~+5 nats
    # each (measured 5.13 / 5.35 mean), every other head < 0.4
    top, second = summary["top_effects"]["mean"][:2]
    assert {top["component"], second["component"]} == {"{}.{}".format(*toy_card["induction"]["induction_head"]), "0.1"}
    for row in (top, second):
        assert row["ci_low"] > 1.0 and row["ci_low"] <= row["effect"] <= row["ci_high"] and row["sign_share"] == 1.0
        assert row["stderr"] > 0
    assert summary["top_effects"]["mean"][2]["effect"] < 1.0
    with open(tmp_path / out["run_dir"].split("/")[-1] / "per_prompt.csv") as f:
        per_prompt = list(csv.DictReader(f))
    assert len(per_prompt) == 12
    values = torch.tensor([[float(r[top["component"]])] for r in per_prompt])
    again = stats.summary(values)
    assert again["mean"][0] == pytest.approx(top["effect"], abs=1e-4)
    assert again["ci_low"][0] == pytest.approx(top["ci_low"], abs=1e-4)
    assert again["stderr"][0] == pytest.approx(top["stderr"], abs=1e-4)
    stability = summary["rank_stability"]["mean"]
    assert stability["top_k"][0] == top["component"] and 0 <= stability["top_k_set_frequency"] <= 1


def test_ablate_task_ioi_finds_the_head_that_patching_finds(tmp_path, capsys):
    """Patching (references/techniques.md) puts the IOI information move in head 0.2: mean- and resample-ablating
    it lowers the logit diff on held-out IOI prompts of several lengths most of all heads, CI below 0
    (measured -6.6 [-10.1, -2.0] and -7.5 on 32 prompts, the interval resampling the 8 templates)."""
    assert main(["ablate", "--task", "ioi", "--components", "heads", "--method", "mean,resample", "--n", "24",
                 "--out", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert summary["metric"] == "logit diff (IO - S)" and summary["clean_metric"] > 3
    for method in ("mean", "resample"):
        top = summary["top_effects"][method][0]
        assert top["component"] == "0.2" and top["ci_high"] < 0, (method, top)  # the interval resamples templates


def test_ablate_prompts_file(toy_model, tmp_path, capsys):
    """--prompts FILE of prompts with answers (different lengths): the clean metric is each prompt's own logit diff."""
    items = [{"prompt": "the capital of france is", "answer": "paris", "wrong": "rome"},
             {"prompt": "the eiffel tower is in the city of", "answer": "paris", "wrong": "rome"},
             {"prompt": "the capital of italy is", "answer": "rome", "wrong": "paris"}]
    path = tmp_path / "facts.jsonl"
    path.write_text("\n".join(json.dumps(i) for i in items))
    assert main(["ablate", "--prompts", str(path), "--components", "mlp0,0.0", "--method", "zero,mean",
                 "--out", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    with torch.no_grad():
        diffs = [float(toy_model(i["prompt"])[0, -1, toy_model.to_single_token(i["answer"])]
                       - toy_model(i["prompt"])[0, -1, toy_model.to_single_token(i["wrong"])]) for i in items]
    assert summary["n_prompts"] == 3 and summary["clean_metric"] == pytest.approx(sum(diffs) / 3, abs=1e-3)


# ------------------------------------------------------------------ engines (issue 12)


@pytest.fixture
def engine(toy_on):
    """mechscope-toy on each engine (conftest's toy_on: loaded once per session)."""
    return toy_on


def test_engines_agree_on_ablation_effects_and_find_the_induction_head(engine, toy_engine, toy_card):
    """Same effects as the transformer-lens engine (zero, mean and resample: no engine folds the value biases, so
    zeroing hook_z means the same everywhere), and on every engine the induction head and the previous-token head
    feeding its keys are the two heads that break copying."""
    tokens = repeated_random_tokens(toy_engine, 8, 20, seed=1)
    metric = lambda lg: second_copy_loss(lg, tokens, 20)  # noqa: E731
    groups = parse_groups(toy_engine, "heads,attns,mlps,mlp1.7,0.1+1.2")
    for method in ("zero", "mean", "resample"):
        mine = ablate(engine, tokens, groups, metric, method, seed=0)
        reference = ablate(toy_engine, tokens, groups, metric, method, seed=0)
        torch.testing.assert_close(mine.ablated, reference.ablated, atol=1e-4, rtol=1e-4)
        heads = mine.effect[:toy_engine.cfg.n_layers * toy_engine.cfg.n_heads]
        top2 = {f"{int(i) // toy_engine.cfg.n_heads}.{int(i) % toy_engine.cfg.n_heads}" for i in heads.topk(2).indices}
        assert top2 == {"{}.{}".format(*toy_card["induction"]["induction_head"]), "0.1"}, top2
        assert float(heads.topk(2).values.min()) > 3.0   # measured 2.1 +5.1 / +9.6, 0.1 +5.4 / +5.5 (mean / resample)


def test_ablation_at_chosen_positions(tmp_path, capsys):
    """--positions END / named positions ablate there only (--per-position means a per-position mean, not this).
    Known answer: a last-layer head's output reaches the logits only at its own position, so ablating it at END
    equals ablating it everywhere for a metric read at END; an early head's END-only effect differs from its
    effect everywhere, and S2 (where IOI prompts repeat the subject) is a named position."""
    from mechscope.cli import main

    def effects(*extra):
        argv = ["ablate", "--task", "ioi", "--n", "8", "--components", "0.1,2.0,2.1", "--method", "mean",
                "--out", str(tmp_path), "--json", *extra]
        assert main(argv) == 0, capsys.readouterr().err
        summary = json.loads(capsys.readouterr().out)["summary"]
        return summary, {r["component"]: r["effect"] for r in summary["top_effects"]["mean"]}

    everywhere = effects()[1]
    summary, at_end = effects("--positions", "END")
    assert summary["positions"] == "END"
    for head in ("2.0", "2.1"):
        assert at_end[head] == pytest.approx(everywhere[head], abs=1e-4)
    assert abs(at_end["0.1"] - everywhere["0.1"]) > 1e-3
    at_s2 = effects("--positions", "S2,END")[1]
    assert at_s2["2.1"] == pytest.approx(everywhere["2.1"], abs=1e-4)
    assert main(["ablate", "--task", "ioi", "--n", "4", "--positions", "NOWHERE", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "'NOWHERE' is not a position here; use END, IO, S1, S2" in err and not (tmp_path / "x").exists()

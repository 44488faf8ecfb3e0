"""Linear probes: known answers on a planted direction, on shuffled labels, and on the bundled model; leak-free
splits (deduplicated, by group) and a control task that can fail (issue 8).

Ground truth on mechscope-toy comes from patching only the last position's residual from a clean prompt
into its corrupted twin (positive -> negative sentiment opener; IO name A -> C). Measured fraction of
the output moved at resid_pre 0 / 1 / 2 / resid_post 2: sentiment 0 / 0.01 / 1.01 / 1.00, IO name
0 / -0.03 / 0.44 / 1.00 (0 and 1 at the ends are exact identities). Where patching places the label,
the probe must be far above its controls on held-out groups; at resid_pre 0 (only the last token) at chance.
"""
import json
import random

import pytest
import torch

from mechscope.cli import main
from mechscope.techniques import probing
from mechscope.toy import card, corpus



@pytest.fixture
def engine(toy_on):
    """mechscope-toy on each engine (conftest's toy_on: loaded once per session)."""
    return toy_on


def probe_task(model, name, n, **kwargs):
    data = probing.task_dataset(name, n, seed=0)
    rows = [model.to_tokens(p)[0] for p in data.prompts]
    return probing.probe_layers(model, rows, [len(r) - 1 for r in rows], data.labels, seed=0, groups=data.groups,
                                controls=data.controls, group_rule=data.group_rule, control_rule=data.control_rule,
                                **kwargs)


@pytest.fixture(scope="module")
def sentiment_probe(toy_model):
    return probe_task(toy_model, "sentiment", 400)


def last_position_patch_fraction(model, pairs) -> list[float]:
    """Per probed site: mean over pairs of (patched - corrupt) / (clean - corrupt), patching only the last
    position's residual from the clean prompt into the corrupt one. pairs: (clean text, corrupt text,
    good ids, bad ids), twins of equal token length; metric: mean logit of good ids - mean logit of bad ids."""
    names = probing.site_names(model)
    by_length = {}
    for pair in pairs:
        by_length.setdefault(model.to_tokens(pair[0]).shape[1], []).append(pair)
    total = torch.zeros(len(names))
    with torch.no_grad():
        for group in by_length.values():
            clean = torch.cat([model.to_tokens(p[0]) for p in group])
            corrupt = torch.cat([model.to_tokens(p[1]) for p in group])
            good, bad = torch.tensor([p[2] for p in group]), torch.tensor([p[3] for p in group])
            rows = torch.arange(len(group))[:, None]

            def metric(logits):
                return logits[rows, -1, good].mean(1) - logits[rows, -1, bad].mean(1)

            _, cache = model.run_with_cache(clean, names_filter=names)
            high, low = metric(model(clean)), metric(model(corrupt))
            for i, name in enumerate(names):
                def patch(resid, hook, name=name):
                    resid[:, -1] = cache[name][:, -1]
                    return resid
                patched = metric(model.run_with_hooks(corrupt, fwd_hooks=[(name, patch)]))
                total[i] += ((patched - low) / (high - low)).sum()
    return (total / len(pairs)).tolist()


def sentiment_pairs(model):
    """(positive, negative) twins: "i love this ! it ' s so" / "i hate this ! it ' s so", ... (30 pairs)."""
    good = [model.to_single_token(w) for w in corpus.POSITIVE_WORDS]
    bad = [model.to_single_token(w) for w in corpus.NEGATIVE_WORDS]
    return [(p, n, good, bad) for p, n in zip(card.sentiment_prompts(True), card.sentiment_prompts(False))]


def ioi_pairs(model, n=40):
    """IOI twins that differ only in the IO name (both from IOI_IO_NAMES); metric: logit(IO) - logit(other)."""
    rng = random.Random(0)
    pairs = []
    for _ in range(n):
        io, other, s = rng.sample(probing.IOI_IO_NAMES, 3)
        template, first = rng.choice(corpus.IOI_TEMPLATES), rng.random() < 0.5
        fill = dict(s=s, place=rng.choice(corpus.PLACES), obj=rng.choice(corpus.OBJECTS))
        clean, corrupt = (template.format(a=x if first else s, b=s if first else x, **fill) for x in (io, other))
        pairs.append((clean, corrupt, [model.to_single_token(io)], [model.to_single_token(other)]))
    return pairs


def test_planted_direction_is_recovered():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(800, 32, generator=gen) * torch.linspace(0.5, 3, 32)  # features of unequal scale
    w = torch.randn(32, generator=gen)
    score = x @ w
    keep = score.abs() > 0.2 * score.std()  # a margin, so that a linear probe can be perfect
    x, y = x[keep], (score[keep] > 0).long()
    fit = probing.train_probe(x, y, 2, probing.group_split(y, list(range(len(y))), seed=0))
    direction = fit.weight[:, 1] - fit.weight[:, 0]
    assert fit.test_correct.float().mean() >= 0.97
    assert torch.cosine_similarity(direction, w, dim=0) > 0.9


def test_wilson_interval_known_values():
    low, high = probing.wilson_interval(8, 10)  # textbook: 0.490, 0.943
    assert abs(low - 0.4902) < 1e-3 and abs(high - 0.9433) < 1e-3
    correct = torch.tensor([True] * 80 + [False] * 20)
    b_low, b_high = probing.bootstrap_interval(correct, seed=0)
    w_low, w_high = probing.wilson_interval(80, 100)
    assert abs(b_low - w_low) < 0.03 and abs(b_high - w_high) < 0.03


def test_accuracy_of_grouped_test_examples_resamples_groups():
    """Two test groups of 40 examples (one opener per label, as the bundled sentiment split holds): the examples
    are 2 independent units, not 80. Chance-level accuracy from group effects (one group all right, one all
    wrong) has a Wilson interval of [0.39, 0.61]; resampling the two groups gives one that spans [0, 1]."""
    correct = torch.tensor([True] * 40 + [False] * 40)
    groups = ["i love this !"] * 40 + ["i hate this !"] * 40
    assert probing.interval(correct, "wilson")[1] < 0.62
    low, high = probing.interval(correct, "wilson", groups=groups)
    assert low == 0.0 and high == 1.0
    assert probing.interval(correct, "wilson", groups=[str(i) for i in range(80)]) == probing.interval(correct, "wilson")


def test_grouped_accuracy_that_is_perfect_still_has_an_interval():
    """Every example of both test groups right: resampling the groups alone gives [1, 1] (no spread), a claim
    of certainty from 2 independent units; the interval is Wilson's at one observation per group instead."""
    correct = torch.ones(80, dtype=torch.bool)
    groups = ["i love this !"] * 40 + ["i hate this !"] * 40
    low, high = probing.interval(correct, "wilson", groups=groups)
    assert high == 1.0 and low == pytest.approx(probing.wilson_interval(2, 2)[0]) and low < 0.4


def test_padded_batch_reads_the_same_activations_as_single_prompts(engine, toy_model):
    prompts = ["the cat sees the dog .", "i love this ! it ' s so", "when mary and john went to the store , john gave a drink to"]
    rows = [toy_model.to_tokens(p)[0] for p in prompts]
    positions = [len(rows[0]) - 1, 2, len(rows[2]) - 1]
    names = probing.site_names(toy_model)
    batched = probing.residuals_at(engine, rows, positions, names)
    for i, (row, pos) in enumerate(zip(rows, positions)):
        _, cache = toy_model.run_with_cache(row[None], names_filter=names)
        single = torch.stack([cache[n][0, pos] for n in names])
        centred = single - single.mean(-1, keepdim=True)   # engines agree on the residual up to centring
        torch.testing.assert_close(batched[:, i] - batched[:, i].mean(-1, keepdim=True), centred, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ issue 8: leaks and a control that can fail
def test_built_in_tasks_hold_distinct_prompts_and_split_without_leaks():
    """Issue 8: ioi-io held 369 distinct prompts of 400, and 7 of 80 test prompts were copies of training prompts;
    every split shared the templates. Now: 400 distinct prompts, no test prompt or group seen in training."""
    for name in probing.TASKS:
        data = probing.task_dataset(name, 400, seed=0)
        assert len(set(data.prompts)) == len(data.prompts) == 400, name
        y = torch.tensor([sorted(set(data.labels)).index(label) for label in data.labels])
        train, val, test = probing.group_split(y, data.groups, seed=0)
        assert len(train) + len(val) + len(test) == 400
        sides = [{data.groups[i] for i in part.tolist()} for part in (train, val, test)]
        assert not (sides[0] & sides[2]) and not (sides[0] & sides[1]) and not (sides[1] & sides[2]), name
        assert not {data.prompts[i] for i in train.tolist()} & {data.prompts[i] for i in test.tolist()}
        assert set(y[train].tolist()) == set(y.tolist()), name       # every label is trained on


def test_duplicates_are_dropped_and_reported(toy_model):
    data = probing.task_dataset("sentiment", 120, seed=0)
    rows = [toy_model.to_tokens(p)[0] for p in data.prompts]
    once = probing.probe_layers(toy_model, rows, [len(r) - 1 for r in rows], data.labels, groups=data.groups,
                                controls=data.controls)
    doubled = probing.probe_layers(toy_model, rows + rows[:30], [len(r) - 1 for r in rows + rows[:30]],
                                   data.labels + data.labels[:30], groups=data.groups + data.groups[:30],
                                   controls=data.controls + data.controls[:30])
    assert once.n_duplicates == 0 and doubled.n_duplicates == 30
    assert doubled.accuracy == once.accuracy and doubled.n_test == once.n_test


def test_control_labels_are_fixed_per_key_and_balanced():
    keys = ["so", "very", "so", "truly", "really", "very", "so", "totally"]
    labels = probing.control_labels(keys, 2, seed=0)
    for k in set(keys):
        assert len({int(labels[i]) for i, key in enumerate(keys) if key == k}) == 1
    per_type = {k: int(labels[keys.index(k)]) for k in set(keys)}
    assert sorted(per_type.values()).count(0) == 3 and sorted(per_type.values()).count(1) == 2


def test_control_task_can_fail_and_selectivity_subtracts_it(sentiment_probe):
    """The shuffled-label control sits at chance by construction; the control task does not: at resid_pre 0 the
    residual is the probed word's embedding, so labels fixed per word are decoded perfectly (measured 1.00)
    while sentiment is at chance, and selectivity = accuracy - control accuracy is strongly negative. The test split
    holds one opener per label (the bundled corpus has 5 per label), so the interval, which resamples openers,
    cannot exclude much: two independent units."""
    r = sentiment_probe
    assert r.control_accuracy[0] >= 0.95 and r.control_chance < 0.7
    assert r.selectivity[0] < -0.3 and len(r.test_groups) == 2 and r.selectivity_ci[0] == (-1.0, 1.0)
    for i in range(len(r.sites)):
        assert r.selectivity[i] == pytest.approx(r.accuracy[i] - r.control_accuracy[i], abs=1e-6)
        low, high = r.selectivity_ci[i]
        assert low - 1e-6 <= r.selectivity[i] <= high + 1e-6
    assert "intensifier" in r.control_rule and r.split_rule == "by opener"
    assert len(r.test_groups) >= 2 and r.n_duplicates == 0


def test_sentiment_decodable_where_patching_places_it(toy_model, sentiment_probe):
    """On openers never seen in training. The control task (labels per intensifier, the probed word) is as easy
    as sentiment from resid_pre 1 on (measured 1.00): selectivity ~0 there, so the evidence that sentiment
    is represented is the held-out-opener accuracy, and that it is at chance where only the word is."""
    fractions = last_position_patch_fraction(toy_model, sentiment_pairs(toy_model))
    assert abs(fractions[0]) < 1e-5 and abs(fractions[-1] - 1) < 1e-4  # exact: nothing at pre 0, all at the end
    acc = sentiment_probe.accuracy
    low, high = sentiment_probe.ci[0]
    assert low <= 0.5 <= high  # resid_pre 0: the last token never depends on the label
    for site, fraction in enumerate(fractions):
        if fraction > 0.3:  # measured: pre 2 (1.01) and post 2 (1.0); probe 1.00 on held-out openers there
            assert acc[site] >= 0.95 and acc[site] - sentiment_probe.shuffled_accuracy[site] >= 0.3, (site, acc)
            assert sentiment_probe.selectivity[site] > sentiment_probe.selectivity[0] + 0.3
    # decodable is not used: at pre 1 the probe reads the sentiment of unseen openers (measured 0.96), yet
    # patching that residual moves the output by ~1% (measured 0.013) - the model reads the opener later
    assert acc[1] >= 0.85 and fractions[1] < 0.1


def test_shuffled_labels_give_chance(sentiment_probe):
    """A sanity check only: shuffled labels carry no signal (measured 0.46-0.64 on 81 test prompts, whose own
    shuffled majority share is itself ~0.55)."""
    shuffled = sentiment_probe.shuffled_accuracy
    assert abs(sum(shuffled) / len(shuffled) - 0.5) < 0.1 and max(shuffled) < 0.75


def test_ioi_indirect_object_decodable_where_patching_places_it(toy_model):
    """On name pairs never seen in training: the IO name at the final position (post 2, patching fraction 1.0) is
    decoded (measured 1.00) beyond the control task (labels per template, measured 0.88): selectivity
    +0.12; the random-init model reads much less."""
    fractions = last_position_patch_fraction(toy_model, ioi_pairs(toy_model))  # measured [0, -0.03, 0.44, 1]
    result = probe_task(toy_model, "ioi-io", 400, random_model=True)
    assert result.accuracy[0] <= result.chance + 0.05  # pre 0 reads the token "to": not above chance (8 names)
    assert fractions[-1] == pytest.approx(1.0, abs=1e-4) and result.accuracy[-1] >= 0.95
    # +0.12; its interval resamples the 5 held-out name pairs (the independent units) and reaches ~0 (measured
    # [-0.01, 0.20]; c14c93b's interval over 76 prompts, [0.05, 0.20], treated prompts of a pair as independent)
    assert result.selectivity[-1] > 0.05 and result.selectivity_ci[-1][1] > result.selectivity[-1]
    assert result.selectivity_ci[-1][0] < 0.03, (result.selectivity, result.selectivity_ci)
    assert result.control_accuracy[-1] > result.control_chance + 0.2    # the control is learnable: it can fail
    assert result.accuracy[-1] - result.random_model_accuracy[-1] >= 0.15
    assert result.split_rule == "by unordered name pair" and "template" in result.control_rule


def test_probe_cli_task(tmp_path, capsys):
    assert main(["probe", "--task", "sentiment", "--n", "200", "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    run_dir = tmp_path / out["run_dir"].split("/")[-1]
    assert {"probe.csv", "accuracy_by_layer.png", "result.json", "meta.json"} <= {p.name for p in run_dir.iterdir()}
    summary = out["summary"]
    layers = {row[0]: dict(zip(summary["columns"], row)) for row in summary["layers"]}
    assert list(layers) == ["pre 0", "pre 1", "pre 2", "post 2"]
    assert layers["post 2"]["accuracy"] >= 0.95 and layers["post 2"]["shuffled_accuracy"] <= 0.7
    assert layers["pre 0"]["control_accuracy"] >= 0.95 and layers["pre 0"]["selectivity"] < -0.3
    assert "by opener" in summary["split"] and "intensifier" in summary["control_task"]
    assert summary["duplicates_dropped"] == 0 and summary["n_test_groups"] >= 2
    assert len((run_dir / "probe.csv").read_text().splitlines()) == 5


def test_probe_cli_data_file_with_word_positions_groups_and_controls(tmp_path, capsys):
    """Labels that are an arbitrary function of the probed word are exactly what the control task is: by default
    (control key = the probed word) selectivity is ~0; a JSON list with groups keeps them on one side."""
    data = tmp_path / "names.jsonl"
    lines = []
    for i, name in enumerate(corpus.NAMES[:40]):  # label: is the name (read at its own position) in the first half?
        for verb in ("sees", "likes"):
            lines.append(json.dumps({"prompt": f"the cat {verb} {name} .", "label": "a" if i < 20 else "b",
                                     "position": name}))
    data.write_text("\n".join(lines + lines[:4]) + "\n")   # 4 duplicates
    assert main(["probe", "--prompts", str(data), "--out", str(tmp_path), "--json", "--ci", "bootstrap"]) == 0
    out = json.loads(capsys.readouterr().out)
    summary = out["summary"]
    result = json.loads((tmp_path / out["run_dir"].split("/")[-1] / "result.json").read_text())
    assert result["positions"] == [4] * 84  # [bos, the, cat, VERB, NAME, .]
    assert summary["duplicates_dropped"] == 4 and summary["n_train"] + summary["n_val"] + summary["n_test"] == 80
    assert "word type at the probed position" in summary["control_task"]
    grouped = tmp_path / "grouped.json"
    grouped.write_text(json.dumps([{**json.loads(line), "group": json.loads(line)["prompt"].split()[3]}
                                   for line in lines]))
    assert main(["probe", "--prompts", str(grouped), "--out", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)["summary"]
    assert "group" in summary["split"] and summary["n_test_groups"] >= 1


@pytest.mark.parametrize("make_args, message", [
    (lambda d: ["--data", str(d / "missing.jsonl")], "does not exist"),
    (lambda d: ["--data", str(d / "one_label.csv")], "two or more labels"),
    (lambda d: ["--data", str(d / "bad.jsonl")], "is not JSON"),
    (lambda d: ["--data", str(d / "one_label.csv"), "--position", "zebra"], "not a token of the prompt"),
    (lambda d: ["--prompts", str(d / "some_groups.jsonl")], "for every example or for none"),
    (lambda d: ["--prompts", str(d / "two_groups.jsonl")], "3+ groups"),
    (lambda d: ["--task", "sentiment", "--split", "0.5,0.5"], "--split"),
    (lambda d: ["--task", "sentiment", "--split", "nan,0.5,0.5"], "--split"),
    (lambda d: ["--task", "sentiment", "--position", "99"], "outside a prompt"),
    (lambda d: ["--task", "sentiment", "--l2", "inf"], "--l2"),
])
def test_probe_bad_inputs(tmp_path, capsys, make_args, message):
    (tmp_path / "one_label.csv").write_text("prompt,label\n" + "the cat sees the dog .,x\n" * 5)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "label": 1}\nnot json\n')
    items = [{"prompt": f"the cat sees {n} .", "label": str(i % 2)} for i, n in enumerate(corpus.NAMES[:12])]
    (tmp_path / "some_groups.jsonl").write_text("\n".join(json.dumps({**x, "group": "g"} if i else x)
                                                           for i, x in enumerate(items)))
    (tmp_path / "two_groups.jsonl").write_text("\n".join(json.dumps({**x, "group": str(i % 2)})
                                                          for i, x in enumerate(items)))
    code = main(["probe", *make_args(tmp_path), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err

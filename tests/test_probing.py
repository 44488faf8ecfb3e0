"""Linear probes: known answers on a planted direction, on shuffled labels, and on the bundled model.

Ground truth on mechscope-toy comes from patching only the last position's residual from a clean prompt
into its corrupted twin (positive -> negative sentiment opener; IO name A -> C). Measured fraction of
the output moved at resid_pre 0 / 1 / 2 / resid_post 2: sentiment 0 / 0.01 / 1.01 / 1.00, IO name
0 / -0.03 / 0.44 / 1.00 (0 and 1 at the ends are exact identities). Where patching places the label,
the probe must be far above both controls; at resid_pre 0 (only the last token) it must be at chance.
"""
import json
import random

import pytest
import torch

from mechscope.cli import main
from mechscope.techniques import probing
from mechscope.toy import card, corpus


@pytest.fixture(scope="module")
def sentiment_probe(toy_model):
    prompts, labels = probing.task_dataset("sentiment", 400, seed=0)
    rows = [toy_model.to_tokens(p)[0] for p in prompts]
    return probing.probe_layers(toy_model, rows, [len(r) - 1 for r in rows], labels, seed=0)


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
    fit = probing.train_probe(x, y, 2, probing.stratified_split(y, seed=0))
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


def test_padded_batch_reads_the_same_activations_as_single_prompts(toy_model):
    prompts = ["the cat sees the dog .", "i love this ! it ' s so", "when mary and john went to the store , john gave a drink to"]
    rows = [toy_model.to_tokens(p)[0] for p in prompts]
    positions = [len(rows[0]) - 1, 2, len(rows[2]) - 1]
    names = probing.site_names(toy_model)
    batched = probing.residuals_at(toy_model, rows, positions, names)
    for i, (row, pos) in enumerate(zip(rows, positions)):
        _, cache = toy_model.run_with_cache(row[None], names_filter=names)
        single = torch.stack([cache[n][0, pos] for n in names])
        torch.testing.assert_close(batched[:, i], single, atol=1e-5, rtol=1e-5)


def test_sentiment_decodable_where_patching_places_it(toy_model, sentiment_probe):
    fractions = last_position_patch_fraction(toy_model, sentiment_pairs(toy_model))
    assert abs(fractions[0]) < 1e-5 and abs(fractions[-1] - 1) < 1e-4  # exact: nothing at pre 0, all at the end
    acc, shuffled = sentiment_probe.accuracy, sentiment_probe.shuffled_accuracy
    low, high = sentiment_probe.ci[0]
    assert low <= 0.5 <= high  # resid_pre 0: the last token never depends on the label
    for site, fraction in enumerate(fractions):
        if fraction > 0.3:  # measured: pre 2 (1.01) and post 2 (1.0); probe 1.00 there, shuffled ~0.5
            assert acc[site] >= 0.95 and acc[site] - shuffled[site] >= 0.3, (site, acc, shuffled)
    # decodable is not used: at pre 1 the probe reads the sentiment (measured 1.00), yet patching that
    # residual moves the output by ~1% (measured 0.013) — the model reads the opener later, not from here
    assert acc[1] >= 0.9 and fractions[1] < 0.1


def test_shuffled_labels_give_chance(sentiment_probe):
    for low, high in sentiment_probe.shuffled_ci:
        assert low <= 0.5 <= high
    assert abs(sum(sentiment_probe.shuffled_accuracy) / len(sentiment_probe.shuffled_accuracy) - 0.5) < 0.1


def test_ioi_indirect_object_decodable_where_patching_places_it(toy_model):
    fractions = last_position_patch_fraction(toy_model, ioi_pairs(toy_model))  # measured [0, -0.03, 0.44, 1]
    prompts, labels = probing.task_dataset("ioi-io", 240, seed=0)
    rows = [toy_model.to_tokens(p)[0] for p in prompts]
    result = probing.probe_layers(toy_model, rows, [len(r) - 1 for r in rows], labels, seed=0, random_model=True,
                                  l2_grid=(1e-2, 1e-1, 1.0))
    assert result.ci[0][0] <= result.chance  # pre 0 reads the token "to": not above chance (4 names)
    for site, fraction in enumerate(fractions):
        if fraction > 0.3:  # measured: probe 1.00, shuffled ~0.25, random-init model <= 0.8
            assert result.accuracy[site] >= 0.95, (site, result.accuracy)
            assert result.accuracy[site] - result.shuffled_accuracy[site] >= 0.5
            assert result.accuracy[site] - result.random_model_accuracy[site] >= 0.15


def test_probe_cli_task(tmp_path, capsys):
    assert main(["probe", "--task", "sentiment", "--n", "200", "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    run_dir = tmp_path / out["run_dir"].split("/")[-1]
    assert {"probe.csv", "accuracy_by_layer.png", "result.json", "meta.json"} <= {p.name for p in run_dir.iterdir()}
    layers = {row[0]: dict(zip(out["summary"]["columns"], row)) for row in out["summary"]["layers"]}
    assert list(layers) == ["pre 0", "pre 1", "pre 2", "post 2"]
    assert layers["post 2"]["accuracy"] >= 0.95 and layers["post 2"]["shuffled_accuracy"] <= 0.7
    assert len((run_dir / "probe.csv").read_text().splitlines()) == 5


def test_probe_cli_data_file_with_word_positions(tmp_path, capsys):
    data = tmp_path / "names.jsonl"
    lines = []
    for i, name in enumerate(corpus.NAMES[:40]):  # label: is the name (read at its own position) in the first half?
        lines.append(json.dumps({"prompt": f"the cat sees {name} .", "label": "a" if i < 20 else "b", "position": name}))
    data.write_text("\n".join(lines) + "\n")
    assert main(["probe", "--data", str(data), "--out", str(tmp_path), "--json", "--ci", "bootstrap"]) == 0
    out = json.loads(capsys.readouterr().out)
    result = json.loads((tmp_path / out["run_dir"].split("/")[-1] / "result.json").read_text())
    assert result["positions"] == [4] * 40  # [bos, the, cat, sees, NAME, .]
    assert out["summary"]["n_test"] == 8


@pytest.mark.parametrize("make_args, message", [
    (lambda d: ["--data", str(d / "missing.jsonl")], "does not exist"),
    (lambda d: ["--data", str(d / "one_label.csv")], "two or more labels"),
    (lambda d: ["--data", str(d / "bad.jsonl")], "is not JSON"),
    (lambda d: ["--data", str(d / "one_label.csv"), "--position", "zebra"], "not a token of the prompt"),
    (lambda d: ["--task", "sentiment", "--split", "0.5,0.5"], "--split"),
    (lambda d: ["--task", "sentiment", "--position", "99"], "outside a prompt"),
])
def test_probe_bad_inputs(tmp_path, capsys, make_args, message):
    (tmp_path / "one_label.csv").write_text("prompt,label\n" + "the cat sees the dog .,x\n" * 5)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "label": 1}\nnot json\n')
    code = main(["probe", *make_args(tmp_path), "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err

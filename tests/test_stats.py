"""stats: intervals that cover at their level at the sizes the commands use (a simulation in the default suite),
no interval from one prompt, Fieller's ratio interval, cluster resampling, multiplicity control on null cells,
sign share, rank stability over the cells that have an effect."""
import math

import pytest
import torch

from mechscope import stats


@pytest.mark.parametrize("kind,n,at_least", [("normal", 5, 0.93), ("normal", 10, 0.93), ("normal", 20, 0.93),
                                              ("normal", 50, 0.93), ("lognormal", 10, 0.88), ("lognormal", 20, 0.91),
                                              ("ratio", 8, 0.93), ("ratio", 32, 0.93)])
def test_intervals_cover_at_about_their_level(kind, n, at_least):
    """2,000 simulated data sets per cell (`python -m mechscope.stats --coverage` prints the table). The
    percentile bootstrap of c14c93b covered 85% / 89% / 92% / 93% (normal), 81% / 85% (lognormal), 89% (ratio, n=8)."""
    coverage = stats.simulate_coverage(kind, n)
    assert at_least <= coverage <= 0.975


def test_cluster_interval_covers_where_the_naive_one_does_not():
    """12 groups of 8 prompts sharing a group effect (SD 1, within-group SD 0.5): resampling prompts treats 96
    correlated prompts as independent and covers about half the time; resampling groups covers ~95%."""
    assert stats.simulate_coverage("clustered-naive", 12) < 0.7
    assert stats.simulate_coverage("clustered", 12) >= 0.93


def test_cluster_standard_error_is_that_of_the_group_means():
    """Equal-size groups: the cluster standard error is the standard error of the group means."""
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(6, 4, 3, generator=gen).reshape(24, 3)
    groups = [g for g in range(6) for _ in range(4)]
    group_means = values.reshape(6, 4, 3).mean(1)
    torch.testing.assert_close(stats.standard_error(values, groups), group_means.std(0) / math.sqrt(6))
    torch.testing.assert_close(stats.standard_error(values), values.std(0) / math.sqrt(24))


def test_small_samples_use_student_t():
    """2-4 prompts: the t-interval mean +- t(n-1) s / sqrt(n) exactly."""
    values = torch.tensor([[1.0], [2.0], [4.0]])
    mean, low, high = stats.interval(values)
    half = 4.302653 * float(values.std()) / math.sqrt(3)  # t(0.975, 2)
    assert low.item() == pytest.approx(7 / 3 - half, rel=1e-5) and high.item() == pytest.approx(7 / 3 + half, rel=1e-5)


def test_rare_outcome_interval_is_never_narrower_than_students_t():
    """A 0/1 outcome seen once in 64 prompts: most resamples have no spread, and the bootstrap-t alone gave
    [-0.009, 0.018] around 0.016; each bound is at least Student's t's. One miss in 76 examples of 5 groups: a
    finite interval near the mean (resamples without the miss have no t, not a near-zero one)."""
    rare = torch.zeros(64, 1)
    rare[0] = 1.0
    mean, low, high = stats.interval(rare)
    half = 1.998341 * float(rare.std()) / 8                         # t(0.975, 63) s / sqrt(64)
    assert high.item() >= mean.item() + half - 1e-6 and low.item() <= mean.item() - half + 1e-6
    almost = torch.ones(76, 1)
    almost[0] = 0.0
    _, low, high = stats.interval(almost, groups=[i % 5 for i in range(76)])
    assert 0.9 < low.item() < 0.987 < high.item() < 1.1


def test_one_prompt_has_no_interval():
    """A single prompt's spread is unknown: no interval (None in a summary), never a zero-width one
    (c14c93b gave low = high = mean, which `--with-ablated` then called a change that excludes 0)."""
    values = torch.tensor([[1.0, float("nan")], [3.0, 5.0], [2.0, float("nan")]])
    mean, low, high = stats.interval(values, n_resamples=200)
    assert mean.tolist() == [2.0, 5.0]
    assert low[1].isnan() and high[1].isnan() and low[0] < 2.0 < high[0]
    out = stats.summary(values[1:2])
    assert out["mean"] == [3.0, 5.0] and out["ci_low"] == [None, None] and out["stderr"] == [None, None]
    assert stats.p_value(values[1:2]).isnan().all()
    assert stats.ratio_interval(values[1:2], values[1:2])[1].isnan().all()


def test_fieller_interval_is_the_set_of_ratios_a_t_test_keeps():
    """Known answer by inversion: r is in Fieller's interval iff the t-test of mean(num - r den) = 0 keeps it."""
    gen = torch.Generator().manual_seed(1)
    den = 1 + 0.5 * torch.randn(10, generator=gen)
    num = 0.6 * den + 0.3 * torch.randn(10, generator=gen)
    ratio, low, high = stats.ratio_interval(num[:, None], den[:, None])
    assert ratio.item() == pytest.approx(float(num.mean() / den.mean()), rel=1e-5)
    grid = torch.linspace(-1, 2, 30001)
    diff = num[:, None] - grid * den[:, None]                      # [n, r]
    t = diff.mean(0) / (diff.std(0) / math.sqrt(10))
    kept = grid[t.abs() <= 2.262157]                                # t(0.975, 9)
    assert low.item() == pytest.approx(float(kept.min()), abs=2e-4)
    assert high.item() == pytest.approx(float(kept.max()), abs=2e-4)


def test_fieller_interval_is_unbounded_when_the_denominator_may_be_zero():
    den = torch.tensor([1.0, -1.0, 0.5, -0.4, 0.2])
    num = torch.tensor([0.5, 0.4, 0.3, 0.6, 0.2])
    _, low, high = stats.ratio_interval(num[:, None], den[:, None])
    assert low.item() == -math.inf and high.item() == math.inf
    assert stats.summary(torch.ones(2, 1))["ci_low"] == [1.0]      # constant: the interval is the value


def test_adjusted_p_values_known_answers():
    """Benjamini-Hochberg and Holm on a textbook family (p sorted: BH p_(i) m / i made monotone; Holm
    p_(i) (m - i + 1) made monotone); NaN is no test and not counted."""
    p = torch.tensor([0.01, 0.04, 0.03, 0.005, float("nan")])
    assert stats.adjust(p, "bh")[:4].tolist() == pytest.approx([0.02, 0.04, 0.04, 0.02])
    assert stats.adjust(p, "holm")[:4].tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.adjust(p, "bh")[4].isnan()


@pytest.mark.parametrize("n", [8, 32])
def test_null_cells_are_rarely_flagged(n):
    """576 cells with no true change (the size of a head x position patching grid), 20 data sets: calling a
    cell changed when its 95% interval excludes 0, cell by cell, flags dozens of null cells in every data set
    (c14c93b's rule: 11.8% at n = 8, 6.4% at n = 32); a Benjamini-Hochberg adjusted p < 0.05 flags <= 5%, and
    on at least 18 of the 20 data sets none (under the global null its false discovery rate is its level)."""
    gen = torch.Generator().manual_seed(n)
    flagged_naive, flagged = [], []
    for _ in range(20):
        values = torch.randn(n, 576, generator=gen) * torch.rand(576, generator=gen).add(0.1)
        _, low, high = stats.interval(values, n_resamples=400)
        flagged_naive.append(((low > 0) | (high < 0)).float().sum())
        flagged.append((stats.adjust(stats.p_value(values), "bh") < 0.05).float().sum())
    flagged, flagged_naive = torch.stack(flagged), torch.stack(flagged_naive)
    assert (flagged / 576).max() <= 0.05 and (flagged > 0).sum() <= 2
    assert (flagged_naive >= 10).all()


def test_sign_share_and_standard_error():
    values = torch.tensor([[1.0, -1.0], [2.0, 1.0], [3.0, -4.0], [-1.0, -2.0]])
    assert stats.sign_share(values).tolist() == [0.75, 0.75]
    assert torch.allclose(stats.standard_error(values), values.std(0) / 2)


def test_summary_of_an_undefined_cell_is_none():
    out = stats.summary(torch.tensor([[float("nan"), 1.0], [float("nan"), 2.0]]))
    assert out["mean"][0] is None and out["mean"][1] == 1.5


def test_rank_stability_stable_versus_noise():
    gen = torch.Generator().manual_seed(0)
    signal = torch.tensor([5.0, 4.0, 0.0, 0.0, 0.0, 0.0])
    stable = stats.rank_stability(signal + 0.3 * torch.randn(30, 6, generator=gen), k=2)
    assert stable["top_k"] == [0, 1] and stable["set_frequency_by_k"] == [1.0, 1.0]
    assert stable["median_rank_correlation"] > 0.5
    noise = torch.randn(30, 6, generator=gen)
    everything = stats.rank_stability(noise, k=2, only_nonzero=False)
    assert everything["top_k_set_frequency"] < 0.5 and everything["median_rank_correlation"] < 0.5
    assert stats.rank_stability(noise, k=2)["n_ranked"] <= 1    # by default noise is not ranked at all


def test_rank_stability_by_k_ranks_only_cells_with_an_effect():
    """Three clear effects and 20 near-zero cells: the top 5 of all cells is unstable (c14c93b reported one
    number, the top-5 set frequency), while the top 1..3 of the cells whose interval excludes 0 recur in
    every resample."""
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([torch.tensor([3.0, 2.0, 1.0]) + 0.2 * torch.randn(40, 3, generator=gen),
                        0.02 * torch.randn(40, 20, generator=gen)], 1)
    everything = stats.rank_stability(values, k=5, only_nonzero=False)
    assert everything["top_k_set_frequency"] < 0.5
    s = stats.rank_stability(values, k=5)
    assert s["top_k"][:3] == [0, 1, 2] and s["set_frequency_by_k"][:3] == [1.0, 1.0, 1.0]
    assert s["n_ranked"] < 8


def test_rank_correlation_is_not_dominated_by_always_zero_cells():
    """3 noise cells + 253 cells exactly 0 on every prompt: c14c93b's median rank correlation read 1.0 (the
    zeros' tied ranks agree with themselves); the zero cells are never ranked."""
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randn(30, 3, generator=gen), torch.zeros(30, 253)], 1)
    s = stats.rank_stability(values, k=3, only_nonzero=False)
    assert s["n_ranked"] == 3 and s["median_rank_correlation"] < 0.9
    assert stats.rank_stability(values, k=3)["median_rank_correlation"] is None


def test_rank_stability_leaves_nan_out_as_every_summary_does():
    """A cell present on half the prompts ranks by the mean over those prompts (summary's mean), not by
    counting the missing prompts as 0 (c14c93b: mean 2.5, ranked below the cell of 4)."""
    values = torch.tensor([[5.0, 4.0, 0.1], [float("nan"), 4.1, 0.0]] * 4)
    s = stats.rank_stability(values, k=1, only_nonzero=False)
    assert s["top_k"] == [0] and stats.summary(values)["mean"][0] == 5.0


def test_rank_stability_by_value_and_abs():
    values = torch.tensor([[-5.0, 1.0, 2.0]] * 4)
    assert stats.rank_stability(values, k=1, by="abs")["top_k"] == [0]
    assert stats.rank_stability(values, k=1, by="value")["top_k"] == [2]
    with pytest.raises(ValueError):
        stats.rank_stability(values, by="size")


def test_coverage_command_prints_the_table(capsys):
    assert stats.main(["--coverage", "--sets", "50"]) == 0
    out = capsys.readouterr().out
    assert "normal" in out and "ratio" in out and "clustered" in out


def test_commands_on_a_task_resample_its_templates(tmp_path, capsys):
    """Issue 17 §2: predict, sae-ablate and sae-features over --task ioi resample templates (the cluster
    bootstrap), like patch: their intervals equal stats' grouped interval of the same per-prompt values, and
    differ from the prompt-level one. Before, these three resampled prompts."""
    import json

    import torch

    from mechscope.cli import main
    from mechscope.models import load_model
    from mechscope.tasks import load_task

    engine = load_model("mechscope-toy", backend="tl", device="cpu")
    prompt_set = load_task(engine, "ioi", n=16, seed=0)
    groups = prompt_set.groups
    assert 1 < len(set(groups)) < 16
    assert main(["predict", "--task", "ioi", "--n", "16", "--out", str(tmp_path), "--json"]) == 0
    answers = json.loads(capsys.readouterr().out)["summary"]["answers"]
    rows, named = prompt_set.tokens(engine)
    logits = torch.stack([engine.run(r[None])[0][0, -1] for r in rows])
    ids = lambda words: torch.tensor([int(engine.to_tokens(w, prepend_bos=False)[0, 0]) for w in words])  # noqa: E731
    diff = logits[torch.arange(16), ids([p.answer for p in prompt_set.prompts])] \
        - logits[torch.arange(16), ids([p.wrong for p in prompt_set.prompts])]
    grouped, plain = stats.summary(diff, groups=groups), stats.summary(diff)
    assert answers["logit_diff"]["ci_low"] == pytest.approx(grouped["ci_low"], abs=1e-3)
    assert answers["logit_diff"]["ci_high"] == pytest.approx(grouped["ci_high"], abs=1e-3)
    assert (plain["ci_low"], plain["ci_high"]) != pytest.approx((grouped["ci_low"], grouped["ci_high"]), abs=1e-3)
    assert main(["sae-ablate", "--task", "ioi", "--n", "16", "--features", "person_name", "--positions", "IO",
                 "--controls", "4", "--out", str(tmp_path / "ablate"), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    effect = printed["summary"]["effect"]
    table = (tmp_path / "ablate" / printed["run_dir"].split("/")[-1] / "ablation.csv").read_text().splitlines()[1:]
    values = torch.tensor([float(line.rsplit(",", 1)[1]) for line in table])
    assert effect["n_groups"] == len(set(groups))
    assert [effect["ci_low"], effect["ci_high"]] == pytest.approx(
        [stats.summary(values, groups=groups)[k] for k in ("ci_low", "ci_high")], abs=1e-3)
    assert main(["sae-features", "--task", "ioi", "--n", "16", "--top", "3", "--out", str(tmp_path / "features"),
                 "--json"]) == 0
    top = json.loads(capsys.readouterr().out)["summary"]["top_features"]["features"][0]
    from mechscope.techniques import sae as saes
    from mechscope.techniques import sae_features as sf

    acts = sf.acts_at(engine, saes.load_sae("mechscope-toy"), rows, named["END"].tolist())[:, top["feature"]]
    _, low, high = stats.interval(acts[:, None], groups=groups)
    _, naive_low, naive_high = stats.interval(acts[:, None])
    assert top["ci"] == pytest.approx([float(low), float(high)], abs=1e-3)
    assert [float(naive_low), float(naive_high)] != pytest.approx(top["ci"], abs=1e-3)

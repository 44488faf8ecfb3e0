"""stats: bootstrap intervals cover the true mean at about their level, NaN-aware; sign share; rank stability
separates a ranking that holds on every prompt from one that is noise."""
import pytest
import torch

from mechscope import stats


def test_bootstrap_interval_covers_the_true_mean_about_95_percent():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(200, 40, 3, generator=gen) + torch.tensor([0.0, 1.0, -2.0])  # 200 experiments of 40 prompts
    covered = []
    for experiment in values:
        mean, low, high = stats.interval(experiment, n_resamples=400, seed=1)
        covered.append(((low <= torch.tensor([0.0, 1.0, -2.0])) & (torch.tensor([0.0, 1.0, -2.0]) <= high)).float())
    coverage = torch.stack(covered).mean()
    assert 0.88 < coverage < 0.99  # percentile bootstrap at n = 40: slightly under nominal


def test_nan_entries_are_ignored_per_cell():
    values = torch.tensor([[1.0, float("nan")], [3.0, 5.0], [2.0, float("nan")]])
    mean, low, high = stats.interval(values, n_resamples=200)
    assert mean.tolist() == [2.0, 5.0]
    assert low[1] == high[1] == 5.0 and low[0] >= 1.0 and high[0] <= 3.0
    assert stats.summary(values)["mean"] == [2.0, 5.0]


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
    assert stable["top_k"] == [0, 1] and stable["top_k_set_frequency"] == 1.0
    assert stable["median_rank_correlation"] > 0.5
    noise = stats.rank_stability(torch.randn(30, 6, generator=gen), k=2)
    assert noise["top_k_set_frequency"] < 0.5 and noise["median_rank_correlation"] < 0.5


def test_rank_stability_by_value_and_abs():
    values = torch.tensor([[-5.0, 1.0, 2.0]] * 4)
    assert stats.rank_stability(values, k=1, by="abs")["top_k"] == [0]
    assert stats.rank_stability(values, k=1, by="value")["top_k"] == [2]
    with pytest.raises(ValueError):
        stats.rank_stability(values, by="size")

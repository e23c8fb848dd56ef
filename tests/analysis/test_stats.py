"""Rank tests, BH and bootstrap against scipy.stats and hand-computed values."""

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from lit_prune.analysis.stats import (
    benjamini_hochberg,
    bootstrap_ci,
    mann_whitney,
    replicate_mean_ci,
    spearman,
)
from lit_prune.errors import LitPruneError


def _rng(seed=0):
    return np.random.default_rng(seed)


@pytest.mark.parametrize("n", [3, 10, 500])
def test_spearman_matches_scipy_with_ties(n):
    rng = _rng(n)
    x = rng.integers(0, 5, size=n).astype(float)  # many ties
    y = x + rng.normal(size=n)
    ref = sps.spearmanr(x, y)
    rho, p = spearman(x, y)
    assert rho == pytest.approx(ref.statistic, abs=1e-12)
    assert p == pytest.approx(ref.pvalue, rel=1e-9)


def test_spearman_hand_values_and_torch_input():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40])[0] == pytest.approx(1.0)
    rho, _ = spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([4.0, 3, 2, 1]))
    assert rho == pytest.approx(-1.0)


def test_spearman_degenerate_inputs_give_nan():
    assert all(math.isnan(v) for v in spearman([1, 1, 1, 1], [1, 2, 3, 4]))  # constant
    assert all(math.isnan(v) for v in spearman([1, 2], [2, 1]))  # fewer than 3 pairs
    assert all(math.isnan(v) for v in spearman([], []))
    with pytest.raises(LitPruneError, match="equal lengths"):
        spearman([1, 2, 3], [1, 2])


def test_spearman_drops_nan_pairs():
    x = [1.0, 2.0, np.nan, 4.0, 5.0]
    y = [2.0, 1.0, 9.0, 4.0, np.nan]
    ref = sps.spearmanr([1.0, 2.0, 4.0], [2.0, 1.0, 4.0])
    assert spearman(x, y)[0] == pytest.approx(ref.statistic)


@pytest.mark.parametrize("nx,ny,ties", [(5, 7, False), (40, 60, True), (3, 3, False)])
def test_mann_whitney_matches_scipy(nx, ny, ties):
    rng = _rng(nx + ny)
    x, y = rng.normal(size=nx), rng.normal(0.5, size=ny)
    if ties:
        x, y = np.round(x), np.round(y)
    ref = sps.mannwhitneyu(x, y, alternative="two-sided")
    u, p = mann_whitney(x, y)
    assert u == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue, rel=1e-9)


def test_mann_whitney_hand_value_and_empty():
    # every x below every y: U_x = 0 and the exact two-sided p = 2 / C(6, 3) = 0.1
    u, p = mann_whitney([1, 2, 3], [4, 5, 6])
    assert u == 0.0 and p == pytest.approx(0.1)
    assert all(math.isnan(v) for v in mann_whitney([], [1.0, 2.0]))
    assert all(math.isnan(v) for v in mann_whitney([np.nan], [1.0]))


def test_benjamini_hochberg_hand_computed():
    # sorted 0.005, 0.01, 0.03, 0.04 scaled by 4/1, 4/2, 4/3, 4/4 -> .02 .02 .04 .04
    adj = benjamini_hochberg([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adj, [0.02, 0.04, 0.04, 0.02])


def test_benjamini_hochberg_matches_scipy_and_keeps_nan():
    p = _rng(3).uniform(size=200) ** 3
    np.testing.assert_allclose(benjamini_hochberg(p), sps.false_discovery_control(p), rtol=1e-12)
    with_nan = np.array([0.2, np.nan, 0.01, 0.5, np.nan])
    out = benjamini_hochberg(with_nan)
    assert np.isnan(out[[1, 4]]).all()
    np.testing.assert_allclose(out[[0, 2, 3]], sps.false_discovery_control([0.2, 0.01, 0.5]))
    assert benjamini_hochberg([1.0, 1.0]).tolist() == [1.0, 1.0]
    with pytest.raises(LitPruneError):
        benjamini_hochberg([0.5, 1.5])


def test_bootstrap_ci_covers_mean_and_is_reproducible():
    x = _rng(4).normal(3.0, 1.0, size=400)
    lo, hi = bootstrap_ci(np.mean, x, n_boot=400, seed=1)
    half = 1.96 / math.sqrt(400)  # normal-theory half width, sigma = 1
    assert lo < 3.0 < hi and (hi - lo) == pytest.approx(2 * half, rel=0.2)
    assert bootstrap_ci(np.mean, x, n_boot=400, seed=1) == (lo, hi)
    assert bootstrap_ci(np.mean, x, n_boot=400, seed=2) != (lo, hi)


def test_bootstrap_ci_resamples_pairs_together():
    x = _rng(5).normal(size=50)
    # y is a monotone function of x: every paired resample has rho exactly 1
    assert bootstrap_ci(spearman, x, np.exp(x), n_boot=100) == pytest.approx((1.0, 1.0))
    assert bootstrap_ci(np.mean, np.full(10, 7.0), n_boot=50) == (7.0, 7.0)


def test_bootstrap_ci_degenerate():
    assert all(math.isnan(v) for v in bootstrap_ci(np.mean, np.array([1.0])))
    # constant y: every resample's rho is NaN -> dropped -> (nan, nan)
    lo, hi = bootstrap_ci(spearman, np.arange(10.0), np.ones(10), n_boot=20)
    assert math.isnan(lo) and math.isnan(hi)
    with pytest.raises(LitPruneError, match="array lengths"):
        bootstrap_ci(spearman, np.arange(3.0), np.arange(4.0))
    with pytest.raises(LitPruneError, match="alpha"):
        bootstrap_ci(np.mean, np.arange(3.0), alpha=1.5)


# --- exact permutation p, hierarchical bootstrap, CI sides (docs/methods.md §4b) -------------------
def test_spearman_exact_on_perfectly_monotone_five_bins():
    """Only the identity (and, two-sided, the reversal) of the 120 orderings reaches |rho| = 1."""
    from lit_prune.analysis.stats import spearman_exact

    x, y = [0, 1, 2, 3, 4], [0.5, 0.4, 0.3, 0.2, 0.1]
    assert spearman_exact(x, y) == (pytest.approx(-1.0), pytest.approx(2 / 120))
    assert spearman_exact(x, y, "less")[1] == pytest.approx(1 / 120)
    assert spearman_exact(x, y, "greater")[1] == pytest.approx(1.0)
    assert spearman(x, y)[1] < 1e-20  # the t-approximation this replaces: absurdly small at n = 5


def test_spearman_exact_with_ties_counts_distinct_arrangements():
    """y has two 1s and three 0s: 10 distinct arrangements, each 12 times among the 120 orderings;
    |rho| is largest (0.866) for the 1s at either end: p = 2 / 10."""
    from lit_prune.analysis.stats import spearman_exact

    rho, p = spearman_exact([0, 1, 2, 3, 4], [1, 1, 0, 0, 0])
    assert rho == pytest.approx(-math.sqrt(3) / 2) and p == pytest.approx(0.2)


def test_spearman_exact_matches_brute_force_rank_correlation():
    from itertools import permutations

    from lit_prune.analysis.stats import spearman_exact

    x, y = np.arange(5.0), np.array([0.3, 0.1, 0.5, 0.2, 0.4])
    rho, p = spearman_exact(x, y)
    perms = [sps.spearmanr(x, y[list(q)]).statistic for q in permutations(range(5))]
    assert rho == pytest.approx(sps.spearmanr(x, y).statistic)
    assert p == pytest.approx(np.mean(np.abs(perms) >= abs(rho) - 1e-12))


def test_spearman_exact_refuses_large_n():
    from lit_prune.analysis.stats import spearman_exact

    with pytest.raises(LitPruneError, match="len"):
        spearman_exact(range(9), range(9))


def test_hierarchical_bootstrap_resamples_pairs_not_only_features():
    """Two pairs whose features all agree within the pair (0s and 1s): feature resampling changes
    nothing, the pair draw gives a mean of 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the 95%
    CI is [0, 1]. A feature-only bootstrap (one pooled pair) would give a much narrower CI."""
    from lit_prune.analysis.stats import hierarchical_bootstrap, pair_mean

    values = np.array([[0.0] * 50, [1.0] * 50])
    lo, hi = hierarchical_bootstrap(lambda s: pair_mean(s["v"]), {"v": values}, n_boot=2000)
    assert (lo, hi) == (0.0, 1.0)
    pooled = values.reshape(1, -1)
    lo1, hi1 = hierarchical_bootstrap(lambda s: pair_mean(s["v"]), {"v": pooled}, n_boot=2000)
    assert 0.35 < lo1 < 0.5 < hi1 < 0.65  # 0.5 ± 1.96 * 0.05


def test_hierarchical_bootstrap_draws_every_sample_jointly():
    """The same pair and feature draw for every name: a - b of identical arrays is 0 in every
    resample, and a shifted copy keeps its exact shift."""
    from lit_prune.analysis.stats import hierarchical_bootstrap, pair_mean

    a = _rng(1).random((3, 40))
    diff = lambda s: pair_mean(s["a"]) - pair_mean(s["b"])  # noqa: E731
    assert hierarchical_bootstrap(diff, {"a": a, "b": a.copy()}, n_boot=200) == (0.0, 0.0)
    lo, hi = hierarchical_bootstrap(diff, {"a": a + 0.25, "b": a}, n_boot=200)
    assert lo == pytest.approx(0.25) and hi == pytest.approx(0.25)


def test_hierarchical_bootstrap_nan_features_and_crossed_draws():
    from lit_prune.analysis.stats import hierarchical_bootstrap, pair_mean

    v = np.array([[1.0, np.nan, 1.0], [1.0, 1.0, np.nan]])  # NaN: a dead feature, never counted
    assert hierarchical_bootstrap(lambda s: pair_mean(s["v"]), {"v": v}, n_boot=100) == (1.0, 1.0)
    cols = np.tile(np.arange(6.0), (3, 1))  # crossed: column f is feature f in every row
    same = hierarchical_bootstrap(
        lambda s: float(np.ptp(s["c"], axis=0).max()), {"c": cols}, n_boot=50, crossed=True
    )
    assert same == (0.0, 0.0)
    with pytest.raises(LitPruneError, match="shape"):
        hierarchical_bootstrap(pair_mean, {"a": np.zeros((2, 3)), "b": np.zeros((2, 4))})


def test_ci_side():
    from lit_prune.analysis.stats import ci_side

    assert ci_side(1.1, 2.0, 1.0) == 1 and ci_side(0.2, 0.9, 1.0) == -1 and ci_side(0.5, 1.5, 1.0) == 0
    assert ci_side(float("nan"), 1.0, 0.0) is None and ci_side(2.0, float("inf"), 1.0) == 1


def test_replicate_mean_ci_is_the_student_t_interval():
    """[0.1, 0.2, 0.3]: mean 0.2, sd 0.1, t(0.975, 2) = 4.302653: 0.2 ± 0.248414."""
    lo, hi = replicate_mean_ci([0.1, 0.2, 0.3])
    assert (lo, hi) == pytest.approx((0.2 - 0.248414, 0.2 + 0.248414), abs=1e-6)
    assert replicate_mean_ci([0.1, 0.2, 0.3], bounds=(0.0, 0.4)) == pytest.approx((0.0, 0.4))
    assert all(math.isnan(v) for v in replicate_mean_ci([0.1, float("nan")]))  # one replicate: no interval


def test_replicate_mean_ci_is_never_narrower_than_the_replicates_own_noise():
    """[0.19, 0.2, 0.21] agree to sd 0.01, but each carries variance 0.03 of its own: V = max(0.0001/3,
    0.03/3) = 0.01, so 0.2 ± t(0.975, 2) · 0.1 = 0.2 ± 0.4302653; tiny own noise: the t interval."""
    values = [0.19, 0.2, 0.21]
    lo, hi = replicate_mean_ci(values, within_variances=[0.03, 0.03, 0.03])
    assert (lo, hi) == pytest.approx((0.2 - 0.4302653, 0.2 + 0.4302653), abs=1e-6)
    assert replicate_mean_ci(values, within_variances=[1e-9] * 3) == pytest.approx(replicate_mean_ci(values))
    unknown = replicate_mean_ci(values, within_variances=[float("nan")] * 3)
    assert unknown == pytest.approx(replicate_mean_ci(values))
    with pytest.raises(LitPruneError, match="within_variances"):
        replicate_mean_ci(values, within_variances=[0.03])


def test_spearman_variance_is_bonett_wright():
    """rho 0.5 over 23 pairs: (1 - 0.25)^2 (1 + 0.125) / 20 = 0.031640625; n <= 3: undefined."""
    from lit_prune.analysis.stats import spearman_variance

    assert spearman_variance(0.5, 23) == pytest.approx(0.031640625)
    assert spearman_variance(1.0, 50) == 0.0
    assert math.isnan(spearman_variance(0.5, 3)) and math.isnan(spearman_variance(float("nan"), 50))

"""Seed stability, geometric / functional survival and fragility on hand-made examples."""

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from lit_prune.analysis.fragility import (
    breaking_points,
    firing_rate_analysis,
    firing_rate_bins,
    fragility,
    fragility_predictors,
    rho_bin,
    survival_by_bin,
)
from lit_prune.analysis.survival import (
    PearsonAccumulator,
    functional_survival,
    geometric_survival,
    normalised_survival,
    seed_stability,
    wanda_magnitude_ratio,
)
from lit_prune.errors import LitPruneError

NAN = float("nan")


def _rand(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _dense_and_pruned():
    """Dense SAE = e1..e4 in R^8; pruned SAE keeps e1, e2, tilts e3 to cos 0.8, e4 to 0.3."""
    eye = torch.eye(8)
    dense = eye[:4] * torch.tensor([[1.0], [2.0], [0.5], [3.0]])  # norms must not matter
    pruned = torch.stack(
        [eye[0], eye[1], 0.8 * eye[2] + 0.6 * eye[4], 0.3 * eye[3] + math.sqrt(1 - 0.09) * eye[5]]
    )
    return dense, pruned


# --- RQ2 geometric -------------------------------------------------------------------


def test_geometric_survival_of_sae_with_itself_is_one():
    dec = _rand(64, 16, 0)
    out = geometric_survival(dec, dec, torch.ones(64, dtype=torch.bool))
    assert out["S"] == {0.5: 1.0, 0.7: 1.0, 0.9: 1.0}
    torch.testing.assert_close(out["cosine"], torch.ones(64))
    assert out["mmcs_dense_to_pruned"] == pytest.approx(1.0, abs=1e-6)
    assert out["mmcs_pruned_to_dense"] == pytest.approx(1.0, abs=1e-6)


def test_geometric_survival_hand_made():
    dense, pruned = _dense_and_pruned()
    out = geometric_survival(dense, pruned, None)
    torch.testing.assert_close(out["cosine"], torch.tensor([1.0, 1.0, 0.8, 0.3]))
    assert out["partner"].tolist() == [0, 1, 2, 3]
    assert out["S"] == pytest.approx({0.5: 0.75, 0.7: 0.75, 0.9: 0.5})
    assert out["mmcs_dense_to_pruned"] == pytest.approx(3.1 / 4, abs=1e-6)
    assert out["mmcs_pruned_to_dense"] == pytest.approx(3.1 / 4, abs=1e-6)
    alive = torch.tensor([True, True, True, False])  # the 0.3 feature is dead: excluded
    out = geometric_survival(dense, pruned, alive)
    assert out["S"] == pytest.approx({0.5: 1.0, 0.7: 1.0, 0.9: 2 / 3})
    assert out["mean_cosine"] == pytest.approx(2.8 / 3, abs=1e-6)


def test_normalised_survival():
    assert normalised_survival(0.6, 0.8) == pytest.approx(0.75)
    assert math.isnan(normalised_survival(0.6, 0.0))
    assert math.isnan(normalised_survival(0.6, NAN))


def test_wanda_magnitude_ratio():
    out = wanda_magnitude_ratio(
        {0.3: 0.9, 0.5: 0.74, 0.7: 0.2, 0.9: 0.0}, {0.3: 0.9, 0.5: 0.2, 0.7: 0.1, 0.9: 0.0, 0.95: 0.0}
    )
    assert out["ratio"][0.3] == pytest.approx(1.0) and out["ratio"][0.5] == pytest.approx(3.7)
    assert math.isnan(out["ratio"][0.9]) and 0.95 not in out["ratio"]
    assert out["max"] == pytest.approx(3.7) and out["argmax"] == 0.5
    assert wanda_magnitude_ratio({0.5: 0.1}, {0.5: 0.0})["ratio"][0.5] == math.inf


# --- RQ1 ---------------------------------------------------------------------------------


def test_seed_stability_hand_made():
    # seed 1 = seed 0 permuted and rescaled; seed 2 unrelated (random 64-d: cos << 0.7)
    a = _rand(40, 64, 1)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(2))
    out = seed_stability([a, 3.0 * a[perm], _rand(40, 64, 3)])
    pairs = {(p["i"], p["j"]): p for p in out["pairs"]}
    assert set(pairs) == {(0, 1), (0, 2), (1, 2)}
    assert pairs[0, 1]["shared"] == pytest.approx({0.5: 1.0, 0.7: 1.0, 0.9: 1.0})
    assert pairs[0, 1]["mmcs_ij"] == pytest.approx(1.0, abs=1e-6)
    assert pairs[0, 1]["mmcs_ji"] == pytest.approx(1.0, abs=1e-6)
    assert pairs[0, 1]["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert pairs[0, 2]["shared"][0.7] == 0.0 and pairs[0, 2]["mean_cosine"] < 0.5
    # each feature of seeds 0 and 1 is shared in 1 of its 2 pairs; seed 2's in none
    torch.testing.assert_close(out["stability"][0], torch.full((40,), 0.5))
    torch.testing.assert_close(out["stability"][1], torch.full((40,), 0.5))
    torch.testing.assert_close(out["stability"][2], torch.zeros(40))


def test_seed_stability_alive_masks_and_errors():
    a = _rand(10, 8, 4)
    alive = [torch.arange(10) < 5, torch.ones(10, dtype=torch.bool)]
    out = seed_stability([a, a], taus=(0.7,), alive=alive)
    assert out["pairs"][0]["shared"] == {0.7: 1.0}
    with pytest.raises(LitPruneError, match="len\\(decoders\\)"):
        seed_stability([a])


# --- RQ2 functional ----------------------------------------------------------------------


def _acts(seed, tokens=300, n=6):
    rng = np.random.default_rng(seed)
    f = np.maximum(rng.normal(size=(tokens, n)), 0.0)  # ReLU-like: sparse, non-negative
    g = np.maximum(f + 0.3 * rng.normal(size=(tokens, n)), 0.0)
    return f, g


def test_pearson_accumulator_equals_corrcoef_of_concatenation():
    f, g = _acts(0)
    f[:, 0] += 1e4  # large mean, small spread: naive sums would cancel
    acc = PearsonAccumulator()
    for s, e in [(0, 7), (7, 100), (100, 101), (101, 300)]:  # uneven chunks
        acc.update(torch.from_numpy(f[s:e]).float(), torch.from_numpy(g[s:e]).float())
    f32, g32 = f.astype(np.float32).astype(np.float64), g.astype(np.float32).astype(np.float64)
    expected = [np.corrcoef(f32[:, i], g32[:, i])[0, 1] for i in range(f.shape[1])]
    np.testing.assert_allclose(acc.compute().numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(acc.max_a.numpy(), f32.max(0))


def test_functional_survival_hand_made():
    t = torch.arange(1.0, 9.0)  # 8 tokens
    f_dense = torch.stack([t, t, t, torch.zeros(8), t, t], dim=1)
    const = torch.full((8,), 0.1)  # constant but non-zero: float rounding must not fake an r
    f_pruned = torch.stack([2 * t + 1, -t, torch.zeros(8), torch.zeros(8), t % 2, const], 1)
    out = functional_survival(f_dense, f_pruned, threshold=0.7, chunk=3)
    r = out.r
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(-1.0)
    assert math.isnan(r[2]) and math.isnan(r[3])  # silent in pruned / never fires
    expected4 = np.corrcoef(t.numpy(), (t % 2).numpy())[0, 1]
    assert r[4] == pytest.approx(expected4, abs=1e-6)
    assert math.isnan(r[5])
    assert out.alive.tolist() == [True, True, True, False, True, True]
    assert out.fraction == pytest.approx(1 / 5)  # only feature 0 of the 5 alive survives


# --- RQ4 fragility -----------------------------------------------------------------------


def test_firing_rate_bins_hand_computed():
    # log10 p = -10..-1; 5-quantile edges -8.2, -6.4, -4.6, -2.8 -> two per bin
    p = 10.0 ** -torch.arange(10, 0, -1, dtype=torch.float64)
    assert firing_rate_bins(p).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    # ties: median of (-5,-4,-3,-3,-2,-1) is -3, and both -3's share the lower bin
    p = torch.tensor([0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1e-5, 1e-3], dtype=torch.float64)
    assert firing_rate_bins(p, n_bins=2).tolist() == [-1, 0, 0, 1, 1, 0, 0]


def test_survival_by_bin_and_rho_bin():
    p = 10.0 ** -np.arange(10, 0, -1.0)
    c = [0.9, 0.9, 0.9, 0.1, 0.8, NAN, 0.1, 0.1, 0.1, 0.1]  # NaN = unmatched = lost
    assert survival_by_bin(c, p, tau=0.7) == [1.0, 0.5, 0.5, 0.0, 0.0]
    # tied rates: edges (-3, -3, -3, -2.6) leave bins 1..3 empty -> NaN
    tied = survival_by_bin([0.9, 0.1, 0.9, 0.9, 0.2], [1e-3] * 4 + [1e-1], tau=0.7)
    assert tied[0] == 0.75 and tied[4] == 0.0 and all(math.isnan(v) for v in tied[1:4])
    assert rho_bin([1.0, 0.75, 0.5, 0.25, 0.0])[0] == pytest.approx(-1.0)
    assert rho_bin([1.0, 0.5, 0.5, 0.0, 0.0])[0] == pytest.approx(
        sps.spearmanr(range(5), [1.0, 0.5, 0.5, 0.0, 0.0]).statistic
    )


def test_firing_rate_analysis_feature_level_matches_scipy():
    rng = np.random.default_rng(7)
    p = np.concatenate([10 ** rng.uniform(-5, -1, size=200), np.zeros(20)])
    logp = np.log10(np.where(p > 0, p, 1.0))
    c = np.clip(0.5 - 0.1 * logp + 0.1 * rng.normal(size=220), -1, 1)  # rare = more robust
    out = firing_rate_analysis(c, p, n_boot=50, seed=0)
    ref = sps.spearmanr(np.log10(p[:200]), c[:200])
    assert out["n_alive"] == 200
    assert out["rho_feature"] == pytest.approx(ref.statistic)
    assert out["rho_feature_p"] == pytest.approx(ref.pvalue, rel=1e-6)
    lo, hi = out["rho_feature_ci"]
    assert lo <= out["rho_feature"] <= hi
    assert len(out["survival_by_bin"]) == 5 and -1.0 <= out["rho_bin"] <= 1.0


def test_breaking_points_and_fragility_hand_made():
    cos = {
        0.5: torch.tensor([0.9, 0.6, 0.8, NAN]),
        0.3: torch.tensor([0.95, 0.8, 0.6, 0.9]),
        0.7: torch.tensor([0.8, 0.9, 0.2, 0.9]),
    }
    assert breaking_points(cos, tau=0.7).tolist() == [math.inf, 0.5, 0.3, 0.5]
    expected = [1 - 2.65 / 3, 1 - 2.3 / 3, 1 - 1.6 / 3, 1 - 1.8 / 3]  # NaN counts as 0
    np.testing.assert_allclose(fragility(cos).numpy(), expected, rtol=1e-6)


def test_fragility_predictors():
    F = np.array([0.1, 0.4, 0.3, 0.9, 0.5])
    preds = {"same": F * 2, "reverse": -F, "noisy": np.array([1.0, 3.0, 2.0, 5.0, np.nan])}
    out = fragility_predictors(F, preds)
    assert out["same"][0] == pytest.approx(1.0) and out["reverse"][0] == pytest.approx(-1.0)
    assert out["noisy"] == pytest.approx(tuple(sps.spearmanr(F[:4], [1.0, 3.0, 2.0, 5.0])))
    masked = fragility_predictors(F, {"x": F}, mask=np.array([1, 1, 0, 0, 0], dtype=bool))
    assert all(math.isnan(v) for v in masked["x"])  # 2 features left: undefined


def test_seed_pairs_enumerates_every_ordered_cross_pair():
    from lit_prune.analysis.survival import seed_pairs

    cross, same = seed_pairs([0, 1, 2], [0, 1, 2])
    assert cross == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)] and same == [(0, 0), (1, 1), (2, 2)]
    cross, same = seed_pairs([0, 1, 2])  # within one set (the dense seed baseline): no same-seed pairs
    assert cross == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)] and same == []
    assert seed_pairs([3]) == ([], []) and seed_pairs([3], [3]) == ([], [(3, 3)])


def test_pair_cosines_reads_the_reverse_pair_from_the_same_matching():
    from lit_prune.analysis.matching import match_features
    from lit_prune.analysis.survival import pair_cosines

    gen = torch.Generator().manual_seed(0)
    dec = {s: torch.randn(12, 6, generator=gen) for s in (0, 1, 2)}
    within = pair_cosines(dec, None, [(0, 1), (1, 0), (2, 0)])
    assert within.shape == (3, 12)
    assert torch.allclose(within[0], match_features(dec[0], dec[1]).cosine.float(), equal_nan=True)
    assert torch.allclose(within[1], match_features(dec[1], dec[0]).cosine.float(), equal_nan=True)
    assert torch.allclose(within[2], match_features(dec[2], dec[0]).cosine.float(), equal_nan=True)
    other = {s: d + 0.1 for s, d in dec.items()}
    across = pair_cosines(dec, other, [(0, 1), (1, 0), (1, 1)])
    assert torch.allclose(across[1], match_features(dec[1], other[0]).cosine.float(), equal_nan=True)


def test_rho_bin_p_is_the_exact_permutation_p():
    assert rho_bin([0.5, 0.4, 0.3, 0.2, 0.1]) == (pytest.approx(-1.0), pytest.approx(2 / 120))

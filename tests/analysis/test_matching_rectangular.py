"""Rectangular one-to-one matching (n_a != n_b): the "exact" solver equals scipy's
linear_sum_assignment (total and matched cosines) in both orientations, on random and planted
decoders, including a case where the 8-candidate "sparse" solver is not optimal; its LP duals
certify optimality (docs/methods.md §3)."""

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from lit_prune.analysis import matching
from lit_prune.analysis.matching import cosine_matrix, match_features, shared_fraction, unit_rows


def _rand(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _planted(n: int, extra: int, d: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """a [n, d] unit rows; b [n + extra, d]: a permuted plus noise, then `extra` unrelated rows."""
    g = torch.Generator().manual_seed(seed)
    a = unit_rows(torch.randn(n, d, generator=g))
    copy = a[torch.randperm(n, generator=g)] + noise / d**0.5 * torch.randn(n, d, generator=g)
    return a, torch.cat([copy, torch.randn(extra, d, generator=g)])


def _lsa(a, b) -> tuple[float, np.ndarray]:
    """scipy's optimum: total and the partner of every row of a (-1 if unmatched), in float64."""
    c = cosine_matrix(a, b).double().numpy()
    r, j = linear_sum_assignment(c, maximize=True)
    partner = np.full(a.shape[0], -1)
    partner[r] = j
    return float(c[r, j].sum()), partner


def _assert_equals_scipy(a, b, m) -> None:
    total, partner = _lsa(a, b)
    assert m.method == "exact"
    assert m.total == pytest.approx(total, abs=1e-4)
    matched = partner >= 0
    assert int((m.partner >= 0).sum()) == min(a.shape[0], b.shape[0])
    assert len(set(m.partner[m.partner >= 0].tolist())) == min(a.shape[0], b.shape[0])
    assert torch.isnan(m.cosine[m.partner < 0]).all()
    # random continuous decoders have a unique optimum: the same pairs, the same cosines
    assert np.array_equal(m.partner.numpy(), partner)
    c = cosine_matrix(a, b)
    torch.testing.assert_close(
        m.cosine[matched], c[torch.from_numpy(np.flatnonzero(matched)), m.partner[matched]]
    )
    torch.testing.assert_close(m.best_a, c.max(dim=1).values)
    torch.testing.assert_close(m.best_b, c.max(dim=0).values)


@pytest.mark.parametrize("shape", [(300, 340, 32), (340, 300, 32), (120, 400, 16), (400, 120, 8)])
@pytest.mark.parametrize("candidates", [1, 8])
def test_exact_equals_scipy_on_random_rectangular_decoders(shape, candidates):
    # 1 candidate: the first graph misses most optimal pairs, so pricing must add them back.
    n_a, n_b, d = shape
    a, b = _rand(n_a, d, n_a + 7 * n_b), _rand(n_b, d, n_b + 11 * n_a)
    _assert_equals_scipy(a, b, match_features(a, b, "exact", candidates))


@pytest.mark.parametrize("flip", [False, True])
def test_exact_equals_scipy_where_8_candidates_are_not_optimal(flip):
    # Planted: b is a noisy permuted copy of a plus 60 unrelated rows (n_a = 400 < n_b = 460,
    # or the reverse with flip). The old rectangular solver ("sparse", 8 candidates) loses
    # 0.025 of total cosine here and a feature at tau = 0.7; "exact" is scipy's answer.
    a, b = _planted(400, 60, 16, 1.0, 0)
    if flip:
        a, b = b, a
    best, partner = _lsa(a, b)
    sparse = match_features(a, b, "sparse", 8)
    assert sparse.total < best - 1e-2
    exact = match_features(a, b, "exact", 8)
    _assert_equals_scipy(a, b, exact)
    c = cosine_matrix(a, b).double().numpy()
    scipy_cos = np.full(a.shape[0], np.nan)
    scipy_cos[partner >= 0] = c[np.flatnonzero(partner >= 0), partner[partner >= 0]]
    want = shared_fraction(torch.from_numpy(scipy_cos), (0.5, 0.7, 0.9))
    assert shared_fraction(exact.cosine, (0.5, 0.7, 0.9)) == want
    assert shared_fraction(sparse.cosine, (0.7,))[0.7] < want[0.7]


@pytest.mark.parametrize("flip", [False, True])
def test_exact_recovers_planted_permutation_with_extra_columns(flip):
    # Low noise: every row of a finds its own copy, and the extra rows of b stay unmatched.
    g = torch.Generator().manual_seed(5)
    a = unit_rows(torch.randn(200, 24, generator=g))
    perm = torch.randperm(200, generator=g)
    b = torch.cat([a[perm] + 0.05 * torch.randn(200, 24, generator=g), torch.randn(50, 24, generator=g)])
    copy_of = torch.argsort(perm)  # b[copy_of[i]] is the copy of a[i]
    if flip:
        m = match_features(b, a, "exact", 4)
        _assert_equals_scipy(b, a, m)
        assert torch.equal(m.partner[copy_of], torch.arange(200))
        assert (m.partner[200:] == -1).all()
    else:
        m = match_features(a, b, "exact", 4)
        _assert_equals_scipy(a, b, m)
        assert torch.equal(m.partner, copy_of)


def test_rectangular_duals_certify_optimality():
    # The final duals, over every pair: u_i + v_j >= C_ij, v >= 0, v = 0 on unmatched columns,
    # equality on the matching, and sum u + sum v = total (strong duality of the rectangular LP).
    from lit_prune.analysis.matching_exact import column_duals, exact_matching, row_duals, strip_candidates

    a, b = unit_rows(_rand(150, 12, 52)), unit_rows(_rand(190, 12, 53))
    partner = exact_matching(a, b, 2)[0]
    rows, cols, cos, *_ = strip_candidates(a, b, 190)  # every pair a candidate: duals over all of C
    u = row_duals(rows, cols, cos, partner, n_cols=190)
    c = (a.double() @ b.double().T).numpy()
    matched_cos = c[np.arange(150), partner]
    v = column_duals(u, partner, matched_cos, 190)
    unmatched = np.setdiff1d(np.arange(190), partner)
    assert unmatched.size == 40 and (v[unmatched] == 0).all()
    assert (v >= -1e-12).all()
    assert (u[:, None] + v[None, :] >= c - 1e-6).all()
    assert u.sum() + v.sum() == pytest.approx(matched_cos.sum(), abs=1e-9)
    r, j = linear_sum_assignment(c, maximize=True)
    assert matched_cos.sum() == pytest.approx(c[r, j].sum(), abs=150e-6)


def test_exact_matching_refuses_more_rows_than_columns():
    from lit_prune.analysis.matching_exact import exact_matching

    with pytest.raises(ValueError, match="n_a <= n_b"):
        exact_matching(unit_rows(_rand(5, 3, 0)), unit_rows(_rand(4, 3, 1)), 2)


def test_auto_picks_exact_on_rectangular_inputs(monkeypatch):
    # Above EXACT_MIN latents on the larger side "auto" is the certified solver at any shape
    # (the threshold is lowered here to keep the test small).
    monkeypatch.setattr(matching, "EXACT_MIN", 100)
    a, b = _rand(180, 16, 90), _rand(240, 16, 91)
    for x, y in ((a, b), (b, a)):
        m = match_features(x, y)
        _assert_equals_scipy(x, y, m)
    assert match_features(a[:50], b[:80]).method == "hungarian"


def test_rectangular_falls_back_without_dense_matrix_above_hungarian_max(monkeypatch):
    # If the duals never settle, the fallback above HUNGARIAN_MAX is the sparse solver, never the
    # dense float64 matrix.
    monkeypatch.setattr(matching, "HUNGARIAN_MAX", 100)
    monkeypatch.setattr(matching, "_exact", lambda a, b, k: None)
    monkeypatch.setattr(matching, "_hungarian", lambda a, b: pytest.fail("dense solver above HUNGARIAN_MAX"))
    m = match_features(_rand(150, 8, 92), _rand(120, 8, 93), "exact")
    assert m.method == "sparse"


@pytest.mark.parametrize("flip", [False, True])
def test_exact_on_rectangular_clusters_duplicates_and_dead_latents(flip):
    # Near-duplicate clusters, exact duplicate rows (tied cosines: the total is unique, the pairs
    # need not be) and all-zero rows (cosine 0 to everything) on the larger side.
    g = torch.Generator().manual_seed(2)
    cent = torch.randn(10, 16, generator=g)
    a = cent.repeat_interleave(25, 0) + 0.3 * torch.randn(250, 16, generator=g)
    b = cent.repeat_interleave(30, 0) + 0.3 * torch.randn(300, 16, generator=g)
    a[:20] = a[20:40]
    b[270:] = 0.0
    if flip:
        a, b = b, a
    m = match_features(a, b, "exact", 2)
    assert m.method == "exact"
    assert m.total == pytest.approx(_lsa(a, b)[0], abs=1e-4)
    assert len(set(m.partner[m.partner >= 0].tolist())) == int((m.partner >= 0).sum()) == 250


@pytest.mark.parametrize("flip", [False, True])
def test_exact_when_rectangular_candidates_have_no_full_matching(flip):
    # Every row of the smaller side picks the same hub as its single candidate: the first graph
    # matches one row, the others are paired with free columns and pricing repairs the rest.
    g = torch.Generator().manual_seed(3)
    hub = torch.randn(1, 16, generator=g)
    a = hub + 0.05 * torch.randn(150, 16, generator=g)
    b = torch.randn(200, 16, generator=g)
    b[0] = hub
    if flip:
        a, b = b, a
    _assert_equals_scipy(a, b, match_features(a, b, "exact", 1))

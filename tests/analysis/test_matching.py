"""Decoder matching: closed-form cosines/MMCS, permutation recovery, sparse == Hungarian."""

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import ROOT
from scipy.optimize import linear_sum_assignment

from lit_prune.analysis.fragility import breaking_points, survival_by_bin
from lit_prune.analysis.matching import (
    cosine_matrix,
    match_features,
    mmcs,
    shared_fraction,
    unit_rows,
)
from lit_prune.analysis.matching_candidates import row_topk, top_candidates
from lit_prune.errors import LitPruneError

R2 = math.sqrt(2.0)
METHODS = ("hungarian", "sparse")


def _rand(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _lsa_total(a, b) -> float:
    c = cosine_matrix(a, b).double().numpy()
    r, j = linear_sum_assignment(c, maximize=True)
    return float(c[r, j].sum())


def test_unit_rows_keeps_zero_rows_zero():
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]])
    expected = torch.tensor([[0.6, 0.8], [0.0, 0.0], [0.0, -1.0]])
    torch.testing.assert_close(unit_rows(w), expected)


def test_cosine_matrix_and_mmcs_hand_computed():
    a = torch.tensor([[2.0, 0.0], [0.0, 5.0], [1.0, 1.0]])  # e1, e2, (e1+e2)/sqrt2
    b = torch.tensor([[3.0, 0.0], [-1.0, 1.0]])  # e1, (-e1+e2)/sqrt2
    expected = torch.tensor([[1.0, -1 / R2], [0.0, 1 / R2], [1 / R2, 0.0]])
    torch.testing.assert_close(cosine_matrix(a, b), expected)
    for chunk in (1, 2, 4096):  # tiling must not change the answer
        assert mmcs(a, b, chunk=chunk) == pytest.approx((1 + R2) / 3, abs=1e-6)
        assert mmcs(b, a, chunk=chunk) == pytest.approx((1 + 1 / R2) / 2, abs=1e-6)


def test_mmcs_2x2_with_zero_row():
    a = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # a zero row has cosine 0 to everything
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert mmcs(a, b) == pytest.approx((1 / R2 + 0.0) / 2, abs=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_self_match_is_identity_with_cosine_one(method):
    dec = _rand(200, 16, 0)
    m = match_features(dec, dec, method)
    assert torch.equal(m.partner, torch.arange(200))
    torch.testing.assert_close(m.cosine, torch.ones(200))
    assert m.total == pytest.approx(200.0, abs=1e-3)
    assert shared_fraction(m.cosine) == {0.5: 1.0, 0.7: 1.0, 0.9: 1.0}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("candidates", [2, 8])
def test_recovers_permutation_of_rescaled_rows(method, candidates):
    g = torch.Generator().manual_seed(1)
    a = _rand(300, 32, 2)
    perm = torch.randperm(300, generator=g)
    b = a[perm] * (0.1 + 10 * torch.rand(300, 1, generator=g))  # norms must not matter
    m = match_features(a, b, method, candidates=candidates)
    assert torch.equal(m.partner, torch.argsort(perm))  # b[inv[i]] = a[i]
    torch.testing.assert_close(m.cosine, torch.ones(300))


@pytest.mark.parametrize("n_a,n_b,k", [(70, 100, 5), (4500, 600, 3), (40, 3, 8), (31, 700, 40)])
def test_top_candidates_equal_brute_force_top_k(n_a, n_b, k):
    # sizes that are not multiples of the 32-entry groups or the 256-row blocks, and
    # more than one wave of blocks (4500 rows), exercise padding, the column merge
    # and the two-stage (group max, then exact refine) top-k
    a, b = unit_rows(_rand(n_a, 16, n_a)), unit_rows(_rand(n_b, 16, n_b))
    rows, cols, cos, best_a, best_b = top_candidates(a, b, k)
    c = a @ b.T
    want = {(i, int(j)) for i in range(n_a) for j in c[i].topk(min(k, n_b)).indices}
    want |= {(int(i), j) for j in range(n_b) for i in c[:, j].topk(min(k, n_a)).indices}
    assert set(zip(rows.tolist(), cols.tolist(), strict=True)) == want
    np.testing.assert_allclose(cos, c[rows, cols].double().numpy(), atol=1e-6)
    torch.testing.assert_close(best_a, c.max(dim=1).values)
    torch.testing.assert_close(best_b, c.max(dim=0).values)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_total_equals_linear_sum_assignment(seed):
    # Random decoders are the hard case: the optimal partner can sit ~10 deep in both
    # rank lists at n=300, so 16 candidates are needed here to be exact.
    a, b = _rand(300, 32, 10 + seed), _rand(300, 32, 20 + seed)
    assert match_features(a, b, "sparse", candidates=2).total <= _lsa_total(a, b) + 1e-4
    m = match_features(a, b, "sparse", candidates=16)
    assert m.method == "sparse" and m.n_residual == 0
    assert m.total == pytest.approx(_lsa_total(a, b), abs=1e-3)
    h = match_features(a, b, "hungarian")
    assert h.total == pytest.approx(_lsa_total(a, b), abs=1e-3)


def test_sparse_on_clustered_decoders_needs_enough_candidates():
    # 10 tight clusters of 30 near-duplicates: the best assignment inside a cluster
    # uses edges beyond a row's top-2, so k=2 is suboptimal and k=16 is exact.
    g = torch.Generator().manual_seed(1)
    cent = torch.randn(10, 16, generator=g).repeat_interleave(30, 0)
    a = cent + 0.3 * torch.randn(300, 16, generator=g)
    b = cent + 0.3 * torch.randn(300, 16, generator=g)
    best = _lsa_total(a, b)
    few = match_features(a, b, "sparse", candidates=2)
    assert few.total < best - 1e-2  # a subgraph can only lose
    assert match_features(a, b, "sparse", candidates=16).total == pytest.approx(best, abs=1e-3)


def _hub_decoders() -> tuple[torch.Tensor, torch.Tensor]:
    """200 rows of a near one hub; the hub is row 0 of b: every row's top candidate is column 0."""
    g = torch.Generator().manual_seed(3)
    hub = torch.randn(1, 16, generator=g)
    a = hub + 0.05 * torch.randn(200, 16, generator=g)
    b = torch.randn(200, 16, generator=g)
    b[0] = hub
    return a, b


def test_sparse_falls_back_when_candidate_graph_has_no_full_matching():
    # Every row of a points at the same hub column of b: top-1 candidates cannot match
    # everyone, so the dummy-edge solve plus the residual round must finish the job.
    a, b = _hub_decoders()
    m = match_features(a, b, "sparse", candidates=1)
    assert m.n_residual > 0
    assert sorted(m.partner.tolist()) == list(range(200))  # still a permutation
    c = cosine_matrix(a, b)
    torch.testing.assert_close(m.cosine, c[torch.arange(200), m.partner])
    assert m.total <= _lsa_total(a, b) + 1e-3


@pytest.mark.parametrize("method", METHODS)
def test_rectangular_matches_min_side(method):
    a, b = _rand(50, 8, 4), _rand(30, 8, 5)
    wide = match_features(b, a, method)  # 30 rows into 50 columns: all matched
    assert (wide.partner >= 0).all() and len(set(wide.partner.tolist())) == 30
    assert wide.total == pytest.approx(_lsa_total(b, a), abs=1e-3)
    tall = match_features(a, b, method)  # 50 rows into 30 columns: 20 unmatched
    assert int((tall.partner >= 0).sum()) == 30
    assert torch.isnan(tall.cosine[tall.partner < 0]).all()
    assert tall.total == pytest.approx(_lsa_total(a, b), abs=1e-3)
    assert shared_fraction(tall.cosine, (-1.0,)) == {-1.0: 30 / 50}  # NaN = not shared


@pytest.mark.parametrize("method", METHODS)
def test_result_fields_are_consistent(method):
    a, b = _rand(120, 12, 6), _rand(90, 12, 7)
    m = match_features(a, b, method)
    c = cosine_matrix(a, b)
    ok = m.partner >= 0
    torch.testing.assert_close(m.cosine[ok], c[ok.nonzero().squeeze(1), m.partner[ok]])
    torch.testing.assert_close(m.best_a, c.max(dim=1).values)
    torch.testing.assert_close(m.best_b, c.max(dim=0).values)
    assert float(m.best_a.mean()) == pytest.approx(mmcs(a, b), abs=1e-6)
    assert m.total <= m.upper_bound + 1e-4


def test_auto_uses_hungarian_for_small_inputs():
    a = _rand(10, 4, 8)
    assert match_features(a, a).method == "hungarian"


# --- "exact": sparse candidates + dual certificate (matching_exact) -----------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("candidates", [1, 2, 8])
def test_exact_equals_linear_sum_assignment_on_random_decoders(seed, candidates):
    # Random decoders are the hard case for candidate graphs (see the sparse test above): with
    # 1 or 2 candidates the first graph misses optimal pairs, and pricing must add them back.
    a, b = _rand(300, 32, 30 + seed), _rand(300, 32, 40 + seed)
    m = match_features(a, b, "exact", candidates=candidates)
    assert m.method == "exact" and m.rounds >= 1
    assert sorted(m.partner.tolist()) == list(range(300))
    assert m.total == pytest.approx(_lsa_total(a, b), abs=1e-4)
    c = cosine_matrix(a, b)
    torch.testing.assert_close(m.cosine, c[torch.arange(300), m.partner])
    torch.testing.assert_close(m.best_a, c.max(dim=1).values)
    torch.testing.assert_close(m.best_b, c.max(dim=0).values)


def test_exact_on_clustered_duplicated_and_zero_rows():
    # Near-duplicate clusters (where "sparse" with 2 candidates is suboptimal), exact duplicate
    # rows (tied cosines) and all-zero rows (cosine 0 to everything).
    g = torch.Generator().manual_seed(1)
    cent = torch.randn(10, 16, generator=g).repeat_interleave(30, 0)
    a = cent + 0.3 * torch.randn(300, 16, generator=g)
    b = cent + 0.3 * torch.randn(300, 16, generator=g)
    a[:20] = a[20:40]  # exact duplicates
    b[280:] = 0.0  # dead latents
    m = match_features(a, b, "exact", candidates=2)
    assert m.method == "exact"
    assert m.total == pytest.approx(_lsa_total(a, b), abs=1e-4)
    assert match_features(a, b, "sparse", candidates=2).total < m.total - 1e-2


def test_exact_when_candidates_have_no_perfect_matching():
    # Every row's single candidate is the same hub column: the candidate graph has no perfect
    # matching, so "exact" adds column candidates or falls back; the answer stays optimal.
    a, b = _hub_decoders()
    m = match_features(a, b, "exact", candidates=1)
    assert sorted(m.partner.tolist()) == list(range(200))
    assert m.total == pytest.approx(_lsa_total(a, b), abs=1e-4)


def test_exact_duals_certify_optimality():
    # The duals the solver ends with are feasible for EVERY pair and tight on the matching, and
    # their sum equals the total (strong duality): the certificate that makes the answer exact.
    from lit_prune.analysis.matching_exact import column_duals, exact_matching, row_duals, strip_candidates

    a, b = unit_rows(_rand(150, 12, 50)), unit_rows(_rand(150, 12, 51))
    partner = exact_matching(a, b, 2)[0]
    rows, cols, cos, *_ = strip_candidates(a, b, 150)  # every pair a candidate: duals over all of C
    u = row_duals(rows, cols, cos, partner)
    c = (a.double() @ b.double().T).numpy()
    v = column_duals(u, partner, c[np.arange(150), partner])
    assert (u[:, None] + v[None, :] >= c - 1e-6).all()
    assert u.sum() + v.sum() == pytest.approx(c[np.arange(150), partner].sum(), abs=1e-9)
    r, j = linear_sum_assignment(c, maximize=True)
    # optimal up to the float32 cosines the solver works with (n * 1e-6 by the duality bound)
    assert c[np.arange(150), partner].sum() == pytest.approx(c[r, j].sum(), abs=150e-6)


def test_row_topk_by_groups_equals_full_topk():
    c = torch.randn(40, 320, generator=torch.Generator().manual_seed(3))
    c[0, 64:70] = 5.0 + torch.arange(6.0)  # one row's whole top-k inside a single group
    c[1] = 1.0  # all ties: any k entries are a valid answer
    c[2, ::32] = 9.0  # the top-k spread over k different groups
    values, idx = row_topk(c, 5)
    assert torch.equal(values, c.topk(5, dim=1).values)
    assert torch.equal(c.gather(1, idx), values)
    assert idx[0].tolist() == [69, 68, 67, 66, 65]
    assert all(len(set(row)) == 5 for row in idx.tolist())


def test_strip_candidates_hold_every_row_top_k_and_exact_maxima():
    # 512 columns: the GEMM strips and grouped top-k path; brute force from the dense matrix.
    from lit_prune.analysis.matching_exact import strip_candidates

    a, b = unit_rows(_rand(300, 16, 80)), unit_rows(_rand(512, 16, 81))
    rows, cols, cos, row_max, col_max, kth = strip_candidates(a, b, 6)
    c = (a @ b.T).numpy()
    top = np.sort(c, axis=1)[:, -6:]
    assert np.allclose(kth, top[:, 0], atol=1e-6)
    assert torch.allclose(row_max, torch.from_numpy(c.max(axis=1)), atol=1e-6)
    assert torch.allclose(col_max, torch.from_numpy(c.max(axis=0)), atol=1e-6)
    assert np.allclose(cos, c[rows, cols], atol=1e-6)
    per_row = np.bincount(rows, minlength=300)
    assert (per_row >= 6).all()
    for i in range(300):  # the candidates of row i include its 6 largest cosines
        assert np.allclose(np.sort(cos[rows == i])[-6:], top[i], atol=1e-6)


def test_price_finds_every_violated_non_candidate_pair():
    # The k-th-value bound may skip only pairs that cannot violate: compare with brute force for
    # arbitrary duals.
    from lit_prune.analysis.matching_exact import price, strip_candidates

    a, b = unit_rows(_rand(200, 8, 60)), unit_rows(_rand(230, 8, 61))
    rows, cols, _, _, _, kth = strip_candidates(a, b, 5)
    g = np.random.default_rng(0)
    u, v = g.uniform(0.0, 0.6, 200), g.uniform(0.0, 0.6, 230)
    c = (a @ b.T).numpy()
    violated = c > u[:, None] + v[None, :] + 1e-6
    candidate = np.zeros_like(violated)
    candidate[rows, cols] = True
    found = np.zeros_like(violated)
    r, j = price(a, b, u, v, kth, 1e-6, 2)
    found[r, j] = True
    assert (found <= violated).all()  # nothing reported that does not violate
    assert (found | candidate >= violated).all()  # every violated non-candidate pair reported
    assert (violated & ~candidate).sum() > 0  # the test exercises the bound


def test_auto_uses_exact_above_threshold_on_square_and_rectangular_inputs():
    a, b = _rand(1100, 8, 70), _rand(1100, 8, 71)
    m = match_features(a, b)
    assert m.method == "exact"
    assert m.total == pytest.approx(_lsa_total(a, b), abs=1e-3)
    rect = match_features(a[:1050], b)  # rectangular: the same certified solver
    assert rect.method == "exact"
    assert rect.total == pytest.approx(_lsa_total(a[:1050], b), abs=1e-3)


def test_shared_fraction_over_alive_only():
    cos = torch.tensor([0.95, 0.75, 0.55, float("nan"), 0.1])
    assert shared_fraction(cos) == pytest.approx({0.5: 0.6, 0.7: 0.4, 0.9: 0.2})
    alive = torch.tensor([True, True, False, False, False])
    assert shared_fraction(cos, (0.7, 0.9), alive) == pytest.approx({0.7: 1.0, 0.9: 0.5})
    assert math.isnan(shared_fraction(cos, (0.7,), torch.zeros(5, dtype=torch.bool))[0.7])


def test_a_cosine_at_tau_is_judged_alike_everywhere():
    """float32(0.7) = 0.699999988 < 0.7: not shared, not surviving in a bin, broken at once, and
    float32(0.7) + 1 ulp is shared everywhere (the fragility module compares in float64)."""
    at, above = torch.tensor([0.7] * 2), torch.tensor([np.nextafter(np.float32(0.7), np.float32(1))] * 2)
    p = torch.tensor([0.1, 0.1])
    for cos, shared in ((at, 0.0), (above, 1.0)):
        assert shared_fraction(cos, (0.7,)) == {0.7: shared}
        assert survival_by_bin(cos, p, 0.7, 1) == [shared]
        assert breaking_points({0.5: cos}, 0.7).tolist() == [0.5 if shared == 0 else math.inf] * 2


def test_bad_inputs_raise_one_line_errors():
    a = _rand(4, 3, 9)
    with pytest.raises(LitPruneError, match="method="):
        match_features(a, a, "greedy")
    with pytest.raises(LitPruneError, match="decoder shapes"):
        match_features(a, _rand(4, 5, 9))
    with pytest.raises(LitPruneError, match="candidates="):
        match_features(a, a, "sparse", candidates=0)


_BIG = """
import resource, time, torch
from lit_prune.analysis.matching import match_features
g = torch.Generator().manual_seed(0)
a, b = torch.randn(65536, 64, generator=g), torch.randn(65536, 64, generator=g)
t = time.time()
m = match_features(a, b, "auto")  # square: the "exact" solver (no dense C)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(m.method, int((m.partner >= 0).sum()), len(set(m.partner.tolist())), m.n_residual,
      round(m.total, 3), round(time.time() - t, 1), round(peak, 3))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("LIT_PRUNE_SLOW"), reason="set LIT_PRUNE_SLOW=1 (minutes)")
def test_matching_65536_fits_in_memory():
    # Separate process so ru_maxrss is this job's peak alone (GiB on Linux: KiB / 2**20).
    root = str(ROOT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_BIG)],
        check=True,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    ).stdout.split()
    method, matched, unique, _, total, secs, peak_gib = out
    print(f"65,536 x 65,536 exact matching: {secs} s, peak RSS {peak_gib} GiB, total {total}")
    assert method == "exact" and int(matched) == int(unique) == 65536
    assert float(peak_gib) < 4.0

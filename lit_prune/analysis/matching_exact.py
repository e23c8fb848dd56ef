"""Exact one-to-one matching without the dense cosine matrix: sparse candidates + LP duality.

Unit decoder rows a [n, d] (the smaller side) and b [m, d], m >= n: maximise the total cosine of
a matching that pairs every row of a (docs/methods.md §3). This returns the dense Hungarian
answer (`linear_sum_assignment` on C = a b^T) while holding O(n k) edges instead of C (2 GiB in
float64 at 16,384 latents):

1. Candidates (`strip_candidates`): every row's exact top-k cosines, one GEMM strip at a time,
   plus the top-k of the few columns that too few rows chose.
2. Solve the matching M on the candidate graph exactly (`min_weight_full_bipartite_matching`).
3. Duals (`row_duals`, `column_duals`): the LP of the problem is max sum C_ij x_ij with every
   row matched once and every column at most once; its dual is min sum u + sum v subject to
   u_i + v_j >= C_ij and v >= 0 (a column may stay unmatched, so its dual is non-negative, and
   0 when it is unmatched, by complementary slackness). With equality on M,
   v_j = C_{M^-1(j) j} - u_{M^-1(j)} on matched columns, and the conditions are longest-path
   ones: u_i >= u_i' + C_ij - C_i'j (j matched to i') and u_i >= C_ij (j unmatched), plus
   u_i <= C_{i M(i)} (v >= 0). The square case (m = n) is the same without the last two kinds.
   Bellman-Ford rounds settle them; they exist because M is optimal on the candidate graph
   (no positive cycle). For m > n the unmatched columns act as one node D (the m - n dummy rows
   of cosine 0 that would make the problem square, all alike): the edges D -> i (C_ij, j
   unmatched) and i -> D (-C_{i M(i)}) carry those extra conditions, and shifting by D's
   potential makes the unmatched columns' duals exactly 0.
4. Pricing (`price`): find every pair with C_ij > u_i + v_j + tol. A non-candidate C_ij is at most
   the row's k-th largest cosine, so only pairs with v_j < kth_i - u_i - tol need their cosine
   computed (~0.01-0.5% of pairs for random square decoders; every unmatched column of a row
   whose u_i is below its k-th cosine, for rectangular ones). None: (u, v) is feasible for the
   full problem and by LP duality M is optimal there too (to within n * tol; tol = 1e-6, below
   float32 cosine noise). Otherwise the violated pairs join the candidates: back to 2.

The cost is one GEMM pass over C (step 1) plus sparse solves; dense Hungarian is O(n^2 m).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from lit_prune.analysis.matching_candidates import one_thread_per_worker, row_topk, solve_candidates

_ROWS = 256  # rows per pricing block (and least rows per GEMM strip)
_STRIP_FLOATS = 2**25  # cosines in the GEMM strips of all workers together: 128 MiB
_MIN_DEGREE = 4  # columns in fewer rows' candidate lists also get their own top-k


def strip_candidates(a: torch.Tensor, b: torch.Tensor, k: int):
    """Candidate edges of C = a b^T: every row's exact top-k, plus the top-k of every column that
    is in fewer than _MIN_DEGREE rows' lists (so that the graph almost surely has a perfect
    matching); the exact row maxima [n_a] and column maxima [n_b]; and each row's k-th largest
    cosine [n_a] (float64), an upper bound on every non-candidate entry of the row.

    One GEMM strip per worker at a time (never the dense C), through numpy's BLAS: on this
    project's 2-core AMD machine, numpy's OpenBLAS ran these [m, d] x [d, n] float32 strips at
    140 GFLOPS against 80 for torch's MKL (measured in one process). Workers overlap one
    strip's reductions with another's GEMM. The row top-k is a cheap reduction next to the
    GEMM at any d, unlike a column top-k (~6x slower), so columns only get the max. Returns
    rows, cols (int64), cos (float64) sorted by row * n_b + col, row maxima, column maxima
    (float32) and the row k-th values.
    """
    n_a, n_b = a.shape[0], b.shape[0]
    kr, kc = min(k, n_b), min(k, n_a)
    a_np, b_t = a.numpy(), np.ascontiguousarray(b.numpy().T)

    def scan(s: int):
        c = torch.from_numpy(a_np[s : s + strip] @ b_t)  # [m, n_b]
        return (*row_topk(c, kr), c.amax(dim=0))

    def scan_cols(t: int):
        top = torch.nn.functional.linear(b[low[t : t + _ROWS]], a).topk(kc, dim=1)
        return top.values, top.indices

    with one_thread_per_worker() as workers, ThreadPoolExecutor(workers) as pool:
        strip = max(_ROWS, _STRIP_FLOATS // (n_b * workers))  # bounded memory on any core count
        parts = list(pool.map(scan, range(0, n_a, strip)))
        row_v, row_i = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        col_max = torch.stack([p[2] for p in parts]).amax(dim=0)
        del parts
        low = torch.nonzero(torch.bincount(row_i.reshape(-1), minlength=n_b) < _MIN_DEGREE).squeeze(1)
        cols_part = list(pool.map(scan_cols, range(0, low.numel(), _ROWS)))
    rows = [np.repeat(np.arange(n_a), kr)]
    cols = [row_i.reshape(-1).numpy()]
    cos = [row_v.reshape(-1).numpy()]
    if cols_part:
        col_v, col_i = torch.cat([p[0] for p in cols_part]), torch.cat([p[1] for p in cols_part])
        rows.append(col_i.reshape(-1).numpy())
        cols.append(np.repeat(low.numpy(), kc))
        cos.append(col_v.reshape(-1).numpy())
    rows, cols, cos = np.concatenate(rows), np.concatenate(cols), np.concatenate(cos)
    _, first = np.unique(rows * n_b + cols, return_index=True)
    kth = row_v[:, -1].double().numpy()
    return rows[first], cols[first], cos[first].astype(np.float64), row_v[:, 0].clone(), col_max, kth


def row_duals(
    rows: np.ndarray,
    cols: np.ndarray,
    cos: np.ndarray,
    partner: np.ndarray,
    start: np.ndarray | None = None,
    eps: float = 1e-12,
    n_cols: int | None = None,
) -> np.ndarray | None:
    """Least row duals u >= start (default 0) for the full matching row i -> partner[i].

    rows, cols: candidate edges (each pair once, the matched ones included), cos their cosines.
    n_cols: columns (default len(partner), square). With more columns than rows, the least
    potentials (rows >= start, the unmatched columns' node D unbounded) are returned shifted by
    D's, so that the unmatched columns' duals are 0 and `column_duals` >= 0 (module doc, step 3).
    Returns u [n] float64, or None if the rounds do not settle (M not optimal on the graph).
    """
    n = partner.shape[0]
    m = n if n_cols is None else n_cols
    node_d = n  # the unmatched columns' node (used only when m > n)
    row_of = np.full(m, node_d, dtype=np.int64)
    row_of[partner] = np.arange(n)
    matched = np.zeros(m)  # matched[j] = C[row_of[j], j]; 0 for unmatched j (D's edge weight is C_ij)
    is_matched = partner[rows] == cols
    matched[cols[is_matched]] = cos[is_matched]
    src = row_of[cols]  # edge (i, j): u_i >= u_src + C_ij - C_src,j
    keep = src != rows
    src, dst, w = src[keep], rows[keep], cos[keep] - matched[cols[keep]]
    if m > n:  # i -> D: u_D >= u_i - C_i,partner[i] (v >= 0 on matched columns)
        src = np.concatenate([src, np.arange(n)])
        dst = np.concatenate([dst, np.full(n, node_d)])
        w = np.concatenate([w, -matched[partner]])
    order = np.argsort(dst, kind="stable")
    src, dst, w = src[order], dst[order], w[order]
    heads, starts = np.unique(dst, return_index=True)
    # D starts unbounded below: its least value max_i(u_i - C_i,partner[i]) gives the rows their
    # highest duals, so few rows need pricing against the unmatched columns (whose v is 0). From
    # 0 instead, u stayed ~0 on a planted case and every unmatched pair with C_ij > 0 was priced in.
    u = np.append(np.zeros(n) if start is None else start, -np.inf)
    if heads.size:
        u = _longest_paths(u, src, w, heads, starts, eps, n + 2)
    return None if u is None else u[:n] - (u[node_d] if m > n else 0.0)


def _longest_paths(u, src, w, heads, starts, eps, max_rounds):
    """Bellman-Ford rounds u[heads] = max(u[heads], max over in-edges u[src] + w); None if unsettled."""
    for _ in range(max_rounds):
        best = np.maximum.reduceat(u[src] + w, starts)
        up = best > u[heads] + eps
        if not up.any():
            return u
        u[heads[up]] = best[up]
    return None


def column_duals(u: np.ndarray, partner: np.ndarray, matched_cos: np.ndarray, n_cols: int | None = None):
    """v [n_cols] (default len(u)) with u_i + v_partner[i] = C_i,partner[i] (matched_cos[i]); 0 elsewhere."""
    v = np.zeros(u.shape[0] if n_cols is None else n_cols)
    v[partner] = matched_cos - u
    return v


def price(
    a: torch.Tensor, b: torch.Tensor, u: np.ndarray, v: np.ndarray, kth: np.ndarray, tol: float, workers: int
) -> tuple[np.ndarray, np.ndarray]:
    """Every non-candidate pair (i, j) with C_ij > u_i + v_j + tol, as (rows, cols).

    Candidates hold each row's exact top-k, so a non-candidate C_ij <= kth_i (the row's k-th
    largest cosine) and can only violate where v_j < kth_i - u_i - tol: with columns sorted by
    v that is a prefix of length L_i per row (~0.01-0.5% of all pairs for random decoders).
    Rows sorted by L_i are priced in blocks of _ROWS against their longest prefix.
    """
    by_v = np.argsort(v, kind="stable")
    lengths = np.searchsorted(v[by_v], kth - u - tol, side="left")
    todo = np.flatnonzero(lengths > 0)
    if todo.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    todo = todo[np.argsort(lengths[todo], kind="stable")]
    b_sorted = b[torch.from_numpy(by_v)]
    neg_v = torch.from_numpy(-v[by_v]).float()
    uf, lengths_t = torch.from_numpy(u).float(), torch.from_numpy(lengths)

    def block(s: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(todo[s : s + _ROWS])
        length = int(lengths[todo[min(s + _ROWS, todo.size) - 1]])  # longest prefix in the block
        excess = torch.nn.functional.linear(a[idx], b_sorted[:length], neg_v[:length]) - uf[idx, None]
        excess[torch.arange(length)[None, :] >= lengths_t[idx, None]] = -torch.inf  # beyond each row's prefix
        r, c = (excess > tol).nonzero(as_tuple=True)
        return idx[r], c

    with ThreadPoolExecutor(workers) as pool:
        parts = list(pool.map(block, range(0, todo.size, _ROWS)))
    rows = torch.cat([p[0] for p in parts]).numpy()
    return rows, by_v[torch.cat([p[1] for p in parts]).numpy()]


class _Graph:
    """The candidate edges: rows, cols (int64), cos (float64), sorted by key = row * n + col."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, rows: np.ndarray, cols: np.ndarray, cos: np.ndarray):
        self.a, self.b, self.n = a, b, b.shape[0]
        self.rows, self.cols, self.cos = rows, cols, cos
        self.keys = rows * self.n + cols  # sorted (np.unique in strip_candidates)

    def cosines(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Cosines of edges that are in the graph."""
        return self.cos[np.searchsorted(self.keys, rows * self.n + cols)]

    def add(self, rows: np.ndarray, cols: np.ndarray) -> int:
        """Add the pairs not in the graph yet (with their cosines); returns how many were new."""
        keys = rows * self.n + cols
        keys, first = np.unique(keys[~np.isin(keys, self.keys)], return_index=True)
        if keys.size == 0:
            return 0
        rows, cols = keys // self.n, keys % self.n
        cos = (self.a[torch.from_numpy(rows)] * self.b[torch.from_numpy(cols)]).sum(1).double().numpy()
        order = np.argsort(np.concatenate([self.keys, keys]), kind="stable")
        self.keys = np.concatenate([self.keys, keys])[order]
        self.rows = np.concatenate([self.rows, rows])[order]
        self.cols = np.concatenate([self.cols, cols])[order]
        self.cos = np.concatenate([self.cos, cos])[order]
        return int(keys.size)

    def solve(self) -> np.ndarray:
        """Optimal full matching on the graph (every row matched): partner [n_a] (row i -> column).

        If the graph has none, a maximum matching is completed by pairing the rows it leaves free
        with as many free columns, and those pairs join the graph (pricing then removes any harm)."""
        n_a = self.a.shape[0]
        r, c = solve_candidates(self.rows, self.cols, self.cos, n_a, self.n)
        if r.shape[0] < n_a:
            free_rows = np.setdiff1d(np.arange(n_a), r)
            self.add(free_rows, np.setdiff1d(np.arange(self.n), c)[: free_rows.size])
            r, c = solve_candidates(self.rows, self.cols, self.cos, n_a, self.n)
        partner = np.empty(n_a, dtype=np.int64)
        partner[r] = c
        return partner


def exact_matching(a: torch.Tensor, b: torch.Tensor, k: int, tol: float = 1e-6, max_rounds: int = 50):
    """Optimal matching of unit rows a [n, d] into b [m, d] (m >= n: every row of a matched)
    without dense C.

    Returns (partner [n] int64 numpy, row maxima [n], column maxima [m], rounds), or None if
    the duals do not settle within max_rounds (callers then fall back to another solver).
    """
    n, m = a.shape[0], b.shape[0]
    if m < n:
        raise ValueError(f"exact_matching needs n_a <= n_b, got {n} > {m}: swap the sides")
    rows, cols, cos, best_a, best_b, kth = strip_candidates(a, b, k)
    graph = _Graph(a, b, rows, cols, cos)
    u = None
    with one_thread_per_worker() as workers:
        for rounds in range(1, max_rounds + 1):
            partner = graph.solve()
            u = row_duals(graph.rows, graph.cols, graph.cos, partner, u, n_cols=m)  # warm start
            if u is None:
                return None
            v = column_duals(u, partner, graph.cosines(np.arange(n), partner), m)
            if not graph.add(*price(a, b, u, v, kth, tol, workers)):  # no violated pair left
                return partner, best_a, best_b, rounds
    return None

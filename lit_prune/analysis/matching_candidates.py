"""Candidate graphs for sparse matching: the top-k cosines of every row and column of C = a b^T
without materialising C (`top_candidates`), and the exact maximum-cosine matching on such a
graph (`solve_candidates`); `row_topk` is the exact row top-k of a strip already in memory.
Used by the "sparse" and "exact" solvers of `matching`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

_ROWS, _TILE = 256, 256  # cosine tiles of 256 x 256 floats stay in L2 (fastest measured)
_GROUP = 32  # entries per group in the two-stage top-k (divides _ROWS and _TILE)
_WAVE = 16  # row blocks scanned between merges of the running column top-k


def _pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -x.shape[0] % multiple
    return torch.cat([x, x.new_zeros(extra, x.shape[1])]) if extra else x


def _refine(q: torch.Tensor, keys: torch.Tensor, groups: torch.Tensor, n_keys: int, k: int):
    """Exact top-k of q_i . keys_j over the key rows inside the chosen groups.

    q: [m, d]; keys: [n_pad, d] padded to a multiple of _GROUP; groups: [m, g] group ids.
    Returns values [m, k] and key indices [m, k].
    """
    m, d = q.shape
    blocks = keys.view(-1, _GROUP, d)
    # one group slot at a time: small [m, _GROUP, d] copies instead of one big gather
    vals = torch.cat([torch.bmm(blocks[g], q[:, :, None]).squeeze(2) for g in groups.T], dim=1)
    idx = (groups.T[:, :, None] * _GROUP + torch.arange(_GROUP)).transpose(0, 1).reshape(m, -1)
    if n_keys < keys.shape[0]:
        vals[idx >= n_keys] = -torch.inf  # padding rows are never candidates
    top = vals.topk(k, dim=1)
    return top.values, idx.gather(1, top.indices)


@contextmanager
def one_thread_per_worker():
    """Run torch ops single-threaded inside; yields the previous thread count as the
    number of Python workers to use. Why: thousands of small in-cache tile ops pay an
    OpenMP barrier each, which costs ~10x when other processes share the cores; one
    Python thread per core with single-threaded ops scales instead. Process-global:
    torch work in other threads runs single-threaded until this exits."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield n
    finally:
        torch.set_num_threads(n)


def row_topk(c: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k (values, indices) of every row of c [m, n]. When n splits into groups of
    _GROUP, only the k groups with the largest maxima are searched: each of a row's top-k
    entries lies in one of them, and a max per group is a cheaper pass than a full top-k."""
    m, n = c.shape
    if n % _GROUP or n // _GROUP <= k:
        return c.topk(k, dim=1)
    groups = c.view(m, n // _GROUP, _GROUP).amax(2).topk(k, dim=1).indices  # [m, k]
    idx = (groups[:, :, None] * _GROUP + torch.arange(_GROUP)).view(m, -1)  # [m, k * _GROUP]
    top = c.gather(1, idx).topk(k, dim=1)
    return top.values, idx.gather(1, top.indices)


def _scan_rows(ap: torch.Tensor, bp: torch.Tensor, s: int, n_a: int, n_b: int, k: int):
    """Rows s:s+_ROWS of `ap` against every row of `bp`, one in-cache tile at a time.

    Returns the exact row top-k (values, column ids) [m, min(k, n_b)] of the real rows,
    and the column-wise maxima over each group of _GROUP rows [m / _GROUP, n_b_pad].
    """
    a_blk = ap[s : s + _ROWS]
    m, nbp = a_blk.shape[0], bp.shape[0]
    gmax = torch.empty((m, nbp // _GROUP))
    cmax = torch.empty((m // _GROUP, nbp))
    for t in range(0, nbp, _TILE):
        c = torch.nn.functional.linear(a_blk, bp[t : t + _TILE])  # [m, w]
        w = c.shape[1]
        c[max(0, n_a - s) :] = -torch.inf  # padding rows / columns never win
        c[:, max(0, n_b - t) :] = -torch.inf
        gmax[:, t // _GROUP : (t + w) // _GROUP] = c.view(m, w // _GROUP, _GROUP).amax(2)
        cmax[:, t : t + w] = c.view(m // _GROUP, _GROUP, w).amax(1)
    real = min(m, n_a - s)
    groups = gmax[:real].topk(min(k, nbp // _GROUP), dim=1).indices
    return (*_refine(a_blk[:real], bp, groups, n_b, min(k, n_b)), cmax)


def top_candidates(a: torch.Tensor, b: torch.Tensor, k: int):
    """Top-k cosines per row and per column of `C = a b^T` without materialising C.

    a: [n_a, d], b: [n_b, d] unit rows. Returns (rows, cols, cos) int64/int64/float64
    edge arrays (deduplicated) and the exact row maxima [n_a] and column maxima [n_b].
    Why groups: a full top-k over every tile costs more than the matmul, while a max
    over groups of _GROUP entries is a cheap reduction. Each of a row's top-k entries
    lies in one of the row's top-k groups ranked by group max, so those groups are
    found from the maxima and only their entries are recomputed exactly (same for
    columns). Memory is O((n_a + n_b) k) plus a few MiB per worker.
    """
    n_a, n_b = a.shape[0], b.shape[0]
    ap, bp = _pad(a, _GROUP), _pad(b, _GROUP)
    kr, kc, gc = min(k, n_b), min(k, n_a), min(k, ap.shape[0] // _GROUP)
    col_v = torch.full((gc, bp.shape[0]), -torch.inf)  # running best row groups per column
    col_g = torch.zeros((gc, bp.shape[0]), dtype=torch.long)
    row_v, row_i = torch.empty((n_a, kr)), torch.empty((n_a, kr), dtype=torch.long)
    starts = list(range(0, ap.shape[0], _ROWS))
    with one_thread_per_worker() as workers, ThreadPoolExecutor(workers) as pool:
        for w0 in range(0, len(starts), _WAVE):  # bounded: _WAVE blocks of maxima at once
            wave = starts[w0 : w0 + _WAVE]
            cms, gids = [col_v], [col_g]
            scanned = pool.map(lambda s: _scan_rows(ap, bp, s, n_a, n_b, k), wave)
            for s, (v, i, cmax) in zip(wave, scanned, strict=True):
                row_v[s : s + v.shape[0]], row_i[s : s + v.shape[0]] = v, i
                cms.append(cmax)
                gids.append(torch.arange(s // _GROUP, s // _GROUP + cmax.shape[0])[:, None].expand_as(cmax))
            top = torch.cat(cms).topk(gc, dim=0)
            col_v, col_g = top.values, torch.cat(gids).gather(0, top.indices)
        col = list(
            pool.map(
                lambda t: _refine(b[t : t + _ROWS], ap, col_g[:, t : min(t + _ROWS, n_b)].T, n_a, kc),
                range(0, n_b, _ROWS),
            )
        )
    col_v = torch.cat([v for v, _ in col])  # [n_b, kc]
    col_i = torch.cat([i for _, i in col])
    rows = np.concatenate([np.repeat(np.arange(n_a), kr), col_i.reshape(-1).numpy()])
    cols = np.concatenate([row_i.reshape(-1).numpy(), np.repeat(np.arange(n_b), kc)])
    cos = np.concatenate([row_v.reshape(-1).numpy(), col_v.reshape(-1).numpy()])
    _, first = np.unique(rows * n_b + cols, return_index=True)  # an edge may be in both lists
    return rows[first], cols[first], cos[first].astype(np.float64), row_v[:, 0], col_v[:, 0]


def solve_candidates(rows, cols, cos, n_a: int, n_b: int) -> tuple[np.ndarray, np.ndarray]:
    """Max-total-cosine full matching on the candidate edges -> (rows, cols) real pairs.

    Costs are `2 - cos` in [1, 3] (scipy needs non-zero weights). If no full matching
    exists, each row gets a dummy column costing more than any real matching can save
    (3m + 1), so the solver first maximises the number of real pairs, then the cosine.
    """
    cost = 2.0 - cos
    graph = sp.csr_array((cost, (rows, cols)), shape=(n_a, n_b))
    try:
        r, c = min_weight_full_bipartite_matching(graph)
        return r, c
    except ValueError:  # no full matching inside the candidate graph
        pass
    big = 3.0 * min(n_a, n_b) + 1.0
    dummy_cols = n_b + np.arange(n_a)
    graph = sp.csr_array(
        (
            np.concatenate([cost, np.full(n_a, big)]),
            (np.concatenate([rows, np.arange(n_a)]), np.concatenate([cols, dummy_cols])),
        ),
        shape=(n_a, n_b + n_a),
    )
    r, c = min_weight_full_bipartite_matching(graph)
    real = c < n_b
    return r[real], c[real]

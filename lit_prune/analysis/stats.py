"""Small statistics used by the RQ analyses: rank tests, FDR control, bootstrap CIs.

Conventions: inputs are 1-D array-likes (numpy or torch). Pairs (or values) that are NaN
are dropped before testing. Degenerate inputs do not raise: they return NaN, because
one empty condition in a grid of conditions must not stop the whole report.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from scipy import stats as sps

from lit_prune.errors import invalid

_NAN2 = (float("nan"), float("nan"))


def _vec(x) -> np.ndarray:
    """Any 1-D array-like (numpy, torch, list) -> float64 numpy [n]."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _paired(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = _vec(x), _vec(y)
    if x.shape != y.shape:
        raise invalid("len(x), len(y)", (x.size, y.size), "equal lengths")
    keep = ~(np.isnan(x) | np.isnan(y))
    return x[keep], y[keep]


def spearman(x, y) -> tuple[float, float]:
    """Spearman rank correlation of paired samples x, y [n] -> (rho, two-sided p).

    Pairs with a NaN are dropped. Returns (nan, nan) when fewer than 3 pairs remain or
    either side is constant (the correlation is undefined there, not 0).
    """
    x, y = _paired(x, y)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return _NAN2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ±inf ranks etc. are handled by scipy itself
        res = sps.spearmanr(x, y)
    return float(res.statistic), float(res.pvalue)


def mann_whitney(x, y) -> tuple[float, float]:
    """Two-sided Mann-Whitney U test of samples x [n_x] vs y [n_y] -> (U of x, p).

    NaNs are dropped; an empty sample gives (nan, nan). scipy picks the exact
    distribution for small samples without ties and the normal approximation
    (with continuity correction) otherwise.
    """
    x, y = _vec(x), _vec(y)
    x, y = x[~np.isnan(x)], y[~np.isnan(y)]
    if x.size == 0 or y.size == 0:
        return _NAN2
    res = sps.mannwhitneyu(x, y, alternative="two-sided")
    return float(res.statistic), float(res.pvalue)


def benjamini_hochberg(pvalues) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values, same order as the input [m].

    adj_(i) = min_{j >= i} p_(j) * m / j over the sorted p-values, capped at 1.
    NaN p-values stay NaN and do not count towards m.
    """
    p = _vec(pvalues)
    if np.any((p < 0) | (p > 1)):
        raise invalid("pvalues", "values outside [0, 1]", "probabilities in [0, 1]")
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if ok.size == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = p[order] * ok.size / np.arange(1, ok.size + 1)
    out[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return out


def bootstrap_ci(
    fn: Callable[..., float],
    *arrays,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of `fn(*arrays)`, resampling rows jointly (paired).

    arrays: each [n, ...], resampled with the same row indices. `fn` returns a scalar;
    if it returns a tuple (e.g. `spearman`), its first element is used. Resamples where
    the statistic is NaN (e.g. a constant resample) are dropped; (nan, nan) if none is
    left or n < 2.
    """
    if n_boot < 1:
        raise invalid("n_boot", n_boot, "an integer >= 1")
    if not 0 < alpha < 1:
        raise invalid("alpha", alpha, "a number in (0, 1)")
    arrs = [a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a) for a in arrays]
    if not arrs:
        raise invalid("arrays", "none", "at least one array")
    n = arrs[0].shape[0]
    if any(a.shape[0] != n for a in arrs):
        raise invalid("array lengths", [a.shape[0] for a in arrs], "equal first dimensions")
    if n < 2:
        return _NAN2
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, n, size=n)
        v = fn(*(a[idx] for a in arrs))
        values[b] = v[0] if isinstance(v, tuple) else v
    values = values[np.isfinite(values)]
    if values.size == 0:
        return _NAN2
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)

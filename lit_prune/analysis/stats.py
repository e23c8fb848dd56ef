"""Small statistics used by the RQ analyses: rank tests, FDR control, bootstrap CIs.

Conventions: inputs are 1-D array-likes (numpy or torch). Pairs (or values) that are NaN
are dropped before testing. Degenerate inputs do not raise: they return NaN, because
one empty condition in a grid of conditions must not stop the whole report.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from itertools import permutations
from typing import Any

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
        res: Any = sps.spearmanr(x, y)  # a SignificanceResult, which scipy's annotations lose
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
    fn: Callable[..., float | tuple[float, float]],
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


# --- small-n exact tests, hierarchical bootstrap, CI verdicts (docs/methods.md §4b) -----------------
MAX_EXACT_N = 8
"""Largest n whose n! permutations `spearman_exact` enumerates (8! = 40,320)."""


def _ranks(v: np.ndarray) -> np.ndarray:
    return sps.rankdata(v)  # average ranks: tied values share their mean rank


def _rank_corr(rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
    """Pearson correlation of rx [n] with each row of ry [..., n] (ranks in, Spearman out)."""
    dx = rx - rx.mean()
    dy = ry - ry.mean(-1, keepdims=True)
    return (dy @ dx) / np.sqrt((dx @ dx) * (dy * dy).sum(-1))


def rank_correlation(x, y) -> float:
    """Spearman rho alone, without scipy's per-call overhead (for bootstrap resamples of a few bins):
    NaN pairs dropped, average ranks for ties; NaN for fewer than 3 pairs or a constant side."""
    x, y = _paired(x, y)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(_rank_corr(_ranks(x), _ranks(y)[None])[0])


def spearman_exact(x, y, alternative: str = "two-sided") -> tuple[float, float]:
    """Spearman rho of x, y [n] with its exact permutation p-value (n <= MAX_EXACT_N).

    Every one of the n! orderings of y against x is enumerated (5 bins: 120), so the p-value is
    exact where scipy's t-approximation is not. Ties: average ranks; permutations that only swap
    tied values count as often as they occur. two-sided: P(|rho_perm| >= |rho|); less: P(rho_perm
    <= rho); greater: P(rho_perm >= rho). Perfectly monotone 5 bins: p = 2/120 two-sided, 1/120
    one-sided. NaN pairs are dropped; (nan, nan) for fewer than 3 pairs or a constant side.
    """
    if alternative not in ("two-sided", "less", "greater"):
        raise invalid("alternative", alternative, "two-sided, less or greater")
    x, y = _paired(x, y)
    if x.size > MAX_EXACT_N:
        raise invalid("len(x)", x.size, f"at most {MAX_EXACT_N} values for an exact permutation test")
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return _NAN2
    rx, ry = _ranks(x), _ranks(y)
    rho = float(_rank_corr(rx, ry[None])[0])
    perms = _rank_corr(rx, ry[np.array(list(permutations(range(ry.size))))])
    eps = 1e-12  # the same rho computed through another ordering may differ in the last bit
    if alternative == "two-sided":
        hits = np.abs(perms) >= abs(rho) - eps
    elif alternative == "less":
        hits = perms <= rho + eps
    else:
        hits = perms >= rho - eps
    return rho, float(hits.mean())


def hierarchical_bootstrap(
    statistic: Callable[[dict[str, np.ndarray]], float],
    samples: dict[str, np.ndarray],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    crossed: bool = False,
) -> tuple[float, float]:
    """Percentile CI of `statistic` under a two-level bootstrap: seed pairs, then features within pair.

    samples: name -> [P, F] per-feature values of P seed pairs (NaN: no value, e.g. a dead feature).
    All arrays share P and F and are resampled jointly: the same pair draw, and within each drawn pair
    the same feature draw, for every name (the pairs and features of two conditions are the same dense
    SAEs' features, so their difference keeps its pairing). Each resample calls statistic(resampled
    dict of [P, F] arrays). With P = 1 this is the ordinary feature bootstrap. crossed: one feature
    draw shared by every drawn pair (column f is the same feature in every row: for per-feature
    statistics such as a correlation over features of one SAE seen in several pairs). NaN / inf
    resamples are dropped; (nan, nan) when none is left.
    """
    return hierarchical_bootstraps({"s": statistic}, samples, n_boot, alpha, seed, crossed)["s"]


def hierarchical_bootstraps(
    statistics: dict[str, Callable[[dict[str, np.ndarray]], float]],
    samples: dict[str, np.ndarray],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    crossed: bool = False,
) -> dict[str, tuple[float, float]]:
    """`hierarchical_bootstrap` of several statistics from the same resamples (one draw, one CI each)."""
    if n_boot < 1:
        raise invalid("n_boot", n_boot, "an integer >= 1")
    if not 0 < alpha < 1:
        raise invalid("alpha", alpha, "a number in (0, 1)")
    arrs = {k: np.asarray(v, dtype=np.float64) for k, v in samples.items()}
    shapes = {a.shape for a in arrs.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise invalid("samples shapes", sorted(shapes), "one common [pairs, features] shape")
    n_pairs, n_features = next(iter(shapes))
    if n_pairs < 1 or n_features < 1:
        return {name: _NAN2 for name in statistics}
    rng = np.random.default_rng(seed)
    values = np.empty((n_boot, len(statistics)))
    for b in range(n_boot):
        pairs = rng.integers(0, n_pairs, size=n_pairs)[:, None]
        feats = rng.integers(0, n_features, size=(1 if crossed else n_pairs, n_features))
        drawn = {k: a[pairs, feats] for k, a in arrs.items()}
        values[b] = [fn(drawn) for fn in statistics.values()]
    out = {}
    for name, column in zip(statistics, values.T, strict=True):
        column = column[np.isfinite(column)]
        out[name] = (
            _NAN2 if column.size == 0 else tuple(map(float, np.quantile(column, [alpha / 2, 1 - alpha / 2])))
        )
    return out


def spearman_variance(rho: float, n: int) -> float:
    """Sampling variance of a Spearman rho over n pairs (Bonett & Wright 2000, by the delta method):
    (1 - rho^2)^2 (1 + rho^2 / 2) / (n - 3); NaN for n <= 3 or a NaN rho."""
    if n <= 3 or not np.isfinite(rho):
        return float("nan")
    return float((1 - rho**2) ** 2 * (1 + rho**2 / 2) / (n - 3))


def replicate_mean_ci(
    values,
    alpha: float = 0.05,
    bounds: tuple[float, float] = (-np.inf, np.inf),
    within_variances=None,
) -> tuple[float, float]:
    """Student-t CI of the mean of a few independent replicates (e.g. one correlation per SAE):
    mean ± t(1 - alpha/2, R - 1) · sqrt(V), clipped to `bounds`; (nan, nan) for R < 2.

    V = sd² / R, or, given each replicate's own sampling variance v_r, max(sd² / R, mean(v_r) / R):
    the Hartung-Knapp interval with its ad hoc floor (Knapp & Hartung 2003) for an unweighted mean.
    Three replicates estimate their spread with two degrees of freedom, and by chance it can come out
    far below each replicate's own noise; the floor keeps the interval from being narrower than that
    noise alone implies. With R = 3 a percentile bootstrap over the replicates spans about ±0.9 sd,
    the t interval ±2.5 sd: resampling three units cannot see how far a fourth would fall."""
    v = np.asarray(values, dtype=np.float64)
    if within_variances is not None and len(within_variances) != v.size:
        raise invalid("within_variances", len(within_variances), f"one per replicate ({v.size})")
    keep = np.isfinite(v)
    v = v[keep]
    if v.size < 2:
        return _NAN2
    var = float(v.var(ddof=1)) / v.size
    if within_variances is not None:
        within = np.asarray(within_variances, dtype=np.float64)[keep]
        if np.isfinite(within).any():
            var = max(var, float(np.nanmean(within)) / v.size)
    half = float(sps.t.ppf(1 - alpha / 2, v.size - 1) * np.sqrt(var))
    mean = float(v.mean())
    return max(mean - half, bounds[0]), min(mean + half, bounds[1])


def pair_mean(values: np.ndarray) -> float:
    """Mean over pairs of the per-pair mean over features (NaN = no value): [P, F] -> scalar."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN pair is NaN, then skipped
        per_pair = np.nanmean(values, axis=1)
    per_pair = per_pair[np.isfinite(per_pair)]
    return float(per_pair.mean()) if per_pair.size else float("nan")


def ci_side(lo: float | None, hi: float | None, null: float) -> int | None:
    """+1 if the CI [lo, hi] lies above `null`, -1 if below, 0 if it contains it, None if undefined."""
    if lo is None or hi is None or np.isnan(lo) or np.isnan(hi):
        return None
    return 1 if lo > null else -1 if hi < null else 0

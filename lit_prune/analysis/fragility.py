"""Feature fragility (RQ4, docs/methods.md §4): which features break first under pruning?

Convention: a NaN matched cosine (feature left unmatched) is read as 0 here, i.e. "no
partner, nothing preserved": it never survives and it counts fully towards fragility.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from lit_prune.analysis.stats import MAX_EXACT_N, bootstrap_ci, spearman, spearman_exact
from lit_prune.errors import invalid

Array = torch.Tensor | np.ndarray  # every function here takes either (converted by _np)


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _cos(c) -> np.ndarray:
    return np.nan_to_num(_np(c), nan=0.0)


def _bins_np(p: np.ndarray, n_bins: int) -> np.ndarray:
    alive = p > 0
    out = np.full(p.shape, -1, dtype=np.int64)
    if alive.any():
        lp = np.log10(p[alive])
        interior = np.quantile(lp, np.linspace(0, 1, n_bins + 1)[1:-1])
        out[alive] = np.searchsorted(interior, lp, side="left")  # bins are (e_b, e_b+1]
    return out


def firing_rate_bins(p, n_bins: int = 5) -> torch.Tensor:
    """Quantile bin of log10 firing rate per feature: p [n] -> int64 [n] in 0..n_bins-1.

    Edges are the 1/n_bins quantiles (linear interpolation) of log10 p over alive features
    (p > 0); bins are right-closed, so a value equal to an edge goes to the lower bin and
    tied rates always share a bin (a bin may then be empty). Dead features get -1.
    """
    if n_bins < 1:
        raise invalid("n_bins", n_bins, "an integer >= 1")
    return torch.from_numpy(_bins_np(_np(p), n_bins))


def _survival_by_bin_np(c: np.ndarray, bins: np.ndarray, tau: float, n_bins: int) -> list[float]:
    return [float(np.mean(c[bins == b] >= tau)) if np.any(bins == b) else float("nan") for b in range(n_bins)]


def survival_by_bin(cosine, p, tau: float = 0.7, n_bins: int = 5) -> list[float]:
    """Fraction of features with matched cosine >= tau in each firing-rate bin (rarest
    first) -> [n_bins]; NaN for an empty bin. Dead features are in no bin."""
    return _survival_by_bin_np(_cos(cosine), _bins_np(_np(p), n_bins), tau, n_bins)


def rho_bin(survival: list[float]) -> tuple[float, float]:
    """Spearman(bin index, bin survival) -> (rho, two-sided p). rho = -1: survival falls
    monotonically from the rarest to the most frequent bin. Empty bins are skipped. Up to
    MAX_EXACT_N bins the p-value is the exact permutation p (`stats.spearman_exact`; 5 bins: all 120
    orderings), never scipy's t-approximation, which is invalid at n = 5 (docs/methods.md §4b)."""
    x, y = np.arange(len(survival)), np.asarray(survival, dtype=np.float64)
    if np.sum(~np.isnan(y)) <= MAX_EXACT_N:
        return spearman_exact(x, y)
    return spearman(x, y)


def _rho_only(survival: list[float]) -> float:
    return spearman(np.arange(len(survival)), survival)[0]  # rho alone: the bootstrap needs no p


def bin_means(values, bins, n_bins: int = 5) -> np.ndarray:
    """Per-bin mean over pairs of the per-pair mean: values, bins [P, F] (NaN value or bin -1: not
    counted) -> [n_bins], NaN where no pair has a feature in the bin."""
    v, b = np.asarray(values, dtype=np.float64), np.asarray(bins).astype(np.int64)
    keep = (b >= 0) & (b < n_bins) & np.isfinite(v)
    index = (b + n_bins * np.arange(v.shape[0])[:, None])[keep]  # one slot per (pair, bin)
    size = v.shape[0] * n_bins
    sums = np.bincount(index, weights=v[keep], minlength=size).reshape(-1, n_bins)
    counts = np.bincount(index, minlength=size).reshape(-1, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_pair = np.where(counts > 0, sums / counts, np.nan)
        used = (counts > 0).sum(0)
        return np.where(used > 0, np.nansum(per_pair, 0) / np.maximum(used, 1), np.nan)


def firing_rate_analysis(
    cosine, p, tau: float = 0.7, n_bins: int = 5, n_boot: int = 1000, seed: int = 0
) -> dict:
    """RQ4 firing-rate analysis of one condition: cosine [n] matched cosines, p [n] rates.

    Returns survival per bin, rho_bin (with p and a bootstrap CI over features, bins
    recomputed on each resample) and the feature-level Spearman(log10 p, c) over alive
    features with p-value and bootstrap CI.
    """
    c, rate = _cos(cosine), _np(p)
    alive = rate > 0
    c, logp = c[alive], np.log10(rate[alive])
    surv = _survival_by_bin_np(c, _bins_np(rate[alive], n_bins), tau, n_bins)
    rb, rb_p = rho_bin(surv)

    def boot_rho_bin(cc: np.ndarray, rr: np.ndarray) -> float:
        return _rho_only(_survival_by_bin_np(cc, _bins_np(rr, n_bins), tau, n_bins))

    rho, rho_p = spearman(logp, c)
    return {
        "survival_by_bin": surv,
        "rho_bin": rb,
        "rho_bin_p": rb_p,
        "rho_bin_ci": bootstrap_ci(boot_rho_bin, c, rate[alive], n_boot=n_boot, seed=seed),
        "rho_feature": rho,
        "rho_feature_p": rho_p,
        "rho_feature_ci": bootstrap_ci(spearman, logp, c, n_boot=n_boot, seed=seed),
        "n_alive": int(alive.sum()),
    }


def _stack(cosines_by_s: Mapping[float, Array]) -> tuple[list[float], np.ndarray]:
    if not cosines_by_s:
        raise invalid("cosines_by_s", {}, "at least one sparsity")
    levels = sorted(cosines_by_s)
    return levels, np.stack([_cos(cosines_by_s[s]) for s in levels])  # [n_levels, n]


def breaking_points(cosines_by_s: Mapping[float, Array], tau: float = 0.7) -> torch.Tensor:
    """s*_i = min{s : c_i(s) < tau} -> float64 [n]; inf if the feature never breaks.

    Not assumed monotone: a feature that breaks at 0.3 and recovers at 0.5 has s* = 0.3.
    """
    levels, c = _stack(cosines_by_s)
    broken = c < tau
    first = broken.argmax(axis=0)  # index of the first True (0 if none)
    out = np.where(broken.any(axis=0), np.asarray(levels, dtype=np.float64)[first], np.inf)
    return torch.from_numpy(out)


def fragility(cosines_by_s: Mapping[float, Array]) -> torch.Tensor:
    """F_i = 1 - mean_s c_i(s) over the given sparsities -> float64 [n]."""
    return torch.from_numpy(1.0 - _stack(cosines_by_s)[1].mean(axis=0))


def fragility_predictors(F, predictors: Mapping[str, Array], mask=None) -> dict[str, tuple[float, float]]:
    """Spearman(F, x) -> (rho, p) for each named predictor x [n] (e.g. "log10 p",
    "max activation", "decoder norm", "seed stability").

    mask: optional bool [n] of features to use (e.g. alive ones); NaNs in F or x are
    dropped pairwise, so pass NaN for anything that should not be ranked.
    """
    f = _np(F)
    keep = np.ones(f.shape, dtype=bool) if mask is None else _np(mask).astype(bool)
    out = {}
    for name, x in predictors.items():
        x = _np(x)
        if x.shape != f.shape:
            raise invalid(f"predictors[{name!r}] length", x.size, f"{f.size} like F")
        out[name] = spearman(f[keep], x[keep])
    return out

"""Survival under retraining from the dense SAE (RQ2c, docs/methods.md §4): the warm-start design.

The dense reference SAE `A` is trained further for T steps on a pruned model's activations
(-> `A'(m, s)`) and, as the control, on the dense model's for the same T steps and data order
(-> `A'(0)`). Latent indices are preserved, so no matching is needed: feature i survives iff
cos(W_dec,i(A), W_dec,i(A')) >= tau. Survival is a mean over the alive features of `A`.

Conventions: cosines are float64; a decoder row of norm 0 (on either side) has no direction, so its
cosine is NaN and it never survives (as an unmatched feature in `fragility`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from lit_prune.analysis.fragility import firing_rate_bins, rho_bin
from lit_prune.errors import invalid

TAUS = (0.5, 0.7, 0.9)


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def decoder_cosines(w_before, w_after) -> torch.Tensor:
    """Row-wise cosine of two decoders [d_sae, d_in] of the same SAE -> float64 [d_sae]."""
    a, b = _np(w_before), _np(w_after)
    if a.shape != b.shape or a.ndim != 2:
        raise invalid("decoder shapes", (a.shape, b.shape), "two equal [d_sae, d_in] shapes")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, (a * b).sum(axis=1) / norms, np.nan)
    return torch.from_numpy(cos)


def _survived(cos: np.ndarray, tau: float) -> np.ndarray:
    return np.nan_to_num(cos, nan=-np.inf) >= tau  # NaN: no direction, never survives


def warm_survival(cosine, alive, taus: Sequence[float] = TAUS) -> dict[float, float]:
    """S_warm(tau): fraction of alive features whose cosine to their start is >= tau (NaN if none alive)."""
    cos, keep = _np(cosine), _np(alive).astype(bool)
    if cos.shape != keep.shape:
        raise invalid("len(cosine), len(alive)", (cos.size, keep.size), "equal lengths")
    if not keep.any():
        return {float(t): float("nan") for t in taus}
    return {float(t): float(_survived(cos[keep], t).mean()) for t in taus}


def ratio(s: float, s_control: float) -> float:
    """S_warm(m, s) / S_warm(0); NaN when the control keeps nothing (the ratio is then undefined)."""
    return s / s_control if s_control > 0 else float("nan")


def ratio_ci(
    arms: Sequence[tuple[object, object, object]],
    tau: float,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of the pooled ratio S_warm(m, s) / S_warm(0) over warm starts.

    arms: one (cosine, control cosine, alive) per source SAE (dense seed), each [d_sae]. Each
    resample draws the seeds with replacement and then, within each drawn seed, its alive features
    with replacement, paired between the condition and the control (the same feature of the same
    start): the CI includes seed variance when there are several seeds, and is the ordinary
    feature bootstrap for one. (nan, nan) when no resample has a defined ratio.
    """
    if n_boot < 1:
        raise invalid("n_boot", n_boot, "an integer >= 1")
    if not arms:
        raise invalid("arms", "none", "at least one (cosine, control, alive) triple")
    kept = []
    for cos, control, alive in arms:
        keep = _np(alive).astype(bool)
        kept.append((_survived(_np(cos)[keep], tau), _survived(_np(control)[keep], tau)))
    kept = [k for k in kept if k[0].size]
    if not kept:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot)
    for b in range(n_boot):
        hits = np.zeros(2)
        for s in rng.integers(0, len(kept), size=len(kept)):
            cond, control = kept[s]
            idx = rng.integers(0, cond.size, size=cond.size)
            hits += (cond[idx].sum(), control[idx].sum())
        values[b] = ratio(hits[0], hits[1])  # equal feature counts on both sides: counts give the ratio
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def movement_by_bin(
    cosine, control, firing_rate, tau: float = 0.7, n_bins: int = 5
) -> dict[str, list[float]]:
    """Which features move, by quantile bin of log10 firing rate on the dense model (rarest first).

    Per bin: `survival` and `control_survival` (fraction with cosine >= tau), `ratio` of the two,
    `movement` and `control_movement` (mean 1 - cosine, NaN cosines read as 0) and their difference
    `excess_movement` (what the pruned model moves beyond retraining itself), and `n` (alive
    features). Dead features (rate 0) are in no bin; an empty bin gives NaN.
    """
    cos, ctl = _np(cosine), _np(control)
    bins = _np(firing_rate_bins(firing_rate, n_bins))
    out: dict[str, list[float]] = {
        k: []
        for k in (
            "survival",
            "control_survival",
            "ratio",
            "movement",
            "control_movement",
            "excess_movement",
            "n",
        )
    }
    for b in range(n_bins):
        sel = bins == b
        if not sel.any():
            for key in out:
                out[key].append(0.0 if key == "n" else float("nan"))
            continue
        s, s0 = float(_survived(cos[sel], tau).mean()), float(_survived(ctl[sel], tau).mean())
        move = float(np.mean(1 - np.nan_to_num(cos[sel], nan=0.0)))
        move0 = float(np.mean(1 - np.nan_to_num(ctl[sel], nan=0.0)))
        for key, value in zip(
            out, (s, s0, ratio(s, s0), move, move0, move - move0, float(sel.sum())), strict=True
        ):
            out[key].append(value)
    return out


def warm_start_summary(
    cosine,
    control,
    firing_rate,
    taus: Sequence[float] = TAUS,
    n_bins: int = 5,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """The metrics of one warm start (one source SAE, one condition), flat for result rows.

    For each tau: `warm_survival`, `warm_control`, `warm_ratio` with its feature-bootstrap CI
    (`warm_ratio_lo` / `_hi`) and `warm_survivors` (count); at tau = 0.7 (else the first tau) the
    per-bin survival / excess movement (`warm_bin<b>_*`) and rho_bin of the per-bin excess movement
    (rarest bin first: rho > 0 means frequent features move more). Also the median cosines.
    """
    cos, ctl, rate = _np(cosine), _np(control), _np(firing_rate)
    alive = rate > 0
    out: dict[str, float] = {"warm_alive": float(alive.sum())}
    s, s0 = warm_survival(cos, alive, taus), warm_survival(ctl, alive, taus)
    for t in taus:
        tag = f"@{t:g}"
        lo, hi = ratio_ci([(cos, ctl, alive)], t, n_boot=n_boot, seed=seed)
        out |= {
            f"warm_survival{tag}": s[float(t)],
            f"warm_control{tag}": s0[float(t)],
            f"warm_ratio{tag}": ratio(s[float(t)], s0[float(t)]),
            f"warm_ratio_lo{tag}": lo,
            f"warm_ratio_hi{tag}": hi,
            f"warm_survivors{tag}": float(_survived(cos[alive], t).sum()),
        }
    out["warm_median_cosine"] = float(np.nanmedian(cos[alive])) if alive.any() else math.nan
    out["warm_control_median_cosine"] = float(np.nanmedian(ctl[alive])) if alive.any() else math.nan
    bin_tau = 0.7 if 0.7 in [float(t) for t in taus] else float(taus[0])
    bins = movement_by_bin(cos, ctl, rate, bin_tau, n_bins)
    for b in range(n_bins):
        for key in ("survival", "control_survival", "excess_movement"):
            out[f"warm_bin{b}_{key}"] = bins[key][b]
    out["warm_rho_bin_excess_movement"], out["warm_rho_bin_excess_movement_p"] = rho_bin(
        bins["excess_movement"]
    )
    return out

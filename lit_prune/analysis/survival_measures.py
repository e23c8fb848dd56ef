"""RQ2 (geometric + functional feature survival) and RQ4 (firing-rate fragility) of one condition.

The measurements behind `lit_prune.lit.survival_callback.FeatureSurvivalCallback` (docs/methods.md §4),
as plain functions on tensors so that the study and the tests call them without Lightning.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from lit_prune.analysis.fragility import firing_rate_analysis, firing_rate_bins
from lit_prune.analysis.matching import unit_rows
from lit_prune.analysis.survival import geometric_survival, normalised_survival, survival_from_accumulator
from lit_prune.analysis.transfer import PairedPass


class SurvivalResult(NamedTuple):
    metrics: dict[float | None, dict[str, float]]
    """Scalars keyed by their threshold: tau for geometric ones, the functional threshold for
    functional ones, None for threshold-free ones."""
    arrays: dict[str, torch.Tensor]
    """Per-feature arrays: reference-sized ones and `init_cosine` [n_module]."""


def _rq4(prefix: str, analysis: dict, with_feature: bool) -> dict[str, float]:
    """Flatten one `firing_rate_analysis` into scalars (CIs as _ci_lo / _ci_hi)."""
    names = ("rho_bin", "rho_feature") if with_feature else ("rho_bin",)
    out = {}
    for name in names:
        out[f"{prefix}{name}"], out[f"{prefix}{name}_p"] = analysis[name], analysis[f"{name}_p"]
        out[f"{prefix}{name}_ci_lo"], out[f"{prefix}{name}_ci_hi"] = analysis[f"{name}_ci"]
    out.update({f"{prefix}survival_bin{b}": v for b, v in enumerate(analysis["survival_by_bin"])})
    return out


def survival_measurements(
    ref_dec: torch.Tensor,
    module_dec: torch.Tensor,
    init_dec: torch.Tensor,
    paired: PairedPass,
    taus: tuple[float, ...] = (0.5, 0.7, 0.9),
    functional_threshold: float = 0.7,
    n_bins: int = 5,
    n_boot: int = 1000,
    seed_baseline: float | None = None,
    seed_baseline_tau: float = 0.7,
    near_init: float = 0.9,
    matching: str = "auto",
    candidates: int = 8,
) -> SurvivalResult:
    """RQ2 + RQ4 for one condition (no Lightning).

    ref_dec [n, d]: reference (dense-model) decoder; module_dec, init_dec [n', d]: the run's SAE
    decoder now and at initialisation; paired: the reference on the dense vs current LM. Alive =
    fires on the dense model (paired.rate_dense > 0); survival is over alive reference features.
    Geometric: S(tau) = fraction with matched cosine >= tau. Functional: fraction with r >= the
    threshold (NaN r = lost). RQ4: firing-rate bins of log10 p on the dense model, survival per
    bin, rho_bin and the feature-level Spearman(log10 p, c) with p-values and bootstrap CIs.
    `init_cosine` is each module feature's cosine to its own init (near-init latents "survive"
    trivially against a same-seed reference). matching / candidates: the one-to-one matching's
    solver and sparse candidate count (`lit_prune.analysis.matching.match_features`).
    """
    p = paired.rate_dense
    alive = p > 0
    geo = geometric_survival(ref_dec, module_dec, alive, taus, matching, candidates)
    func = survival_from_accumulator(paired.acc, functional_threshold)
    init_cos = (unit_rows(module_dec) * unit_rows(init_dec)).sum(1)
    partner = geo["partner"]
    partner_init = torch.full(partner.shape, float("nan"))
    partner_init[partner >= 0] = init_cos[partner[partner >= 0]]
    metrics: dict[float | None, dict[str, float]] = {}
    for tau in map(float, taus):
        analysis = firing_rate_analysis(geo["cosine"], p, tau, n_bins, n_boot)
        metrics[tau] = {"S": geo["S"][tau], **_rq4("", analysis, with_feature=False)}
        if seed_baseline is not None and math.isclose(tau, seed_baseline_tau):
            metrics[tau]["S_normalised"] = normalised_survival(geo["S"][tau], seed_baseline)
    # the feature-level Spearman(log10 p, c) does not depend on tau: taken from the last analysis
    feature_level = {k: v for k, v in _rq4("", analysis, True).items() if k.startswith("rho_feature")}
    r_alive = func.r[alive]
    metrics.setdefault(float(functional_threshold), {}).update(
        {
            "functional_S": func.fraction,
            "functional_mean_r": float(torch.nanmean(r_alive.double())) if alive.any() else float("nan"),
            **_rq4(
                "functional_", firing_rate_analysis(func.r, p, functional_threshold, n_bins, n_boot), True
            ),
        }
    )
    metrics[None] = {
        "mean_cosine": geo["mean_cosine"],
        "mmcs_reference_to_module": geo["mmcs_dense_to_pruned"],
        "mmcs_module_to_reference": geo["mmcs_pruned_to_dense"],
        **feature_level,
        "n_reference": float(p.numel()),
        "n_alive": float(alive.sum()),
        "n_module": float(init_cos.numel()),
        "eval_tokens": float(paired.tokens),
        "init_cosine_mean": float(init_cos.double().mean()),
        "init_near_fraction": float((init_cos >= near_init).double().mean()),
    }
    assert paired.acc.max_a is not None  # survival_from_accumulator above refuses an empty pass
    arrays = {
        "matched_cosine": geo["cosine"].float(),
        "partner": partner,
        "firing_rate": p.double(),
        "firing_rate_current": paired.rate_current.double(),
        "pearson_r": func.r.float(),
        "bin": firing_rate_bins(p, n_bins),
        "alive": alive,
        "partner_init_cosine": partner_init,
        "init_cosine": init_cos.float(),
        # RQ4's other fragility predictors (docs/methods.md §4): on the dense model, per reference feature
        "max_activation": paired.acc.max_a.float().cpu(),
        "decoder_norm": ref_dec.double().norm(dim=-1).float(),
    }
    return SurvivalResult(metrics, arrays)

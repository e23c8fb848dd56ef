"""The numbers of the study report: every aggregation its tables, figures and headline use.

Conventions (stated in the report too):
- Survival is the cross-seed measure (reference SAE vs an SAE trained with another seed on the
  pruned model), averaged over the cross-seed fits of a condition; same-seed is shown beside it.
- Functional survival does not depend on the pruned-model SAE, so any fit of the condition gives it.
- Per-feature survival (RQ4 fragility, RQ5) is the matched cosine of each reference feature,
  averaged over the cross-seed fits, with "unmatched" read as 0 (`lit_prune.analysis.fragility`).
- None stands for "not measured"; every function tolerates missing steps.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from lit_prune.analysis.ablation import bh_correct, importance_vs_survival
from lit_prune.analysis.fragility import breaking_points, fragility, fragility_predictors
from lit_prune.analysis.survival import normalised_survival, wanda_magnitude_ratio
from lit_prune.analysis.transfer import largest_viable_sparsity
from lit_prune.study.report.data import DENSE, Cond, StudyData, value

TAU = 0.7
TAUS = (0.5, 0.7, 0.9)
SAE_METRICS = ("fvu", "l0", "ce_recovered", "kl_score", "delta_lm_loss", "dead_fraction")
TRANSFER_METRICS = (
    "fvu",
    "ce_recovered",
    "kl_score",
    "l0",
    "l0_ratio",
    "delta_lm_loss",
    "alive_fraction",
    "viable",
)
RQ1_METRICS = ("shared@0.5", "shared@0.7", "shared@0.9", "mmcs_ij", "mmcs_ji", "mean_cosine")


def finite(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def mean(values: Iterable[Any]) -> float | None:
    """Mean of the finite values; None if there are none."""
    vals = [v for v in map(finite, values) if v is not None]
    return sum(vals) / len(vals) if vals else None


def spread(values: Iterable[Any]) -> dict[str, float | None]:
    """mean, sample sd (None for n < 2), min, max and n of the finite values."""
    vals = [v for v in map(finite, values) if v is not None]
    n = len(vals)
    if not n:
        return {"mean": None, "sd": None, "min": None, "max": None, "n": 0}
    mu = sum(vals) / n
    sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (n - 1)) if n > 1 else None
    return {"mean": mu, "sd": sd, "min": min(vals), "max": max(vals), "n": n}


def _base(cond: Cond) -> dict[str, Any]:
    return {"condition": cond.name, "method": cond.label, "sparsity": cond.sparsity}


# --- perplexity, SAE quality, RQ1 -------------------------------------------------------------
def perplexity(data: StudyData) -> list[dict[str, Any]]:
    out = []
    for c in data.conditions:
        rows = data.rows("dense/perplexity" if c.dense else f"{c.name}/prune", "perplexity.json")
        out.append(
            {**_base(c), **{k: value(rows, k) for k in ("perplexity", "realised_sparsity", "prune_seconds")}}
        )
    return out


def sae_metrics(data: StudyData) -> list[dict[str, Any]]:
    """Per condition: each SAE metric's spread over the seeds' own SAEs."""
    out = []
    for c in data.conditions:
        fits = data.fits(c)
        out.append(
            {
                **_base(c),
                "seeds": [f.seed for f in fits],
                **{m: spread(value(f.rows["sae_metrics.json"], m) for f in fits) for m in SAE_METRICS},
            }
        )
    return out


def seed_pairs(data: StudyData, cond: Cond) -> list[dict[str, Any]]:
    """RQ1 rows of a condition, one dict per seed pair."""
    pairs: dict[tuple, dict[str, Any]] = {}
    for row in data.rows(f"{cond.name}/rq1", "rq1_seeds.json"):
        entry = pairs.setdefault(
            (row["seed_a"], row["seed_b"]), {**_base(cond), "seed_a": row["seed_a"], "seed_b": row["seed_b"]}
        )
        entry[row["metric"]] = finite(row["value"])
    return list(pairs.values())


def seed_baseline(data: StudyData, tau: float = TAU) -> dict[str, Any]:
    """The dense cross-seed shared fraction at tau: per pair, mean, min and max over pairs."""
    dense = Cond(DENSE, DENSE, 0.0)
    per_pair = {(p["seed_a"], p["seed_b"]): p.get(f"shared@{tau:g}") for p in seed_pairs(data, dense)}
    vals = [v for v in per_pair.values() if v is not None]
    return {
        "pairs": per_pair,
        "mean": mean(vals),
        "min": min(vals) if vals else None,
        "max": max(vals) if vals else None,
        "n": len(vals),
    }


# --- RQ2 survival and RQ4 bins ----------------------------------------------------------------
def _bins(rows: list[dict[str, Any]], prefix: str, tau: float | None) -> list[float | None]:
    out, b = [], 0
    while any(r["metric"] == f"{prefix}{b}" for r in rows):
        out.append(value(rows, f"{prefix}{b}", tau=tau) if tau is not None else value(rows, f"{prefix}{b}"))
        b += 1
    return out


def _mean_lists(lists: list[list[float | None]]) -> list[float | None]:
    n = max((len(x) for x in lists), default=0)
    return [mean(x[i] for x in lists if i < len(x)) for i in range(n)]


def survival(data: StudyData, cond: Cond) -> dict[str, Any]:
    """RQ2 / RQ4 summary of one pruned condition (cross-seed means; see the module docstring)."""
    fits = data.fits(cond)
    cross = [f for f in fits if f.same_seed is False]
    same = [f for f in fits if f.same_seed is True]
    functional = cross or same
    rq2 = lambda f: f.rows["rq2_survival.json"]  # noqa: E731
    out: dict[str, Any] = {**_base(cond), "n_cross": len(cross), "n_same": len(same)}
    for tau in TAUS:
        out[f"S@{tau:g}"] = mean(value(rq2(f), "S", tau=tau) for f in cross)
        out[f"S_same@{tau:g}"] = mean(value(rq2(f), "S", tau=tau) for f in same)
    out["functional_S"] = mean(value(rq2(f), "functional_S") for f in functional)
    for name in ("rho_bin", "rho_bin_p", "rho_bin_ci_lo", "rho_bin_ci_hi"):
        out[name] = mean(value(rq2(f), name, tau=TAU) for f in cross)
        out[f"functional_{name}"] = mean(value(rq2(f), f"functional_{name}") for f in functional)
    for name in ("rho_feature", "rho_feature_p", "mean_cosine", "n_alive"):
        out[name] = mean(value(rq2(f), name) for f in cross)
    out["bins"] = _mean_lists([_bins(rq2(f), "survival_bin", TAU) for f in cross])
    out["functional_bins"] = _mean_lists([_bins(rq2(f), "functional_survival_bin", None) for f in functional])
    out["init_near_same"] = mean(value(rq2(f), "init_near_fraction") for f in same)
    baseline = seed_baseline(data)
    pair = [baseline["pairs"].get((data.reference_seed, f.seed)) for f in cross]
    out["S_seed"] = mean(pair) if mean(pair) is not None else baseline["mean"]
    s, s_seed = out["S@0.7"], out["S_seed"]
    out["S_tilde"] = finite(normalised_survival(s, s_seed)) if s is not None and s_seed is not None else None
    out["S_normalised"] = mean(value(rq2(f), "S_normalised", tau=TAU) for f in cross)
    return out


def survivals(data: StudyData) -> list[dict[str, Any]]:
    return [survival(data, c) for c in data.pruned]


def count_rho_minus_one(values: Iterable[float | None], tol: float = 1e-9) -> tuple[int, int]:
    """(conditions with rho_bin = -1, conditions with a rho_bin at all)."""
    vals = [v for v in map(finite, values) if v is not None]
    return sum(v <= -1 + tol for v in vals), len(vals)


def wanda_vs_magnitude(rows: list[dict[str, Any]], key: str = "S@0.7") -> dict[str, Any]:
    """`wanda_magnitude_ratio` over the unstructured sparsities both methods have."""
    per = {
        m: {r["sparsity"]: r[key] for r in rows if r["method"] == m and r.get(key) is not None}
        for m in ("wanda", "magnitude")
    }
    return wanda_magnitude_ratio(per["wanda"], per["magnitude"])


# --- RQ3 transfer -----------------------------------------------------------------------------
def transfer(data: StudyData) -> list[dict[str, Any]]:
    """One row per (condition, SAE): the reference on the dense model first, then per condition the
    reference, the retrained SAE and the Wanda-pruned reference (reference-seed fit)."""
    out, dense_row = [], None
    for c in data.pruned:
        fit = next((f for f in data.fits(c) if f.seed == data.reference_seed), None)
        rows = fit.rows["rq3_transfer.json"] if fit else []
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault(
                (r.get("stage") == "dense", r.get("sae"), r.get("sae_sparsity") or 0.0), []
            ).append(r)
        order = lambda kv: (not kv[0][0], _sae_order(kv[0][1]), kv[0][2])  # noqa: E731
        for (is_dense, sae, level), grp in sorted(groups.items(), key=order):
            metrics = {m: value(grp, m) for m in TRANSFER_METRICS}
            if is_dense:
                dense_row = dense_row or {
                    "condition": "dense",
                    "method": "dense",
                    "sparsity": 0.0,
                    "sae_kind": sae,
                    "sae": f"{sae} (on the dense model)",
                    "sae_sparsity": 0.0,
                    **metrics,
                }
                continue
            name = sae if sae != "reference_wanda" else f"reference Wanda-pruned {level:g}"
            out.append({**_base(c), "sae": name, "sae_kind": sae, "sae_sparsity": level, **metrics})
    return ([dense_row] if dense_row else []) + out


def _sae_order(sae: str | None) -> int:
    return {"reference": 0, "retrained": 1, "reference_wanda": 2}.get(sae or "", 3)


def viability(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method label: {"levels": {s: viable}, "largest": largest viable s} of the reference SAE."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["sae_kind"] != "reference" or r["method"] == "dense" or r.get("viable") is None:
            continue
        out.setdefault(r["method"], {"levels": {}})["levels"][r["sparsity"]] = r["viable"] >= 0.5
    for entry in out.values():
        entry["largest"] = largest_viable_sparsity(entry["levels"])
    return out


# --- per-feature: RQ4 fragility and RQ5 importance ---------------------------------------------
@dataclass
class FeatureSurvival:
    cosine: np.ndarray
    """[n_ref] matched cosine to the pruned-model SAEs, mean over cross-seed fits (NaN read as 0)."""
    rate: np.ndarray
    """[n_ref] firing rate of the reference SAE on the dense model."""
    alive: np.ndarray
    """[n_ref] bool: fires on the dense model."""
    fits: int
    extra: dict[str, np.ndarray]
    """Per-feature fragility predictors of the reference on the dense model (max activation,
    decoder norm), when the study wrote them."""


EXTRA_PREDICTORS = {"max_activation": "max activation (dense)", "decoder_norm": "decoder norm"}


def feature_survival(data: StudyData, cond: Cond) -> FeatureSurvival | None:
    arrays = [
        data.arrays(f"{cond.name}/seed{f.seed}", "rq2_survival.safetensors") for f in data.cross_fits(cond)
    ]
    arrays = [a for a in arrays if a is not None and "matched_cosine" in a]
    if not arrays:
        return None
    cos = np.mean([np.nan_to_num(a["matched_cosine"].double().numpy(), nan=0.0) for a in arrays], axis=0)
    rate = arrays[0]["firing_rate"].double().numpy()
    alive = arrays[0]["alive"].numpy().astype(bool) if "alive" in arrays[0] else rate > 0
    extra = {
        name: arrays[0][key].double().numpy() for key, name in EXTRA_PREDICTORS.items() if key in arrays[0]
    }
    return FeatureSurvival(cos, rate, alive, len(arrays), extra)


def fragility_by_method(data: StudyData) -> dict[str, dict[str, Any]]:
    """Per unstructured method: F_i, s*_i over its sparsities and Spearman(F, predictors) over alive features."""
    stability = None
    if not data.settings.get("reference_sae"):  # our own dense SAE: its RQ1 per-feature stability
        arrays = data.arrays("dense/rq1", "rq1_seeds.safetensors")
        stability = arrays.get(f"stability_seed{data.reference_seed}") if arrays else None
    out = {}
    for label in sorted({c.label for c in data.pruned if not c.nm}):
        per = {
            c.sparsity: fs
            for c in data.pruned
            if c.label == label and not c.nm
            for fs in [feature_survival(data, c)]
            if fs is not None
        }
        if not per:
            continue
        first = per[min(per)]
        F = fragility({s: fs.cosine for s, fs in per.items()}).numpy()
        s_star = breaking_points({s: fs.cosine for s, fs in per.items()}, TAU).numpy()
        with np.errstate(divide="ignore"):
            logp = np.where(first.rate > 0, np.log10(first.rate), np.nan)
        predictors = {"log10 firing rate": logp, **first.extra}
        if stability is not None and stability.numel() == F.size:
            predictors["seed stability (dense RQ1)"] = stability.double().numpy()
        alive = first.alive
        finite_s = s_star[alive & np.isfinite(s_star)]
        out[label] = {
            "levels": sorted(per),
            "F": F,
            "s_star": s_star,
            "logp": logp,
            "alive": alive,
            "n_alive": int(alive.sum()),
            "mean_F": mean(F[alive]),
            "never_broken": float(np.mean(~np.isfinite(s_star[alive]))) if alive.any() else None,
            "median_s_star": float(np.median(finite_s)) if finite_s.size else None,
            "predictors": fragility_predictors(F, predictors, mask=alive),
        }
    return out


def importance(data: StudyData) -> dict[str, list[dict[str, Any]]]:
    """RQ5: does survival predict importance? Per pruned condition, BH-corrected across conditions.

    "attribution": importance = |gradient attribution| of every alive reference feature;
    "exact": importance = exact-ablation CE increase (scope firing) of the ablated features.
    Survived = per-feature cross-seed matched cosine >= 0.7.
    """
    rq5 = data.arrays("dense/rq5", "rq5_ablation.safetensors")
    out: dict[str, list[dict[str, Any]]] = {"attribution": [], "exact": []}
    if rq5 is None:
        return out
    attribution = rq5["attribution"].double().numpy()
    fired = rq5["firing_rate"].double().numpy() > 0
    features = rq5["features"].long().numpy()
    exact = rq5["exact_ce_firing"].double().numpy()
    for c in data.pruned:
        fs = feature_survival(data, c)
        if fs is None or fs.cosine.size != attribution.size:
            continue
        keep = fs.alive & fired
        res = importance_vs_survival(np.abs(attribution[keep]), fs.cosine[keep], fs.cosine[keep] >= TAU)
        out["attribution"].append(
            {**_base(c), **res, "cosine": fs.cosine[keep], "importance": np.abs(attribution[keep])}
        )
        sel = keep[features]
        res = importance_vs_survival(exact[sel], fs.cosine[features][sel], fs.cosine[features][sel] >= TAU)
        out["exact"].append({**_base(c), **res})
    return {k: bh_correct(v) for k, v in out.items()}


def rq5_groups(data: StudyData) -> list[dict[str, Any]]:
    """The RQ5 summary rows of the dense model pivoted to one dict per feature group."""
    groups: dict[str, dict[str, Any]] = {}
    for r in data.rows("dense/rq5", "rq5_ablation.json"):
        groups.setdefault(r.get("group", "all"), {"group": r.get("group", "all")})[r["metric"]] = finite(
            r["value"]
        )
    order = {"top": 0, "random": 1, "rare": 2, "selected": 3, "all": 4}
    return sorted(groups.values(), key=lambda g: order.get(g["group"], 5))

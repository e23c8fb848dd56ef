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
    out.update(same_seed_init(data, cond))
    return _with_pairs(data, cond, out)


def _with_pairs(data: StudyData, cond: Cond, out: dict[str, Any]) -> dict[str, Any]:
    """Replace the fits' reference-only survival by every seed pair's (the pairs step), when finished:
    S over every cross-seed pair, same-seed pairs apart, S_seed over the same dense pairs, and RQ4's
    bins normalised by each bin's own dense seed baseline."""
    from lit_prune.analysis.stats import pair_mean

    p, effects = pairs(data, cond), cross_effects(data, cond)
    if p is None or effects is None:
        return out
    cross, same = np.flatnonzero(~p.same), np.flatnonzero(p.same)
    for tau in TAUS:
        # mean over pairs of each pair's fraction, as the headline's S (pair_mean)
        out[f"S@{tau:g}"] = finite(pair_mean(p.survived(tau, cross))) if cross.size else None
        out[f"S_same@{tau:g}"] = finite(pair_mean(p.survived(tau, same))) if same.size else None
    out["n_cross"], out["n_same"] = int(cross.size), int(same.size)
    out["S_seed"], out["S_tilde"] = effects["S_seed"]["value"], effects["S_tilde"]["value"]
    out["S_tilde_ci"] = (effects["S_tilde"]["lo"], effects["S_tilde"]["hi"])
    out["survivors"] = effects["survivors"]
    out["bins"], out["seed_bins"] = effects["bins"], effects["seed_bins"]
    out["normalised_bins"] = effects["normalised_bins"]
    for key, e in (("rho_bin", effects["rho_bin_raw"]), ("rho_bin_norm", effects["rho_bin"])):
        out[key], out[f"{key}_p"], out[f"{key}_ci_lo"], out[f"{key}_ci_hi"] = (
            e["value"],
            e["p"],
            e["lo"],
            e["hi"],
        )
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
    """Per unstructured method: F_i, s*_i over its sparsities, Spearman(F, predictors) over alive features."""
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
    Survived = per-feature cross-seed matched cosine >= 0.7, or without cross-seed fits the RQ2c
    warm-start cosine (`survival` names which).
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
        found = (fs.cosine, fs.alive, "cross-seed") if fs is not None else _warm_survival(data, c)
        if found is None or found[0].size != attribution.size:
            continue
        cosine, alive, source = found
        keep = alive & fired
        res = importance_vs_survival(np.abs(attribution[keep]), cosine[keep], cosine[keep] >= TAU)
        out["attribution"].append(
            {
                **_base(c),
                **res,
                "survival": source,
                "cosine": cosine[keep],
                "importance": np.abs(attribution[keep]),
            }
        )
        sel = keep[features]
        res = importance_vs_survival(exact[sel], cosine[features][sel], cosine[features][sel] >= TAU)
        out["exact"].append({**_base(c), **res, "survival": source})
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


# --- every cross-seed pair, effect sizes with seed-level CIs (docs/methods.md §4b) -------------
MIN_SURVIVORS = 30
"""A compared group with fewer surviving features (mean per seed pair) cannot decide a verdict."""


@dataclass
class Pairs:
    """The <cond>/pairs step's arrays (`lit_prune.study.pairs`): every (dense seed a, seed b) pair."""

    cosine: np.ndarray
    """[P, n] matched cosine of dense SAE a's features in SAE b (NaN: unmatched, read as 0)."""
    rate: np.ndarray
    """[P, n] SAE a's firing rate on the dense model (0: dead, excluded)."""
    labels: list[tuple[int, int]]
    same: np.ndarray
    """[P] bool: a == b."""

    def survived(self, tau: float = TAU, rows: np.ndarray | None = None) -> np.ndarray:
        """[P', n]: 1.0 survived at tau, 0.0 lost (unmatched included), NaN for dead features."""
        rows = np.arange(len(self.labels)) if rows is None else rows
        hit = (np.nan_to_num(self.cosine[rows], nan=0.0) >= tau).astype(np.float64)
        return np.where(self.rate[rows] > 0, hit, np.nan)

    def bins(self, rows: np.ndarray, n_bins: int = 5) -> np.ndarray:
        """[P', n] firing-rate quintile bin of each feature of SAE a (-1: dead), per pair."""
        from lit_prune.analysis.fragility import firing_rate_bins

        return np.stack([firing_rate_bins(self.rate[r], n_bins).numpy() for r in rows])

    def rows(self, labels: list[tuple[int, int]]) -> np.ndarray:
        index = {lab: i for i, lab in enumerate(self.labels)}
        return np.array([index[lab] for lab in labels], dtype=np.int64)

    @property
    def cross(self) -> list[tuple[int, int]]:
        return [lab for lab, s in zip(self.labels, self.same, strict=False) if not s]


def pairs(data: StudyData, cond: Cond) -> Pairs | None:
    """The pairs step's arrays of a condition (dense: the seed baseline), None if not finished."""
    arr = data.arrays(f"{cond.name}/pairs", "rq2_pairs.safetensors")
    if arr is None:
        return None
    labels = list(zip(arr["seed_a"].tolist(), arr["seed_b"].tolist(), strict=False))
    return Pairs(
        arr["cosine"].double().numpy(), arr["firing_rate"].double().numpy(), labels, arr["same_seed"].numpy()
    )


def n_boot(data: StudyData) -> int:
    return int(data.settings.get("survival", {}).get("n_boot", 1000))


def _survivors(surv: np.ndarray) -> float:
    """Mean number of surviving features per pair of a [P, n] survived matrix."""
    return float(np.nansum(surv, axis=1).mean()) if surv.size else 0.0


def _ratio(a: float, b: float) -> float:
    return a / b if b else (math.inf if a > 0 else math.nan)


def _with_ci(point: float, ci: tuple[float, float]) -> dict[str, float | None]:
    return {"value": finite(point), "lo": finite(ci[0]), "hi": finite(ci[1])}


def cross_effects(data: StudyData, cond: Cond, tau: float = TAU) -> dict[str, Any] | None:
    """`_cross_effects`, computed once per study, condition and tau (the tables and the headline share it)."""
    cache = data.__dict__.setdefault("_cross_effects", {})
    if (cond.name, tau) not in cache:
        cache[cond.name, tau] = _cross_effects(data, cond, tau)
    return cache[cond.name, tau]


def _cross_effects(data: StudyData, cond: Cond, tau: float = TAU) -> dict[str, Any] | None:
    """Geometric survival of a condition over every cross-seed pair, against the dense seed pairs.

    S = mean over pairs (a != b) of the fraction of SAE a's alive features surviving in b; S_seed the
    same over the dense pairs with the same labels; S~ = S / S_seed; per-bin S_bin / S_seed,bin and
    rho_bin of the normalised bins (exact permutation p). CIs: hierarchical bootstrap, pairs then
    features, the condition's and the dense pairs drawn jointly (same labels, same features of a).
    """
    from lit_prune.analysis.fragility import bin_means, rho_bin
    from lit_prune.analysis.stats import hierarchical_bootstraps, pair_mean, rank_correlation

    mine, dense = pairs(data, cond), pairs(data, Cond(DENSE, DENSE, 0.0))
    if mine is None or dense is None:
        return None
    labels = [lab for lab in mine.cross if lab in dense.labels]
    if not labels:
        return None
    rows, drows = mine.rows(labels), dense.rows(labels)
    samples = {"c": mine.survived(tau, rows), "d": dense.survived(tau, drows), "bin": mine.bins(rows)}
    same_rows = np.flatnonzero(mine.same)
    S, S_seed = pair_mean(samples["c"]), pair_mean(samples["d"])

    def normalised_bins(s: dict[str, np.ndarray]) -> np.ndarray:
        return bin_means(s["c"], s["bin"]) / bin_means(s["d"], s["bin"])

    def rho(s: dict[str, np.ndarray]) -> float:
        return rank_correlation(np.arange(5), normalised_bins(s))

    def rho_raw(s: dict[str, np.ndarray]) -> float:
        return rank_correlation(np.arange(5), bin_means(s["c"], s["bin"]))

    ci = hierarchical_bootstraps(
        {
            "S": lambda s: pair_mean(s["c"]),
            "S_seed": lambda s: pair_mean(s["d"]),
            "S_tilde": lambda s: _ratio(pair_mean(s["c"]), pair_mean(s["d"])),
            "rho": rho,
            "rho_raw": rho_raw,
        },
        samples,
        n_boot(data),
    )
    norm = normalised_bins(samples)
    counts = [
        float(np.nansum(np.where(samples["bin"] == b, samples["c"], 0.0), axis=1).mean()) for b in range(5)
    ]
    rb_norm, rb_norm_p = rho_bin(list(norm))
    rb_raw, rb_raw_p = rho_bin(list(bin_means(samples["c"], samples["bin"])))
    return {
        "pairs": labels,
        "n_pairs": len(labels),
        "per_pair": {lab: float(np.nanmean(samples["c"][i])) for i, lab in enumerate(labels)},
        "S": _with_ci(S, ci["S"]),
        "S_seed": _with_ci(S_seed, ci["S_seed"]),
        "S_tilde": _with_ci(_ratio(S, S_seed), ci["S_tilde"]),
        "S_same": finite(pair_mean(mine.survived(tau, same_rows))) if same_rows.size else None,
        "survivors": _survivors(samples["c"]),
        "bins": [finite(v) for v in bin_means(samples["c"], samples["bin"])],
        "seed_bins": [finite(v) for v in bin_means(samples["d"], samples["bin"])],
        "normalised_bins": [finite(v) for v in norm],
        "bin_survivors": counts,
        "rho_bin": {**_with_ci(rb_norm, ci["rho"]), "p": finite(rb_norm_p)},
        "rho_bin_raw": {**_with_ci(rb_raw, ci["rho_raw"]), "p": finite(rb_raw_p)},
    }


def functional_effects(data: StudyData, cond: Cond, r0: float = 0.7) -> dict[str, Any] | None:
    """Functional survival of the reference (r_i >= r0; no seed variance: one SAE on two models), with
    feature-bootstrap CIs; per-bin survival and rho_bin with its exact permutation p."""
    from lit_prune.analysis.fragility import bin_means, firing_rate_bins, rho_bin
    from lit_prune.analysis.stats import hierarchical_bootstrap, pair_mean, rank_correlation

    arr = _reference_arrays(data, cond)
    if arr is None or "pearson_r" not in arr:
        return None
    surv = functional_matrix(arr, r0)
    bins = firing_rate_bins(arr["firing_rate"], 5).numpy()[None]
    samples = {"c": surv, "bin": bins}
    boot = lambda f: hierarchical_bootstrap(f, samples, n_boot(data))  # noqa: E731
    rb, rb_p = rho_bin(list(bin_means(surv, bins)))
    return {
        "S": _with_ci(pair_mean(surv), boot(lambda s: pair_mean(s["c"]))),
        "survivors": _survivors(surv),
        "bins": [finite(v) for v in bin_means(surv, bins)],
        "bin_survivors": [float(np.nansum(np.where(bins == b, surv, 0.0))) for b in range(5)],
        "rho_bin": {
            **_with_ci(rb, boot(lambda s: rank_correlation(np.arange(5), bin_means(s["c"], s["bin"])))),
            "p": finite(rb_p),
        },
    }


def functional_matrix(arr: dict[str, Any], r0: float) -> np.ndarray:
    """[1, n]: 1.0 where the reference feature's Pearson r >= r0 (NaN r: lost), NaN for dead ones."""
    r = np.nan_to_num(arr["pearson_r"].double().numpy(), nan=-2.0)
    alive = arr["firing_rate"].double().numpy() > 0
    return np.where(alive, (r >= r0).astype(np.float64), np.nan)[None]


def _reference_arrays(data: StudyData, cond: Cond) -> dict[str, Any] | None:
    """rq2_survival.safetensors of the condition's reference-seed fit (else any fit)."""
    fits = sorted(data.fits(cond), key=lambda f: f.seed != data.reference_seed)
    for f in fits:
        arr = data.arrays(f"{cond.name}/seed{f.seed}", "rq2_survival.safetensors")
        if arr is not None:
            return arr
    return None


def method_contrast(
    data: StudyData, sparsity: float, tau: float = TAU, r0: float = 0.7
) -> dict[str, Any] | None:
    """Wanda vs magnitude at one sparsity: ratio and difference of S with joint hierarchical CIs
    (the two conditions' cross pairs share labels and the dense SAEs' features), each method's S~ CI
    (is it within the seed band?), survivors, and the functional ratio with its feature-bootstrap CI."""
    from lit_prune.analysis.stats import hierarchical_bootstrap, hierarchical_bootstraps, pair_mean

    conds = {c.label: c for c in data.pruned if not c.nm and math.isclose(c.sparsity, sparsity)}
    if "wanda" not in conds or "magnitude" not in conds:
        return None
    w, m, d = (pairs(data, c) for c in (conds["wanda"], conds["magnitude"], Cond(DENSE, DENSE, 0.0)))
    out: dict[str, Any] = {"sparsity": sparsity}
    if w is not None and m is not None and d is not None:
        labels = [lab for lab in w.cross if lab in m.labels and lab in d.labels]
        if labels:
            samples = {
                "w": w.survived(tau, w.rows(labels)),
                "m": m.survived(tau, m.rows(labels)),
                "d": d.survived(tau, d.rows(labels)),
            }
            ratio_of = lambda a, b: lambda s: _ratio(pair_mean(s[a]), pair_mean(s[b]))  # noqa: E731
            ci = hierarchical_bootstraps(
                {
                    "w": lambda s: pair_mean(s["w"]),
                    "m": lambda s: pair_mean(s["m"]),
                    "ratio": ratio_of("w", "m"),
                    "difference": lambda s: pair_mean(s["w"]) - pair_mean(s["m"]),
                    "tilde_w": ratio_of("w", "d"),
                    "tilde_m": ratio_of("m", "d"),
                },
                samples,
                n_boot(data),
            )
            Sw, Sm, Sd = (pair_mean(samples[k]) for k in "wmd")
            out.update(
                n_pairs=len(labels),
                S_wanda=_with_ci(Sw, ci["w"]),
                S_magnitude=_with_ci(Sm, ci["m"]),
                ratio=_with_ci(_ratio(Sw, Sm), ci["ratio"]),
                difference=_with_ci(Sw - Sm, ci["difference"]),
                tilde_wanda=_with_ci(_ratio(Sw, Sd), ci["tilde_w"]),
                tilde_magnitude=_with_ci(_ratio(Sm, Sd), ci["tilde_m"]),
                survivors_wanda=_survivors(samples["w"]),
                survivors_magnitude=_survivors(samples["m"]),
            )
    fw, fm = (_reference_arrays(data, conds[k]) for k in ("wanda", "magnitude"))
    if fw is not None and fm is not None and "pearson_r" in fw and "pearson_r" in fm:
        samples = {"w": functional_matrix(fw, r0), "m": functional_matrix(fm, r0)}
        point = _ratio(pair_mean(samples["w"]), pair_mean(samples["m"]))
        ci = hierarchical_bootstrap(
            lambda s: _ratio(pair_mean(s["w"]), pair_mean(s["m"])), samples, n_boot(data)
        )
        out["functional_ratio"] = _with_ci(point, ci)
        out["functional_survivors"] = min(_survivors(samples["w"]), _survivors(samples["m"]))
    return out


def method_contrasts(data: StudyData, tau: float = TAU, r0: float = 0.7) -> list[dict[str, Any]]:
    levels = sorted({c.sparsity for c in data.pruned if not c.nm})
    return [c for s in levels for c in [method_contrast(data, s, tau, r0)] if c is not None]


def importance_effects(
    data: StudyData, tau: float = TAU, r0: float = 0.7, scope: str = "firing"
) -> list[dict[str, Any]]:
    """`_importance_effects`, computed once per study and arguments (the headline and a table share it)."""
    cache = data.__dict__.setdefault("_importance_effects", {})
    if (tau, r0, scope) not in cache:
        cache[tau, r0, scope] = _importance_effects(data, tau, r0, scope)
    return cache[tau, r0, scope]


def _importance_effects(
    data: StudyData, tau: float = TAU, r0: float = 0.7, scope: str = "firing"
) -> list[dict[str, Any]]:
    """RQ5 at the effect-size level, per condition: Spearman(exact ablation ΔCE, survival) of the
    ablated top / random / rare features of each RQ5 SAE (every dense seed of study.importance_seeds),
    averaged over those SAEs (`_pooled_rho`). Geometric survival: each SAE's mean matched cosine over its
    cross-seed pairs, or where an SAE has none, for every SAE its decoder cosine to its start after the
    RQ2c warm start (`source` "warm start"); functional: the Pearson r on the dense vs the pruned model.
    Mann-Whitney survived vs lost over the pooled features; p-values BH-corrected across conditions."""
    from lit_prune.analysis.stats import benjamini_hochberg

    refs = _rq5_references(data, scope)
    if not refs:
        return []
    out = []
    for c in data.pruned:
        row: dict[str, Any] = {**_base(c), "n": sum(f.size for f, _ in refs.values())}
        geometric = _reference_survival(refs, _geometric_sources(data, c))
        if geometric is not None:
            row["geometric"] = _pooled_rho(data, refs, geometric[0], tau) | (
                {"source": geometric[1]} if geometric[1] != "cross-seed" else {}
            )
        elif pairs(data, c) is not None:
            row["geometric_missing"] = (
                f"no pruned SAE of a seed other than the reference {data.reference_seed} "
                "(add one to study.pruned_seeds) and no warm start of it"
            )
        functional = _reference_survival(refs, {"functional": _functional(data, c)})
        if functional is not None:
            row["functional"] = _pooled_rho(data, refs, functional[0], r0)
        out.append(row)
    for kind in ("geometric", "functional"):
        have = [r[kind] for r in out if kind in r]
        for key in ("p", "mw_p"):
            adjusted = benjamini_hochberg([np.nan if h[key] is None else h[key] for h in have])
            for h, v in zip(have, adjusted, strict=False):
                h[f"{key}_bh"] = finite(v)
    return out


def importance_over_studies(studies: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """RQ5 over the SAEs of several studies together (e.g. disjoint seed sets), from each study's
    `importance_effects`: per condition and survival kind, the mean of every SAE's rho and the t
    interval over all of them (`n_references` SAEs, `_mean_over_saes`)."""
    found: dict[str, dict[str, list[tuple[float, int]]]] = {}
    for effects in studies:
        for r in effects:
            kinds = found.setdefault(r["condition"], {})
            for kind in ("geometric", "functional"):
                e = r.get(kind) or {}
                ns = e.get("per_sae_n", {})
                kinds.setdefault(kind, []).extend(
                    (v, ns.get(s, 0)) for s, v in e.get("per_sae", {}).items() if v is not None
                )
    out = []
    for condition, kinds in found.items():
        row: dict[str, Any] = {"condition": condition}
        for kind, found_rhos in kinds.items():
            if found_rhos:
                rhos, ns = (list(v) for v in zip(*found_rhos, strict=True))
                row[kind] = {**_mean_over_saes(rhos, ns), "n_references": len(rhos)}
        out.append(row)
    return out


def _rq5_references(data: StudyData, scope: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Dense seed -> (ablated features, their exact-ablation ΔCE) of every finished RQ5 step, the
    reference first (under the reference seed for a pretrained reference SAE)."""
    from lit_prune.study.config import rq5_name

    ref, out = data.reference_seed, {}
    if ref is None:
        return out
    for s in [ref] + [s for s in data.seeds if s != ref]:
        arr = data.arrays(f"{DENSE}/{rq5_name(s, ref)}", "rq5_ablation.safetensors")
        if arr is not None:
            out[s] = (arr["features"].long().numpy(), arr[f"exact_ce_{scope}"].double().numpy())
    return out


def _geometric_sources(data: StudyData, cond: Cond) -> dict[str, dict[int, np.ndarray]]:
    """Per source (cross-seed, warm start): dense seed -> the survival of each feature of its SAE. A
    pretrained reference: its matched cosine in the pruned models' SAEs (cross-seed)."""
    if data.settings.get("reference_sae"):
        fs = feature_survival(data, cond)
        return {
            "cross-seed": {}
            if fs is None or data.reference_seed is None
            else {data.reference_seed: fs.cosine}
        }
    cross, warm = {}, {}
    p = pairs(data, cond)
    for s in data.seeds:
        mine = [] if p is None else [lab for lab in p.cross if lab[0] == s]
        if p is not None and mine:
            cross[s] = np.nan_to_num(p.cosine[p.rows(mine)], nan=0.0).mean(0)
        if (found := _warm_survival(data, cond, s)) is not None:
            warm[s] = found[0]
    return {"cross-seed": cross, "warm start": warm}


def _functional(data: StudyData, cond: Cond) -> dict[int, np.ndarray]:
    """Dense seed -> per-feature functional r of its SAE on `cond`: the functional step's, else the
    reference fit's (the reference SAE only)."""
    from lit_prune.study.functional import ARRAYS

    arr = data.arrays(f"{cond.name}/functional", ARRAYS)
    if arr is not None:
        return {int(s): r.double().numpy() for s, r in zip(arr["seed"], arr["pearson_r"], strict=True)}
    fit = _reference_arrays(data, cond)
    if fit is None or "pearson_r" not in fit or data.reference_seed is None:
        return {}
    return {data.reference_seed: fit["pearson_r"].double().numpy()}


def _reference_survival(
    refs: dict[int, tuple[np.ndarray, np.ndarray]], sources: dict[str, dict[int, np.ndarray]]
) -> tuple[dict[int, np.ndarray], str] | None:
    """(seed -> survival of its ablated features, source): the first source that covers every RQ5
    SAE, else the first that covers the reference SAE (it alone: one source for all, never a mix);
    None when none does."""
    for chosen in (list(refs), [next(iter(refs))]):
        for source, values in sources.items():
            if all(s in values and values[s].size > refs[s][0].max(initial=0) for s in chosen):
                return {s: values[s][refs[s][0]] for s in chosen}, source
    return None


def _pooled_rho(
    data: StudyData,
    refs: dict[int, tuple[np.ndarray, np.ndarray]],
    survival: dict[int, np.ndarray],
    kept_at: float,
) -> dict[str, Any]:
    """The mean over RQ5 SAEs of Spearman(importance, survival) over each SAE's ablated features
    (`per_sae`, over `per_sae_n` features each); its CI: with several SAEs the t interval over their
    rho, never narrower than their feature noise (the choice of SAE is part of the uncertainty, and
    each rho carries its own feature noise: `_mean_over_saes`), with one a feature bootstrap. Also
    the pooled Spearman p and the Mann-Whitney of importance, survived vs lost."""
    from lit_prune.analysis.stats import (
        hierarchical_bootstrap,
        mann_whitney,
        rank_correlation,
        spearman,
    )

    per_sae = {s: rank_correlation(refs[s][1], survival[s]) for s in survival}
    per_sae_n = {s: int((np.isfinite(refs[s][1]) & np.isfinite(survival[s])).sum()) for s in survival}
    if len(per_sae) > 1:
        effect = _mean_over_saes(list(per_sae.values()), list(per_sae_n.values()))
    else:
        (s,) = per_sae
        samples = {"i": refs[s][1][None], "c": survival[s][None]}
        ci = hierarchical_bootstrap(lambda x: rank_correlation(x["i"][0], x["c"][0]), samples, n_boot(data))
        effect = _with_ci(per_sae[s], ci)
    imp = np.concatenate([refs[s][1] for s in per_sae])
    surv = np.concatenate([survival[s] for s in per_sae])
    kept = np.nan_to_num(surv, nan=-2.0) >= kept_at
    return {
        **effect,
        "p": finite(spearman(imp, surv)[1]),
        "mw_p": finite(mann_whitney(imp[kept], imp[~kept])[1]),
        "n_survived": int(kept.sum()),
        "n_references": len(per_sae),
        "per_sae": {int(s): finite(r) for s, r in per_sae.items()},
        "per_sae_n": {int(s): n for s, n in per_sae_n.items()},
    }


def _mean_over_saes(rhos: list[float], ns: list[int]) -> dict[str, Any]:
    """The mean of the SAEs' rho with the t interval over them, never narrower than their feature
    noise (`stats.replicate_mean_ci` with each rho's Spearman variance over its n features)."""
    from lit_prune.analysis.stats import replicate_mean_ci, spearman_variance

    within = [spearman_variance(r, n) for r, n in zip(rhos, ns, strict=True)]
    ci = replicate_mean_ci(rhos, bounds=(-1.0, 1.0), within_variances=within)
    return _with_ci(float(np.nanmean(rhos)), ci)


def _warm_survival(
    data: StudyData, cond: Cond, seed: int | None = None
) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(cosine, alive, "warm start"): per feature of dense seed `seed`'s SAE (default: the reference),
    its decoder cosine to its start after the RQ2c warm start on `cond`'s model, and whether it fires
    on the dense model. None without that warm start, or for a pretrained reference (RQ2c warm-starts
    our dense SAEs)."""
    from lit_prune.study.warm import ARRAYS

    seed = data.reference_seed if seed is None else seed
    warm = None if data.settings.get("reference_sae") else data.arrays(f"{cond.name}/warm{seed}", ARRAYS)
    if warm is None:
        return None
    return warm["cosine"].double().numpy(), warm["firing_rate"].numpy() > 0, "warm start"


def dense_baseline(data: StudyData, tau: float = TAU) -> dict[str, Any] | None:
    """The seed baseline S_seed over every ordered dense pair (a != b), with its hierarchical CI."""
    from lit_prune.analysis.stats import hierarchical_bootstrap, pair_mean

    dense = pairs(data, Cond(DENSE, DENSE, 0.0))
    if dense is None or not dense.labels:
        return None
    surv = dense.survived(tau)
    ci = hierarchical_bootstrap(lambda s: pair_mean(s["d"]), {"d": surv}, n_boot(data))
    return {
        "S_seed": _with_ci(pair_mean(surv), ci),
        "n_pairs": len(dense.labels),
        "per_pair": {lab: float(np.nanmean(surv[i])) for i, lab in enumerate(dense.labels)},
    }


def same_seed_init(data: StudyData, cond: Cond, tau: float = TAU) -> dict[str, float | None]:
    """The measured mechanism of same-seed inflation: how far the same-seed SAEs' latents moved from
    their (shared) init. init_cosine_mean / init_near_fraction over all latents (rq2 rows), and the
    median cosine to its own init of the partners of same-seed survivors (partner_init_cosine)."""
    same = [f for f in data.fits(cond) if f.same_seed is True]
    rq2 = lambda f: f.rows["rq2_survival.json"]  # noqa: E731
    partner = []
    for f in same:
        arr = data.arrays(f"{cond.name}/seed{f.seed}", "rq2_survival.safetensors")
        if arr is not None and "partner_init_cosine" in arr:
            hit = np.nan_to_num(arr["matched_cosine"].double().numpy(), nan=0.0) >= tau
            vals = arr["partner_init_cosine"].double().numpy()[hit]
            partner += list(vals[np.isfinite(vals)])
    return {
        "init_cosine_mean": mean(value(rq2(f), "init_cosine_mean") for f in same),
        "init_near_fraction": mean(value(rq2(f), "init_near_fraction") for f in same),
        "partner_init_cosine_median": float(np.median(partner)) if partner else None,
        "same_survivors": float(len(partner) / len(same)) if same else None,
    }


def warm_start(data: StudyData) -> list[dict[str, Any]]:
    """RQ2c per pruned condition (docs/methods.md §4): S_warm and its control per tau (means over the
    warm-started seeds), the ratio pooled over them with a bootstrap CI over seeds and features, and
    the mean per-bin movement (`lit_prune.study.warm.warm_comparison`)."""
    from lit_prune.study.warm import ARRAYS, RESULTS, warm_comparison

    w = data.settings.get("warm_start") or {}
    if not w.get("enabled", False):
        return []
    seeds = [int(s) for s in (w.get("seeds") or data.seeds)]
    read = lambda key: data.arrays(key, ARRAYS)  # noqa: E731
    out = []
    for cond in data.pruned:
        found = warm_comparison(read, cond.name, seeds, TAUS, n_boot=int(w.get("n_boot", 1000)))
        if found is None:
            continue
        per_seed, pooled = found["per_seed"], found["pooled"]
        got = lambda metric, per_seed=per_seed: mean(s[metric] for s in per_seed)  # noqa: E731
        row = {**_base(cond), "seeds": len(per_seed)}
        for t in TAUS:
            tag = f"@{t:g}"
            row |= {
                f"S_warm{tag}": got(f"warm_survival{tag}"),
                f"control{tag}": got(f"warm_control{tag}"),
                f"ratio{tag}": finite(pooled[f"ratio{tag}"]),
                f"ratio_ci{tag}": [finite(v) for v in pooled[f"ratio_ci{tag}"]],
            }
        row["excess_movement_bins"] = [got(f"warm_bin{b}_excess_movement") for b in range(5)]
        row["bins"] = [got(f"warm_bin{b}_survival") for b in range(5)]
        row["control_bins"] = [got(f"warm_bin{b}_control_survival") for b in range(5)]
        row["rho_bin_movement"] = got("warm_rho_bin_excess_movement")
        rows = [data.rows(f"{cond.name}/warm{s}", RESULTS) for s in seeds]
        row["val_fvu"] = mean(value(r, "val_fvu") for r in rows if r)
        out.append(row)
    return out

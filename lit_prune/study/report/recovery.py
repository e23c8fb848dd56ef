"""RQ6 in the report: does a recovery fine-tune restore the features pruning lost? (docs/methods.md §4 RQ6)

Each recovered model (<cond>-recovered, study.recovery) is set beside its unrecovered twin <cond>:
- perplexity (the same eval sequences);
- geometric survival S at tau = 0.7 over every cross-seed pair (`analysis.cross_effects`), S / S_seed, and
  the ratio S_recovered / S_pruned with a joint hierarchical bootstrap CI: the two conditions' pairs
  have the same labels (dense SAE a, SAE of seed b) and the same features of a, so pairs and features
  are drawn once for both;
- functional survival of the reference (r >= r0) on both models and its ratio (CI over features; one
  SAE on three models, no seed variance);
- RQ3: the dense SAE's transfer metrics on both models;
- which lost features come back, per firing-rate quintile of the dense SAE a (bin 0 = rarest): among
  the features lost on the pruned model, the fraction that survive on the recovered one (returned),
  among the survivors the fraction lost after recovery (newly lost), and the net return
  (S_rec,bin - S_pruned,bin) / (1 - S_pruned,bin); and the seed-relative return
  (S_rec,bin - S_pruned,bin) / (S_seed,bin - S_pruned,bin): the share of what pruning took below the
  bin's own dense seed ceiling that comes back (a feature two dense seeds do not share cannot
  "return", and rare and frequent bins differ in their seed stability). rho of the seed-relative
  return over the bins (CI from the same joint bootstrap, the dense pairs drawn with the others) says
  whether the rare (rho < 0) or the frequent ones (rho > 0) come back.

Verdict ("restored" / "not restored" / not determinable, `restored_verdict`), by the rules of the other
claims (`report.claims`, the equivalence band first): not restored iff the CI of S_recovered / S_pruned
lies inside (1 / RATIO_BOUND, RATIO_BOUND) or below 1; restored iff above 1 and out of that band; not
determinable with fewer than MIN_SURVIVORS
survivors per pair in either model, when the pruned model's S is within the seed band (the CI of
S / S_seed contains 1: nothing measurably lost to restore), or when the CI spans both outcomes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lit_prune.study.report import claims as C
from lit_prune.study.report.analysis import (
    MIN_SURVIVORS,
    TAU,
    _ratio,
    _reference_arrays,
    _survivors,
    _with_ci,
    cross_effects,
    finite,
    functional_effects,
    functional_matrix,
    n_boot,
    pairs,
)
from lit_prune.study.report.data import DENSE, Cond, StudyData, value
from lit_prune.study.report.tables import S_FMT, Table

RESTORED, NOT_RESTORED = "restored", "not restored"
RARE, FREQUENT, NEITHER = "the rare ones", "the frequent ones", "neither: evenly over firing rates"
N_BINS = 5
TRANSFER = ("ce_recovered", "fvu", "kl_score")
"""The dense SAE's RQ3 metrics shown for both models."""


def _perplexity(data: StudyData, key: str) -> float | None:
    return value(data.rows(key, "perplexity.json"), "perplexity")


def _transfer(data: StudyData, cond: Cond) -> dict[str, float | None]:
    """The dense (reference) SAE's RQ3 metrics on a condition's model (its reference-seed fit)."""
    fit = next((f for f in data.fits(cond) if f.seed == data.reference_seed), None)
    rows = [
        r
        for r in (fit.rows["rq3_transfer.json"] if fit else [])
        if r.get("stage") != "dense" and r.get("sae") == "reference" and not r.get("sae_sparsity")
    ]
    return {m: value(rows, m) for m in TRANSFER}


def _returns(u: np.ndarray, r: np.ndarray, bins: np.ndarray) -> dict[str, np.ndarray]:
    """Per bin, over [P, n] survived matrices (NaN: dead) with [P, n] (or [1, n]) bin indices, each
    pair's share first and then their mean (`bin_means`, as every S_bin of the report): returned =
    lost features (u = 0) surviving on the recovered model, newly lost = kept ones (u = 1) that do
    not, net = (S_r - S_u) / (1 - S_u); lost = lost features per pair."""
    from lit_prune.analysis.fragility import bin_means

    alive = ~np.isnan(u) & ~np.isnan(r)
    bins = np.where(alive, np.broadcast_to(bins, u.shape), -1)
    lost, kept = alive & (u == 0), alive & (u == 1)
    su, sr = bin_means(u, bins), bin_means(r, bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        net = np.where(su < 1, (sr - su) / (1 - su), np.nan)
    return {
        "returned": bin_means(np.where(lost, r, np.nan), bins),
        "newly_lost": bin_means(np.where(kept, 1 - r, np.nan), bins),
        "net": net,
        "lost": np.array([(lost & (bins == b)).sum() for b in range(N_BINS)]) / max(u.shape[0], 1),
    }


def _seed_relative(u: np.ndarray, r: np.ndarray, d: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Per bin (S_r - S_u) / (S_d - S_u) of [P, n] survived matrices of the pruned (u), recovered (r)
    and dense seed (d) pairs; NaN where pruning took nothing below the seed ceiling (S_d <= S_u)."""
    from lit_prune.analysis.fragility import bin_means

    su, sr, sd = bin_means(u, bins), bin_means(r, bins), bin_means(d, bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sd > su, (sr - su) / (sd - su), np.nan)


def _rho(net: np.ndarray) -> float:
    from lit_prune.analysis.stats import rank_correlation

    return rank_correlation(np.arange(N_BINS), net)


def _list(x: np.ndarray) -> list[float | None]:
    return [finite(v) for v in x]


def geometric_contrast(data: StudyData, rec: Cond, tau: float = TAU) -> dict[str, Any] | None:
    """S_recovered / S_pruned and the per-bin returns over the cross-seed pairs both conditions have."""
    from lit_prune.analysis.fragility import rho_bin
    from lit_prune.analysis.stats import hierarchical_bootstraps, pair_mean

    r, u, d = pairs(data, rec), pairs(data, rec.source), pairs(data, Cond(DENSE, DENSE, 0.0))
    if r is None or u is None or d is None:
        return None
    labels = [lab for lab in r.cross if lab in u.labels and lab in d.labels]
    if not labels:
        return None
    samples = {
        "r": r.survived(tau, r.rows(labels)),
        "u": u.survived(tau, u.rows(labels)),
        "d": d.survived(tau, d.rows(labels)),
        "bin": u.bins(u.rows(labels)),  # the dense SAE a's firing-rate bins: the same in all three
    }
    stats = {
        "ratio": lambda s: _ratio(pair_mean(s["r"]), pair_mean(s["u"])),
        "difference": lambda s: pair_mean(s["r"]) - pair_mean(s["u"]),
        "rho_net": lambda s: _rho(_returns(s["u"], s["r"], s["bin"])["net"]),
        "rho_seed": lambda s: _rho(_seed_relative(s["u"], s["r"], s["d"], s["bin"])),
    }
    ci = hierarchical_bootstraps(stats, samples, n_boot(data))
    back = _returns(samples["u"], samples["r"], samples["bin"])
    rho, p = rho_bin(list(back["net"]))
    relative = _seed_relative(samples["u"], samples["r"], samples["d"], samples["bin"])
    rho_seed, p_seed = rho_bin(list(relative))
    Sr, Su = pair_mean(samples["r"]), pair_mean(samples["u"])
    return {
        "n_pairs": len(labels),
        "ratio": _with_ci(_ratio(Sr, Su), ci["ratio"]),
        "difference": _with_ci(Sr - Su, ci["difference"]),
        "survivors_recovered": _survivors(samples["r"]),
        "survivors_pruned": _survivors(samples["u"]),
        "returned_bins": _list(back["returned"]),
        "newly_lost_bins": _list(back["newly_lost"]),
        "net_bins": _list(back["net"]),
        "lost_bins": _list(back["lost"]),
        "rho_net": {**_with_ci(rho, ci["rho_net"]), "p": finite(p)},
        "seed_relative_bins": _list(relative),
        "rho_seed": {**_with_ci(rho_seed, ci["rho_seed"]), "p": finite(p_seed)},
    }


def functional_contrast(data: StudyData, rec: Cond, r0: float = 0.7) -> dict[str, Any] | None:
    """The reference's functional survival on the recovered vs the pruned model (CI over features)."""
    from lit_prune.analysis.fragility import firing_rate_bins
    from lit_prune.analysis.stats import hierarchical_bootstrap, pair_mean

    ar, au = _reference_arrays(data, rec), _reference_arrays(data, rec.source)
    if ar is None or au is None or "pearson_r" not in ar or "pearson_r" not in au:
        return None
    samples = {"r": functional_matrix(ar, r0), "u": functional_matrix(au, r0)}
    ci = hierarchical_bootstrap(lambda s: _ratio(pair_mean(s["r"]), pair_mean(s["u"])), samples, n_boot(data))
    back = _returns(samples["u"], samples["r"], firing_rate_bins(au["firing_rate"], N_BINS).numpy()[None])
    return {
        "ratio": _with_ci(_ratio(pair_mean(samples["r"]), pair_mean(samples["u"])), ci),
        "survivors": min(_survivors(samples["r"]), _survivors(samples["u"])),
        "returned_bins": _list(back["returned"]),
        "net_bins": _list(back["net"]),
    }


def restored_verdict(
    ratio: dict[str, Any] | None, survivors: list[float], pruned_in_band: bool = False
) -> tuple[str, str]:
    """(verdict, reason) of "recovery restores features" from S_recovered / S_pruned with its CI."""
    if not ratio or (ratio.get("value") is None and ratio.get("lo") is None):
        return C.NOT_MEASURED, "no pairs of both models"
    if min(survivors) < MIN_SURVIVORS:
        return C.NOT_DETERMINABLE, f"fewer than {MIN_SURVIVORS} survivors per pair ({min(survivors):.0f})"
    if pruned_in_band:
        return (
            C.NOT_DETERMINABLE,
            "the pruned model's S is within the seed band (CI of S/S_seed contains 1): nothing measurably lost",
        )
    side = C.decide(ratio, 1.0, 1 / C.RATIO_BOUND, C.RATIO_BOUND)
    if side == 0:
        return (
            NOT_RESTORED,
            f"CI inside ({1 / C.RATIO_BOUND:.2f}, {C.RATIO_BOUND:g}): no difference worth the name",
        )
    if side == 1:
        return RESTORED, "CI above 1"
    if side == -1:
        return NOT_RESTORED, "CI below 1 (recovery loses more)"
    return C.NOT_DETERMINABLE, "CI spans both outcomes"


def which_return(rho: dict[str, Any] | None, lost: list[float | None]) -> tuple[str, str]:
    """(which lost features come back, reason) from rho of the seed-relative return over the bins."""
    if not rho or rho.get("value") is None:
        return C.NOT_MEASURED, "no seed-relative return per bin"
    counted = [v for v in lost if v is not None]
    if not counted or min(counted) < MIN_SURVIVORS:
        return C.NOT_DETERMINABLE, f"fewer than {MIN_SURVIVORS} lost features per pair in a bin"
    side = C.decide(rho, 0.0, -C.EQUIVALENCE, C.EQUIVALENCE)
    if side == 0:
        return NEITHER, f"CI inside ±{C.EQUIVALENCE:g}"
    if side == -1:
        return RARE, "CI of rho below 0"
    if side == 1:
        return FREQUENT, "CI of rho above 0"
    return C.NOT_DETERMINABLE, "CI spans both outcomes"


def recovery_rows(data: StudyData, r0: float = 0.7) -> list[dict[str, Any]]:
    """One row per recovered model: its numbers beside its pruned twin's, the verdicts and their reasons."""
    out = []
    for rec in data.recovered:
        src = rec.source
        geo_r, geo_u = cross_effects(data, rec), cross_effects(data, src)
        fun_r, fun_u = functional_effects(data, rec, r0), functional_effects(data, src, r0)
        geo, fun = geometric_contrast(data, rec), functional_contrast(data, rec, r0)
        row: dict[str, Any] = {
            "condition": rec.name,
            "source": src.name,
            "method": src.label,
            "sparsity": rec.sparsity,
            "perplexity_dense": _perplexity(data, f"{DENSE}/perplexity"),
            "perplexity_pruned": _perplexity(data, f"{src.name}/prune"),
            "perplexity_recovered": _perplexity(data, f"{rec.name}/recover"),
            "geometric": geo,
            "functional": fun,
        }
        for tag, g, f, cond in (("pruned", geo_u, fun_u, src), ("recovered", geo_r, fun_r, rec)):
            row[f"S_{tag}"] = g["S"] if g else None
            row[f"S_tilde_{tag}"] = g["S_tilde"] if g else None
            row[f"functional_S_{tag}"] = f["S"] if f else None
            row[f"transfer_{tag}"] = _transfer(data, cond)
        row["S_seed"] = geo_u["S_seed"] if geo_u else None
        band = C.in_seed_band(row["S_tilde_pruned"])
        row["verdict"], row["reason"] = restored_verdict(
            geo and geo["ratio"],
            [geo["survivors_recovered"], geo["survivors_pruned"]] if geo else [0.0],
            band,
        )
        row["functional_verdict"], row["functional_reason"] = restored_verdict(
            fun and fun["ratio"], [fun["survivors"]] if fun else [0.0]
        )
        row["which"], row["which_reason"] = which_return(
            geo and geo["rho_seed"], geo["lost_bins"] if geo else []
        )
        row["back_in_seed_band"] = C.in_seed_band(row["S_tilde_recovered"])
        out.append(row)
    return out


def _overall(verdicts: list[str]) -> str:
    """`claims.overall` over restored / not restored verdicts."""
    to = {RESTORED: C.REPRODUCED, NOT_RESTORED: C.NOT_REPRODUCED}
    back = {v: k for k, v in to.items()}
    result = C.overall([to.get(v, v) for v in verdicts])
    return back.get(result, result)


def recovery_claim(rows: list[dict[str, Any]], r0: float = 0.7) -> dict[str, str]:
    """The headline row of RQ6 (claims.COLUMNS)."""
    geo, fun = [], []
    for r in rows:
        g = r["geometric"] or {}
        geo.append(
            f"{r['condition']}: S_rec/S_pruned {C._ci(g.get('ratio'), unit='x')}, survivors/pair "
            f"{C._f(g.get('survivors_recovered'), 0)} vs {C._f(g.get('survivors_pruned'), 0)} → {r['verdict']} "
            f"({r['reason']}); lost features that come back: {r['which']} ({r['which_reason']})"
        )
        fun.append(
            f"{r['condition']}: {C._ci((r['functional'] or {}).get('ratio'), unit='x')} → "
            f"{r['functional_verdict']} ({r['functional_reason']})"
        )
    return {
        "claim": "RQ6: a recovery fine-tune restores the features pruning lost",
        "paper": "– (not in the paper)",
        "ours": "; ".join(geo) or "–",
        "verdict": _overall([r["verdict"] for r in rows]),
        "functional": "; ".join(fun) or "–",
        "functional verdict": _overall([r["functional_verdict"] for r in rows]),
        "basis": f"S_recovered / S_pruned [95% CI] at τ = {TAU:g} over the cross-seed pairs both models have "
        f"(joint hierarchical bootstrap); functional: the same ratio of r >= {r0:g} (CI over features); "
        f"not restored iff the CI lies inside ({1 / C.RATIO_BOUND:.2f}, {C.RATIO_BOUND:g}) or below 1, restored "
        f"iff above 1 and out of that band; not determinable with < {MIN_SURVIVORS} survivors per pair or the pruned "
        "model within the seed band",
    }


# --- table and figure ------------------------------------------------------------------------------
def _v(e: dict[str, Any] | None) -> float | None:
    return None if not e else e.get("value")


def _cis(e: dict[str, Any] | None) -> str:
    return C._ci(e, 3)


def recovery_table(rows: list[dict[str, Any]]) -> Table:
    cols = [
        "condition",
        "method",
        "sparsity",
        "model",
        "perplexity",
        "S@0.7 [CI]",
        "S/S_seed [CI]",
        "functional S [CI]",
        *(f"RQ3 {m}" for m in TRANSFER),
    ]
    out = []
    for r in rows:
        for tag in ("pruned", "recovered"):
            out.append(
                [
                    r["condition"],
                    r["method"],
                    r["sparsity"],
                    tag,
                    r[f"perplexity_{tag}"],
                    _cis(r[f"S_{tag}"]),
                    _cis(r[f"S_tilde_{tag}"]),
                    _cis(r[f"functional_S_{tag}"]),
                    *(r[f"transfer_{tag}"][m] for m in TRANSFER),
                ]
            )
    return Table(
        name="rq6_recovery",
        title="RQ6: the pruned models before and after their recovery fine-tune",
        columns=cols,
        rows=out,
        formats=S_FMT,
        note="S: geometric survival of the dense SAE a's features in the SAE of seed b != a trained on each "
        "model, mean over the cross-seed pairs [95% hierarchical bootstrap CI]; S/S_seed: over the dense "
        "seed pairs with the same labels (a CI containing 1 is within the seed band); functional S: the "
        "reference's activations on the dense vs this model, r >= r0 (CI over features); RQ3: the dense "
        "SAE on this model.",
    )


def recovery_bins_table(rows: list[dict[str, Any]]) -> Table:
    cols = ["condition", "method", "sparsity", "measure", *(f"bin {b}" for b in range(N_BINS)), "rho [CI]"]
    out = []
    for r in rows:
        g, f = r["geometric"] or {}, r["functional"] or {}
        rho = g.get("rho_net")
        for name, values, extra in (
            ("lost per pair (pruned)", g.get("lost_bins"), ""),
            ("returned (of lost)", g.get("returned_bins"), ""),
            ("newly lost (of survivors)", g.get("newly_lost_bins"), ""),
            ("net return", g.get("net_bins"), _cis(rho) if rho else "–"),
            ("seed-relative return", g.get("seed_relative_bins"), _cis(g.get("rho_seed"))),
            ("functional returned (of lost)", f.get("returned_bins"), ""),
            ("functional net return", f.get("net_bins"), ""),
        ):
            out.append(
                [r["condition"], r["method"], r["sparsity"], name, *(values or [None] * N_BINS), extra]
            )
    return Table(
        name="rq6_returns",
        title="RQ6: which lost features come back, per firing-rate quintile of the dense SAE (bin 0 = rarest)",
        columns=cols,
        rows=out,
        formats=S_FMT,
        note="Geometric, over the cross-seed pairs of both models (τ = 0.7): returned = lost on the pruned "
        "model and surviving on the recovered one; net return = (S_rec,bin − S_pruned,bin) / (1 − "
        "S_pruned,bin); seed-relative return = (S_rec,bin − S_pruned,bin) / (S_seed,bin − S_pruned,bin), "
        "the share of the loss below the bin's dense seed ceiling that comes back (–: nothing lost below "
        "it); rho: Spearman over the bins (CI: the joint bootstrap), < 0 = the rare ones come back more; "
        "the verdict reads the seed-relative one.",
    )


def recovery_figure(rows: list[dict[str, Any]]) -> Figure | None:
    """Perplexity, geometric and functional survival before / after recovery, and the net return per bin."""
    from lit_prune.study.report.figures import _figure, color

    if not rows:
        return None
    fig = _figure(13.0, 4.2)
    axes = fig.subplots(1, 4)
    x = np.arange(len(rows))
    names = [r["condition"].removesuffix("-recovered") for r in rows]
    for ax, key, title, ylabel in (
        (axes[0], "perplexity", "Perplexity", "eval perplexity (log)"),
        (axes[1], "S", f"Geometric survival (τ = {TAU:g})", "S, cross-seed pairs"),
        (axes[2], "functional_S", "Functional survival", "fraction of features with r ≥ r0"),
    ):
        for k, tag in enumerate(("pruned", "recovered")):
            if key == "perplexity":
                vals, err = [r[f"perplexity_{tag}"] for r in rows], None
            else:
                es = [r[f"{key}_{tag}"] or {} for r in rows]
                vals = [e.get("value") for e in es]
                err = np.array(
                    [
                        [
                            (e["value"] - e["lo"]) if e.get("lo") is not None else 0.0,
                            (e["hi"] - e["value"]) if e.get("hi") is not None else 0.0,
                        ]
                        if e.get("value") is not None
                        else [0.0, 0.0]
                        for e in es
                    ]
                ).T
            heights = [np.nan if v is None else v for v in vals]
            ax.bar(x + (k - 0.5) * 0.38, heights, 0.38, yerr=err, capsize=3, label=tag, alpha=0.6 + 0.4 * k)
        if key == "perplexity":
            ax.set_yscale("log")
            dense = rows[0].get("perplexity_dense")
            if dense is not None:
                ax.axhline(dense, color="k", ls="--", lw=1, label="dense")
        if key == "S" and _v(rows[0].get("S_seed")) is not None:
            ax.axhline(_v(rows[0]["S_seed"]), color="grey", ls=":", lw=1, label="S_seed (dense pairs)")
        ax.set_xticks(x, names, rotation=20)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax = axes[3]
    for r in rows:
        g, f = r["geometric"] or {}, r["functional"] or {}
        for values, ls, what in (
            (g.get("net_bins"), "-", "geometric"),
            (g.get("seed_relative_bins"), "-.", "geometric, seed-relative"),
            (f.get("net_bins"), "--", "functional"),
        ):
            if values:
                ys = [np.nan if v is None else v for v in values]
                ax.plot(
                    range(N_BINS),
                    ys,
                    ls=ls,
                    marker="o",
                    color=color(r["method"]),
                    label=f"{r['condition']} {what}",
                )
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_xticks(range(N_BINS))
    ax.set_xlabel("firing-rate quintile of the dense SAE (0 = rarest)")
    ax.set_ylabel("return of lost features")
    ax.set_title("Which lost features come back")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig

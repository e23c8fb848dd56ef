"""The report's headline: each claim of arXiv 2603.25325 beside our effect size, its CI and a verdict.

Verdict rules (docs/methods.md §4b). Every effect has a 95% CI from a hierarchical bootstrap over the
cross-seed pairs and, within each pair, the features (`lit_prune.analysis.stats.hierarchical_bootstrap`);
functional survival has no seed variance (one SAE on two models), so its CI resamples features only.
- "reproduced" / "not reproduced" only when the CI decides; otherwise "not determinable at this budget"
  with the reason: fewer than MIN_SURVIVORS surviving features (mean per pair) in a compared group, the
  pruned S within the seed band (the CI of S / S_seed contains 1: pruning is indistinguishable from
  retraining with another seed), or a CI that spans both outcomes.
- Every effect has an equivalence band of effects too small to count, and the band is read first
  (`decide`): a CI inside it is "no difference worth the name" even when it also excludes the null.
  A large sample makes a trivial effect significant; it must not make it a reproduction.
- Wanda vs magnitude: ratio S_wanda / S_magnitude per sparsity. Not reproduced iff its CI lies inside
  (1 / RATIO_BOUND, RATIO_BOUND) or below 1; reproduced iff it lies above 1 and leaves that band.
- Rare features survive better: rho_bin of the per-bin survival normalised by each bin's own dense seed
  baseline (S_bin / S_seed,bin), exact permutation p over the 5! orderings. Not reproduced iff its CI
  lies inside (-EQUIVALENCE, EQUIVALENCE) or above 0; reproduced iff it lies below 0 outside that band.
- Survival does not predict importance (a dissociation): Spearman(exact-ablation ΔCE, survival) must
  have its CI inside (-EQUIVALENCE, EQUIVALENCE) to be reproduced; not reproduced iff the CI lies
  wholly outside that band; Mann-Whitney (BH-corrected) is reported beside it.
- Over conditions: decided both ways -> "partly"; decided one way by at least half of the measured
  conditions and by none the other way -> that verdict; otherwise not determinable (one condition of
  four that decides, beside three that do not, is one more chance for a CI to decide by luck).
"""

from __future__ import annotations

from typing import Any

from lit_prune.analysis.stats import ci_side
from lit_prune.study.report.analysis import MIN_SURVIVORS, TAU

REPRODUCED, NOT_REPRODUCED, PARTLY, NOT_MEASURED, CONTEXT = (
    "reproduced",
    "not reproduced",
    "partly",
    "not measured",
    "context",
)
NOT_DETERMINABLE = "not determinable at this budget"
RATIO_BOUND = 1.25
"""Wanda / magnitude ratios whose CI lies inside (1 / 1.25, 1.25) count as "no difference"."""
EQUIVALENCE = 0.2
"""|rho| below this is "no relation" (an equivalence bound: the whole CI must lie inside)."""
ALPHA = 0.05
COLUMNS = ("claim", "paper", "ours", "verdict", "functional", "functional verdict", "basis")


def _f(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _ci(e: dict[str, Any] | None, digits: int = 2, unit: str = "") -> str:
    """'v [lo, hi]' of a _with_ci dict."""
    if not e or e.get("value") is None:
        return "–"
    return f"{_f(e['value'], digits)}{unit} [{_f(e.get('lo'), digits)}, {_f(e.get('hi'), digits)}]"


def _p(v: float | None) -> str:
    return "–" if v is None else f"{v:.3g}"


def in_seed_band(tilde: dict[str, Any] | None) -> bool:
    """The CI of S / S_seed contains 1: this survival is what retraining with another seed gives."""
    return bool(tilde) and ci_side(tilde.get("lo"), tilde.get("hi"), 1.0) == 0


def decide(effect: dict[str, Any], null: float, band_lo: float, band_hi: float) -> int | None:
    """How the CI of an effect decides, the equivalence band (band_lo, band_hi) first: 0 if the whole
    CI lies inside it (no effect worth the name, whether or not it excludes the null), +1 / -1 if it
    lies above / below the null and leaves the band, None if it decides nothing."""
    lo, hi = effect.get("lo"), effect.get("hi")
    if lo is not None and hi is not None and band_lo < lo and hi < band_hi:
        return 0
    side = ci_side(lo, hi, null)
    return side if side else None


def ratio_verdict(
    effect: dict[str, Any] | None, survivors: list[float], bands: list[bool]
) -> tuple[str, str]:
    """(verdict, reason) of "A preserves more than B" from the ratio A / B with its CI."""
    if not effect or effect.get("value") is None and effect.get("lo") is None:
        return NOT_MEASURED, "no cross-seed pairs"
    if min(survivors) < MIN_SURVIVORS:
        return NOT_DETERMINABLE, f"fewer than {MIN_SURVIVORS} survivors per pair ({min(survivors):.0f})"
    if bands and all(bands):
        return NOT_DETERMINABLE, "both within the seed band (CI of S/S_seed contains 1)"
    side = decide(effect, 1.0, 1 / RATIO_BOUND, RATIO_BOUND)
    if side == 0:
        return (
            NOT_REPRODUCED,
            f"CI inside ({1 / RATIO_BOUND:.2f}, {RATIO_BOUND:g}): no difference worth the name",
        )
    if side == 1:
        return REPRODUCED, "CI above 1"
    if side == -1:
        return NOT_REPRODUCED, "CI below 1 (the opposite)"
    return NOT_DETERMINABLE, "CI spans both outcomes"


def negative_rho_verdict(rho: dict[str, Any] | None, survivors: list[float], band: bool) -> tuple[str, str]:
    """(verdict, reason) of "rho < 0" (rare survive better) from rho's CI."""
    if not rho or rho.get("value") is None:
        return NOT_MEASURED, "no rho_bin"
    if survivors and min(survivors) < MIN_SURVIVORS:
        return NOT_DETERMINABLE, f"fewer than {MIN_SURVIVORS} survivors in a bin ({min(survivors):.0f})"
    if band:
        return NOT_DETERMINABLE, "S within the seed band (CI of S/S_seed contains 1)"
    side = decide(rho, 0.0, -EQUIVALENCE, EQUIVALENCE)
    if side == 0:
        return NOT_REPRODUCED, f"CI inside ±{EQUIVALENCE:g}: no relation"
    if side is None:
        return NOT_DETERMINABLE, "CI spans both outcomes"
    # The CI resamples features and seed pairs within the bins; the exact p asks whether 5 bins fall
    # in this order by chance. A direction needs both: a CI off 0 alone flipped between seed sets.
    p = rho.get("p")
    if p is not None and not p < ALPHA:
        return NOT_DETERMINABLE, f"CI {'below' if side == -1 else 'above'} 0 but exact p {_p(p)} >= {ALPHA:g}"
    return (REPRODUCED, "CI below 0") if side == -1 else (NOT_REPRODUCED, "CI above 0 (the opposite)")


def dissociation_verdict(rho: dict[str, Any] | None) -> tuple[str, str]:
    """(verdict, reason) of "no relation": reproduced iff the CI of rho lies inside ±EQUIVALENCE, not
    reproduced iff it lies wholly beyond it (a relation worth the name). A CI that excludes 0 but
    reaches into the band shows a relation that may still be too small to count: it decides nothing."""
    if not rho or rho.get("value") is None:
        return NOT_MEASURED, "no correlation"
    side = decide(rho, 0.0, -EQUIVALENCE, EQUIVALENCE)
    if side == 0:
        return REPRODUCED, f"CI inside ±{EQUIVALENCE:g}"
    if side is not None and (rho["lo"] >= EQUIVALENCE or rho["hi"] <= -EQUIVALENCE):
        return NOT_REPRODUCED, f"CI beyond ±{EQUIVALENCE:g}: a relation worth the name"
    where = "contains 0" if side is None else "excludes 0 but reaches into the band"
    return NOT_DETERMINABLE, f"CI not inside ±{EQUIVALENCE:g} and {where}"


def overall(verdicts: list[str]) -> str:
    """One verdict over conditions: decided both ways -> partly; one way by at least half of the
    measured conditions -> that verdict; else not determinable. One condition of four is not the claim:
    each condition is another chance of a CI that happens to decide."""
    measured = [v for v in verdicts if v != NOT_MEASURED]
    if not measured:
        return NOT_MEASURED
    decided = {v for v in measured if v in (REPRODUCED, NOT_REPRODUCED)}
    if len(decided) > 1:
        return PARTLY
    if decided and 2 * measured.count(verdict := decided.pop()) >= len(measured):
        return verdict
    return NOT_DETERMINABLE


def _tally(verdicts: list[str]) -> str:
    n = len(verdicts)
    return ", ".join(
        f"{verdicts.count(v)} of {n} {v}" for v in (REPRODUCED, NOT_REPRODUCED, NOT_DETERMINABLE)
    )


def _rho_verdicts(rows: list[dict[str, Any]], seed_band: bool) -> tuple[list[str], str]:
    """Per-condition rare-features verdicts and their text (seed_band: geometric, S~ is checked)."""
    parts, verdicts = [], []
    for row in rows:
        e = row["effects"]
        if e is None:
            verdicts.append(NOT_MEASURED)
            continue
        band = seed_band and in_seed_band(e["S_tilde"])
        v, why = negative_rho_verdict(e["rho_bin"], e["bin_survivors"], band)
        verdicts.append(v)
        parts.append(
            f"{row['condition']}: {_ci(e['rho_bin'])}, exact p {_p(e['rho_bin']['p'])} → {v} ({why})"
        )
    return verdicts, (f"{_tally(verdicts)}. " if verdicts else "") + ("; ".join(parts) or "–")


def rare_features_claim(
    geo: list[dict[str, Any]], func: list[dict[str, Any]], r0: float = 0.7
) -> dict[str, str]:
    """geo / func: per pruned condition {"condition", "effects": cross_effects / functional_effects}."""
    g_verdicts, g_text = _rho_verdicts(geo, seed_band=True)
    f_verdicts, f_text = _rho_verdicts(func, seed_band=False)
    return {
        "claim": "Rare features survive pruning better than frequent ones",
        "paper": "ρ_bin = −1.0 in 11 of 17 conditions",
        "ours": g_text,
        "verdict": overall(g_verdicts),
        "functional": f_text,
        "functional verdict": overall(f_verdicts),
        "basis": f"geometric: ρ_bin [95% CI] of S_bin / S_seed,bin (each firing-rate quintile's "
        f"survival over the same bin's dense seed-pair survival), cross-seed pairs, τ = {TAU:g}; "
        f"functional: ρ_bin of the fraction with r >= {r0:g}; exact permutation p over 120 orderings "
        f"(two-sided); not reproduced iff the CI lies inside ±{EQUIVALENCE:g}, or above 0 and out of "
        f"that band with p < {ALPHA:g}; reproduced iff it lies below 0 and out of that band with p < {ALPHA:g}",
    }


def wanda_claim(contrasts: list[dict[str, Any]]) -> dict[str, str]:
    g_parts, g_verdicts, f_parts, f_verdicts = [], [], [], []
    for c in contrasts:
        s = f"s={c['sparsity']:g}"
        if "ratio" in c:
            v, why = ratio_verdict(
                c["ratio"],
                [c["survivors_wanda"], c["survivors_magnitude"]],
                [in_seed_band(c["tilde_wanda"]), in_seed_band(c["tilde_magnitude"])],
            )
            g_verdicts.append(v)
            g_parts.append(
                f"{s}: {_ci(c['ratio'], unit='x')}, ΔS {_ci(c['difference'], 3)}, survivors/pair "
                f"{c['survivors_wanda']:.0f} vs {c['survivors_magnitude']:.0f} → {v} ({why})"
            )
        if "functional_ratio" in c:
            v, why = ratio_verdict(c["functional_ratio"], [c["functional_survivors"]], [])
            f_verdicts.append(v)
            f_parts.append(f"{s}: {_ci(c['functional_ratio'], unit='x')} → {v} ({why})")
    return {
        "claim": "Wanda preserves features better than magnitude pruning",
        "paper": "up to 3.7x better",
        "ours": (f"{_tally(g_verdicts)}. " if g_verdicts else "") + ("; ".join(g_parts) or "–"),
        "verdict": overall(g_verdicts),
        "functional": (f"{_tally(f_verdicts)}. " if f_verdicts else "") + ("; ".join(f_parts) or "–"),
        "functional verdict": overall(f_verdicts),
        "basis": f"S_wanda / S_magnitude [95% CI] per sparsity, geometric survival at τ = {TAU:g} over every "
        f"cross-seed pair; not reproduced iff the CI lies inside ({1 / RATIO_BOUND:.2f}, {RATIO_BOUND:g}) (no "
        "difference worth the name, even if it excludes 1) or below 1; reproduced iff above 1 and out of that "
        f"band; not determinable with < {MIN_SURVIVORS} survivors "
        "per pair or both methods within the seed band",
    }


def viability_claim(
    viable: dict[str, dict[str, Any]], reference: str, functional: str = "–"
) -> dict[str, str]:
    parts = [
        f"{m}: "
        + ("none" if v["largest"] is None else f"up to {v['largest']:g}")
        + " ("
        + ", ".join(f"{s:g} {'✓' if ok else '✗'}" for s, ok in sorted(v["levels"].items()))
        + ")"
        for m, v in sorted(viable.items())
    ]
    wanda = viable.get("wanda")
    if not wanda or not wanda["levels"]:
        verdict = NOT_MEASURED
    else:
        best = wanda["largest"]
        failed_by_half = any(not ok and s <= 0.5 + 1e-9 for s, ok in wanda["levels"].items())
        if best is not None and best >= 0.5 - 1e-9:
            verdict = REPRODUCED
        elif failed_by_half:
            verdict = NOT_REPRODUCED
        else:
            verdict = PARTLY  # viable at every level measured below 0.5, none measured up to 0.5
    return {
        "claim": "Dense-model SAEs stay viable on Wanda-pruned models",
        "paper": "viable up to 50% sparsity",
        "ours": "largest viable sparsity: " + ("; ".join(parts) if parts else "–"),
        "verdict": verdict,
        "functional": functional,
        "functional verdict": CONTEXT,
        "basis": f"RQ3, {reference}: viable iff CE recovered >= 0.9 x dense and FVU <= 2 x dense, at every "
        "sparsity up to s (one reference SAE on each model: no seed variance)",
    }


def _importance_part(row: dict[str, Any], kind: str) -> tuple[str, str]:
    e = row.get(kind)
    v, why = dissociation_verdict(e)
    if e is None:
        return v, f"{row['condition']}: {row.get(f'{kind}_missing', '–')}"
    mw = (
        f"MW p_BH {_p(e.get('mw_p_bh'))}"
        if e["n_survived"] >= MIN_SURVIVORS
        else f"MW not determinable ({e['n_survived']} survived)"
    )
    source = f" ({e['source']})" if e.get("source") else ""
    return v, f"{row['condition']}{source}: ρ {_ci(e)}, p_BH {_p(e.get('p_bh'))}, {mw} → {v} ({why})"


def importance_claim(effects: list[dict[str, Any]], r0: float = 0.7) -> dict[str, str]:
    """effects: `analysis.importance_effects` rows."""
    out = {}
    for kind in ("geometric", "functional"):
        parts = [_importance_part(r, kind) for r in effects]
        verdicts = [v for v, _ in parts]
        out[kind] = (
            overall(verdicts),
            (f"{_tally(verdicts)}. " if verdicts else "") + ("; ".join(p for _, p in parts) or "–"),
        )
    n = effects[0]["n"] if effects else 0
    saes = max(
        (r[k].get("n_references", 1) for r in effects for k in ("geometric", "functional") if k in r),
        default=1,
    )
    return {
        "claim": "Geometric survival does not predict causal importance",
        "paper": "a dissociation (no relation)",
        "ours": out["geometric"][1],
        "verdict": out["geometric"][0],
        "functional": out["functional"][1],
        "functional verdict": out["functional"][0],
        "basis": f"importance = exact-ablation ΔCE (error term kept, tokens where the feature fires) of "
        f"the {n} ablated top / random / rare features of {saes} dense SAE(s) of different seeds; ρ: "
        "Spearman ρ over each SAE's features, averaged over the SAEs, [95% CI]: the t interval over the "
        "SAEs' ρ, never narrower than their feature noise (with one SAE, a bootstrap over its features: "
        "the choice of SAE is then not in the CI); survival: the mean cross-seed matched cosine of "
        "each feature, or where an SAE has no pruned SAE of another seed, every SAE's decoder cosine "
        "to its start after the RQ2c warm start on the pruned model, marked (warm start), and the "
        "functional r; reproduced iff the CI "
        f"lies inside ±{EQUIVALENCE:g}, not reproduced iff it lies wholly outside; Mann–Whitney survived "
        f"(>= {TAU:g} / r >= {r0:g}) vs lost, BH-corrected across conditions, needs >= {MIN_SURVIVORS} "
        "survivors",
    }


def importance_over_studies_text(rows: list[dict[str, Any]]) -> str:
    """One line per survival kind of `analysis.importance_over_studies`: the overall verdict of "no
    relation" and each condition's mean rho [t interval] over every study's SAEs."""
    lines = []
    for kind in ("geometric", "functional"):
        parts = [(r["condition"], r[kind], dissociation_verdict(r[kind])[0]) for r in rows if kind in r]
        if parts:
            n = max(e["n_references"] for _, e, _ in parts)
            each = "; ".join(f"{c}: ρ {_ci(e)} → {v}" for c, e, v in parts)
            lines.append(f"{kind}, {n} SAEs: **{overall([v for _, _, v in parts])}** ({each})")
    return "\n".join(lines)


def context_rows(baseline: dict[str, Any] | None, geo: list[dict[str, Any]]) -> list[dict[str, str]]:
    tilde = [(r["condition"], r["effects"]["S_tilde"]) for r in geo if r["effects"] is not None]
    return [
        {
            "claim": "RQ1 seed baseline: shared fraction of two dense SAEs trained with different seeds",
            "paper": "–",
            "ours": "–"
            if not baseline
            else f"S_seed@{TAU:g} = {_ci(baseline['S_seed'], 3)} over {baseline['n_pairs']} ordered pair(s)",
            "verdict": CONTEXT,
            "functional": "–",
            "functional verdict": CONTEXT,
            "basis": "the noise ceiling of RQ2: survival within it is not distinguishable from reseeding",
        },
        {
            "claim": "Normalised survival S / S_seed",
            "paper": "–",
            "ours": "; ".join(f"{c}: {_ci(t)}" for c, t in tilde) or "–",
            "verdict": CONTEXT,
            "functional": "–",
            "functional verdict": CONTEXT,
            "basis": f"S at τ = {TAU:g} over every cross-seed pair / the dense S_seed over the same pairs, "
            "joint hierarchical bootstrap CI; a CI containing 1 is 'within the seed band'",
        },
    ]


def headline(
    geo: list[dict[str, Any]],
    func: list[dict[str, Any]],
    contrasts: list[dict[str, Any]],
    viable: dict[str, dict[str, Any]],
    importance: list[dict[str, Any]],
    baseline: dict[str, Any] | None,
    reference: str,
    r0: float = 0.7,
    viable_functional: str = "–",
) -> list[dict[str, str]]:
    """The claims' rows (COLUMNS). geo / func: [{"condition", "effects"}] per pruned condition
    (`analysis.cross_effects` / `functional_effects`); contrasts: `analysis.method_contrasts`;
    importance: `analysis.importance_effects`; baseline: {"S_seed", "n_pairs"} of the dense pairs;
    r0: the study's functional-survival threshold."""
    return [
        rare_features_claim(geo, func, r0),
        wanda_claim(contrasts),
        viability_claim(viable, reference, viable_functional),
        importance_claim(importance, r0),
        *context_rows(baseline, geo),
    ]


def same_seed_text(rows: list[dict[str, Any]], near: float = 0.9) -> str:
    """What same-seed survival measures, from the init statistics the survival callback computes."""
    measured = [r for r in rows if r.get("init_near_fraction") is not None]
    text = (
        "Survival is measured over every cross-seed pair (the dense SAE of seed a against the SAE of "
        "seed b ≠ a trained on the pruned model); same-seed pairs (a = b) are reported apart. A same-seed "
        "pair shares its initialisation and its data order, so both SAEs follow one training trajectory "
        "and agree more than reseeding allows."
    )
    if not measured:
        return text
    stats = "; ".join(
        f"{r['condition']}: mean cosine to own init {_f(r.get('init_cosine_mean'))}, fraction within "
        f"{near:g} of init {_f(r['init_near_fraction'], 3)}, median init cosine of same-seed survivors' "
        f"partners {_f(r.get('partner_init_cosine_median'))}"
        for r in measured
    )
    stuck = max(r["init_near_fraction"] for r in measured)
    partner = [
        r["partner_init_cosine_median"] for r in measured if r.get("partner_init_cosine_median") is not None
    ]
    top = (
        f"; the partners of same-seed survivors have a median cosine of at most {max(partner):.2f} to theirs"
        if partner
        else ""
    )
    if stuck < 0.05 and (not partner or max(partner) < near):
        why = (
            " Measured here, latents left at their init do not explain it: at most "
            f"{stuck:.1%} of the latents stay within cosine {near:g} of their init" + top
        )
    else:
        why = f" Measured here, part of it is latents that stay near their shared init (up to {stuck:.1%})"
    return f"{text}{why} ({stats})."

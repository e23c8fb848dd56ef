"""The report's tables: one `Table` per topic, rendered as markdown, HTML and CSV.

Cells hold raw values; formatting happens on rendering, so the CSV keeps full precision.
Missing values (None, NaN) render as "–" in markdown / HTML and as an empty CSV cell.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from lit_prune.study.report.analysis import RQ1_METRICS, SAE_METRICS, TAUS, TRANSFER_METRICS
from lit_prune.study.report.claims import COLUMNS

DASH = "–"


class PM(NamedTuple):
    """mean ± sd over seeds (n of them); CSV: two columns <name> and <name>_sd."""

    mean: float | None
    sd: float | None
    n: int = 0


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def fmt(v: Any) -> str:
    """A cell for people: 3 decimals, scientific for very small / large numbers, – when missing."""
    if isinstance(v, PM):
        return DASH if _missing(v.mean) else fmt(v.mean) + ("" if _missing(v.sd) else f" ± {fmt(v.sd)}")
    if _missing(v):
        return DASH
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v.is_integer() and abs(v) < 1e5:
            return str(int(v))
        if abs(v) >= 1e5 or abs(v) < 1e-3:
            return f"{v:.2e}"
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3f}"
    return str(v)


def fmt_p(v: Any) -> str:
    """A p-value: 3 decimals, scientific below 0.001."""
    if _missing(v):
        return DASH
    return f"{v:.2e}" if v < 1e-3 else f"{v:.3f}"


def fmt_s(v: Any) -> str:
    """A sparsity or threshold: as short as exact (0.3, 0.75)."""
    return DASH if _missing(v) else f"{v:g}"


@dataclass
class Table:
    name: str
    """File stem of the CSV (tables/<name>.csv)."""
    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""
    formats: dict[str, Callable[[Any], str]] = field(default_factory=dict)
    hide: tuple[str, ...] = ("condition",)
    """Columns only in the CSV (the condition's name repeats method and sparsity)."""

    @property
    def shown(self) -> list[str]:
        return [c for c in self.columns if c not in self.hide]

    def cells(self) -> list[list[str]]:
        return [
            [
                self.formats.get(c, fmt)(v)
                for c, v in zip(self.columns, row, strict=False)
                if c not in self.hide
            ]
            for row in self.rows
        ]

    def markdown(self) -> str:
        esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines = ["| " + " | ".join(map(esc, self.shown)) + " |", "|" + "---|" * len(self.shown)]
        lines += ["| " + " | ".join(map(esc, row)) + " |" for row in self.cells()]
        return "\n".join(lines)

    def csv(self) -> str:
        pm = [any(isinstance(row[i], PM) for row in self.rows) for i in range(len(self.columns))]
        header: list[str] = []
        for c, is_pm in zip(self.columns, pm, strict=False):
            header += [c, f"{c}_sd"] if is_pm else [c]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        for row in self.rows:
            line: list[Any] = []
            for v, is_pm in zip(row, pm, strict=False):
                if is_pm:
                    v = v if isinstance(v, PM) else PM(v, None)
                    line += [_raw(v.mean), _raw(v.sd)]
                else:
                    line.append(_raw(v))
            writer.writerow(line)
        return out.getvalue()


def _raw(v: Any) -> Any:
    if _missing(v):
        return ""
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    return v


def _pm(s: dict[str, Any]) -> PM:
    return PM(s["mean"], s["sd"], s["n"])


S_FMT = {"sparsity": fmt_s}


# --- builders ---------------------------------------------------------------------------------
def headline_table(claims: list[dict[str, str]]) -> Table:
    cols: list[str] = list(COLUMNS)
    return Table(
        "headline",
        "The paper's claims and our results",
        cols,
        [[c.get(k, "–") for k in cols] for c in claims],
        note="ours: geometric survival over every cross-seed pair, effect [95% CI] (hierarchical bootstrap: "
        "seed pairs, then features); functional: the reference SAE's activations on the dense vs the pruned "
        "model (CI over features). A verdict is 'reproduced' / 'not reproduced' only when the CI decides; "
        "otherwise 'not determinable at this budget', with the reason.",
    )


def perplexity_table(rows: list[dict[str, Any]]) -> Table:
    cols = ["condition", "method", "sparsity", "perplexity", "realised_sparsity", "prune_seconds"]
    return Table(
        "perplexity",
        "Perplexity of the dense and pruned models (eval split)",
        cols,
        [[r[c] for c in cols] for r in rows],
        formats=S_FMT,
    )


def sae_table(rows: list[dict[str, Any]]) -> Table:
    cols = ["condition", "method", "sparsity", "seeds", *SAE_METRICS]
    body = [
        [
            r["condition"],
            r["method"],
            r["sparsity"],
            ", ".join(map(str, r["seeds"])) or None,
            *[_pm(r[m]) for m in SAE_METRICS],
        ]
        for r in rows
    ]
    return Table(
        "sae_metrics",
        "Each model's own SAEs (mean ± sd over seeds)",
        cols,
        body,
        note="fvu: fraction of variance unexplained; l0: active latents per token (count); ce_recovered, "
        "kl_score: fractions; delta_lm_loss: nats per token; dead_fraction: fraction of latents.",
        formats=S_FMT,
    )


def rq1_table(pairs: list[dict[str, Any]]) -> Table:
    cols = ["condition", "method", "sparsity", "seed_a", "seed_b", *RQ1_METRICS]
    return Table(
        "rq1_seed_stability",
        "RQ1: seed stability (pairs of SAEs trained on the same model)",
        cols,
        [[p.get(c) for c in cols] for p in pairs],
        formats=S_FMT,
        note="shared@τ: fraction of alive features of seed_a whose one-to-one matched cosine in seed_b is "
        ">= τ.",
    )


def survival_table(rows: list[dict[str, Any]], r0: float = 0.7) -> Table:
    pairs = [
        ("condition", "condition"),
        ("method", "method"),
        ("sparsity", "sparsity"),
        *[(f"S@{t:g}", f"S@{t:g}") for t in TAUS],
        *[(f"S_same@{t:g}", f"S_same@{t:g}") for t in TAUS],
        ("functional_S", "functional_S"),
        ("S_seed", "S_seed"),
        ("S/S_seed", "S_tilde"),
        ("S/S_seed 95% CI", "S_tilde_ci"),
        ("survivors/pair@0.7", "survivors"),
        ("S_normalised (callback)", "S_normalised"),
        ("mean_cosine", "mean_cosine"),
        ("cross pairs", "n_cross"),
        ("same pairs", "n_same"),
        ("same-seed init cosine", "init_cosine_mean"),
        ("same-seed near init", "init_near_fraction"),
        ("survivors' partner init cosine", "partner_init_cosine_median"),
    ]
    if all(r["S_normalised"] is None for r in rows):  # only when the callback was given a seed baseline
        pairs.remove(("S_normalised (callback)", "S_normalised"))
    cols, keys = [c for c, _ in pairs], [k for _, k in pairs]
    return Table(
        "survival",
        "RQ2: survival of the dense SAEs' features",
        cols,
        [[_ci_cell(r.get(k)) if k == "S_tilde_ci" else r.get(k) for k in keys] for r in rows],
        formats=S_FMT,
        note="S@τ: mean over every cross-seed pair (dense SAE of seed a, SAE of seed b ≠ a on the pruned "
        "model) of the fraction of a's alive features whose matched cosine is >= τ (the primary measure); "
        "S_same: the same-seed pairs (a = b), which share init and data order; functional_S: fraction of "
        f"the reference's features with Pearson r >= {r0:g} between its activations on the dense and the "
        "pruned model; S_seed: the dense shared@0.7 over the same pairs (RQ1); CI: hierarchical bootstrap "
        "over pairs and features. Same-seed init columns: mean cosine of the same-seed SAE's latents to "
        "their own init, the fraction within 0.9 of it, and the median init cosine of the partners of "
        "same-seed survivors.",
    )


def warm_start_table(rows: list[dict[str, Any]]) -> Table:
    """RQ2c: survival under retraining from the dense SAE, against the dense control."""
    cols = ["condition", "method", "sparsity", "seeds"]
    cols += [f"S_warm@{t:g}" for t in TAUS] + [f"control@{t:g}" for t in TAUS]
    cols += [f"ratio@{t:g}" for t in TAUS] + [f"ratio@{t:g} 95% CI" for t in TAUS]
    cols += ["excess movement by bin (rare→frequent)", "ρ_bin movement", "warm FVU"]
    body = []
    for r in rows:
        moves = r.get("excess_movement_bins") or []
        body.append(
            [r["condition"], r["method"], r["sparsity"], r["seeds"]]
            + [r.get(f"S_warm@{t:g}") for t in TAUS]
            + [r.get(f"control@{t:g}") for t in TAUS]
            + [r.get(f"ratio@{t:g}") for t in TAUS]
            + [_ci_cell(r.get(f"ratio_ci@{t:g}")) for t in TAUS]
            + [" ".join(fmt(v) for v in moves) or None, r.get("rho_bin_movement"), r.get("val_fvu")]
        )
    return Table(
        "warm_start",
        "RQ2c: survival under retraining (warm start from the dense SAE)",
        cols,
        body,
        formats=S_FMT,
        note="Each dense seed's SAE trained T more steps on the pruned model (S_warm) and, as the control, "
        "on the dense model with the same steps and data order (control). A feature survives iff its decoder "
        "cosine to where it started is >= τ (indices preserved: no matching, no seed noise); fractions of "
        "the source's alive features, mean over the warm-started seeds. ratio = S_warm / control pooled over "
        "seeds; CI: bootstrap over seeds, then features. Excess movement: mean (1 - cosine) minus the "
        "control's, per quantile bin of the dense firing rate at τ = 0.7; ρ_bin > 0: frequent features "
        "move more. Warm FVU: the warm SAE on its own model's eval split.",
    )


def _ci_cell(ci: Any) -> str | None:
    if not ci or any(v is None for v in ci):
        return None
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]"


def bins_tables(rows: list[dict[str, Any]], r0: float = 0.7) -> list[Table]:
    """RQ4 survival per firing-rate bin: geometric (cross-seed, tau 0.7) and functional, one table each."""
    out = []
    kinds = [
        ("", "bins", "geometric, τ = 0.7, cross-seed"),
        ("functional_", "functional_bins", f"functional, r >= {r0:g}"),
    ]
    if any(r.get("normalised_bins") for r in rows):
        kinds.append(("norm_", "normalised_bins", "geometric over each bin's own dense seed baseline"))
    for prefix, key, what in kinds:
        n = max([len(r.get(key) or []) for r in rows] + [0])
        rho = "rho_bin_norm" if prefix == "norm_" else f"{prefix}rho_bin"
        cols = [
            "condition",
            "method",
            "sparsity",
            rho,
            "exact p",
            "95% CI",
            *[f"bin{b}" for b in range(n)],
        ]
        if not prefix:
            cols += ["rho_feature", "rho_feature p"]
        body = []
        for r in rows:
            ci = _ci_cell((r.get(f"{rho}_ci_lo"), r.get(f"{rho}_ci_hi")))
            values = list(r.get(key) or [])
            row = [
                r["condition"],
                r["method"],
                r["sparsity"],
                r.get(rho),
                r.get(f"{rho}_p"),
                ci,
                *(values + [None] * (n - len(values))),
            ]
            body.append(row + ([r["rho_feature"], r["rho_feature_p"]] if not prefix else []))
        out.append(
            Table(
                "fragility_bins" + {"": "", "functional_": "_functional", "norm_": "_normalised"}[prefix],
                f"RQ4: survival by firing-rate bin, {what} (bin 0 = rarest)",
                cols,
                body,
                formats={**S_FMT, "exact p": fmt_p, "rho_feature p": fmt_p},
            )
        )
    out[0].note = (
        "Bins: quintiles of log10 firing rate of the reference SAE on the dense model; binN: fraction of "
        "the bin's features that survive (mean over every cross-seed pair, each pair binned by its dense "
        "SAE's rates). rho_bin: Spearman(bin, survival in bin); −1 = survival falls monotonically from rare "
        "to frequent; p: exact permutation p over the 120 orderings of 5 bins (two-sided); CI: hierarchical "
        "bootstrap over pairs and features. rho_feature: Spearman(log10 p, matched cosine) over features."
    )
    if len(out) > 2:
        out[2].note = (
            "binN: S_bin / S_seed,bin, the bin's survival over the same bin's survival between two "
            "dense SAEs of the same seed pair (firing rate and seed stability are confounded: frequent "
            "features are also the most seed-stable). rho_bin of these ratios is what the headline's "
            "rare-features verdict reads."
        )
    return out


def fragility_table(by_method: dict[str, dict[str, Any]]) -> Table:
    names = sorted({n for v in by_method.values() for n in v["predictors"]})
    cols = ["method", "sparsities", "alive features", "mean F", "never broken", "median s*"]
    for n in names:
        cols += [f"Spearman(F, {n})", f"p ({n})"]
    body = []
    for label, v in sorted(by_method.items()):
        row = [
            label,
            ", ".join(f"{s:g}" for s in v["levels"]),
            v["n_alive"],
            v["mean_F"],
            v["never_broken"],
            v["median_s_star"],
        ]
        for n in names:
            row += list(v["predictors"].get(n, (None, None)))
        body.append(row)
    return Table(
        "fragility",
        "RQ4: feature fragility per method",
        cols,
        body,
        formats={c: fmt_p for c in cols if c.startswith("p (")},
        note="F_i = 1 − mean over sparsities of the cross-seed matched cosine c_i(s); s*_i = smallest "
        "sparsity "
        "with c_i < 0.7 (never broken: fraction of features with c_i >= 0.7 at every sparsity).",
    )


def transfer_table(rows: list[dict[str, Any]]) -> Table:
    cols = ["condition", "method", "sparsity", "sae", *TRANSFER_METRICS]
    body = [
        [r.get(c) if c != "viable" or r.get(c) is None else bool(r[c] >= 0.5) for c in cols] for r in rows
    ]
    return Table(
        "transfer",
        "RQ3: the dense-model SAE on the pruned models",
        cols,
        body,
        formats=S_FMT,
        note="reference: the dense-model SAE applied unchanged; retrained: an SAE trained on the pruned "
        "model "
        "(same seed); reference Wanda-pruned x: the reference SAE itself Wanda-pruned to x. Each against "
        "the pruned model's own clean and zero-ablated CE. viable: CE recovered >= 0.9 x and FVU <= 2 x "
        "the reference's values on the dense model.",
    )


def rq5_table(groups: list[dict[str, Any]]) -> Table:
    cols = [
        "group",
        "n_features",
        "ablation_ce_firing_mean",
        "ablation_kl_firing_mean",
        "ablation_ce_all_mean",
        "attribution_mean",
        "spearman_ce_firing_vs_attribution",
        "spearman_ce_firing_vs_attribution_p",
    ]
    return Table(
        "rq5_ablation",
        "RQ5: feature importance on the dense model",
        cols,
        [[g.get(c) for c in cols] for g in groups],
        formats={cols[-1]: fmt_p},
        note="Exact ablation (error term kept) of the top / random / rare features: mean CE and KL increase "
        "(nats per firing token); attribution: gradient estimate of the CE effect for every feature.",
    )


def importance_table(results: dict[str, list[dict[str, Any]]]) -> Table:
    cols = [
        "importance",
        "condition",
        "method",
        "sparsity",
        "survival",
        "n",
        "n_survived",
        "spearman_rho",
        "spearman_p",
        "spearman_p_bh",
        "mannwhitney_u",
        "mannwhitney_p",
        "mannwhitney_p_bh",
        "importance_survived_mean",
        "importance_lost_mean",
    ]
    label = {"attribution": "|attribution|", "exact": "exact ΔCE"}
    body = [[label[kind], *[r.get(c) for c in cols[1:]]] for kind, rs in results.items() for r in rs]
    return Table(
        "rq5_importance_vs_survival",
        "RQ5: does survival predict importance?",
        cols,
        body,
        formats={**S_FMT, **{c: fmt_p for c in cols if c.endswith(("_p", "_p_bh"))}},
        note="|attribution|: gradient attribution of every alive reference feature; exact ΔCE: exact "
        "ablation (scope firing) of the top / random / rare features. Survival: cross-seed matched cosine "
        "of the reference feature, or where the pruned models have no SAE of another seed its decoder "
        "cosine to its start after the RQ2c warm start (warm start); survived iff >= 0.7. _bh: "
        "Benjamini–Hochberg across conditions, per importance measure.",
    )


def runs_table(runs: list[dict[str, Any]]) -> Table:
    stamp = lambda t: time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else None  # noqa: E731
    body = [
        [
            r.get("shard"),
            stamp(r.get("started")),
            r.get("seconds"),
            len(r.get("ran", [])),
            len(r.get("skipped", [])),
        ]
        for r in runs
    ]
    return Table(
        "runs",
        "Invocations of the study (runs.jsonl)",
        ["shard", "started", "wall seconds", "steps ran", "steps already done"],
        body,
    )


def importance_effects_table(effects: list[dict[str, Any]]) -> Table:
    """RQ5 at the effect-size level: exact-ablation importance against geometric and functional survival."""
    cols = [
        "condition",
        "method",
        "sparsity",
        "survival",
        "SAEs",
        "n",
        "rho",
        "95% CI",
        "p_bh",
        "n_survived",
        "mw_p_bh",
    ]
    body = []
    for r in effects:
        for kind in ("geometric", "functional"):
            e = r.get(kind)
            if e is None:
                continue
            ci = _ci_cell((e.get("lo"), e.get("hi")))
            body.append(
                [r["condition"], r["method"], r["sparsity"], kind, e.get("n_references", 1), r["n"]]
                + [e.get("value"), ci, e.get("p_bh")]
                + [e.get("n_survived"), e.get("mw_p_bh")]
            )
    return Table(
        "rq5_effects",
        "RQ5: exact-ablation importance against geometric and functional survival",
        cols,
        body,
        formats={**S_FMT, "p_bh": fmt_p, "mw_p_bh": fmt_p},
        note="rho: Spearman(exact ablation ΔCE on the tokens where the feature fires, survival) over the "
        "ablated top / random / rare features of each of the SAEs (dense SAEs of different seeds; n: their "
        "features together), averaged over the SAEs; CI: the t interval over the SAEs' rho, never "
        "narrower than their feature noise (one SAE: a bootstrap over its features). "
        "Geometric survival: the feature's mean matched cosine over its SAE's cross-seed pairs, or its "
        "decoder cosine to its start after the RQ2c warm start; functional: the Pearson r of its "
        "activations on the dense vs the pruned model. p_bh, mw_p_bh: Spearman and Mann–Whitney (survived "
        "vs lost) p-values over the pooled features, Benjamini–Hochberg across conditions.",
    )

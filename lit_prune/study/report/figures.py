"""The report's figures: matplotlib `Figure`s (no pyplot global state, Agg canvas), one per topic.

Each builder returns None when the study has no data for it yet. Every axis with data gets
labelled axes (with units), a title and a legend.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from lit_prune.study.report.analysis import TAU
from lit_prune.study.report.tables import fmt, fmt_p

SPARSITY = "sparsity (fraction of weights pruned)"
COLORS = {"magnitude": "tab:blue", "wanda": "tab:orange"}
_EXTRA = ("tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def color(label: str) -> str:
    if label in COLORS:
        return COLORS[label]
    return _EXTRA[sum(map(ord, label)) % len(_EXTRA)]


def _figure(width: float = 7.0, height: float = 4.4) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained", dpi=100)
    FigureCanvasAgg(fig)
    return fig


def png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _series(rows: list[dict[str, Any]], key: str) -> dict[str, tuple[list[float], list[float]]]:
    """method label -> (sparsities, values) over the rows with a value, sorted by sparsity."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for r in sorted(rows, key=lambda r: r["sparsity"]):
        if r["method"] != "dense" and r.get(key) is not None:
            xs, ys = out.setdefault(r["method"], ([], []))
            xs.append(r["sparsity"])
            ys.append(r[key])
    return out


def perplexity_figure(rows: list[dict[str, Any]]) -> Figure | None:
    series = _series(rows, "perplexity")
    if not series:
        return None
    dense = next(
        (r["perplexity"] for r in rows if r["method"] == "dense" and r["perplexity"] is not None), None
    )
    fig = _figure()
    ax = fig.subplots()
    for label, (xs, ys) in sorted(series.items()):
        if dense is not None and ":" not in label:
            xs, ys = [0.0, *xs], [dense, *ys]
        ax.plot(xs, ys, marker="o" if ":" not in label else "*", ms=7, color=color(label), label=label)
    if dense is not None:
        ax.axhline(dense, color="grey", ls="--", lw=1, label=f"dense model ({fmt(dense)})")
    ax.set_yscale("log")
    values = [y for _, ys in series.values() for y in ys] + ([dense] if dense is not None else [])
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    if max(values) < 10 * min(values):  # less than a decade: label the in-between ticks plainly too
        ax.yaxis.set_minor_formatter(plain)
    ax.set(
        xlabel=SPARSITY,
        ylabel="perplexity (exp of nats per token, log scale)",
        title="Pruned-model perplexity on the eval split",
    )
    legend_outside(fig, [ax])
    return fig


def survival_figure(rows: list[dict[str, Any]], baseline: dict[str, Any], r0: float = 0.7) -> Figure | None:
    geo, func = _series(rows, f"S@{TAU:g}"), _series(rows, "functional_S")
    if not geo and not func:
        return None
    fig = _figure(11.0, 4.6)
    ax, fax = fig.subplots(1, 2)  # geometric S sits near 0: its own axis, not the functional 0-1 one
    base = baseline.get("mean")
    if base is not None:
        if baseline["max"] > baseline["min"]:
            ax.axhspan(
                baseline["min"],
                baseline["max"],
                color="grey",
                alpha=0.25,
                label=f"seed baseline: min–max over {baseline['n']} dense seed pairs",
            )
        ax.axhline(
            base,
            color="grey",
            lw=1.5,
            label=f"seed baseline: dense cross-seed shared@{TAU:g} "
            f"({'mean, ' if baseline['n'] > 1 else ''}{fmt(base)})",
        )
    for label in sorted(set(geo) | set(func)):
        start = ":" not in label  # s = 0 is the dense model: S(0) = the seed baseline, functional = 1
        if label in geo:
            xs, ys = geo[label]
            if start and base is not None:
                xs, ys = [0.0, *xs], [base, *ys]
            ax.plot(xs, ys, marker="o", color=color(label), label=f"{label}: geometric S@{TAU:g}, cross-seed")
        if label in func:
            xs, ys = func[label]
            xs, ys = ([0.0, *xs], [1.0, *ys]) if start else (xs, ys)
            fax.plot(
                xs, ys, marker="s", ls="--", color=color(label), label=f"{label}: functional (r ≥ {r0:g})"
            )
    ax.set_ylim(bottom=0)
    ax.set(xlabel=SPARSITY, ylabel="surviving reference features (fraction of alive)", title="geometric")
    fax.set_ylim(-0.02, 1.05)
    fax.set(xlabel=SPARSITY, ylabel="surviving reference features (fraction of alive)", title="functional")
    fig.suptitle("RQ2: feature survival vs sparsity")
    legend_outside(fig, [ax, fax])
    return fig


def legend_outside(fig: Figure, axes: list, fontsize: float = 8) -> None:
    """One legend for the figure, below its panels: it never hides data (labels shared by several
    panels appear once)."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(
            list(entries.values()), list(entries), loc="outside lower center", ncol=2, fontsize=fontsize
        )


def warm_start_figure(rows: list[dict[str, Any]]) -> Figure | None:
    """RQ2c: S_warm / control at τ = 0.7 vs sparsity with its CI (left); excess movement by bin (right)."""
    rows = [r for r in rows if r.get(f"ratio@{TAU:g}") is not None]
    if not rows:
        return None
    fig = _figure(11.0, 4.4)
    left, right = fig.subplots(1, 2)
    left.axhline(1.0, color="grey", lw=1.5, label="control: retrained on the dense model")
    for label, (xs, ys) in _series(rows, f"ratio@{TAU:g}").items():
        ci = [
            r[f"ratio_ci@{TAU:g}"] for r in sorted(rows, key=lambda r: r["sparsity"]) if r["method"] == label
        ]
        lo = [y - (c[0] if c[0] is not None else y) for y, c in zip(ys, ci, strict=True)]
        hi = [(c[1] if c[1] is not None else y) - y for y, c in zip(ys, ci, strict=True)]
        left.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, color=color(label), label=label)
    left.set(
        xlabel=SPARSITY,
        ylabel=f"S_warm / control (τ = {TAU:g})",
        title="RQ2c: survival under retraining, relative to the control",
    )
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    for r in rows:
        moves = r.get("excess_movement_bins") or []
        xs = [b for b, v in enumerate(moves) if v is not None]
        right.plot(
            xs,
            [moves[b] for b in xs],
            marker="o",
            color=color(r["method"]),
            alpha=0.4 + 0.6 * float(r["sparsity"]),
            label=f"{r['method']} {r['sparsity']:g}",
        )
    right.axhline(0.0, color="grey", lw=1)
    right.set(
        xlabel="firing-rate bin on the dense model (0 = rarest)",
        ylabel="mean (1 − cosine) beyond the control",
        title="Which features move",
    )
    right.legend(fontsize=8)
    return fig


def bins_figure(rows: list[dict[str, Any]], r0: float = 0.7) -> Figure | None:
    panels = [("bins", f"geometric, τ = {TAU:g}, cross-seed"), ("functional_bins", f"functional, r ≥ {r0:g}")]
    panels = [(k, t) for k, t in panels if any(any(v is not None for v in r[k]) for r in rows)]
    if not panels:
        return None
    fig = _figure(6.0 * len(panels), 4.4)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (key, title) in zip(axes, panels, strict=False):
        n = 0
        for r in rows:
            ys = [np.nan if v is None else v for v in r[key]]
            if not any(v == v for v in ys):
                continue
            n = max(n, len(ys))
            ax.plot(
                range(len(ys)),
                ys,
                marker="o",
                color=color(r["method"]),
                alpha=0.35 + 0.65 * r["sparsity"],
                ls="-" if ":" not in r["method"] else ":",
                label=f"{r['method']} s={r['sparsity']:g}",
            )
        ax.set_xticks(
            range(n),
            [f"{b}" + (" rarest" if b == 0 else " most frequent" if b == n - 1 else "") for b in range(n)],
        )
        ax.set_ylim(-0.02, 1.05)
        ax.set(
            xlabel="firing-rate quintile bin of the reference feature (dense model)",
            ylabel="surviving features in bin (fraction)",
            title=f"RQ4: survival by firing rate ({title})",
        )
        ax.legend(fontsize=7, ncol=2)
    return fig


TRANSFER_PANELS = (
    ("fvu", "FVU (fraction of variance unexplained)"),
    ("ce_recovered", "CE recovered (fraction)"),
    ("kl_score", "KL score (fraction)"),
    ("l0_ratio", "L0 / dense L0 (ratio)"),
)


def transfer_figure(
    rows: list[dict[str, Any]], ce_factor: float = 0.9, fvu_factor: float = 2.0
) -> Figure | None:
    ref = [r for r in rows if r["sae_kind"] == "reference" and r["method"] != "dense"]
    own = [r for r in rows if r["sae_kind"] == "retrained"]
    if not ref:
        return None
    dense = next((r for r in rows if r["method"] == "dense"), {})
    # a panel whose values all equal its dense value shows nothing: l0_ratio is exactly 1 for TopK
    # SAEs (k latents per token), so its panel is dropped
    panels = [
        (key, ylabel)
        for key, ylabel in TRANSFER_PANELS
        if _series(ref, key) and not _constant(1.0 if key == "l0_ratio" else dense.get(key), ref, own, key)
    ]
    if not panels:
        return None
    cols = min(2, len(panels))
    fig = _figure(5.5 * cols, 3.75 * math.ceil(len(panels) / cols) + 0.3)
    axes = list(fig.subplots(math.ceil(len(panels) / cols), cols, squeeze=False).flat)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax, (key, ylabel) in zip(axes, panels, strict=False):
        for label, (xs, ys) in sorted(_series(ref, key).items()):
            at_zero = dense.get(key) if key != "l0_ratio" else 1.0
            if at_zero is not None and ":" not in label:  # s = 0: the reference on the dense model
                xs, ys = [0.0, *xs], [at_zero, *ys]
            ax.plot(xs, ys, marker="o", color=color(label), label=f"{label}: dense-model SAE")
        for label, (xs, ys) in sorted(_series(own, key).items()):
            ax.plot(
                xs, ys, marker="x", ls="--", color=color(label), alpha=0.7, label=f"{label}: retrained SAE"
            )
        base = dense.get(key) if key != "l0_ratio" else 1.0
        if base is not None and key == "fvu":
            ax.axhline(
                fvu_factor * base, color="red", ls=":", label=f"viability limit: {fvu_factor:g} x dense FVU"
            )
        if base is not None and key == "ce_recovered":
            ax.axhline(
                ce_factor * base,
                color="red",
                ls=":",
                label=f"viability limit: {ce_factor:g} x dense CE recovered",
            )
        if base is not None:
            ax.axhline(base, color="grey", ls="--", lw=1, label="dense-model SAE on the dense model")
        ax.set(xlabel=SPARSITY, ylabel=ylabel, title=f"RQ3: {key} vs sparsity")
    fig.suptitle("RQ3: transfer of the dense-model SAE to pruned models")
    legend_outside(fig, axes[: len(panels)], fontsize=7)
    return fig


def _constant(base: float | None, ref: list[dict[str, Any]], own: list[dict[str, Any]], key: str) -> bool:
    """Whether every value of `key` (reference and retrained SAEs) equals `base`."""
    values = {y for rows in (ref, own) for _, ys in _series(rows, key).values() for y in ys}
    return base is not None and values <= {base}


def fragility_figure(by_method: dict[str, dict[str, Any]]) -> Figure | None:
    if not by_method:
        return None
    fig = _figure(5.5 * len(by_method), 4.4)
    axes = np.atleast_1d(fig.subplots(1, len(by_method), sharey=True))
    for ax, (label, v) in zip(axes, sorted(by_method.items()), strict=False):
        keep = v["alive"] & np.isfinite(v["logp"])
        x, y = v["logp"][keep], v["F"][keep]
        ax.scatter(x, y, s=6, alpha=0.35, color=color(label), label=f"features ({keep.sum()})")
        if x.size >= 5:
            edges = np.quantile(x, np.linspace(0, 1, 6))
            idx = np.clip(np.searchsorted(edges[1:-1], x, side="left"), 0, 4)
            centres = [x[idx == b].mean() for b in range(5) if np.any(idx == b)]
            means = [y[idx == b].mean() for b in range(5) if np.any(idx == b)]
            ax.plot(centres, means, color="black", marker="o", label="mean per firing-rate quintile")
        rho = v["predictors"].get("log10 firing rate", (math.nan, math.nan))
        ax.set(
            xlabel="log10 firing rate on the dense model (log10 fraction of tokens)",
            ylabel="fragility F = 1 − mean matched cosine (1 − cosine)",
            title=f"RQ4: {label}, s in {{{', '.join(f'{s:g}' for s in v['levels'])}}}; "
            f"Spearman ρ = {fmt(rho[0])}",
        )
        ax.legend(fontsize=8)
    return fig


SURVIVAL_AXIS = {
    "cross-seed": "cross-seed matched cosine (cosine similarity)",
    "warm start": "decoder cosine to its start after the warm start",
}


def importance_figure(results: list[dict[str, Any]]) -> Figure | None:
    """One panel per method; one colour per sparsity (darker = sparser), Spearman and BH p in the legend."""
    results = [r for r in results if r["n"] > 0]
    if not results:
        return None
    labels = sorted({r["method"] for r in results})
    fig = _figure(5.8 * len(labels), 4.6)
    axes = np.atleast_1d(fig.subplots(1, len(labels), sharey=True))
    for ax, label in zip(axes, labels, strict=False):
        mine = sorted((r for r in results if r["method"] == label), key=lambda r: r["sparsity"])
        shades = np.linspace(0.8, 0.1, len(mine)) if len(mine) > 1 else [0.45]
        for shade, r in zip(shades, mine, strict=False):
            cos, imp = r["cosine"], r["importance"]
            imp = np.maximum(imp, imp[imp > 0].min() / 2 if np.any(imp > 0) else 1e-9)  # log axis: no zeros
            p = r.get("spearman_p_bh")
            ax.scatter(
                cos,
                imp,
                s=7,
                alpha=0.45,
                color=colormaps["viridis"](shade),
                label=f"s={r['sparsity']:g}: ρ = {fmt(r['spearman_rho'])}, p_BH = {fmt_p(p)}"
                + f" (n = {r['n']})",
            )
        ax.axvline(TAU, color="grey", ls="--", lw=1, label=f"survival threshold τ = {TAU:g}")
        ax.set_yscale("log")
        ax.set(
            xlabel=" / ".join(
                sorted(SURVIVAL_AXIS[src] for src in {r.get("survival", "cross-seed") for r in mine})
            ),
            ylabel="|gradient attribution| (nats per firing token)",
            title=f"RQ5: importance vs survival, {label}",
        )
        ax.legend(fontsize=7)
    return fig

"""Figures of the analysis (matplotlib `Figure` objects, never pyplot: no global backend state).

Used by the callbacks (TensorBoard) and by the study's report.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from lit_prune.analysis.ablation import GROUPS, SCOPES
from lit_prune.analysis.survival_measures import SurvivalResult


def survival_figures(
    result: SurvivalResult, taus: tuple[float, ...], functional_threshold: float, n_bins: int, title: str
) -> dict[str, Figure]:
    """Matched-cosine histogram, survival by firing-rate bin, firing-rate histogram (TensorBoard tags)."""
    a = result.arrays
    alive = a["alive"].numpy()
    cos = a["matched_cosine"].numpy()[alive]
    logp = np.log10(a["firing_rate"].numpy()[alive])
    edges = np.quantile(logp, np.linspace(0, 1, n_bins + 1)) if logp.size else np.zeros(n_bins + 1)

    hist = Figure(figsize=(6, 4))
    ax = hist.add_subplot()
    ax.hist(
        cos[~np.isnan(cos)],
        bins=40,
        range=(min(0.0, float(np.nanmin(cos, initial=0.0))), 1.0),
        color="tab:blue",
        label="alive reference features",
    )
    for tau, color in zip(taus, ("tab:orange", "tab:red", "tab:purple", "tab:green"), strict=False):
        ax.axvline(tau, color=color, linestyle="--", label=f"τ = {tau:g}")
    ax.set(
        xlabel="matched decoder cosine to the run's SAE (dimensionless)",
        ylabel="features (count)",
        title=title,
    )
    ax.legend()

    bars = Figure(figsize=(7, 4))
    ax = bars.add_subplot()
    series = [
        (f"geometric, τ = {tau:g}", [result.metrics[tau][f"survival_bin{b}"] for b in range(n_bins)])
        for tau in taus
    ]
    func = result.metrics[float(functional_threshold)]
    series.append(
        (
            f"functional, r ≥ {functional_threshold:g}",
            [func[f"functional_survival_bin{b}"] for b in range(n_bins)],
        )
    )
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        ax.bar(
            np.arange(n_bins) + (i - (len(series) - 1) / 2) * width, np.nan_to_num(values), width, label=label
        )
    ax.set_xticks(range(n_bins), [f"[{edges[b]:.2f}, {edges[b + 1]:.2f}]" for b in range(n_bins)], fontsize=7)
    ax.set(
        xlabel="firing-rate bin: log10 p on the dense model (rarest → most frequent)",
        ylabel="surviving features (fraction)",
        ylim=(0, 1.05),
        title=title,
    )
    ax.legend(fontsize=7)

    rates = Figure(figsize=(6, 4))
    ax = rates.add_subplot()
    cur = a["firing_rate_current"].numpy()
    logp_cur = np.log10(cur[cur > 0])
    shared = np.histogram_bin_edges(np.concatenate([logp, logp_cur]), bins=40)  # same bins: comparable bars
    ax.hist(logp, bins=shared.tolist(), alpha=0.6, label="dense model (alive features)")
    ax.hist(logp_cur, bins=shared.tolist(), alpha=0.6, label="this run's model")
    for x in edges[1:-1]:
        ax.axvline(x, color="black", linestyle=":", linewidth=1)
    ax.plot([], [], color="black", linestyle=":", label="quantile bin edges (dense)")
    ax.set(
        xlabel="log10 firing rate (log10 fraction of eval tokens)",
        ylabel="reference features (count)",
        title=title,
    )
    ax.legend(fontsize=7)
    return {
        "rq2/matched_cosine_hist": hist,
        "rq4/survival_by_firing_rate_bin": bars,
        "rq4/firing_rate_hist": rates,
    }


def scatter_figure(arrays: dict[str, torch.Tensor]) -> Any:
    """Exact ablation CE effect (both scopes) against gradient attribution, one colour per group."""
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    attribution = arrays["attribution"][arrays["features"]].double()
    for ax, scope in zip(fig.subplots(1, 2), SCOPES, strict=False):
        exact = arrays[f"exact_ce_{scope}"].double()
        for gi, group in enumerate(GROUPS):
            take = arrays["group"] == gi
            ax.scatter(attribution[take], exact[take], s=14, alpha=0.7, label=f"{group} ({int(take.sum())})")
        values = torch.cat([attribution, exact]).abs()
        values = values[values > 0]
        # effects span decades and can be negative: symmetric log axes, linear only near 0
        linthresh = float(values.quantile(0.1)) if values.numel() else 1e-6
        lim = float(values.max()) if values.numel() else 1.0
        ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8, ls="--", label="exact = attribution")
        ax.set_xscale("symlog", linthresh=linthresh)
        ax.set_yscale("symlog", linthresh=linthresh)
        ax.set_xlabel("gradient attribution -f·(W_dec·dCE/dx) (nats per firing token)")
        ax.set_ylabel(f"exact ablation ΔCE, scope {scope} (nats per firing token)")
        ax.set_title(f"scope: {scope}")
        ax.legend(fontsize=8)
    return fig

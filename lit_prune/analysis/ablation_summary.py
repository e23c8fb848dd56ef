"""RQ5's summary: the per-feature ablation arrays as metrics per feature group and as tidy rows."""

from __future__ import annotations

from typing import Any

import torch

from lit_prune.analysis.ablation import GROUPS, SCOPES
from lit_prune.analysis.results import Condition, make_rows
from lit_prune.analysis.stats import spearman


def summarise(arrays: dict[str, torch.Tensor]) -> dict[str, float]:
    """Metrics keyed "metric:group" (group: top, random, rare, selected; all for whole-SAE numbers)."""
    rate, attribution = arrays["firing_rate"].double(), arrays["attribution"].double()
    alive = rate > 0
    out = {
        "dead_fraction:all": float((~alive).double().mean()),
        "n_alive:all": float(alive.sum()),
        "attribution_mean:all": float(attribution[alive].mean()) if alive.any() else float("nan"),
        "eval_tokens:all": float(arrays["eval_tokens"]),
    }
    for gi, group in enumerate((*GROUPS, "selected")):
        take = (
            arrays["group"] == gi
            if group != "selected"
            else torch.ones_like(arrays["group"], dtype=torch.bool)
        )
        attr = attribution[arrays["features"][take]]
        out[f"n_features:{group}"] = float(take.sum())
        out[f"attribution_mean:{group}"] = _mean(attr)
        for scope in SCOPES:
            for kind in ("ce", "kl"):
                out[f"ablation_{kind}_{scope}_mean:{group}"] = _mean(arrays[f"exact_{kind}_{scope}"][take])
            rho, p = spearman(arrays[f"exact_ce_{scope}"][take], attr)
            out[f"spearman_ce_{scope}_vs_attribution:{group}"] = rho
            out[f"spearman_ce_{scope}_vs_attribution_p:{group}"] = p
    return out


def summary_rows(condition: Condition, metrics: dict[str, float], **extra: Any) -> list[dict[str, Any]]:
    """Tidy rows of `summarise` output: "metric:group" keys become a metric and a `group` column."""
    rows = []
    for key, value in metrics.items():
        metric, group = key.split(":")
        rows += make_rows(condition, {metric: value}, group=group, **extra)
    return rows


def _mean(values: torch.Tensor) -> float:
    return float(values.double().mean()) if values.numel() else float("nan")

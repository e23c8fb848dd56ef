"""Our metric names -> the names SAELens' evals and SAEBench give the same quantities.

Result files and TensorBoard carry both: ours (docs/methods.md §3) and these aliases, so our
numbers sit beside published SAEs' without a translation. docs/metric_names.md is the table
with each definition; `ALIASES` is its source of truth (a test keeps the two in step).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

# SAEBench name -> our name; explained_variance is derived (1 - fvu), see `saebench_metrics`
ALIASES: dict[str, str] = {
    "ce_loss_score": "ce_recovered",
    "ce_loss_with_sae": "ce_sae",
    "ce_loss_without_sae": "ce_clean",
    "ce_loss_with_ablation": "ce_zero",
    "kl_div_score": "kl_score",
    "kl_div_with_sae": "kl_sae",
    "kl_div_with_ablation": "kl_zero",
    "cossim": "cos",
    "l2_ratio": "l2_ratio",
    "l0": "l0",
}
# not aliased: our `mse` is per element; SAELens' `mse` is per token (summed over d_model): ours x d_model
EXPLAINED_VARIANCE = "explained_variance"
"""1 - fvu, as SAELens' `ExplainedVarianceCalculator` pools it over all eval tokens."""


def saebench_metrics(ours: Mapping[str, float | torch.Tensor]) -> dict[str, float]:
    """The SAEBench-named subset of a metrics dict (names present in `ours` only), as floats."""
    named = {alias: float(ours[name]) for alias, name in ALIASES.items() if name in ours}
    if "fvu" in ours:
        named[EXPLAINED_VARIANCE] = 1.0 - float(ours["fvu"])
    return named

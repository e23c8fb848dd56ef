"""Weight pruning of causal LMs: magnitude, Wanda, SparseGPT and N:M (docs/methods.md §1).

`prune_model` is the entry point: it validates the request, builds keep-masks
(True = keep) for every Linear inside the decoder blocks, applies them in place
and asserts the realised sparsity of every matrix exactly.

N:M convention: with `nm=(N, M)` the pattern fixes the sparsity. `sparsity`
may be left at None or 0 ("implied by the pattern") or set to exactly N/M;
anything else is an error rather than silently ignored.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_prune.errors import invalid
from lit_prune.pruning.magnitude import magnitude_mask, magnitude_masks
from lit_prune.pruning.masks import (
    GROUPS,
    Masks,
    SparsityMismatch,
    apply_masks,
    check_pattern,
    check_realised,
    check_sparsity,
    count_pruned,
    load_masks,
    prunable_linears,
    save_masks,
    sparsity_report,
)
from lit_prune.pruning.nm import check_nm, check_nm_shape, nm_mask
from lit_prune.pruning.sparsegpt import sparsegpt_masks, sparsegpt_prune
from lit_prune.pruning.wanda import wanda_mask, wanda_mask_reference, wanda_masks, wanda_scores

METHODS = ("magnitude", "wanda", "sparsegpt")
CALIBRATED = ("wanda", "sparsegpt")
"""The methods that need calibration token ids."""

__all__ = [
    "METHODS",
    "CALIBRATED",
    "GROUPS",
    "Masks",
    "SparsityMismatch",
    "prune_model",
    "resolve_sparsity",
    "verify_masks",
    "apply_masks",
    "check_realised",
    "count_pruned",
    "load_masks",
    "prunable_linears",
    "save_masks",
    "sparsity_report",
    "magnitude_mask",
    "magnitude_masks",
    "nm_mask",
    "sparsegpt_masks",
    "sparsegpt_prune",
    "wanda_mask",
    "wanda_mask_reference",
    "wanda_masks",
    "wanda_scores",
]


def resolve_sparsity(sparsity: float | None, nm: object = None) -> tuple[float, tuple[int, int] | None]:
    """(sparsity, nm) after validation; with N:M, None/0 means N/M and any other value must equal N/M."""
    if nm is None:
        if sparsity is None:
            raise invalid("sparsity", None, "a number in [0, 1) (or nm=(N, M) to imply it)")
        return check_sparsity(sparsity), None
    n, m = check_nm(nm)
    if sparsity is None or (not isinstance(sparsity, bool) and sparsity == 0):
        return n / m, (n, m)
    check_sparsity(sparsity)
    if abs(sparsity - n / m) > 1e-9:
        raise invalid("sparsity", sparsity, f"{n}/{m} = {n / m:g} as implied by nm=({n}, {m}), or 0/None")
    return n / m, (n, m)


def resolve_group(method: str, group: str | None, nm: tuple[int, int] | None) -> str:
    """The grouping a method prunes in; also what `check_realised` verifies."""
    if nm is not None:
        if group is not None:
            raise invalid("group", group, "None when nm is set (N:M fixes the grouping)")
        return "row"
    if method == "sparsegpt":
        if group not in (None, "matrix"):
            raise invalid("group", group, "None or 'matrix' for sparsegpt (exact count per matrix)")
        return "matrix"
    if method == "wanda":
        if group not in (None, "row"):
            raise invalid("group", group, "None or 'row' for wanda (it prunes per output row)")
        return "row"
    group = "matrix" if group is None else group
    if group not in GROUPS:
        raise invalid("group", group, "one of " + ", ".join(GROUPS))
    return group


def _magnitude_nm(model: nn.Module, nm: tuple[int, int]) -> Masks:
    linears = prunable_linears(model)
    for name, lin in linears.items():
        check_nm_shape(nm, tuple(lin.weight.shape), name)
    return {name: nm_mask(lin.weight.detach().abs(), *nm) for name, lin in linears.items()}


def prune_model(
    model: nn.Module,
    method: str,
    sparsity: float | None,
    nm: tuple[int, int] | None = None,
    group: str | None = None,
    calibration_ids: torch.Tensor | None = None,
    batch_size: int = 8,
    max_seq_len: int = 256,
    progress: bool = True,
    dampening: float = 0.01,
    column_block: int = 128,
) -> Masks:
    """Prune `model` in place and return its keep-masks ({qualified Linear name: bool [d_out, d_in]}).

    method: `magnitude` (group None = `matrix`, or `row` / `global`) or `wanda`
    (per output row; needs calibration_ids [n_seq, seq_len], truncated to max_seq_len).
    `sparsegpt` (exact count per matrix, or N:M; kept weights get OBS updates; dampening = λ as a
    fraction of mean diag H, column_block = columns per lazy-update block; calibration as for wanda).
    nm: (N, M) semi-structured pattern; scores are |W| (magnitude), Wanda or SparseGPT scores.
    Raises LitPruneError on bad input, SparsityMismatch if the result is not exact.
    """
    if method not in METHODS:
        raise invalid("method", method, "one of " + ", ".join(METHODS))
    sparsity, nm = resolve_sparsity(sparsity, nm)
    group = resolve_group(method, group, nm)
    if method in CALIBRATED and calibration_ids is None:
        raise invalid("calibration_ids", None, f"token ids [n_seq, seq_len] for {method}")
    if method == "magnitude":
        masks = _magnitude_nm(model, nm) if nm is not None else magnitude_masks(model, sparsity, group)
    elif method == "sparsegpt":
        assert calibration_ids is not None  # checked above for every calibrated method
        masks = sparsegpt_masks(
            model, calibration_ids, sparsity, nm, batch_size, max_seq_len, progress, dampening, column_block
        )
    else:
        assert calibration_ids is not None  # checked above for every calibrated method
        masks = wanda_masks(model, calibration_ids, sparsity, nm, batch_size, max_seq_len, progress)
    apply_masks(model, masks)
    check_realised(sparsity_report(model, masks, sparsity), sparsity, group, nm)
    return masks


def verify_masks(
    model: nn.Module,
    masks: Masks,
    method: str,
    sparsity: float | None,
    nm: tuple[int, int] | None = None,
    group: str | None = None,
) -> list[dict]:
    """The per-matrix sparsity report, after asserting it is exactly what the method promises."""
    sparsity, nm = resolve_sparsity(sparsity, nm)
    group = resolve_group(method, group, nm)
    report = sparsity_report(model, masks, sparsity)
    check_realised(report, sparsity, group, nm)
    check_pattern(masks, sparsity, group, nm)
    return report

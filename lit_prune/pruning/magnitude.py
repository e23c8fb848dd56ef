"""Magnitude pruning: zero exactly floor(n * s) weights of smallest |W| per group.

Ties (frequent with 4-bit-derived weights) are broken by flat index: among
equal |W| the lower index is pruned first.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lit_prune.errors import invalid
from lit_prune.pruning.masks import (
    GROUPS,
    Masks,
    check_sparsity,
    count_pruned,
    numpy_view,
    prunable_linears,
    select_lowest,
    select_lowest_numpy,
)


def _scores(weight: torch.Tensor) -> torch.Tensor:
    # fp32 holds every fp16/bf16 value exactly, so no ties are created or broken here.
    w = numpy_view(weight)  # CPU: numpy (no OpenMP barrier per op on a busy machine)
    if w is not None:
        return torch.from_numpy(np.abs(w).astype(np.float32, copy=False))
    return weight.detach().abs().float()


def magnitude_mask(weight: torch.Tensor, sparsity: float, group: str = "matrix") -> torch.Tensor:
    """Keep-mask (bool, shaped like `weight: [d_out, d_in]`).

    group `matrix`: prune floor(d_out * d_in * s) of the whole matrix (row-major flat index tie-break);
    group `row`: prune floor(d_in * s) in every output row.
    """
    sparsity = check_sparsity(sparsity)
    if group not in ("matrix", "row"):
        raise invalid("group", group, "'matrix' or 'row' for one matrix ('global' needs the model)")
    rows = scores = _scores(weight)
    k = count_pruned(scores.numel() if group == "matrix" else scores.shape[1], sparsity)
    if group == "matrix":
        rows = scores.reshape(1, -1)
    if numpy_view(rows) is not None:  # CPU: stay in numpy down to the mask
        return torch.from_numpy(~select_lowest_numpy(rows.numpy(), k).reshape(weight.shape))
    return ~select_lowest(rows, k).view(weight.shape)


def magnitude_masks(model: nn.Module, sparsity: float, group: str = "matrix") -> Masks:
    """Keep-masks for every prunable Linear of `model`.

    group `global`: one ranking over all prunable weights (concatenated flat, in
    module order), removing floor(total * s) in all; per-matrix sparsity then varies.
    Holds one fp32 copy of all prunable weights, so it suits small models.
    """
    sparsity = check_sparsity(sparsity)
    if group not in GROUPS:
        raise invalid("group", group, "one of " + ", ".join(GROUPS))
    linears = prunable_linears(model)
    if group != "global":
        return {name: magnitude_mask(lin.weight, sparsity, group) for name, lin in linears.items()}
    flat = torch.cat([_scores(lin.weight).reshape(-1) for lin in linears.values()])
    keep = ~select_lowest(flat.view(1, -1), count_pruned(flat.numel(), sparsity)).view(-1)
    sizes = [lin.weight.numel() for lin in linears.values()]
    return {
        name: part.view(lin.weight.shape)
        for (name, lin), part in zip(linears.items(), keep.split(sizes), strict=False)
    }

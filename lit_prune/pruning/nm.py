"""N:M semi-structured pruning: in every group of M consecutive input columns of
each row, zero the N lowest scores (scores = |W| or Wanda scores)."""

from __future__ import annotations

from typing import Any

import torch

from lit_prune.errors import invalid
from lit_prune.pruning.masks import select_lowest


def check_nm(nm: Any) -> tuple[int, int]:
    """Validate an (N, M) pattern with 1 <= N < M; returns it as a tuple of ints."""
    ok = (
        isinstance(nm, (tuple, list))
        and len(nm) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in nm)
        and 1 <= nm[0] < nm[1]
    )
    if not ok:
        raise invalid("nm", nm, "a pair (N, M) of integers with 1 <= N < M, e.g. (2, 4)")
    return int(nm[0]), int(nm[1])


def check_nm_shape(nm: tuple[int, int], shape: tuple[int, ...], name: str = "weight") -> None:
    """M must divide d_in of a [d_out, d_in] matrix."""
    if len(shape) != 2 or shape[1] % nm[1] != 0:
        raise invalid("nm", tuple(nm), f"M dividing d_in of {name} with shape {tuple(shape)}")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask (bool, shaped like `scores: [d_out, d_in]`) with N of every M inputs pruned.

    Within each group the N lowest scores go; among equal scores the lower column first.
    """
    n, m = check_nm((n, m))
    check_nm_shape((n, m), tuple(scores.shape), "scores")
    groups = (
        scores.detach().to(torch.promote_types(scores.dtype, torch.float32)).reshape(-1, m)
    )  # [d_out*d_in/m, m]
    return ~select_lowest(groups, n).view(scores.shape)

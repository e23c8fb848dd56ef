"""SparseGPT pruning (Frantar & Alistarh 2023), docs/methods.md §1 and §4.

Per Linear with weight W [d_out, d_in] and calibration inputs X [d_in, tokens]:
H = 2 X Xᵀ / tokens + λ I (the 1 / tokens only rescales H; masks and updates do not depend on it),
λ = `dampening` x mean diag H. Inputs that are zero on every calibration token ("dead", diag H = 0)
get H_jj = 1 and their weights are set to 0, as in the reference. U = upper Cholesky factor of H⁻¹.
The columns are processed in blocks of `column_block`; inside a block, column by column, the
pruned entries q = 0 of column i are fixed and the error (w - q) / U_ii is spread over the block's
later columns with row i of U (the OBS update of the kept weights); the block's accumulated errors
reach the columns after the block in one matrix product (the lazy batch update).

Mask selection:
- unstructured: at the start of each block, the scores w² / U_jj² of the whole block (all rows) are
  ranked and exactly k_b lowest are pruned, k_b = floor(d_out * i2 * s) - floor(d_out * i1 * s) for
  the block's columns [i1, i2). The counts telescope, so every matrix has exactly floor(numel * s)
  pruned weights (the `matrix` group of `check_realised`) while rows may differ, as in the
  reference's per-block threshold (which prunes int(numel_block * s) + 1 weights per block, ties
  included). Ties: lower row-major position first.
- N:M: when column i starts a group of M (i % M == 0), the N lowest scores of the group's columns,
  computed from the weights as already updated by the block's earlier columns, are pruned per row
  (ties: lower column first). `column_block` must be a multiple of M.

Everything runs in float32 like the reference; the result is written back in the weight's dtype.
Sequential over decoder blocks like Wanda (`sequential_masks`): Hessians come from the dense block,
all its Linears are pruned, and the pruned block produces the next block's inputs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lit_prune.errors import invalid
from lit_prune.pruning.masks import Masks, check_sparsity, count_pruned, select_lowest
from lit_prune.pruning.nm import check_nm, check_nm_shape
from lit_prune.pruning.wanda import InputStatistics, _check_positive, sequential_masks

DAMPENING_RAISES = 4
"""How many times a Hessian that is not positive definite gets its dampening multiplied by 10."""


def check_dampening(dampening: object) -> float:
    """λ as a fraction of mean diag H: a finite number > 0."""
    if isinstance(dampening, bool) or not isinstance(dampening, (int, float)) or not math.isfinite(dampening):
        raise invalid(
            "dampening", dampening, "a finite number > 0 (a fraction of the Hessian's mean diagonal)"
        )
    if dampening <= 0:
        raise invalid(
            "dampening", dampening, "a finite number > 0 (a fraction of the Hessian's mean diagonal)"
        )
    return float(dampening)


def check_options(
    sparsity: float, nm: tuple[int, int] | None, dampening: float, column_block: int
) -> tuple[float, tuple[int, int] | None, float, int]:
    """Validated (sparsity, nm, dampening, column_block); N:M groups must not straddle column blocks."""
    nm = check_nm(nm) if nm is not None else None
    column_block = _check_positive("column_block", column_block)
    if nm is not None and column_block % nm[1]:
        raise invalid(
            "column_block", column_block, f"a multiple of M = {nm[1]} (N:M groups stay in one block)"
        )
    return check_sparsity(sparsity), nm, check_dampening(dampening), column_block


def inverse_cholesky(hessian: torch.Tensor, dampening: float, name: str = "weight") -> torch.Tensor:
    """Upper Cholesky factor U of (H + λ I)⁻¹ (Uᵀ U = (H + λ I)⁻¹), λ = dampening x mean diag H.

    A Hessian that is still not positive definite (fp32 round-off on a nearly singular H) gets its
    dampening raised tenfold, with a warning, up to DAMPENING_RAISES times; then a one-line error.
    """
    if not bool(torch.isfinite(hessian).all()):
        raise invalid(f"calibration inputs of {name}", "non-finite values", "finite activations")
    mean_diag = hessian.diagonal().mean()
    fraction = dampening
    for attempt in range(DAMPENING_RAISES + 1):
        damped = hessian.clone()
        damped.diagonal().add_(fraction * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                if attempt:
                    warnings.warn(
                        f"sparsegpt: the Hessian of {name} is not positive definite with dampening "
                        f"{dampening:g}; used {fraction:g} of its mean diagonal",
                        stacklevel=2,
                    )
                return upper
        fraction *= 10
    raise invalid(
        "dampening",
        dampening,
        f"a value that makes the Hessian of {name} positive definite "
        f"(raised {DAMPENING_RAISES} times up to {fraction / 10:g} of its mean diagonal, still not)",
    )


def _block_counts(d_out: int, d_in: int, sparsity: float, column_block: int) -> list[int]:
    """Weights pruned in each column block: floor-differences that add up to floor(numel * s)."""
    edges = list(range(0, d_in, column_block)) + [d_in]
    return [
        count_pruned(d_out * b, sparsity) - count_pruned(d_out * a, sparsity)
        for a, b in zip(edges, edges[1:], strict=False)
    ]


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    dampening: float = 0.01,
    column_block: int = 128,
    name: str = "weight",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned and OBS-updated weight [d_out, d_in] in the weight's dtype, keep-mask [d_out, d_in]).

    hessian: [d_in, d_in], 2 X Xᵀ up to a positive factor (undamped). With nm=(N, M), `sparsity` is
    ignored. Pruned positions of the returned weight are exactly 0.
    """
    sparsity, nm, dampening, column_block = check_options(sparsity, nm, dampening, column_block)
    d_out, d_in = weight.shape
    if tuple(hessian.shape) != (d_in, d_in):
        raise invalid("hessian.shape", tuple(hessian.shape), f"({d_in}, {d_in}) for {name}")
    if nm is not None:
        check_nm_shape(nm, (d_out, d_in), name)
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1  # an input that never fires: its weights cannot matter on the calibration data
    w[:, dead] = 0
    u = inverse_cholesky(h, dampening, name)
    with _one_thread(w.device):
        pruned = _prune_columns(w, u, sparsity, nm, column_block)
    return w.to(weight.dtype), ~pruned


def _prune_columns(
    w: torch.Tensor, u: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, column_block: int
) -> torch.Tensor:
    """The column loop on `w` [d_out, d_in] (fp32, updated in place) with U = chol(H⁻¹) upper;
    returns the pruned positions (True = pruned)."""
    d_out, d_in = w.shape
    pruned = torch.zeros_like(w, dtype=torch.bool)
    counts = None if nm is not None else _block_counts(d_out, d_in, sparsity, column_block)
    for b, i1 in enumerate(range(0, d_in, column_block)):
        i2 = min(i1 + column_block, d_in)
        block, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        diag_sq = u1.diagonal().square()
        if counts is not None:
            flat = (block.square() / diag_sq).reshape(1, -1)
            pruned[:, i1:i2] = select_lowest(flat, counts[b]).view(d_out, i2 - i1)
        errors = torch.zeros_like(block)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                group = block[:, i : i + nm[1]].square() / diag_sq[i : i + nm[1]]
                pruned[:, i1 + i : i1 + i + nm[1]] = select_lowest(group, nm[0])
            col = block[:, i]
            q = col.masked_fill(pruned[:, i1 + i], 0)
            err = (col - q) / u1[i, i]
            block[:, i:].addr_(err, u1[i, i:], alpha=-1)  # OBS: compensate on the block's later columns
            block[:, i] = q  # exactly q: pruned entries are exactly 0
            errors[:, i] = err
        w[:, i1:i2] = block
        w[:, i2:] -= errors @ u[i1:i2, i2:]  # lazy batch update of every later column at once
    return pruned


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread for the column loop on a CPU: its thousands of small ops only pay OpenMP
    barriers with more (16-22x slower with 2 threads on a busy 2-core machine, measured)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class _Hessians(InputStatistics):
    """Sums of x xᵀ [d_in, d_in] for each Linear of a block."""

    def zeros(self, linear: nn.Linear) -> torch.Tensor:
        d_in = linear.in_features
        return torch.zeros(d_in, d_in, dtype=torch.float32, device=linear.weight.device)

    def add(self, total: torch.Tensor, x: torch.Tensor) -> None:
        total.addmm_(x.T, x)

    def hessian(self, name: str) -> torch.Tensor:
        """2 X Xᵀ / tokens [d_in, d_in] (the mean over tokens keeps fp32 values moderate)."""
        return self.sums[name] * (2.0 / max(self.tokens[name], 1))


@torch.no_grad()
def sparsegpt_masks(
    model: nn.Module,
    calibration_ids: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    batch_size: int = 8,
    max_seq_len: int = 256,
    progress: bool = True,
    dampening: float = 0.01,
    column_block: int = 128,
) -> Masks:
    """Sequential SparseGPT keep-masks for every prunable Linear; PRUNES and UPDATES `model` in place.

    calibration_ids: [n_seq, seq_len] token ids, truncated to `max_seq_len`. Unlike Wanda, the kept
    weights change too (OBS updates), so the pruned model is not the dense one times its masks.
    """
    sparsity, nm, dampening, column_block = check_options(sparsity, nm, dampening, column_block)

    def prune_block(linears: dict[str, nn.Linear], run_dense: Callable[[], None]) -> Masks:
        with _Hessians(linears) as hessians:
            run_dense()
        masks: Masks = {}
        for name, lin in linears.items():
            h = hessians.hessian(name)
            weight, masks[name] = sparsegpt_prune(lin.weight, h, sparsity, nm, dampening, column_block, name)
            lin.weight.copy_(weight)
            del hessians.sums[name]  # freed as soon as its Linear is pruned
        return masks

    return sequential_masks(
        model, calibration_ids, sparsity, nm, batch_size, max_seq_len, prune_block, "sparsegpt", progress
    )

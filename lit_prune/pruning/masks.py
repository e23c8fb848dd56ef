"""Pruning masks: which weights are prunable, exact lowest-k selection, applying,
reporting, checking and saving masks.

A mask is a bool tensor shaped like its weight: True = keep, False = pruned.
Masks are keyed by the qualified module name (`model.layers.0.self_attn.q_proj`).
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lit_prune.errors import invalid
from lit_prune.files import atomic_path
from lit_prune.models.hooks import decoder_layers

Masks = dict[str, torch.Tensor]
GROUPS = ("matrix", "row", "global")


class SparsityMismatch(RuntimeError):
    """A matrix's realised sparsity differs from what the pruning method promises (a bug, not bad input)."""


def check_sparsity(sparsity: float, field: str = "sparsity") -> float:
    """Validate a sparsity in [0, 1); returns it as a float."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise invalid(field, sparsity, "a number in [0, 1)")
    return float(sparsity)


def count_pruned(n: int, sparsity: float) -> int:
    """floor(n * s), with s read as the decimal it prints as.

    Plain float arithmetic gives floor(100 * 0.29) = 28 because 0.29 is stored as
    0.28999...; users mean 29/100, so the product is taken exactly on that decimal.
    """
    return math.floor(Fraction(repr(float(sparsity))) * n)


def select_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool [rows, n]: True at exactly the `k` lowest scores of each row of `scores: [rows, n]`.

    Ties are broken by position: among equal scores the lower index is selected
    first. A threshold `<= kth` alone would over-select when the k-th value is
    tied (common with quantised weights), so in the rows where it does, the surplus
    tied entries are dropped right to left. Equal to a stable argsort's first k.
    """
    rows, n = scores.shape
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    array = numpy_view(scores)
    if array is not None:
        return torch.from_numpy(select_lowest_numpy(array, k))
    if scores.device.type != "cpu" and n < 2**31:  # CUDA sorts rows of at most INT_MAX elements
        return select_lowest_sorted(scores, k)
    kth = scores.kthvalue(k, dim=1, keepdim=True).values
    below = scores < kth
    tied = scores == kth
    room = k - below.sum(dim=1, keepdim=True)  # how many tied entries still fit, >= 1
    return below | (tied & (tied.cumsum(dim=1, dtype=torch.int32) <= room))


def select_lowest_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """`select_lowest` as the definition: the first k of a stable sort of each row.

    The path for GPUs, where one sort is fast and `kthvalue` is not: it works on each row in one
    thread block, so the few very long rows of a per-matrix (magnitude) selection crawl.
    """
    first = scores.sort(dim=1, stable=True).indices[:, :k]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, first, True)


_NUMPY_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
)


def numpy_view(t: torch.Tensor) -> np.ndarray | None:
    """The tensor as a numpy array sharing its memory, if it is on the CPU in a dtype numpy has."""
    return t.detach().numpy() if t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES else None


def select_lowest_numpy(x: np.ndarray, k: int) -> np.ndarray:
    """`select_lowest` on a CPU array [rows, n], all in numpy.

    Why numpy: its introselect (`np.partition`) finds the k-th values ~4x faster than
    `torch.kthvalue`, and single-threaded numpy ops do not pay the OpenMP barrier that makes
    a chain of small torch ops crawl on a shared 2-core machine. Only the rows whose k-th
    value is tied beyond the k-th place get the tie pass, and it touches only their ties.
    """
    if k <= 0 or k >= x.shape[1]:
        return np.full(x.shape, k > 0)
    kth = np.partition(x, k - 1, axis=1)[:, k - 1 : k]
    selected = x <= kth
    count = selected.sum(axis=1)
    over = np.flatnonzero(count > k)
    if over.size:
        r, c = np.nonzero(x[over] == kth[over])  # the tied entries, row by row, left to right
        n_tied = np.bincount(r, minlength=over.size)
        room = k - (count[over] - n_tied)  # tied entries that fit in each row, >= 1
        rank = np.arange(r.size) - (np.cumsum(n_tied) - n_tied)[r]  # position among its row's ties
        drop = rank >= room[r]
        selected[over[r[drop]], c[drop]] = False
    return selected


def block_linears(model: nn.Module) -> list[dict[str, nn.Linear]]:
    """Per decoder block, its nn.Linear modules keyed by qualified name (module order)."""
    names = {id(module): name for name, module in model.named_modules()}
    blocks = []
    for layer in decoder_layers(model):
        prefix = names[id(layer)]
        blocks.append({f"{prefix}.{sub}": m for sub, m in layer.named_modules() if isinstance(m, nn.Linear)})
    return blocks


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder blocks (q, k, v, o, gate, up, down).

    Embeddings, lm_head and norms live outside the blocks or are not Linears,
    so they are never included.
    """
    return {name: m for block in block_linears(model) for name, m in block.items()}


def _checked_pairs(model: nn.Module, masks: Masks) -> list[tuple[str, nn.Linear, torch.Tensor]]:
    linears = prunable_linears(model)
    pairs = []
    for name, mask in masks.items():
        if name not in linears:
            raise invalid(
                "masks", name, "names of prunable Linears of this model, e.g. " + next(iter(linears))
            )
        weight = linears[name].weight
        if tuple(mask.shape) != tuple(weight.shape):
            raise invalid(
                f"masks[{name}].shape", tuple(mask.shape), f"the weight shape {tuple(weight.shape)}"
            )
        pairs.append((name, linears[name], mask))
    return pairs


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Masks) -> None:
    """Zero, in place, every weight whose mask entry is False (mask: [d_out, d_in], True = keep)."""
    for _name, linear, mask in _checked_pairs(model, masks):
        keep = mask.to(device=linear.weight.device, dtype=torch.bool)
        linear.weight.masked_fill_(~keep, 0)


@torch.no_grad()
def sparsity_report(model: nn.Module, masks: Masks, target: float | None = None) -> list[dict]:
    """One row per masked matrix.

    Row fields: name, shape, numel; pruned (mask False count); sparsity = pruned / numel;
    zeros (weights exactly 0, which can exceed `pruned` when the dense weights
    already held zeros); leaked (pruned positions whose weight is not 0 — must be
    0 once masks are applied); target (the requested sparsity, may be None).
    """
    rows = []
    for name, linear, mask in _checked_pairs(model, masks):
        weight = linear.weight
        keep = mask.to(device=weight.device, dtype=torch.bool)
        pruned = int((~keep).sum())
        rows.append(
            {
                "name": name,
                "shape": tuple(weight.shape),
                "numel": weight.numel(),
                "pruned": pruned,
                "sparsity": pruned / weight.numel(),
                "zeros": int((weight == 0).sum()),
                "leaked": int(((weight != 0) & ~keep).sum()),
                "target": target,
            }
        )
    return rows


def expected_pruned(
    shape: tuple[int, int], sparsity: float, group: str = "matrix", nm: tuple[int, int] | None = None
) -> int | None:
    """Exact number of weights a method prunes in one [d_out, d_in] matrix (None for `global`)."""
    d_out, d_in = shape
    if nm is not None:
        n, m = nm
        return d_out * (d_in // m) * n
    if group == "row":
        return d_out * count_pruned(d_in, sparsity)
    if group == "matrix":
        return count_pruned(d_out * d_in, sparsity)
    return None


def check_realised(
    report: list[dict], target: float, group: str = "matrix", nm: tuple[int, int] | None = None
) -> None:
    """Raise SparsityMismatch unless every matrix pruned exactly what its method promises.

    `matrix`: floor(numel * s); `row` (Wanda): d_out * floor(d_in * s); N:M: N per
    M inputs; `global`: floor(total * s) over all matrices together. Pruned
    positions must also hold 0 in the weight.
    """
    for row in report:
        if row["leaked"]:
            raise SparsityMismatch(f"{row['name']}: {row['leaked']} pruned weights are not zero")
        want = expected_pruned(row["shape"], target, group, nm)
        if want is not None and row["pruned"] != want:
            raise SparsityMismatch(
                f"{row['name']}: realised sparsity {row['pruned']}/{row['numel']} != expected {want}/{row['numel']}"
            )
    if group == "global" and nm is None:
        total = sum(row["numel"] for row in report)
        pruned = sum(row["pruned"] for row in report)
        if pruned != count_pruned(total, target):
            raise SparsityMismatch(
                f"global: realised {pruned}/{total} != expected {count_pruned(total, target)}/{total}"
            )


def check_pattern(
    masks: Masks, target: float, group: str = "matrix", nm: tuple[int, int] | None = None
) -> None:
    """Raise SparsityMismatch unless the pruned positions follow the method's pattern: exactly N of
    every M consecutive inputs (N:M), or the same count in every output row (`row`). The counts per
    matrix (`check_realised`) cannot tell a magnitude mask from a Wanda one."""
    for name, keep in masks.items():
        pruned = ~keep.bool()
        if nm is not None:
            n, m = nm
            counts, want = pruned.reshape(pruned.shape[0], -1, m).sum(-1), n
        elif group == "row":
            counts, want = pruned.sum(1), count_pruned(pruned.shape[1], target)
        else:
            continue
        bad = int((counts != want).sum())
        if bad:
            unit = f"groups of {nm[1]}" if nm else "rows"
            raise SparsityMismatch(
                f"{name}: {bad} of {counts.numel()} {unit} do not have exactly {want} pruned weights"
            )


# Masks are stored one bit per weight (numpy.packbits, big-endian bit order) in flat uint8 tensors,
# with each mask's shape in the file's metadata: 1/8 of one byte per weight (13 MB, not 106 MB, for
# SmolLM2-135M). Files written before this format (one uint8 0/1 per weight, no FORMAT_KEY) still load.
FORMAT_KEY = "lit_prune.masks"
PACKED = "packbits-v1"
_SHAPE = "shape:"


def save_masks(masks: Masks, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write masks to a safetensors file, one bit per weight, atomically (temp file + rename)."""
    tensors, info = {}, {**(metadata or {}), FORMAT_KEY: PACKED}
    for name, mask in masks.items():
        flat = mask.detach().to("cpu", torch.bool).contiguous().reshape(-1).numpy()
        tensors[name] = torch.from_numpy(np.packbits(flat))
        info[_SHAPE + name] = ",".join(str(d) for d in mask.shape)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=info)


def load_masks(path: str | os.PathLike) -> Masks:
    """Read masks written by `save_masks` (packed, or the older one byte per weight); bool tensors on CPU."""
    with safe_open(str(path), "pt") as f:
        info = f.metadata() or {}
    tensors = load_file(str(path))
    if info.get(FORMAT_KEY) == PACKED:
        return {name: _unpack(name, t, info.get(_SHAPE + name)) for name, t in tensors.items()}
    for name, t in tensors.items():
        if t.dtype != torch.uint8 or bool((t > 1).any()):
            raise invalid(f"masks[{name}]", str(t.dtype), "uint8 0/1 values written by save_masks")
    return {name: t.bool() for name, t in tensors.items()}


def _unpack(name: str, packed: torch.Tensor, shape_text: str | None) -> torch.Tensor:
    try:
        shape = tuple(int(d) for d in shape_text.split(",")) if shape_text else None
    except ValueError:
        shape = None
    numel = math.prod(shape) if shape is not None else -1
    if shape is None or packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != -(-numel // 8):
        raise invalid(f"masks[{name}]", shape_text, "a packed mask with its shape, written by save_masks")
    bits = np.unpackbits(packed.numpy(), count=numel).astype(bool)
    return torch.from_numpy(bits).reshape(shape)

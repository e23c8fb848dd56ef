"""Wanda pruning (Sun et al. 2023): score S_ij = |W_ij| * ||X_j||_2, pruned per output row.

`wanda_masks` runs the sequential procedure of docs/methods.md §1: block-0 inputs are
captured for the whole calibration set, then block by block the dense block
yields input norms, all its Linears are pruned, and the pruned block produces
the next block's inputs. Only one block's inputs are held at a time.

Batching: calibration sequences are split into batches of `batch_size`; the
last batch may be smaller. Decoder blocks need per-layer keyword arguments
(masks and rotary embeddings differ between sliding and global layers in
Gemma 2/3), so they are captured from one dense forward per distinct batch
size (at most two) and reused for every batch of that size. No padding is
added, so every token counted is a real calibration token.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from lit_prune.errors import invalid
from lit_prune.models.hooks import decoder_layers
from lit_prune.pruning.masks import (
    Masks,
    apply_masks,
    block_linears,
    check_sparsity,
    count_pruned,
    numpy_view,
    select_lowest,
    select_lowest_numpy,
)
from lit_prune.pruning.nm import check_nm, check_nm_shape, nm_mask

if TYPE_CHECKING:  # annotations only
    from typing_extensions import Self

# Keyword arguments that carry a KV cache; sequential calibration must not build one.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """fp32 scores [d_out, d_in] = |W| * sqrt(input_sq_norm) for `weight: [d_out, d_in]`,
    `input_sq_norm: [d_in]` (sum or mean of x_j^2 over calibration tokens; rank-equivalent per row)."""
    if tuple(input_sq_norm.shape) != (weight.shape[1],):
        raise invalid(
            "input_sq_norm.shape", tuple(input_sq_norm.shape), f"({weight.shape[1]},) = d_in of the weight"
        )
    # The float32 sqrt correctly rounded, through float64: torch's float32 CPU sqrt is not (2.13 was one
    # ulp off for ~20% of inputs), which reordered near-equal scores and so changed masks.
    root = input_sq_norm.detach().float().double().sqrt().float()
    return weight.detach().abs().float() * root


def wanda_mask(weight: torch.Tensor, input_sq_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask [d_out, d_in]: per output row the floor(d_in * s) lowest scores are pruned
    (ties: lower column first). k-th value by introselect (`select_lowest`), no full sort.

    On CPU the scores are computed in numpy, bit for bit as `wanda_scores` does (|W| is exact, and
    both take the correctly rounded float32 sqrt), so no torch op runs at all."""
    sparsity = check_sparsity(sparsity)
    k = count_pruned(weight.shape[1], sparsity)
    w, sq = numpy_view(weight), numpy_view(input_sq_norm)
    if w is not None and sq is not None and tuple(sq.shape) == (w.shape[1],):
        scores = np.abs(w).astype(np.float32, copy=False) * np.sqrt(sq.astype(np.float32))
        return torch.from_numpy(~select_lowest_numpy(scores, k))
    return ~select_lowest(wanda_scores(weight, input_sq_norm), k)


def wanda_mask_reference(weight: torch.Tensor, input_sq_norm: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Naive `wanda_mask`: full stable argsort of each row, the first floor(d_in * s) pruned."""
    sparsity = check_sparsity(sparsity)
    scores = wanda_scores(weight, input_sq_norm)
    k = count_pruned(scores.shape[1], sparsity)
    order = torch.argsort(scores, dim=1, stable=True)
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, order[:, :k], False)
    return keep


def check_calibration(calibration_ids: object, vocab_size: int) -> torch.Tensor:
    """Validate calibration token ids: an integer tensor [n_seq, seq_len], ids in [0, vocab_size)."""
    ids = calibration_ids
    if (
        not isinstance(ids, torch.Tensor)
        or ids.dim() != 2
        or ids.is_floating_point()
        or ids.dtype == torch.bool
    ):
        shown = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise invalid("calibration_ids", shown, "an integer tensor [n_seq, seq_len]")
    if ids.numel() == 0:
        raise invalid(
            "calibration_ids", f"shape {tuple(ids.shape)}", "at least one sequence of at least one token"
        )
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise invalid("calibration_ids", f"ids in [{lo}, {hi}]", f"token ids in [0, {vocab_size})")
    return ids.long()


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


def _layer_kwargs(kwargs: dict) -> dict:
    kept = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS and k != "hidden_states"}
    if "use_cache" in kept:
        kept["use_cache"] = False
    return kept


def _capture_inputs(
    model: nn.Module, batches: list[torch.Tensor]
) -> tuple[list[torch.Tensor], dict[int, list[dict]]]:
    """Block-0 inputs ([batch, seq, d_model] per batch) and, per batch size, every block's call kwargs."""
    layers = decoder_layers(model)
    inputs: list[torch.Tensor] = []
    per_size: dict[int, list[dict]] = {}
    state: dict[str, list[dict] | None] = {"record": None}

    def make_hook(idx: int) -> Callable:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            if idx == 0:
                inputs.append(args[0] if args else kwargs["hidden_states"])
            record = state["record"]
            if record is None:
                raise _Stop  # kwargs for this batch size are known: block 0's input is all we need
            record.append(_layer_kwargs(kwargs))
            if idx == len(layers) - 1:
                raise _Stop

        return hook

    handles = [
        layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    try:
        for ids in batches:
            size = ids.shape[0]
            state["record"] = [] if size not in per_size else None
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
            if state["record"] is not None:
                per_size[size] = state["record"]
    finally:
        for handle in handles:
            handle.remove()
    return inputs, per_size


class InputStatistics:
    """Running fp32 sums of a statistic of each Linear's inputs over all tokens (and the token
    count), collected by forward pre-hooks while a block runs; subclasses say which statistic."""

    def __init__(self, linears: dict[str, nn.Linear]):
        self.sums = {n: self.zeros(lin) for n, lin in linears.items()}
        self.tokens = {n: 0 for n in linears}
        self._handles = [lin.register_forward_pre_hook(self._hook(n)) for n, lin in linears.items()]

    def zeros(self, linear: nn.Linear) -> torch.Tensor:
        """The empty sum for one Linear."""
        raise NotImplementedError

    def add(self, total: torch.Tensor, x: torch.Tensor) -> None:
        """Add the statistic of inputs `x: [tokens, d_in]` (fp32) to `total` in place."""
        raise NotImplementedError

    def _hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()  # [tokens, d_in]
            self.add(self.sums[name], x)
            self.tokens[name] += x.shape[0]

        return hook

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()


class _InputNorms(InputStatistics):
    """Sums of x_j^2 [d_in] for each Linear of a block."""

    def zeros(self, linear: nn.Linear) -> torch.Tensor:
        return torch.zeros(linear.in_features, dtype=torch.float32, device=linear.weight.device)

    def add(self, total: torch.Tensor, x: torch.Tensor) -> None:
        total += x.pow(2).sum(dim=0)


def _run_block(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """One decoder block on `x: [batch, seq, d_model]`; blocks return a tensor or a tuple."""
    out = layer(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _mask_fn(
    sparsity: float, nm: tuple[int, int] | None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if nm is None:
        return lambda weight, sq: wanda_mask(weight, sq, sparsity)
    return lambda weight, sq: nm_mask(wanda_scores(weight, sq), *nm)


def _check_positive(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(field, value, "an integer >= 1")
    return value


@torch.no_grad()
def wanda_masks(
    model: nn.Module,
    calibration_ids: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    batch_size: int = 8,
    max_seq_len: int = 256,
    progress: bool = True,
) -> Masks:
    """Sequential Wanda keep-masks for every prunable Linear; PRUNES `model` in place as it goes.

    calibration_ids: [n_seq, seq_len] token ids, truncated to `max_seq_len`.
    With `nm=(N, M)` each row keeps M - N of every M inputs by Wanda score and
    `sparsity` is ignored.
    """
    sparsity = check_sparsity(sparsity)
    nm = check_nm(nm) if nm is not None else None
    make_mask = _mask_fn(sparsity, nm)

    def prune_block(linears: dict[str, nn.Linear], run_dense: Callable[[], None]) -> Masks:
        with _InputNorms(linears) as norms:
            run_dense()
        return {name: make_mask(lin.weight, norms.sums[name]) for name, lin in linears.items()}

    return sequential_masks(
        model, calibration_ids, sparsity, nm, batch_size, max_seq_len, prune_block, "wanda", progress
    )


def _run_all(layer: nn.Module, inputs: list[torch.Tensor], per_size: dict[int, list[dict]], idx: int) -> None:
    for x in inputs:
        _run_block(layer, x, per_size[x.shape[0]][idx])


@torch.no_grad()
def sequential_masks(
    model: nn.Module,
    calibration_ids: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None,
    batch_size: int,
    max_seq_len: int,
    prune_block: Callable[[dict[str, nn.Linear], Callable[[], None]], Masks],
    desc: str,
    progress: bool = True,
) -> Masks:
    """The sequential procedure of docs/methods.md §1, shared by Wanda and SparseGPT; PRUNES `model`.

    Validates the calibration ids ([n_seq, seq_len], truncated to `max_seq_len`), the batch sizes and
    the N:M shapes (sparsity and nm are already checked); sparsity 0 without N:M returns all-True
    masks at once. Block-0 inputs of every calibration batch are captured once. For each block,
    `prune_block(linears, run_dense)` receives the block's Linears and a function that runs the still
    dense block over all calibration inputs (the caller's hooks collect its statistics); it returns the
    block's keep-masks, which are applied, and the pruned block then produces the next block's inputs
    in place of the old ones.
    """
    batch_size = _check_positive("batch_size", batch_size)
    max_seq_len = _check_positive("max_seq_len", max_seq_len)
    # nn.Module's typing does not know transformers' get_input_embeddings
    vocab = cast(int, model.get_input_embeddings().num_embeddings)  # pyright: ignore[reportCallIssue]
    ids = check_calibration(calibration_ids, vocab)
    blocks = block_linears(model)
    if nm is not None:
        for block in blocks:
            for name, lin in block.items():
                check_nm_shape(nm, tuple(lin.weight.shape), name)
    elif sparsity == 0:
        return {n: torch.ones_like(lin.weight, dtype=torch.bool) for b in blocks for n, lin in b.items()}

    device = next(model.parameters()).device
    batches = list(ids[:, :max_seq_len].to(device).split(batch_size))
    layers = decoder_layers(model)
    was_training = model.training
    model.eval()
    try:
        inputs, per_size = _capture_inputs(model, batches)
        masks: Masks = {}
        for idx, linears in enumerate(tqdm(blocks, desc=desc, unit="block", disable=not progress)):
            layer = layers[idx]
            block_masks = prune_block(linears, partial(_run_all, layer, inputs, per_size, idx))
            apply_masks(model, block_masks)
            masks.update(block_masks)
            if idx + 1 < len(blocks):
                for i, x in enumerate(inputs):  # replace in place: one block's activations at a time
                    inputs[i] = _run_block(layer, x, per_size[x.shape[0]][idx])
    finally:
        model.train(was_training)
    return masks

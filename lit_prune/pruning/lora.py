"""Masked LoRA on the decoder blocks' Linears: the recovery mode beside full fine-tuning (RQ6).

Each pruned Linear W (already 0 where its keep-mask M is False) gets a rank-r adapter (A [r, d_in],
B [d_out, r], scale = alpha / r). The layer computes x (W + (scale B A) * M)^T: the adapter's update
is masked in the forward pass too, so training optimises exactly the weights that `merge` writes,
W <- (W + scale B A) * M, and a pruned weight is exactly 0 before and after every merge.

Our own ~60 lines rather than `peft`: we need the masked forward and a merge that re-masks, neither of
which peft has (its merge adds the dense B A, which would revive pruned weights), on plain
nn.Linear modules found by `prunable_linears`; a new dependency would buy nothing here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lit_prune.pruning.masks import Masks, prunable_linears


class LoRAAdapter(nn.Module):
    """A rank-r update of one Linear: A ~ Kaiming-uniform, B = 0, so the adapted layer starts equal to W."""

    def __init__(self, d_out: int, d_in: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / rank

    def delta(self, mask: torch.Tensor) -> torch.Tensor:
        """(scale B A) * mask: [d_out, d_in], zero wherever the mask prunes."""
        return (self.B @ self.A) * self.scale * mask


def adapter_key(linear_name: str) -> str:
    """A ModuleDict key for a Linear's dotted name (dots are not allowed in keys)."""
    return linear_name.replace(".", "__")


def make_adapters(model: nn.Module, masks: Masks, rank: int, alpha: float) -> nn.ModuleDict:
    """One adapter per masked Linear of the model (keyed by `adapter_key`), on its weight's device and dtype."""
    linears = prunable_linears(model)
    out = nn.ModuleDict()
    for name in masks:
        weight = linears[name].weight
        out[adapter_key(name)] = LoRAAdapter(weight.shape[0], weight.shape[1], rank, alpha).to(
            device=weight.device, dtype=weight.dtype
        )
    return out


def attach(
    model: nn.Module, adapters: nn.ModuleDict, masks: Masks, device_masks: Callable[[], Masks] | None = None
) -> list[RemovableHandle]:
    """Forward hooks that add x ((scale B A) * M)^T to each adapted Linear's output; remove them to detach.

    device_masks: returns the masks on the adapters' device (called each forward); default: `masks`."""
    handles = []
    for name, linear in prunable_linears(model).items():
        key = adapter_key(name)
        if key not in adapters:
            continue

        def hook(module: nn.Module, args: tuple, output: torch.Tensor, name: str = name, key: str = key):
            mask = (device_masks() if device_masks else masks)[name]
            delta = adapters[key].delta(mask.to(output.dtype))  # pyright: ignore[reportCallIssue]
            return output + nn.functional.linear(args[0], delta)

        handles.append(linear.register_forward_hook(hook))
    return handles


@torch.no_grad()
def merge(model: nn.Module, adapters: nn.ModuleDict, masks: Masks) -> None:
    """W <- (W + scale B A) * M in place, then B <- 0: the model computes the same function, its pruned
    weights are exactly 0 and the adapters add nothing until trained further."""
    for name, linear in prunable_linears(model).items():
        key = adapter_key(name)
        if key not in adapters:
            continue
        adapter = adapters[key]
        assert isinstance(adapter, LoRAAdapter)
        mask = masks[name].to(linear.weight.device)
        linear.weight.add_(adapter.delta(mask.to(linear.weight.dtype)).to(linear.weight.dtype))
        linear.weight.masked_fill_(~mask.bool(), 0)
        adapter.B.zero_()


@torch.no_grad()
def merged_weights(model: nn.Module, adapters: nn.ModuleDict, masks: Masks) -> dict[str, torch.Tensor]:
    """{Linear name: (W + scale B A) * M}, new tensors: what `merge` would write, the model untouched."""
    out = {}
    for name, linear in prunable_linears(model).items():
        key = adapter_key(name)
        if key in adapters:
            mask = masks[name].to(linear.weight.device)
            adapter = adapters[key]
            assert isinstance(adapter, LoRAAdapter)
            w = linear.weight + adapter.delta(mask.to(linear.weight.dtype)).to(linear.weight.dtype)
            out[name] = w.masked_fill(~mask.bool(), 0)
    return out

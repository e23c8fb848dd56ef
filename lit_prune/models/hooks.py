"""Read and replace the residual stream after a decoder block.

`resid_post` of block L is the output of `model.model.layers[L]`, equal to
HF `hidden_states[L + 1]`. Position 0 (the attention sink, ~100x the median
norm in SmolLM2) and padding are never SAE inputs: `valid_positions` says which
tokens count, and splices leave everything else untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from lit_prune.errors import invalid


class _StopForward(Exception):
    """Raised inside a hook to end the forward pass once the wanted block ran."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Llama / Gemma 2 / Gemma 3 causal LM."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None and hasattr(inner, "language_model"):
        layers = getattr(inner.language_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise invalid(
            "model", type(model).__name__, "a causal LM with model.layers (Llama, Gemma 2, Gemma 3)"
        )
    return layers


def check_layer(model: nn.Module, layer: int, field: str = "hook_layer") -> int:
    """Validate a block index against the model; returns it unchanged."""
    n = len(decoder_layers(model))
    if not 0 <= layer < n:
        raise invalid(field, layer, f"a block index in [0, {n - 1}] for this {n}-block model")
    return layer


def valid_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Bool [batch, seq]: real tokens at positions >= 1 (position 0 and padding excluded)."""
    mask = attention_mask.bool().clone()
    mask[:, 0] = False
    return mask


# Whether a decoder-block class returns a tuple (older transformers) or the hidden states alone,
# as seen by `capture_resid_post`: `resume_after` stands in for skipped blocks in that form.
_RETURNS_TUPLE: dict[type, bool] = {}


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output: Any, hidden: torch.Tensor) -> object:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@torch.no_grad()
def capture_resid_post(
    model: nn.Module,
    input_ids: torch.Tensor,
    layer: int,
    attention_mask: torch.Tensor | None = None,
    stop: bool = True,
) -> torch.Tensor:
    """resid_post of `layer`: [batch, seq, d_model]. With `stop`, blocks after `layer` never run."""
    captured: list[torch.Tensor] = []

    def hook(module: nn.Module, _inputs: object, output: object) -> None:
        _RETURNS_TUPLE[type(module)] = isinstance(output, tuple)
        captured.append(_hidden(output))
        if stop:
            raise _StopForward

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=False,
            logits_to_keep=1 if stop else 0,
        )
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured[0]


@contextmanager
def splice_resid_post(
    model: nn.Module, layer: int, replace: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[None]:
    """Within the context, block `layer` outputs `replace(x)` instead of `x` ([batch, seq, d_model])."""

    def hook(_module: nn.Module, _inputs: object, output: object) -> object:
        return _with_hidden(output, replace(_hidden(output)))

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def resume_after(model: nn.Module, layer: int, resid: torch.Tensor) -> Iterator[None]:
    """Within the context, block `layer` outputs `resid` ([batch, seq, d_model]) and it and the
    blocks before it do not run, so a forward costs only the later blocks and the head.

    Pass the ids `resid` was captured from (`capture_resid_post`, possibly then edited): the
    later blocks see exactly the input a full forward gives them, so the logits are the same
    bits. A block class `capture_resid_post` has not seen yet runs every block instead.
    """
    layers = decoder_layers(model)
    as_tuple = _RETURNS_TUPLE.get(type(layers[layer]))
    if as_tuple is None:
        with splice_resid_post(model, layer, lambda _x: resid.clone()):  # later blocks may not write into it
            yield
        return
    wrap = (lambda h: (h,)) if as_tuple else (lambda h: h)
    saved = [block.__dict__.get("forward") for block in layers[: layer + 1]]
    for block in layers[:layer]:
        block.forward = lambda hidden_states, *_args, **_kwargs: wrap(hidden_states)
    layers[layer].forward = lambda *_args, **_kwargs: wrap(resid.clone())  # as above
    try:
        yield
    finally:
        for block, forward in zip(layers, saved, strict=False):  # saved: the first layer + 1 blocks
            if forward is None:
                del block.forward
            else:
                block.forward = forward

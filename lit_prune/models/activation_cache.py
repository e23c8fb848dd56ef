"""Shared hooked activations: one LM forward feeds every SAE that reads the same hook.

Inside `sharing_activations(max_bytes)`, `harvest` results (and the SAE-independent clean and
zero-ablated logits of spliced CE) are kept in a process-wide LRU keyed by (the LM's weights,
dtype, hooked block or tag, the exact token batch). The seeds of a condition, the reference
SAE, its pruned baselines and functional survival then read one forward's activations instead
of running the LM again. Outside the context nothing is kept.

The weights key is a digest of every parameter's sum and sum of squares (float64): a dense
copy loaded separately hits the same entries as the original, and pruning in place changes
it. Each parameter's statistics are remembered until its version counter or storage changes,
so a lookup costs microseconds, not a pass over the weights. A hit returns exactly the
tensor a recomputation would (same batch, same kernels).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

T = TypeVar("T")


def _bytes(value: object) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


class ActivationCache:
    """LRU of tensors (and small values such as metric dicts, counted as 0 bytes) bounded by
    the tensors' total size in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, Any] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key: str) -> Any:
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return value

    def put(self, key: str, value: Any) -> None:
        size = _bytes(value)
        if size > self.max_bytes:
            return
        self.entries[key] = value
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= _bytes(old)


_active: list[ActivationCache] = []


@contextlib.contextmanager
def sharing_activations(max_bytes: int = 4 << 30) -> Iterator[ActivationCache]:
    """Cache `harvest` results (up to max_bytes) for the duration of the block."""
    cache = ActivationCache(max_bytes)
    _active.append(cache)
    try:
        yield cache
    finally:
        _active.remove(cache)


def active_cache() -> ActivationCache | None:
    return _active[-1] if _active else None


# Per-parameter statistics, remembered with the parameter's version counter and storage:
# recomputing them for SmolLM2-135M costs ~0.15 s (numpy) to ~1.2 s (torch float64 copies)
# on 2 cores, up to twice a block-6 forward of 2k tokens.
_param_stats: WeakIdKeyDictionary = WeakIdKeyDictionary()
_STATS_CHUNK = 1 << 24
"""Elements squared per float64 copy off CPU (a whole float64 copy of Gemma 2's embedding: 4.7 GB)."""


def _stats(p: torch.Tensor) -> torch.Tensor:
    """[2] float64 (sum, sum of squares) of p, recomputed only when p may have changed.

    In-place ops on a parameter (`masked_fill_`, `mul_`, `copy_`, `load_state_dict`) bump its
    `_version`; `p.data = t` changes its storage. Both invalidate. Writes through `p.data.op_()`
    bypass the version counter and are not seen: modify LM weights through the parameter.
    Inference tensors have no version counter and are never remembered.
    """
    if p.is_inference():
        return _compute_stats(p)
    key = (p._version, p.data_ptr(), p.dtype, tuple(p.shape))
    memo = _param_stats.get(p)
    if memo is not None and memo[0] == key:
        return memo[1]
    value = _compute_stats(p)
    _param_stats[p] = (key, value)
    return value


def _compute_stats(p: torch.Tensor) -> torch.Tensor:
    if p.device.type == "cpu" and p.dtype in (torch.float32, torch.float64):
        # numpy accumulates in float64 chunk by chunk; torch would first copy p to float64 (~10x slower)
        a = p.detach().reshape(-1).numpy()
        return torch.tensor(
            [np.add.reduce(a, dtype=np.float64), np.einsum("i,i->", a, a, dtype=np.float64)],
            dtype=torch.float64,
        )
    total = squares = p.new_zeros((), dtype=torch.float64)
    for chunk in p.detach().reshape(-1).split(_STATS_CHUNK):  # sum(dtype=float64) would copy all of p too
        wide = chunk.double()
        total, squares = total + wide.sum(), squares + wide.pow(2).sum()
    return torch.stack([total, squares]).cpu()


@torch.no_grad()
def weights_digest(lm: nn.Module) -> str:
    """Digest of the LM's weights by value: per-parameter sum and sum of squares in float64."""
    stats = torch.stack([_stats(p) for p in lm.parameters()])
    return hashlib.blake2b(stats.numpy().tobytes(), digest_size=16).hexdigest()


def cached(lm: nn.Module, ids: torch.Tensor, layer: object, compute: Callable[[], T]) -> T:
    """compute() through the active cache (or directly when none is active).

    layer: what is computed besides the LM and tokens: a block index for activations, or a tag
    such as "clean" / "zero@6" for logits (or one naming an SAE, for its metrics)."""
    cache = active_cache()
    if cache is None:
        return compute()
    dtype = next(lm.parameters()).dtype
    ids_key = hashlib.blake2b(ids.cpu().numpy().tobytes(), digest_size=16).hexdigest()
    key = f"{weights_digest(lm)}:{dtype}:{layer}:{tuple(ids.shape)}:{ids_key}"
    value = cache.get(key)
    if value is None:
        value = compute()
        cache.put(key, value)
    return value

"""Learning-rate schedule for SAE training: linear warm-up, constant, linear decay at the end."""

from __future__ import annotations

import torch


def lr_factor(step: int, total: int, warmup: int, decay_fraction: float) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-indexed) of `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    decay_start = total - int(total * decay_fraction)
    if step < decay_start:
        return 1.0
    return max(0.0, (total - step) / max(1, total - decay_start))


def sae_steps(lm_batches: int, tokens_per_batch: int, sae_batch_tokens: int) -> int:
    """SAE optimizer steps in a fit: harvested tokens / SAE batch, the last partial batch counted
    when at least half full (as SAEModule drains its buffer)."""
    full, rest = divmod(lm_batches * tokens_per_batch, sae_batch_tokens)
    return max(1, full + int(rest > 0 and rest >= sae_batch_tokens // 2))


def warmup_decay(opt: torch.optim.Optimizer, total: int, warmup: int, decay_fraction: float):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, warmup, decay_fraction))

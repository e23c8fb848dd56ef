"""A shuffling activation buffer and the input normalisation scalar.

Consecutive LM batches are strongly correlated (same documents); mixing them in
a buffer and drawing random rows decorrelates SAE batches (the idea of
sae-lens' mixing buffer, implemented here for in-loop harvesting).
"""

from __future__ import annotations

import math

import torch


def fit_norm_scale(acts: torch.Tensor) -> float:
    """c with E||c x||^2 = d_model over acts: [n, d_model]."""
    mean_sq = acts.double().pow(2).sum(-1).mean().item()
    return math.sqrt(acts.shape[-1] / mean_sq)


class ActivationBuffer:
    """Holds up to `capacity` rows; `pop` draws a uniformly random batch (seeded) once full."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.rows: torch.Tensor | None = None
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return 0 if self.rows is None else self.rows.shape[0]

    def add(self, acts: torch.Tensor) -> None:
        """acts: [n, d_model], appended (detached)."""
        acts = acts.detach()
        self.rows = acts if self.rows is None else torch.cat([self.rows, acts])

    def full(self) -> bool:
        return len(self) >= self.capacity

    def pop(self, batch_size: int) -> torch.Tensor:
        """A random batch [min(batch_size, len), d_model], removed from the buffer."""
        assert self.rows is not None
        order = torch.randperm(len(self), generator=self.generator).to(self.rows.device)
        take, keep = order[:batch_size], order[batch_size:]
        batch, self.rows = self.rows[take], self.rows[keep]
        return batch

    def state_dict(self) -> dict[str, object]:
        return {"rows": None if self.rows is None else self.rows.cpu(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, object]) -> None:
        self.rows = state["rows"]  # type: ignore[assignment]
        self.generator.set_state(state["generator"])  # type: ignore[arg-type]

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
    """Holds up to `capacity` rows; `pop` draws a uniformly random batch (seeded) once full.

    Rows live in one preallocated tensor: `add` writes after the held rows and `pop` fills the
    holes it leaves with the untaken rows from the end, so neither copies the whole buffer.
    """

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.storage: torch.Tensor | None = None
        self.n = 0
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n

    @property
    def rows(self) -> torch.Tensor | None:
        """The held rows [n, d_model] (a view), or None when nothing was added."""
        return None if self.storage is None else self.storage[: self.n]

    def add(self, acts: torch.Tensor) -> None:
        """acts: [m, d_model], appended (detached)."""
        acts, m = acts.detach(), acts.shape[0]
        if self.storage is None or self.n + m > self.storage.shape[0]:
            grown = acts.new_empty((max(self.capacity, self.n) + m, acts.shape[1]))  # room for one more add
            if self.n:
                assert self.storage is not None  # n > 0 only once storage exists
                grown[: self.n] = self.storage[: self.n]
            self.storage = grown
        self.storage[self.n : self.n + m] = acts
        self.n += m

    def clear(self) -> None:
        self.storage, self.n = None, 0

    def full(self) -> bool:
        return len(self) >= self.capacity

    def pop(self, batch_size: int) -> torch.Tensor:
        """A random batch [min(batch_size, len), d_model], removed from the buffer."""
        assert self.storage is not None
        n = self.n
        b = min(batch_size, n)
        # The indices are worked out on the host, where the generator is, and reach the device in one
        # copy that the host need not wait for (boolean indexing on a GPU would wait three times).
        take = torch.randperm(n, generator=self.generator)[:b]
        first_tail = n - b  # rows [first_tail, n) move into the holes left below first_tail
        in_tail = take >= first_tail
        untaken_tail = torch.ones(b, dtype=torch.bool)
        untaken_tail[take[in_tail] - first_tail] = False
        holes, fillers = take[~in_tail], first_tail + untaken_tail.nonzero().squeeze(1)
        take, holes, fillers = _to_device(torch.cat([take, holes, fillers]), self.storage.device).split(
            [b, len(holes), len(fillers)]
        )
        batch = self.storage[take]
        self.storage[holes] = self.storage[fillers]
        self.n = first_tail
        return batch

    def state_dict(self) -> dict[str, object]:
        rows = self.rows
        # a copy of the held rows only (a view would save the whole preallocated storage)
        return {
            "rows": None if rows is None else rows.to("cpu", copy=True),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        rows = state["rows"]
        self.storage, self.n = rows, 0 if rows is None else rows.shape[0]  # type: ignore[assignment,union-attr]
        self.generator.set_state(state["generator"])  # type: ignore[arg-type]


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU from page-locked memory without the host waiting for the copy."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)

"""Tidy result rows: one JSON object per metric, written atomically.

A row is `(model, hook, method, sparsity, seed_a, seed_b, metric, value)` plus optional
`extra` keys (e.g. `tau`, `epoch`). Per-feature arrays go beside the rows as safetensors.
The report reads only these files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lit_prune.files import atomic_path, write_text_atomic

ROW_KEYS = ("model", "hook", "method", "sparsity", "seed_a", "seed_b", "metric", "value")


@dataclass(frozen=True)
class Condition:
    """Which model, hook, pruning condition and SAE seeds a metric belongs to."""

    model: str
    hook: str
    method: str = "dense"
    sparsity: float = 0.0
    seed_a: int | None = None
    seed_b: int | None = None


def make_rows(condition: Condition, metrics: dict[str, float], **extra: Any) -> list[dict[str, Any]]:
    """One row per metric; non-finite values are kept as null so nothing silently disappears."""
    base = asdict(condition)
    return [{**base, "metric": name, "value": _finite(value), **extra} for name, value in metrics.items()]


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def write_rows(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Replace `path` with `rows` as a JSON list (temp file + rename: never half-written)."""
    path = Path(path)
    write_text_atomic(path, json.dumps(list(rows), indent=1, sort_keys=True))
    return path


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text())


def append_rows(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Existing rows + new rows, rewritten atomically."""
    path = Path(path)
    old = read_rows(path) if path.is_file() else []
    return write_rows(path, [*old, *rows])


def write_arrays(path: str | Path, **arrays: torch.Tensor) -> Path:
    """Per-feature arrays (e.g. matched cosines [d_sae]) as safetensors, atomically."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in arrays.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp)
    return path


def read_arrays(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))

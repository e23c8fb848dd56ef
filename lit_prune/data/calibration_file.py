"""A user's own Wanda calibration data (`prune --calibration_file`): token ids in a .npy / .pt
file (2-D [n, seq] or 1-D, cut into rows) or UTF-8 text, tokenized and packed into rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lit_prune.data.tokens import pack_documents
from lit_prune.errors import invalid


def _load_ids(path: Path) -> torch.Tensor | str:
    """The raw content of a calibration file: a tensor for .npy / .pt, else text."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        if suffix in (".pt", ".pth"):
            return torch.load(path, map_location="cpu", weights_only=True)
        return path.read_text(encoding="utf-8")
    except Exception as err:  # numpy / torch / codecs raise many types for corrupt files
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        allowed = f"a readable .npy / .pt token-id file or UTF-8 text ({reason})"
        raise invalid("calibration_file", str(path), allowed) from None


def read_calibration_file(path: Path, tokenizer, n_seq: int, seq_len: int, vocab_size: int) -> torch.Tensor:
    """Calibration ids [n <= n_seq, <= seq_len] from a text or token-id file, checked against
    [0, vocab_size)."""
    raw, shown = _load_ids(path), str(path)
    if isinstance(raw, str):
        if not raw.strip():
            raise invalid("calibration_file", shown, "a non-empty file")
        ids = pack_documents([raw], tokenizer, seq_len, n_seq)
        if ids.shape[0] == 0:
            raise invalid(
                "calibration_file", shown, f"text of at least {seq_len} tokens (calibration_seq_len)"
            )
        return ids
    if (
        not isinstance(raw, torch.Tensor)
        or raw.dim() not in (1, 2)
        or raw.is_floating_point()
        or raw.is_complex()
        or raw.dtype == torch.bool
    ):
        raise invalid("calibration_file", shown, "an integer tensor of token ids, 2-D [n, seq] or 1-D")
    if raw.numel() == 0:
        raise invalid("calibration_file", shown, "a non-empty file")
    if raw.dim() == 1:
        n = min(n_seq, raw.numel() // seq_len)
        if n == 0:
            raise invalid("calibration_file", shown, f"at least {seq_len} token ids (calibration_seq_len)")
        raw = raw[: n * seq_len].reshape(n, seq_len)
    ids = raw[:n_seq, :seq_len].long().contiguous()
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise invalid("calibration_file", f"{shown} (ids in [{lo}, {hi}])", f"token ids in [0, {vocab_size})")
    return ids

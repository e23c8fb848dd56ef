"""Language-model perplexity on fixed token sequences (fp32 CE, every next-token prediction)."""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from lit_prune.analysis.metrics import next_token_ce


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """exp(mean CE) over ids: [n, seq_len] (no padding). Mean is over all n * (seq_len - 1) predictions."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in tqdm(
        range(0, ids.shape[0], batch_size), desc="perplexity", disable=not progress, leave=False
    ):
        batch = ids[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        ce = next_token_ce(logits, batch)
        total += ce.double().sum().item()
        count += ce.numel()
    return math.exp(total / count)

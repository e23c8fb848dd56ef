"""Evaluate an SAE on a (possibly pruned) LM over fixed eval tokens: reconstruction + spliced CE.

`Codec` maps raw activations x: [n, d_model] to (features [n, d_sae], x_hat [n, d_model]);
`sae_codec` builds one from any sae-lens SAE and the input scale it was trained with.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lit_prune.analysis.metrics import (
    ReconstructionMetrics,
    SplicedCEMetrics,
    loss_positions,
    spliced_forward,
)
from lit_prune.models.activation_cache import cached
from lit_prune.models.hooks import capture_resid_post, valid_positions

if TYPE_CHECKING:  # annotations only: importing sae_lens costs seconds
    from sae_lens.saes.sae import SAE
    from transformers import PreTrainedModel

Codec = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def sae_codec(sae: SAE[Any], scale: float = 1.0) -> Codec:
    """Raw-space encode/decode of an SAE trained on inputs scaled by `scale` (1.0: exported SAEs)."""

    def codec(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = sae.encode(x.float() * scale)
        return feats, sae.decode(feats) / scale

    return codec


@torch.no_grad()
def harvest(lm: nn.Module, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """fp32 resid_post of `layer` at positions >= 1: [n, d_model]; later blocks never run.

    Shared through `sharing_activations` when that is active (then callers must not modify it)."""
    mask = torch.ones_like(ids)
    # no padding: positions >= 1 are a slice (boolean indexing would wait for the GPU)
    return cached(
        lm, ids, layer, lambda: capture_resid_post(lm, ids, layer, mask)[:, 1:].flatten(0, 1).float()
    )


class SAEEvaluator(nn.Module):
    """Streams reconstruction metrics over every eval token and spliced CE / KL over the first ones."""

    def __init__(self, d_model: int, d_sae: int) -> None:
        super().__init__()
        self.recon = ReconstructionMetrics(d_model, d_sae)
        self.spliced = SplicedCEMetrics()

    @torch.no_grad()
    def update(self, lm: nn.Module, layer: int, ids: torch.Tensor, codec: Codec, ce_rows: int) -> None:
        """One batch ids: [batch, seq]; spliced CE on its first `ce_rows` sequences."""
        ce_rows = max(0, min(ce_rows, ids.shape[0]))
        if ce_rows:
            self._update_spliced(lm, layer, ids[:ce_rows], codec)
        if ce_rows < ids.shape[0]:
            x = harvest(lm, ids[ce_rows:], layer)
            feats, x_hat = codec(x)
            self.recon.update(x, x_hat, feats)

    def _update_spliced(self, lm: nn.Module, layer: int, ids: torch.Tensor, codec: Codec) -> None:
        mask = torch.ones_like(ids)
        valid = valid_positions(mask)

        def reconstruct(x: torch.Tensor) -> torch.Tensor:
            feats, x_hat = codec(x.float())
            self.recon.update(x.float(), x_hat, feats)
            return x_hat

        # Every forward resumes from block `layer`'s output, run once. Clean and zero-ablated logits
        # do not depend on the SAE: shared, like the activations, when a cache is active.
        resid = cached(lm, ids, f"resid@{layer}", lambda: capture_resid_post(lm, ids, layer, mask))
        clean = cached(lm, ids, "clean", lambda: spliced_forward(lm, ids, mask, layer, valid, None, resid))
        sae = spliced_forward(lm, ids, mask, layer, valid, reconstruct, resid)
        zero = cached(
            lm,
            ids,
            f"zero@{layer}",
            lambda: spliced_forward(lm, ids, mask, layer, valid, torch.zeros_like, resid),
        )
        self.spliced.update(ids, loss_positions(valid), clean, sae, zero)

    def compute(self) -> dict[str, float]:
        values = dict(self.recon.compute())
        if self.spliced.update_called:
            values.update(self.spliced.compute())
        return {k: float(v) for k, v in values.items()}

    def reset(self) -> None:
        self.recon.reset()
        self.spliced.reset()


def evaluate_sae(
    lm: PreTrainedModel,
    layer: int,
    codec: Codec,
    eval_ids: torch.Tensor,
    d_sae: int,
    batch_size: int = 32,
    ce_sequences: int = 128,
    progress: bool = False,
) -> dict[str, float]:
    """All SAE metrics over eval_ids: [n, seq] (spliced CE on the first ce_sequences rows)."""
    device = next(lm.parameters()).device
    evaluator = SAEEvaluator(lm.config.hidden_size, d_sae).to(device)
    for start in tqdm(
        range(0, eval_ids.shape[0], batch_size), desc="evaluate SAE", disable=not progress, leave=False
    ):
        evaluator.update(
            lm, layer, eval_ids[start : start + batch_size].to(device), codec, ce_sequences - start
        )
    return evaluator.compute()

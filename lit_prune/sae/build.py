"""Build sae-lens training SAEs from our flat, typed settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.sae import TrainingSAE
from sae_lens.saes.standard_sae import StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

from lit_prune.errors import invalid

ARCHITECTURES = ("topk", "standard", "jumprelu", "batchtopk")


@dataclass
class SAESettings:
    """What SAE to train. Defaults: TopK, k = 32, 8x width (docs/methods.md §2)."""

    architecture: str = "topk"
    """sae-lens architecture: topk | batchtopk | standard (L1) | jumprelu."""
    expansion: int = 8
    """d_sae = expansion * d_model (ignored when d_sae is set)."""
    d_sae: int | None = None
    """Number of latents; overrides expansion."""
    k: int = 32
    """Active latents per token for topk / batchtopk."""
    aux_loss_coefficient: float = 1.0
    """TopK auxiliary loss weight that lets dead latents learn the residual (topk only)."""
    l1_coefficient: float = 5.0
    """Sparsity penalty for the standard architecture."""
    l0_coefficient: float = 1.0
    """Sparsity penalty for jumprelu."""
    jumprelu_init_threshold: float = 0.01
    """Initial JumpReLU threshold."""
    decoder_init_norm: float | None = 0.1
    """Initial decoder row norm (None: sae-lens' plain init)."""
    fast: bool | None = None
    """Use lit_prune's sparse TopK training step (identical loss and gradients to sae-lens', faster); topk
    only. null: on for topk, off for the others (true with another architecture is an error)."""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise invalid("sae.architecture", self.architecture, f"one of {', '.join(ARCHITECTURES)}")
        if self.expansion < 1:
            raise invalid("sae.expansion", self.expansion, "an integer >= 1")
        if self.d_sae is not None and self.d_sae < 1:
            raise invalid("sae.d_sae", self.d_sae, "a positive integer or null")
        if self.k < 1:
            raise invalid("sae.k", self.k, "an integer >= 1")
        if self.fast and self.architecture != "topk":
            raise invalid(
                "sae.fast", self.fast, f"false or null with architecture={self.architecture!r} (topk only)"
            )

    def width(self, d_in: int) -> int:
        return self.d_sae if self.d_sae is not None else self.expansion * d_in


def build_training_sae(settings: SAESettings, d_in: int, seed: int) -> TrainingSAE:
    """A freshly initialised sae-lens training SAE; `seed` fixes the init."""
    d_sae = settings.width(d_in)
    if settings.architecture in ("topk", "batchtopk") and settings.k > d_sae:
        raise invalid("sae.k", settings.k, f"at most d_sae={d_sae}")
    common: dict[str, Any] = dict(d_in=d_in, d_sae=d_sae, decoder_init_norm=settings.decoder_init_norm)
    cls, cfg = {
        "topk": lambda: (
            TopKTrainingSAE,
            TopKTrainingSAEConfig(k=settings.k, aux_loss_coefficient=settings.aux_loss_coefficient, **common),
        ),
        "batchtopk": lambda: (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig(k=settings.k, **common)),
        "standard": lambda: (
            StandardTrainingSAE,
            StandardTrainingSAEConfig(l1_coefficient=settings.l1_coefficient, **common),
        ),
        "jumprelu": lambda: (
            JumpReLUTrainingSAE,
            JumpReLUTrainingSAEConfig(
                l0_coefficient=settings.l0_coefficient,
                jumprelu_init_threshold=settings.jumprelu_init_threshold,
                **common,
            ),
        ),
    }[settings.architecture]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(cfg)

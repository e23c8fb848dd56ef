"""RQ5 inside fit: exact feature ablation and gradient attribution with the module's current SAE.

Definitions (scopes, sign of the attribution) are in `lit_prune.analysis.ablation`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from lit_prune.analysis.ablation import GROUPS, feature_importance, sae_parts
from lit_prune.analysis.ablation_summary import summarise, summary_rows
from lit_prune.analysis.figures import scatter_figure
from lit_prune.analysis.results import Condition, write_arrays, write_rows
from lit_prune.errors import invalid
from lit_prune.lit.datamodule import datamodule_of

if TYPE_CHECKING:  # annotations only (sae_module imports these callbacks' modules)
    from lit_prune.lit.sae_module import SAEModule


class AblationCallback(L.Callback):
    """After each validation epoch: which SAE features matter causally to the LM the fit runs on.

    On the first `eval_sequences` eval sequences: firing rates, disjoint top / random / rare feature
    groups, exact ablation effects (CE and KL, both scopes) for them, gradient attribution for every
    feature and Spearman(exact, attribution). Logs rq5/* scalars and a scatter figure, and rewrites
    <output_dir>/results/rq5_ablation.json (tidy rows) and rq5_ablation.safetensors (per feature).
    RQ5 is defined on the dense model; on a pruned fit the results carry its pruning_info.

    Args:
        n_top: features with the highest firing rate.
        n_random: features drawn uniformly (seeded) from the remaining alive ones.
        n_rare: features with the lowest nonzero firing rate.
        eval_sequences: eval sequences (from the start of the eval split) to measure on.
        every_n_epochs: measure after every n-th validation epoch.
        output_dir: where results/ goes; null: the trainer's log dir.
        seed: seed of the random group.
        batch_size: sequences (or ablated copies) per forward pass.
    """

    def __init__(
        self,
        n_top: int = 64,
        n_random: int = 64,
        n_rare: int = 64,
        eval_sequences: int = 8,
        every_n_epochs: int = 1,
        output_dir: str | None = None,
        seed: int = 0,
        batch_size: int = 8,
    ) -> None:
        for name, value, low in (
            ("n_top", n_top, 0),
            ("n_random", n_random, 0),
            ("n_rare", n_rare, 0),
            ("eval_sequences", eval_sequences, 1),
            ("every_n_epochs", every_n_epochs, 1),
            ("batch_size", batch_size, 1),
        ):
            if value < low:
                raise invalid(f"ablation.{name}", value, f"an integer >= {low}")
        self.n_top, self.n_random, self.n_rare = n_top, n_random, n_rare
        self.eval_sequences, self.every_n_epochs = eval_sequences, every_n_epochs
        self.output_dir, self.seed, self.batch_size = output_dir, seed, batch_size

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: SAEModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return  # rank 0 alone: the work needs no collective and the outputs are single files
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        arrays = self.measure(pl_module, datamodule_of(trainer).eval_ids[: self.eval_sequences])
        metrics = summarise(arrays)
        self._warn_if_short(metrics)
        self._log(trainer, metrics, arrays)
        self._write(trainer, pl_module, arrays, metrics)

    def measure(self, pl_module: SAEModule, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-feature arrays for ids: [n, seq] (keys as in the safetensors file)."""
        parts = sae_parts(pl_module.sae, pl_module.norm_scale.item())
        return feature_importance(
            pl_module.lm_on_device(),
            pl_module.hparams.hook_layer,
            ids.to(pl_module.device),
            parts,
            self.n_top,
            self.n_random,
            self.n_rare,
            self.seed,
            self.batch_size,
        )

    def _warn_if_short(self, metrics: dict[str, float]) -> None:
        """Groups are drawn from the alive features only; say so when there were too few for a group."""
        for group in GROUPS:
            asked, got = getattr(self, f"n_{group}"), int(metrics[f"n_features:{group}"])
            if got < asked:
                rank_zero_warn(
                    f"ablation.n_{group}={asked}: only {got} alive features were left for this group "
                    f"({int(metrics['n_alive:all'])} alive in all); its RQ5 numbers use those"
                )

    def _log(self, trainer: L.Trainer, metrics: dict[str, float], arrays: dict[str, torch.Tensor]) -> None:
        scalars = {f"rq5/{k.replace(':', '/')}": v for k, v in metrics.items()}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=trainer.global_step)
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(
                    "rq5/exact_vs_attribution", scatter_figure(arrays), trainer.global_step
                )

    def _write(
        self,
        trainer: L.Trainer,
        pl_module: SAEModule,
        arrays: dict[str, torch.Tensor],
        metrics: dict[str, float],
    ) -> None:
        hp, info = pl_module.hparams, getattr(pl_module, "pruning_info", {})
        condition = Condition(
            model=str(hp.model_name),
            hook=f"blocks.{hp.hook_layer}.hook_resid_post",
            method=str(info.get("method", "dense")),
            sparsity=float(info.get("sparsity", 0.0)),
            seed_a=int(hp.seed),
        )
        rows = summary_rows(
            condition, metrics, epoch=trainer.current_epoch, eval_sequences=self.eval_sequences
        )
        out = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir) / "results"
        write_arrays(out / "rq5_ablation.safetensors", **arrays)
        write_rows(out / "rq5_ablation.json", rows)

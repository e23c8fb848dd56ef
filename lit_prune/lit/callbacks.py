"""Callbacks: pruning the LM before any activation is read, and keeping it pruned."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch

from lit_prune.analysis.perplexity import perplexity
from lit_prune.errors import LitPruneError, described, invalid
from lit_prune.lit.datamodule import datamodule_of
from lit_prune.lit.sae_module import check_same_pruning
from lit_prune.models.registry import load_model
from lit_prune.pruning import (
    METHODS,
    SparsityMismatch,
    apply_masks,
    load_masks,
    prunable_linears,
    prune_model,
    resolve_sparsity,
    verify_masks,
)
from lit_prune.pruning.sparsegpt import check_options as check_sparsegpt

if TYPE_CHECKING:  # annotations only (sae_module imports this module)
    from lit_prune.lit.sae_module import SAEModule


class PruningCallback(L.Callback):
    """Prunes the frozen LM at the start of fit so the SAE trains on the pruned model.

    Masks are kept in this callback's checkpoint state (restored masks are re-applied instead of
    recomputed), re-applied after every optimizer step when LM weights are trainable, and their
    realised sparsity is logged per matrix with the pruned model's eval perplexity.

    Args:
        method: magnitude, wanda or sparsegpt.
        sparsity: fraction of weights removed per matrix (per row for wanda), in [0, 1);
            with nm it may be left at 0 (implied by the pattern).
        nm: N:M pattern as [N, M] (zero N of every M consecutive inputs), e.g. [2, 4]; null for unstructured.
        group: magnitude ranking group: matrix (default), row or global.
        calibration_batch_size: sequences per forward pass during Wanda / SparseGPT calibration.
        dampening: SparseGPT: lambda added to the Hessian's diagonal as a fraction of its mean.
        column_block: SparseGPT: columns per block of lazy OBS updates (a multiple of M with nm).
        perplexity_sequences: eval sequences for the dense and pruned perplexity (0 to skip).
        masks_path: apply these saved masks (`save_masks`, e.g. a study's or `prune`'s masks.safetensors)
            instead of computing them; they are still checked against method / sparsity / nm.
        recovered_model: RQ6: a recovered model (a PrunedLMModule export of this LM pruned by
            masks_path's masks) whose decoder-block Linear weights replace the LM's before the masks are
            checked; the run's rows are labelled <method>-recovered.
    """

    def __init__(
        self,
        method: str = "wanda",
        sparsity: float = 0.5,
        nm: list[int] | None = None,
        group: str | None = None,
        calibration_batch_size: int = 8,
        perplexity_sequences: int = 64,
        masks_path: str | None = None,
        dampening: float = 0.01,
        column_block: int = 128,
        recovered_model: str | None = None,
    ) -> None:
        if method not in METHODS:
            raise invalid("pruning.method", method, "one of " + ", ".join(METHODS))
        self.sparsity, self.nm = resolve_sparsity(sparsity, tuple(nm) if nm else None)
        self.method, self.group = method, group
        for name, value, low in (
            ("calibration_batch_size", calibration_batch_size, 1),
            ("perplexity_sequences", perplexity_sequences, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise invalid(f"pruning.{name}", value, f"an integer >= {low}")
        self.calibration_batch_size = calibration_batch_size
        self.dampening, self.column_block = dampening, column_block
        if method == "sparsegpt":
            try:
                check_sparsegpt(self.sparsity, self.nm, dampening, column_block)
            except LitPruneError as err:
                raise LitPruneError(f"pruning.{err}") from None
        self.perplexity_sequences = perplexity_sequences
        self.masks: dict[str, torch.Tensor] | None = None
        self.masks_path = masks_path
        if recovered_model is not None and (masks_path is None or not Path(recovered_model).is_dir()):
            raise invalid(
                "pruning.recovered_model",
                recovered_model,
                "a recovered model directory, with masks_path given",
            )
        self.recovered_model = recovered_model
        if masks_path is not None:
            if not Path(masks_path).is_file():
                raise invalid("pruning.masks_path", masks_path, "an existing masks.safetensors file")
            try:
                self.masks = load_masks(masks_path)
            except Exception as err:  # safetensors raises several types for a file that is not one
                raise invalid(
                    "pruning.masks_path", masks_path, f"a masks file written by save_masks ({described(err)})"
                ) from None

    def on_fit_start(self, trainer: L.Trainer, pl_module: SAEModule) -> None:
        resumed = getattr(pl_module, "resumed_pruning", None)
        if resumed is not None:  # before pruning, which may take minutes
            check_same_pruning(resumed, self.state_dict())
        pl_module.ensure_norm_scale()  # c is fitted on the dense model, never on the pruned one
        lm = pl_module.lm_on_device()
        dm = datamodule_of(trainer)
        eval_ids = dm.eval_ids[: self.perplexity_sequences]
        info: dict[str, Any] = {
            "method": self.method,
            "sparsity": self.sparsity,
            "nm": self.nm,
            "group": self.group,
        }
        if self.perplexity_sequences:
            info["perplexity_dense"] = perplexity(lm, eval_ids)
        started = time.perf_counter()
        if self.recovered_model is not None:
            _load_linears(lm, self.recovered_model)
            info["recovered"] = True
        if self.masks is None:
            masks = prune_model(
                lm,
                self.method,
                self.sparsity,
                nm=self.nm,
                group=self.group,
                calibration_ids=dm.calibration_ids,
                batch_size=self.calibration_batch_size,
                max_seq_len=dm.hparams.calibration_seq_len,
                progress=False,
                dampening=self.dampening,
                column_block=self.column_block,
            )
            self.masks = {
                name: mask.cpu() for name, mask in masks.items()
            }  # 1 byte per weight: not on the GPU
        else:
            apply_masks(lm, self.masks)  # given or resumed: those masks, exactly
        info["seconds"] = time.perf_counter() - started
        try:
            report = verify_masks(lm, self.masks, self.method, self.sparsity, self.nm, self.group)
        except SparsityMismatch as err:
            if self.masks_path is None:
                raise  # masks computed here or resumed from a checkpoint: a bug, not bad input
            raise invalid(
                "pruning.masks_path",
                self.masks_path,
                f"masks of method={self.method} sparsity="
                f"{self.sparsity:g} nm={self.nm} group={self.group} ({err})",
            ) from None
        if self.perplexity_sequences:
            info["perplexity_pruned"] = perplexity(lm, eval_ids)
        info["realised_sparsity"] = sum(r["pruned"] for r in report) / sum(r["numel"] for r in report)
        pl_module.pruning_info = info
        self._pruned_lm = pl_module.lm  # a later validate on this LM finds it pruned already
        self._log(trainer, report, info)

    # validate (and test / predict) never call on_fit_start: without these the SAE would be measured on
    # the dense LM. The checkpoint's masks (restored by load_state_dict) or the configured pruning
    # are applied once per LM, before the first batch.
    def on_validation_start(self, trainer: L.Trainer, pl_module: SAEModule) -> None:
        self._outside_fit(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: SAEModule) -> None:
        self._outside_fit(trainer, pl_module)

    def on_predict_start(self, trainer: L.Trainer, pl_module: SAEModule) -> None:
        self._outside_fit(trainer, pl_module)

    def _outside_fit(self, trainer: L.Trainer, pl_module: SAEModule) -> None:
        if trainer.state.fn != "fit" and getattr(self, "_pruned_lm", None) is not pl_module.lm:
            self.on_fit_start(trainer, pl_module)

    def _log(self, trainer: L.Trainer, report: list[dict], info: dict[str, Any]) -> None:
        if trainer.logger is None:
            return
        scalars = {f"pruning/{k}": float(v) for k, v in info.items() if isinstance(v, (int, float))}
        trainer.logger.log_metrics(scalars, step=0)
        experiment: Any = getattr(trainer.logger, "experiment", None)
        if hasattr(experiment, "add_histogram"):  # per matrix: one histogram and one table, not 210 charts
            sparsities = torch.tensor([row["sparsity"] for row in report], dtype=torch.float64)
            experiment.add_histogram("pruning/sparsity_per_matrix", sparsities, global_step=0)
            experiment.add_text("pruning/sparsity_per_matrix", sparsity_table(report), global_step=0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: SAEModule, *args: Any) -> None:
        if self.masks is not None and any(p.requires_grad for p in pl_module.lm.parameters()):
            apply_masks(pl_module.lm, self.masks)  # an optimizer step may have revived pruned weights

    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": self.masks,
            "method": self.method,
            "sparsity": self.sparsity,
            "nm": self.nm,
            "group": self.group,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        mine = self.state_dict()
        check_same_pruning({**mine, **state_dict}, mine)  # checkpoints before "group" was saved: assume ours
        self.masks = state_dict["masks"]


@torch.no_grad()
def _load_linears(lm: torch.nn.Module, path: str) -> None:
    """Copy the decoder-block Linear weights of the model at `path` (same architecture) into `lm`:
    all that a recovery fine-tune changes."""
    source = prunable_linears(load_model(path))
    for name, linear in prunable_linears(lm).items():
        if name not in source or source[name].weight.shape != linear.weight.shape:
            raise invalid(
                "pruning.recovered_model",
                path,
                f"a recovered copy of this model (it has no {name} of its shape)",
            )
        linear.weight.copy_(source[name].weight)


def sparsity_table(report: list[dict]) -> str:
    """A markdown table (TensorBoard's text tab) of each matrix's realised sparsity."""
    lines = ["| matrix | weights | pruned | sparsity |", "|---|---:|---:|---:|"]
    lines += [f"| {r['name']} | {r['numel']:,} | {r['pruned']:,} | {r['sparsity']:.4f} |" for r in report]
    return "\n".join(lines)

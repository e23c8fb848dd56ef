"""RQ3 as a callback: is the dense-model SAE still usable on this run's (pruned) LM?"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

import lightning as L
import torch

from lit_prune.analysis.evaluate import harvest, sae_codec
from lit_prune.analysis.results import make_rows
from lit_prune.analysis.transfer import (
    is_viable,
    l0_ratio,
    sae_input_sq_norm,
    transfer_metrics,
    wanda_prune_sae,
)
from lit_prune.errors import invalid
from lit_prune.lit.analysis_callbacks import ReferenceSAECallback, dense_lm
from lit_prune.lit.datamodule import datamodule_of
from lit_prune.models.activation_cache import cached, weights_digest
from lit_prune.pruning.masks import check_sparsity

if TYPE_CHECKING:  # annotations only (sae_module imports these callbacks' modules)
    from sae_lens.saes.sae import SAE
    from transformers import PreTrainedModel

    from lit_prune.lit.sae_module import SAEModule

Metrics = dict[str, float]


class TransferabilityCallback(ReferenceSAECallback):
    """Evaluates the reference SAE on the run's LM every validation epoch and at fit end, next to two
    baselines.

    SAEs compared on the current (possibly pruned) LM over the whole eval split, each against
    this LM's own clean and zero-ablated CE:
    - `reference`: the reference SAE as loaded;
    - `retrained`: the module's own SAE, B(m, s) (from `module.last_val` when it covers the same
      tokens, else evaluated here the same way);
    - `reference_wanda` at each `sae_prune_levels` s: the reference SAE with its encoder
      Wanda-pruned (`wanda_prune_sae`; decoder dense), calibrated on this LM's activations over
      the calibration split (the train split if that is empty), never on eval tokens.
    The reference is also evaluated once on the dense LM M(0): rows with method "dense". Every SAE
    gets `l0_ratio` (its L0 over the reference's dense L0) and `viable` (1/0): CE recovered
    >= ce_factor x and FVU <= fvu_factor x the reference's dense values. For the reference this is
    the docs/methods.md §4 rule; for the baselines it asks whether they reach the same bar.
    Rows (extra keys `sae`, `sae_sparsity`, `epoch`, `stage`) go to <dir>/results/rq3_transfer.json
    and scalars to the logger as rq3/<sae>/<metric>.

    Args:
        reference_sae: directory of the dense-model SAE (ours, or a foreign sae-lens SAE).
        sae_prune_levels: Wanda sparsities of the SAE-pruning baseline, each in [0, 1).
        ce_sequences: eval sequences (from the start of the split) for spliced CE / KL; null: the
            module's ce_eval_sequences (then its own validation metrics are reused as `retrained`).
        calibration_sequences: sequences whose activations calibrate the SAE pruning.
        ce_factor: viability needs CE recovered >= ce_factor x the dense value.
        fvu_factor: viability needs FVU <= fvu_factor x the dense value.
        output_dir: where results/ is written; null: the trainer's log dir.
        batch_size: eval sequences per forward; null: the datamodule's batch size.
        at_fit_end: measure once more at the end of fit (validation already sees the final SAE;
            useful when validation runs mid-epoch).
    """

    results_name = "rq3_transfer.json"

    def __init__(
        self,
        reference_sae: str,
        sae_prune_levels: tuple[float, ...] = (0.25, 0.5, 0.75),
        ce_sequences: int | None = None,
        calibration_sequences: int = 32,
        ce_factor: float = 0.9,
        fvu_factor: float = 2.0,
        output_dir: str | None = None,
        batch_size: int | None = None,
        at_fit_end: bool = False,
    ) -> None:
        super().__init__(reference_sae, output_dir, batch_size, at_fit_end)
        self.sae_prune_levels = tuple(check_sparsity(s, "sae_prune_levels") for s in sae_prune_levels)
        if ce_sequences is not None and ce_sequences < 0:
            raise invalid("ce_sequences", ce_sequences, "a non-negative integer or null")
        if not (ce_factor > 0 and fvu_factor > 0):
            raise invalid("ce_factor, fvu_factor", (ce_factor, fvu_factor), "positive numbers")
        if calibration_sequences < 1:
            raise invalid("calibration_sequences", calibration_sequences, "a positive integer")
        self.ce_sequences, self.calibration_sequences = ce_sequences, calibration_sequences
        self.ce_factor, self.fvu_factor = ce_factor, fvu_factor
        self.dense_metrics: Metrics | None = None
        self._cache: tuple[str, dict[tuple[str, float], Metrics]] | None = None
        self.last: dict[tuple[str, float], Metrics] = {}
        """The latest measurement's metrics by (sae, sae_sparsity)."""

    def measure(self, trainer: L.Trainer, module: SAEModule, stage: str) -> None:
        assert self.reference is not None  # loaded in setup
        ce = self._ce(module)
        if self.dense_metrics is None:
            self.dense_metrics = self._evaluate(trainer, module, dense_lm(module), self.reference, ce)
        results = {
            **self._reference_side(trainer, module, ce),
            ("retrained", 0.0): self._retrained(trainer, module, ce, use_last_val=stage == "validation"),
        }
        results = {key: {**metrics, **self._versus_dense(metrics)} for key, metrics in results.items()}
        self.last = results
        epoch = trainer.current_epoch if stage == "validation" else None
        rows = make_rows(
            self.condition(module, dense=True),
            self.dense_metrics,
            sae="reference",
            sae_sparsity=0.0,
            epoch=None,
            stage="dense",
        )
        cond = self.condition(module)
        for (sae, level), metrics in results.items():
            rows += make_rows(cond, metrics, sae=sae, sae_sparsity=level, epoch=epoch, stage=stage)
        self.write(trainer, rows)
        scalars = {f"rq3/reference_dense/{k}": v for k, v in self.dense_metrics.items()}
        for (sae, level), metrics in results.items():
            label = f"{sae}{level:g}" if sae == "reference_wanda" else sae
            scalars.update({f"rq3/{label}/{k}": v for k, v in metrics.items()})
        self.log_scalars(trainer, scalars)

    # --- pieces ------------------------------------------------------------------------------
    def _ce(self, module: SAEModule) -> int:
        return int(module.hparams.ce_eval_sequences if self.ce_sequences is None else self.ce_sequences)

    def _evaluate(
        self,
        trainer: L.Trainer,
        module: SAEModule,
        lm: PreTrainedModel,
        sae: SAE[Any],
        ce: int,
        scale: float = 1.0,
    ) -> Metrics:
        """transfer_metrics, shared through the activation cache: in a study every pruned
        condition measures the same reference on the same dense LM."""
        layer, ids, batch = (
            module.hparams.hook_layer,
            datamodule_of(trainer).eval_ids,
            self.eval_batch_size(trainer),
        )
        cfg = json.dumps(sae.cfg.to_dict(), sort_keys=True, default=str)
        cfg_digest = hashlib.sha256(cfg.encode()).hexdigest()[:16]
        tag = f"transfer@{layer}:{weights_digest(sae)}:{cfg_digest}:{scale!r}:{batch}:{ce}"
        metrics = cached(
            lm,
            ids,
            tag,
            lambda: transfer_metrics(lm, layer, sae_codec(sae, scale), ids, sae.cfg.d_sae, batch, ce)[0],
        )
        return dict(metrics)

    def _reference_side(
        self, trainer: L.Trainer, module: SAEModule, ce: int
    ) -> dict[tuple[str, float], Metrics]:
        """The reference and its Wanda-pruned copies on the current LM; cached while its weights stay the
        same."""
        lm = module.lm_on_device()
        fingerprint = weights_digest(lm)
        if self._cache is not None and self._cache[0] == fingerprint:
            return self._cache[1]
        assert self.reference is not None  # loaded in setup
        results = {("reference", 0.0): self._evaluate(trainer, module, lm, self.reference, ce)}
        if self.sae_prune_levels:
            sq = self._input_sq_norm(trainer, module, lm)
            for s in self.sae_prune_levels:
                pruned = wanda_prune_sae(self.reference, sq, s)
                results[("reference_wanda", s)] = self._evaluate(trainer, module, lm, pruned, ce)
        self._cache = (fingerprint, results)
        return results

    def _retrained(self, trainer: L.Trainer, module: SAEModule, ce: int, use_last_val: bool) -> Metrics:
        """The module SAE's metrics on the same tokens: its own validation result when comparable
        (never at fit end: the module trained on after that validation)."""
        ids = datamodule_of(trainer).eval_ids
        last = getattr(module, "last_val", None) if use_last_val else None
        same_tokens = last is not None and int(last.get("tokens", -1)) == ids.shape[0] * (ids.shape[1] - 1)
        comparable = same_tokens and ce == int(module.hparams.ce_eval_sequences)
        if comparable and last is not None and "ce_recovered" in last:  # same_tokens: last is set
            metrics = dict(last)
            metrics.setdefault("alive_fraction", 1.0 - metrics["dead_fraction"])
            return metrics
        return self._evaluate(
            trainer, module, module.lm_on_device(), module.sae, ce, module.norm_scale.item()
        )

    @torch.no_grad()
    def _input_sq_norm(self, trainer: L.Trainer, module: SAEModule, lm: PreTrainedModel) -> torch.Tensor:
        """Mean square of the reference encoder's inputs on this LM over the calibration sequences: [d_in]."""
        dm = datamodule_of(trainer)
        ids = dm.calibration_ids if dm.calibration_ids.numel() else dm.train_ids
        assert self.reference is not None  # loaded in setup
        total: Any = 0.0  # a float64 tensor after the first batch
        n = 0
        for batch in ids[: self.calibration_sequences].split(self.eval_batch_size(trainer)):
            x = harvest(lm, batch.to(module.device), module.hparams.hook_layer)  # [tokens, d_model]
            total = total + sae_input_sq_norm(self.reference, x).double() * x.shape[0]  # token-weighted mean
            n += x.shape[0]
        return (total / n).float()

    def _versus_dense(self, metrics: Metrics) -> dict[str, Any]:
        dense = self.dense_metrics
        assert dense is not None  # measure() takes the dense metrics first
        measured = "ce_recovered" in metrics and "ce_recovered" in dense  # ce_sequences = 0: no spliced CE
        viable = (
            float(is_viable(metrics, dense, self.ce_factor, self.fvu_factor)) if measured else float("nan")
        )
        return {"l0_ratio": l0_ratio(metrics["l0"], dense["l0"]), "viable": viable}

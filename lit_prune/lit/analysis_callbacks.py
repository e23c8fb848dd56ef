"""Analysis callbacks that measure a fixed reference SAE against the run's (pruned) LM and SAE.

- `TransferabilityCallback` (RQ3, `lit_prune.lit.transfer_callback`)
- `FeatureSurvivalCallback` (RQ2 + RQ4, `lit_prune.lit.survival_callback`)

Both are importable from here too. This module holds what they share: loading and checking
the reference SAE at setup, the dense LM copy, the condition of the run, tidy rows and logging.

Dense measurements: the callbacks never rely on their position in `trainer.callbacks`.
They measure on the first `on_validation_end`, after every `on_fit_start` (so after any
`PruningCallback`), using a separate dense copy of the LM loaded with the module's own
`model_name`, `lm_dtype` and cache. The copy is shared by both callbacks, kept out of
checkpoints, and dropped at teardown. A run whose `pruning_info` says "dense" uses its own LM.

When: in `on_validation_end` (stage "validation"; the module's `on_validation_epoch_end`, which
sets `module.last_val`, has run by then; never during the sanity check). The module trains on its
leftover activation buffer in the epoch's last training step, so the end-of-epoch validation sees
the SAE as exported; `at_fit_end` adds a "fit_end" measurement for runs that validate mid-epoch.
Global rank 0 only. Measurements that depend only on the reference SAE and the
frozen LMs are cached and redone only when the LM's weights change (`weights_digest`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

from lit_prune.analysis.results import Condition, read_rows, write_rows
from lit_prune.errors import LitPruneError
from lit_prune.lit.datamodule import datamodule_of
from lit_prune.models.registry import load_model, move_outside_inference
from lit_prune.sae.io import check_compatible, hook_name, load_sae

if TYPE_CHECKING:  # annotations only (sae_module imports these callbacks' modules)
    from sae_lens.saes.sae import SAE
    from transformers import PreTrainedModel

    from lit_prune.lit.sae_module import SAEModule

_DENSE_ATTR = "_analysis_dense_lm"  # on the module, via object.__setattr__: not a submodule
_ROW_KEY = ("model", "hook", "method", "sparsity", "seed_a", "seed_b", "epoch", "stage")


def dense_lm(module: SAEModule) -> PreTrainedModel:
    """The dense LM on the module's device: the module's own if it was not pruned, else a shared copy."""
    if module.pruning_info.get("method", "dense") == "dense":
        return module.lm_on_device()
    lm = module.__dict__.get(_DENSE_ATTR)
    if lm is None:
        hp = module.hparams
        lm = load_model(hp.model_name, dtype=hp.get("lm_dtype", "float32"), cache_dir=hp.model_cache_dir)
        object.__setattr__(module, _DENSE_ATTR, lm)
    return move_outside_inference(lm, module.device)


def release_dense_lm(module: SAEModule) -> None:
    module.__dict__.pop(_DENSE_ATTR, None)


def condition_method(info: dict[str, Any]) -> str:
    """Pruning method as a row label: "dense", "magnitude", "wanda", or e.g. "wanda-2:4" for N:M; with
    "-recovered" appended for a recovered model (RQ6)."""
    method = str(info.get("method", "dense"))
    nm = info.get("nm")
    label = f"{method}-{nm[0]}:{nm[1]}" if nm else method
    return f"{label}-recovered" if info.get("recovered") else label


class ReferenceSAECallback(L.Callback):
    """Base: a reference SAE (our export or a foreign sae-lens directory) measured every validation.

    Args:
        reference_sae: directory of the reference SAE (sae-lens cfg.json + weights; lit_prune.json
            when exported by this project), or sae-lens:<release>:<sae_id> for a pretrained one.
            It must read the module's hook and d_model.
        output_dir: where `results/` is written; null: the trainer's log dir.
        batch_size: eval sequences per LM forward; null: the datamodule's batch size.
        at_fit_end: measure once more at the end of fit (validation already sees the final SAE;
            useful when validation runs mid-epoch).
    """

    results_name = "results.json"

    def __init__(
        self,
        reference_sae: str,
        output_dir: str | None = None,
        batch_size: int | None = None,
        at_fit_end: bool = False,
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise LitPruneError(f"batch_size={batch_size!r} is invalid: expected a positive integer or null")
        self.reference_path = str(reference_sae)
        self.output_dir = output_dir
        self.batch_size = batch_size
        self.at_fit_end = at_fit_end
        self.reference: SAE[Any] | None = None
        self.reference_meta: dict[str, Any] = {}

    # --- set-up ------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: SAEModule, stage: str) -> None:
        if self.reference is None:
            self.reference, self.reference_meta = load_reference(
                self.reference_path, pl_module.lm.config.hidden_size, pl_module.hparams.hook_layer
            )
            recorded = self.reference_meta.get("model")
            if recorded is not None and recorded != pl_module.hparams.model_name:
                rank_zero_warn(
                    f"reference_sae was trained on model {recorded!r}, this run uses "
                    f"{pl_module.hparams.model_name!r}"
                )

    def teardown(self, trainer: L.Trainer, pl_module: SAEModule, stage: str) -> None:
        release_dense_lm(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: SAEModule) -> None:
        if not trainer.sanity_checking and trainer.is_global_zero:
            assert self.reference is not None  # loaded in setup
            move_outside_inference(self.reference, pl_module.device)
            self.measure(trainer, pl_module, "validation")

    def on_fit_end(self, trainer: L.Trainer, pl_module: SAEModule) -> None:
        if self.at_fit_end and trainer.is_global_zero:
            # Lightning has moved the module back to the CPU by now: measure on the accelerator
            device = trainer.strategy.root_device
            pl_module.to(device)
            try:
                assert self.reference is not None  # loaded in setup
                move_outside_inference(self.reference, device)
                self.measure(trainer, pl_module, "fit_end")
            finally:
                pl_module.cpu()

    def measure(self, trainer: L.Trainer, pl_module: SAEModule, stage: str) -> None:
        """One measurement; stage is "validation" or "fit_end" (rows: epoch None at fit_end)."""
        raise NotImplementedError

    # --- shared helpers ------------------------------------------------------------------------
    @property
    def reference_seed(self) -> int | None:
        seed = self.reference_meta.get("seed")
        return None if seed is None else int(seed)

    def condition(self, module: SAEModule, dense: bool = False) -> Condition:
        """Row condition: the run's pruning (or M(0) when `dense`), seed_a = reference, seed_b = module."""
        info = {"method": "dense", "sparsity": 0.0} if dense else module.pruning_info
        return Condition(
            model=str(module.hparams.model_name),
            hook=hook_name(module.hparams.hook_layer),
            method=condition_method(info),
            sparsity=float(info.get("sparsity", 0.0)),
            seed_a=self.reference_seed,
            seed_b=None if dense else int(module.hparams.seed),
        )

    def eval_batch_size(self, trainer: L.Trainer) -> int:
        return self.batch_size or int(datamodule_of(trainer).hparams.batch_size)

    def results_dir(self, trainer: L.Trainer) -> Path:
        base = self.output_dir or trainer.log_dir or trainer.default_root_dir
        return Path(base) / "results"

    def write(self, trainer: L.Trainer, rows: list[dict[str, Any]]) -> Path:
        """Merge rows into results/<results_name>: rows of the same condition, epoch and stage are replaced
        (a rerun or a resumed run never duplicates), everything else is kept."""
        path = self.results_dir(trainer) / self.results_name
        new_keys = {_key(r) for r in rows}
        old = [r for r in read_rows(path) if _key(r) not in new_keys] if path.is_file() else []
        return write_rows(path, [*old, *rows])

    @staticmethod
    def log_scalars(trainer: L.Trainer, scalars: dict[str, float]) -> None:
        if trainer.logger is not None:
            finite = {k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(float(v))}
            trainer.logger.log_metrics(finite, step=trainer.global_step)


def _key(row: dict[str, Any]) -> tuple:
    return tuple(row.get(k) for k in _ROW_KEY)


def load_reference(path: str, d_model: int, layer: int) -> tuple[SAE[Any], dict[str, Any]]:
    """Load and check a reference SAE; every failure is one line naming `reference_sae`."""
    try:
        sae, meta = load_sae(path)
    except LitPruneError as err:
        raise LitPruneError(f"reference_sae: {err}") from err
    check_compatible(sae, meta, d_model, layer, field="reference_sae")
    return sae.eval().requires_grad_(False), meta

"""PrunedLMModule: a pruned Hugging Face causal LM and its masks as a LightningModule (docs/methods.md §4).

- validate: perplexity and mean next-token loss on the eval split (every next-token prediction, fp32).
- fit: masked recovery fine-tuning of the decoder blocks' Linears on the train split; embeddings,
  norms and lm_head stay frozen. mode "full" (the default) trains those weights: the gradients of
  pruned weights are zeroed before every optimizer step (so AdamW's moments of pruned weights stay 0)
  and the masks are re-applied after it. mode "lora" trains only rank-r adapters on the same Linears
  (`lit_prune.pruning.lora`), whose update is masked in the forward pass and merged into the weights
  and re-masked, W <- (W + scale B A) * M, at export and in every checkpoint (the live adapters keep
  training; a checkpoint holds the merged weights with B = 0). Either way the realised sparsity is
  asserted at the start and end of fit and before export, and the masks travel in every checkpoint.
- export (end of fit): a Hugging Face model directory + tokenizer + masks.safetensors, the layout of
  `prune`'s output, so `prune`, `fit` (model_name) and `study` take it as a model, and
  PruningCallback(masks_path=...) takes its masks.

The model is a pruned model directory (prune's output or an earlier export) whose masks.safetensors
is used unless masks_path names another file; a dense model is refused: there is nothing to recover.
With apply_masks a dense model and its masks (a study's <condition>/prune/masks.safetensors) are taken
instead: the masks are applied when it loads (the study's RQ6 recovery, `lit_prune.study.steps`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch

from lit_prune.analysis.metrics import next_token_ce
from lit_prune.commands.prune import MASKS_FILE, _publish
from lit_prune.errors import LitPruneError, described, invalid
from lit_prune.files import check_writable, staging_dir, umask_modes
from lit_prune.models.registry import load_model, load_tokenizer, model_dir
from lit_prune.pruning import (
    Masks,
    SparsityMismatch,
    apply_masks,
    load_masks,
    lora,
    prunable_linears,
    save_masks,
    sparsity_report,
)

RECOVERY_FILE = "recovery.json"
MODES = ("full", "lora")


class PrunedLMModule(L.LightningModule):
    """Validates a pruned causal LM (perplexity, next-token loss) and recovers it by masked fine-tuning.

    Args:
        model_name: the pruned model: a directory written by `prune` (or by an earlier recovery's
            export) holding masks.safetensors, or any model name with masks_path.
        masks_path: keep-masks (save_masks format) of the model; null: <model directory>/masks.safetensors.
        lr: peak AdamW learning rate of the decoder blocks' Linear weights.
        weight_decay: AdamW weight decay (pruned weights stay exactly 0 either way).
        warmup_steps: linear learning-rate warm-up, in optimizer steps; constant afterwards.
        model_cache_dir: where converted / built models are cached.
        export_dir: where the recovered model is written at the end of fit (HF model directory +
            masks.safetensors + recovery.json, replaced as a whole); null: <log dir>/recovered.
        mode: full (fine-tune the Linears' weights) or lora (train rank-lora_rank adapters on them,
            merged and re-masked at export and in checkpoints).
        lora_rank: rank r of each LoRA adapter (mode lora).
        lora_alpha: LoRA scale numerator: the update is (lora_alpha / lora_rank) B A (mode lora).
        apply_masks: apply masks_path's masks to the model as it loads (a dense model + a study's
            masks); false: the model must already be pruned by them.
    """

    if TYPE_CHECKING:  # save_hyperparameters() fills it; Lightning types it as a MutableMapping
        hparams: Any

    def __init__(
        self,
        model_name: str = "smollm2-135m",
        masks_path: str | None = None,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 10,
        model_cache_dir: str = "checkpoints/models",
        export_dir: str | None = None,
        mode: str = "full",
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        apply_masks: bool = False,
    ) -> None:
        super().__init__()
        for name, value, ok, allowed in (
            ("lr", lr, isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0, "a finite number > 0"),
            (
                "weight_decay",
                weight_decay,
                isinstance(weight_decay, (int, float)) and weight_decay >= 0,
                ">= 0",
            ),
            (
                "warmup_steps",
                warmup_steps,
                isinstance(warmup_steps, int) and warmup_steps >= 0,
                "an integer >= 0",
            ),
            ("mode", mode, mode in MODES, " or ".join(MODES)),
            ("lora_rank", lora_rank, isinstance(lora_rank, int) and lora_rank >= 1, "an integer >= 1"),
            (
                "lora_alpha",
                lora_alpha,
                isinstance(lora_alpha, (int, float)) and math.isfinite(lora_alpha) and lora_alpha > 0,
                "a finite number > 0",
            ),
        ):
            if isinstance(value, bool) or not ok:
                raise invalid(f"model.{name}", value, allowed)
        if export_dir is not None:
            check_writable("model.export_dir", export_dir)  # before training, not after it
            if Path(export_dir).exists() or Path(export_dir).is_symlink():
                _check_earlier_export(Path(export_dir))
        # where to cache and export is this run's choice: kept out of the checkpoint's hyperparameters,
        # which LightningCLI puts in place of the config's on a --ckpt_path resume
        self.save_hyperparameters(ignore=["model_cache_dir", "export_dir"])
        self.model_cache_dir, self.export_dir = model_cache_dir, export_dir
        if apply_masks and masks_path is None:
            raise invalid("model.masks_path", None, "a masks file when model.apply_masks is true")
        field, path = _masks_file(model_name, model_cache_dir, masks_path)  # before the model loads
        self.lm = load_model(model_name, cache_dir=model_cache_dir)
        self.masks = _load_checked_masks(self.lm, field, path, apply=apply_masks)
        self.lm.train().requires_grad_(False)  # train mode: Lightning switches it for validation
        self.adapters: torch.nn.ModuleDict | None = None
        if mode == "lora":
            self.adapters = lora.make_adapters(self.lm, self.masks, lora_rank, float(lora_alpha))
            self._hooks = lora.attach(self.lm, self.adapters, self.masks, self._masks_on_device)
        else:
            for linear in prunable_linears(self.lm).values():
                linear.weight.requires_grad_(True)
        self._val_sums: list[torch.Tensor] = []
        self.last_val: dict[str, float] = {}

    # --- masks ----------------------------------------------------------------------------
    def _linears(self) -> dict[str, torch.nn.Linear]:
        return prunable_linears(self.lm)

    def _masks_on_device(self) -> Masks:
        if any(m.device != self.device for m in self.masks.values()):
            self.masks = {n: m.to(self.device) for n, m in self.masks.items()}
        return self.masks

    def check_masks(self) -> list[dict]:
        """The per-matrix sparsity report; SparsityMismatch if a pruned weight is not exactly 0 (with
        LoRA: in the weights and in the weights merged with the adapters)."""
        masks = self._masks_on_device()
        report = sparsity_report(self.lm, masks)
        leaked = [row for row in report if row["leaked"]]
        if leaked:
            row = leaked[0]
            raise SparsityMismatch(f"{row['name']}: {row['leaked']} pruned weights are not zero")
        if self.adapters is not None:
            for name, w in lora.merged_weights(self.lm, self.adapters, masks).items():
                if bool(w[~masks[name]].any()):
                    raise SparsityMismatch(f"{name}: pruned weights are not zero after the LoRA merge")
        return report

    def merge_adapters(self) -> None:
        """mode lora: W <- (W + scale B A) * M, B <- 0 (the same function; a no-op in mode full)."""
        if self.adapters is not None:
            lora.merge(self.lm, self.adapters, self._masks_on_device())

    def realised_sparsity(self) -> float:
        report = self.check_masks()
        return sum(r["pruned"] for r in report) / sum(r["numel"] for r in report)

    # --- fit ------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        if self.adapters is not None:
            params = list(self.adapters.parameters())
        else:
            params = [lin.weight for lin in self._linears().values()]
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        warmup = self.hparams.warmup_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_fit_start(self) -> None:
        sparsity = self.realised_sparsity()  # asserts the masks before any step
        if self.logger is not None:
            self.logger.log_metrics({"recovery/realised_sparsity": sparsity}, step=self.global_step)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]
        loss = next_token_ce(self.lm(input_ids=ids, use_cache=False).logits, ids).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_after_backward(self) -> None:
        masks = self._masks_on_device()
        for name, linear in self._linears().items():
            if linear.weight.grad is not None:
                linear.weight.grad.mul_(masks[name])  # pruned weights get no update, Adam moments stay 0

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        apply_masks(self.lm, self._masks_on_device())  # exact zeros whatever the optimizer did

    def on_fit_end(self) -> None:
        self.merge_adapters()  # every rank: the module's weights are the recovered model's from here on
        if self.trainer.is_global_zero:
            self.export(Path(self.export_dir or _default_export_dir(self.trainer)))

    # --- validate -------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_sums = []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ids = batch["input_ids"]
        ce = next_token_ce(self.lm(input_ids=ids, use_cache=False).logits, ids).double()
        self._val_sums.append(
            torch.stack([ce.sum(), torch.tensor(ce.numel(), device=ce.device, dtype=ce.dtype)])
        )

    def on_validation_epoch_end(self) -> None:
        total = torch.stack(self._val_sums).sum(0) if self._val_sums else torch.zeros(2, dtype=torch.float64)
        total = self.trainer.strategy.reduce(total.to(self.device), reduce_op="sum")  # all ranks' tokens
        loss = float(total[0] / total[1])
        self.last_val = {"loss": loss, "perplexity": math.exp(loss), "predictions": int(total[1])}
        self.log_dict(
            {
                "val/loss": loss,
                "val/perplexity": math.exp(loss),
                "val/realised_sparsity": self.realised_sparsity(),
                "hp_metric": math.exp(loss),  # the hparams tab's metric (Lightning logged it as -1)
            },
            rank_zero_only=True,
        )

    # --- checkpoint and export ------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_masks()
        checkpoint["masks"] = {n: m.cpu() for n, m in self.masks.items()}
        if self.adapters is not None:  # the merged, re-masked weights, the live module untouched
            state = checkpoint["state_dict"]
            for name, w in lora.merged_weights(self.lm, self.adapters, self._masks_on_device()).items():
                state[f"lm.{name}.weight"] = w.detach().cpu()
                state[f"adapters.{lora.adapter_key(name)}.B"] = torch.zeros_like(
                    state[f"adapters.{lora.adapter_key(name)}.B"]
                )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "masks" not in checkpoint:
            raise invalid(
                "ckpt_path", "a checkpoint without masks", "a checkpoint written by a PrunedLMModule fit"
            )
        saved = {n: m.bool() for n, m in checkpoint["masks"].items()}
        mine = {n: m.cpu() for n, m in self.masks.items()}
        differ = sum(int((saved[n] != mine[n]).sum()) for n in saved.keys() & mine.keys())
        if saved.keys() != mine.keys() or differ:
            raise LitPruneError(
                f"--ckpt_path: the checkpoint was trained with other masks than this run's model.model_name"
                f" / model.masks_path ({differ or 'other'} weights differ); resume with the masks it was "
                "trained with, or leave out --ckpt_path to start a new run"
            )
        self.masks = saved

    def export(self, target: Path) -> None:
        """HF model directory + tokenizer + masks.safetensors + recovery.json, written beside `target`
        and renamed into place (an existing target is replaced only once the new one is complete).
        With LoRA the adapters are merged (and the weights re-masked) first."""
        self.merge_adapters()
        report = self.check_masks()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging_dir(target.parent, f".{target.name}-new-")
        try:
            self.lm.save_pretrained(tmp)
            load_tokenizer(self.hparams.model_name, self.model_cache_dir).save_pretrained(tmp)
            save_masks(
                self.masks, tmp / MASKS_FILE, metadata={"recovered_from": json.dumps(self.hparams.model_name)}
            )
            record = {
                "recovered_from": self.hparams.model_name,
                "hparams": dict(self.hparams),
                "global_step": int(self.trainer.global_step) if self._trainer is not None else 0,
                "realised_sparsity": sum(r["pruned"] for r in report) / sum(r["numel"] for r in report),
                "metrics": self.last_val,
            }
            (tmp / RECOVERY_FILE).write_text(json.dumps(record, indent=2, default=str))
            umask_modes(tmp)  # save_pretrained and save_masks write 0600
            earlier = target.exists() or target.is_symlink()
            if earlier:
                _check_earlier_export(target)
            aside = staging_dir(target.parent, f".{target.name}-old-") / "old"
            if earlier:  # moved aside until the new one is in place
                os.rename(target, aside)
            try:
                _publish(tmp, target, overwrite=False)
            except BaseException:
                if aside.exists():
                    os.rename(aside, target)
                raise
            finally:
                shutil.rmtree(aside.parent, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.print(f"recovered model exported to {target}")


def _masks_file(model_name: str, cache_dir: str, masks_path: str | None) -> tuple[str, str]:
    """(the option that names it, path) of the masks file; a model without one is dense: refused."""
    if masks_path is not None:
        if not Path(masks_path).is_file():
            raise invalid("model.masks_path", masks_path, "an existing masks.safetensors file")
        return "model.masks_path", masks_path
    path = Path(model_dir(model_name, cache_dir)) / MASKS_FILE
    if not path.is_file():
        raise invalid(
            "model.model_name",
            model_name,
            f"a pruned model (a directory with {MASKS_FILE}, as prune writes; or set model.masks_path): "
            "a dense model has nothing to recover",
        )
    return "model.model_name", str(path)


def _load_checked_masks(lm: torch.nn.Module, field: str, masks_path: str, apply: bool = False) -> Masks:
    """The model's keep-masks, refused unless they fit it: names and shapes, every pruned weight 0
    (after applying them when `apply`), and at least one pruned weight (a dense model has nothing to
    recover)."""
    try:
        masks = load_masks(masks_path)
    except LitPruneError:
        raise
    except Exception as err:  # safetensors raises several types for a file that is not one
        raise invalid(field, masks_path, f"a masks file written by save_masks ({described(err)})") from None
    try:
        report = sparsity_report(lm, masks)
    except LitPruneError as err:
        raise invalid(field, masks_path, f"masks of this model's decoder Linears ({err})") from None
    if apply:
        apply_masks(lm, masks)
        report = sparsity_report(lm, masks)
    leaked = sum(row["leaked"] for row in report)
    if leaked:
        raise invalid(
            field, masks_path, f"masks of this model ({leaked} weights it prunes are not 0 in the model)"
        )
    if not report or not any(row["pruned"] for row in report):
        raise invalid(field, masks_path, "masks that prune something: a dense model has nothing to recover")
    return masks


def _check_earlier_export(target: Path) -> None:
    """An existing export_dir is replaced only if it is an earlier export (recovery.json and masks)."""
    if target.is_symlink() or not ((target / RECOVERY_FILE).is_file() and (target / MASKS_FILE).is_file()):
        raise invalid(
            "model.export_dir", str(target), f"a new path or an earlier export (with {RECOVERY_FILE})"
        )


def _default_export_dir(trainer: L.Trainer) -> Path:
    """checkpoints/<logger name>/version_<n>/recovered, mirroring the TensorBoard run."""
    logger = trainer.logger
    if logger is None or logger.version in (None, ""):
        return Path(trainer.default_root_dir) / "recovered"
    return Path("checkpoints") / str(logger.name) / f"version_{logger.version}" / "recovered"

"""LightningModule: a frozen (possibly pruned) LM feeding an sae-lens SAE trained on its activations."""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from sae_lens.saes.sae import TrainStepInput

from lit_prune.analysis.evaluate import SAEEvaluator, harvest, sae_codec
from lit_prune.analysis.saebench import saebench_metrics
from lit_prune.errors import LitPruneError, invalid
from lit_prune.files import check_writable
from lit_prune.lit.datamodule import datamodule_of
from lit_prune.models.hooks import check_layer
from lit_prune.models.registry import load_model, move_outside_inference, resolve_lm_dtype
from lit_prune.sae.buffer import ActivationBuffer, fit_norm_scale
from lit_prune.sae.build import SAESettings, build_training_sae
from lit_prune.sae.fast import StepOutput, fast_topk_training_forward
from lit_prune.sae.init_from import init_from_export
from lit_prune.sae.io import LensMetadata, check_export_target, export_sae, lens_metadata
from lit_prune.sae.schedule import sae_steps, warmup_decay

if TYPE_CHECKING:  # annotations only
    from sae_lens.saes.topk_sae import TopKTrainingSAE
    from transformers import PreTrainedModel

# the val/ metrics are reduced over the DDP ranks by torchmetrics before they are logged
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/.*sync_dist=True")
# noise on every fit: Lightning's own use of a torch API torch 2.13 deprecates, and its tips to install
# its cloud services' packages
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡")
)


PRECISIONS = ("32-true", "bf16-mixed")
"""Trainer precisions a fit takes. bf16-mixed runs the LM forwards of the training and validation steps
under autocast; the SAE, its optimizer state, its input scale and the metrics stay fp32 either way."""


class SAEModule(L.LightningModule):
    """Trains one SAE on resid_post of block `hook_layer` of a frozen causal LM.

    Args:
        model_name: smollm2-135m (embedded), tiny-llama / tiny-gemma2 / tiny-gemma3, a local model
            directory, or a hub id such as meta-llama/Llama-3.2-1B.
        hook_layer: 0-indexed decoder block whose output (resid_post) the SAE reads.
        sae: architecture and size of the SAE.
        seed: fixes the SAE initialisation and the activation-buffer shuffling.
        lr: peak Adam learning rate.
        warmup_steps: linear learning-rate warm-up, in SAE steps.
        decay_fraction: the learning rate decays linearly to zero over this last fraction of steps.
        sae_batch_tokens: activations per SAE optimizer step.
        buffer_batches: the shuffling buffer holds this many SAE batches before training starts.
        dead_window_tokens: a latent that has not fired for this many training tokens counts as dead
            (it then gets the TopK auxiliary loss).
        norm_scale: input scale c with E||c x||^2 = d_model; null fits it on the dense model at the
            start of fit. Pass the dense model's value when training on a pruned model.
        norm_sequences: train sequences used to fit norm_scale.
        lm_dtype: dtype of the LM forward: float32, bfloat16, float16, or auto (bfloat16 where the
            GPU, or else the CPU, computes bf16 natively, else float32); SAE and metrics stay float32.
        ce_eval_sequences: eval sequences (from the start of the eval split) also used for spliced
            CE / KL; the reconstruction metrics use the whole eval split.
        model_cache_dir: where converted / built models are cached.
        export_dir: where the trained SAE is written in sae-lens format; null: <log dir>/sae.
        init_from: an exported SAE directory to continue training from (RQ2c's warm start): its
            weights and b_dec (no b_dec re-initialisation) and its input scale c; the optimizer starts
            fresh and the lr schedule applies. Its d_in, width and architecture must be this run's.
        max_sae_steps: stop after this many SAE optimizer steps (the lr schedule spans them); null:
            every harvested token once per epoch.
    """

    if TYPE_CHECKING:  # set in __init__ where nn.Module's and Lightning's typing cannot see them
        hparams: Any  # save_hyperparameters()
        lm: PreTrainedModel  # a plain attribute, not a submodule
        norm_scale: torch.Tensor  # buffers
        tokens_trained: torch.Tensor
        tokens_since_fired: torch.Tensor

    def __init__(
        self,
        model_name: str = "smollm2-135m",
        hook_layer: int = 6,
        sae: SAESettings = SAESettings(),  # noqa: B008 (never mutated; gives --model.sae.* flags)
        seed: int = 0,
        lr: float = 3e-3,
        warmup_steps: int = 10,
        decay_fraction: float = 0.2,
        sae_batch_tokens: int = 4096,
        buffer_batches: int = 8,
        dead_window_tokens: int = 100_000,
        norm_scale: float | None = None,
        norm_sequences: int = 64,
        lm_dtype: str = "float32",
        ce_eval_sequences: int = 64,
        model_cache_dir: str = "checkpoints/models",
        export_dir: str | None = None,
        init_from: str | None = None,
        max_sae_steps: int | None = None,
    ) -> None:
        super().__init__()
        _validate(
            seed=seed,
            lr=lr,
            decay_fraction=decay_fraction,
            sae_batch_tokens=sae_batch_tokens,
            buffer_batches=buffer_batches,
            norm_scale=norm_scale,
            ce_eval_sequences=ce_eval_sequences,
            warmup_steps=warmup_steps,
            dead_window_tokens=dead_window_tokens,
            norm_sequences=norm_sequences,
            max_sae_steps=max_sae_steps,
        )
        if export_dir is not None:
            check_export_target(export_dir, "model.export_dir")
            check_writable("model.export_dir", export_dir)  # before training, not after it
        self.save_hyperparameters()
        # "auto" is recorded as what it chose here, so the callbacks' copy and a resume use the same
        self.hparams["lm_dtype"] = lm_dtype = resolve_lm_dtype(lm_dtype)
        self.settings = sae
        self.automatic_optimization = False
        lm = load_model(model_name, dtype=lm_dtype, cache_dir=model_cache_dir)
        check_layer(lm, hook_layer)
        object.__setattr__(self, "lm", lm)  # not a submodule: kept out of checkpoints and DDP
        d_model = lm.config.hidden_size
        self.sae = build_training_sae(self.settings, d_model, seed)
        if init_from is not None:  # a warm start: the source's weights and its (the dense fit's) c
            norm_scale = init_from_export(self.sae, init_from, norm_scale)
        self.register_buffer("norm_scale", torch.tensor(norm_scale or 0.0, dtype=torch.float64))
        self.register_buffer("tokens_since_fired", torch.zeros(self.sae.cfg.d_sae))
        self.register_buffer("tokens_trained", torch.zeros((), dtype=torch.long))
        self.buffer = ActivationBuffer(sae_batch_tokens * buffer_batches, seed)
        self.evaluator = SAEEvaluator(d_model, self.sae.cfg.d_sae)
        self.pruning_info: dict[str, Any] = {"method": "dense", "sparsity": 0.0}
        # Host-side state, so that an SAE step on a GPU need not wait for it: a copy of tokens_trained
        # (read once per fit) and the training scalars not yet written to the logger.
        self._tokens_trained_host: int | None = None
        self.resumed_pruning: dict[str, Any] | None = None  # what the checkpoint's run was trained on
        self._pending_logs: list[tuple[int, dict[str, float], list[str], torch.Tensor]] = []
        self._step_losses: list[torch.Tensor] = []  # this LM batch's SAE losses, checked once per batch

    # --- set-up ---------------------------------------------------------------------------
    def lm_on_device(self) -> PreTrainedModel:
        if next(self.lm.parameters()).device != self.device:
            move_outside_inference(self.lm, self.device)
        return self.lm

    def ensure_norm_scale(self) -> float:
        """Fit c on the current (dense) LM if not given; callbacks that prune call this first."""
        if self.norm_scale.item() == 0.0:
            ids = datamodule_of(self.trainer).train_ids[: self.hparams.norm_sequences]
            acts = self.harvest(ids.to(self.device))
            self.norm_scale.fill_(fit_norm_scale(acts))
        return self.norm_scale.item()

    def setup(self, stage: str) -> None:
        check_precision(self.trainer.precision)
        dm = getattr(self.trainer, "datamodule", None)
        context = getattr(self.lm.config, "max_position_embeddings", None)
        for name in ("seq_len", "calibration_seq_len"):
            value = getattr(getattr(dm, "hparams", None), name, None)
            if context and value and value > context:
                raise invalid(f"data.{name}", value, f"at most the model's context of {context} tokens")
        if stage == "fit" and dm is not None:
            harvested = (dm.hparams.train_tokens // dm.hparams.seq_len) * (dm.hparams.seq_len - 1)
            if self.hparams.sae_batch_tokens > 2 * harvested:  # the last batch trains on >= half a step
                raise invalid(
                    "model.sae_batch_tokens",
                    self.hparams.sae_batch_tokens,
                    f"at most twice the {harvested:,} tokens data.train_tokens yields, or no SAE step is taken",
                )

    def on_fit_start(self) -> None:
        self._tokens_trained_host = None  # tokens_trained may have been loaded since the last fit
        self.ensure_norm_scale()
        if self.resumed_pruning is not None:  # runs after the callbacks' on_fit_start: pruning_info is final
            check_same_pruning(self.resumed_pruning, self.pruning_info)

    def configure_optimizers(self) -> Any:
        params = list(self.sae.parameters())
        # fused: one kernel per parameter instead of ~10 elementwise passes (the same update up to
        # rounding); Adam was 15% of a CPU SAE step at 2,304 latents
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        opt = torch.optim.Adam(params, lr=self.hparams.lr, fused=fused)
        # The schedule counts SAE steps, not LM batches: one batch of batch_size x (seq_len - 1)
        # harvested tokens feeds that many / sae_batch_tokens steps.
        dm = getattr(self.trainer, "datamodule", None)
        per_batch = (
            dm.hparams.batch_size * (dm.hparams.seq_len - 1)
            if dm is not None
            else self.hparams.sae_batch_tokens
        )
        total = sae_steps(
            int(self.trainer.estimated_stepping_batches), per_batch, self.hparams.sae_batch_tokens
        )
        if self.hparams.max_sae_steps is not None:
            total = min(total, self.hparams.max_sae_steps)
        sched = warmup_decay(opt, total, self.hparams.warmup_steps, self.hparams.decay_fraction)
        return [opt], [{"scheduler": sched, "interval": "step"}]

    # --- training -------------------------------------------------------------------------
    def harvest(self, ids: torch.Tensor) -> torch.Tensor:
        """Unscaled fp32 resid_post at positions >= 1: [n, d_model]; blocks after the hook never run."""
        return harvest(self.lm_on_device(), ids, self.hparams.hook_layer)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        last = batch_idx + 1 >= self.trainer.num_training_batches
        if self._steps_done():  # max_sae_steps reached: the rest of the fit harvests nothing
            self.buffer.clear()
            return
        self.buffer.add(self.harvest(batch["input_ids"]) * self.norm_scale.float())
        # The last batch also trains on what is left in the buffer, so every harvested token is
        # used once and validation (which runs before on_train_epoch_end) sees the final SAE.
        while not self._steps_done() and (
            self.buffer.full() or (last and len(self.buffer) >= self.hparams.sae_batch_tokens // 2)
        ):
            fvu = self.sae_step(self.buffer.pop(self.hparams.sae_batch_tokens))
            # the progress bar's; TensorBoard has train/fvu
            self.log("fvu", fvu, prog_bar=True, logger=False, on_step=True, on_epoch=False)
        if last:
            self.buffer.clear()
        self._check_finite()

    def _check_finite(self) -> None:
        """A diverged SAE (non-finite loss or weights) stops the fit with one line before any later
        checkpoint or the export can hold it; one device sync per LM batch, not per SAE step."""
        losses, self._step_losses = self._step_losses, []
        checks = [torch.isfinite(torch.stack(losses))] if losses else []
        checks += [torch.isfinite(p.detach()).all().reshape(1) for p in self.sae.parameters()]
        if not checks or bool(torch.cat(checks).all()):
            return
        bad = [i for i, loss in enumerate(losses) if not torch.isfinite(loss)]
        step = self.global_step - len(losses) + 1 + (bad[0] if bad else len(losses) - 1)
        raise LitPruneError(
            f"training diverged: the SAE's {'loss' if bad else 'weights'} became non-finite at SAE step "
            f"{step} (model.lr={self.hparams.lr!r}); nothing is exported, the last checkpoint before it "
            "is kept: try a lower model.lr"
        )

    def _steps_done(self) -> bool:
        return self.hparams.max_sae_steps is not None and self.global_step >= self.hparams.max_sae_steps

    def sae_step(self, x: torch.Tensor) -> torch.Tensor:
        """One optimizer step on scaled activations x: [n, d_model]; returns the batch FVU."""
        with _without_autocast(x):
            return self._sae_step(x)

    def _sae_step(self, x: torch.Tensor) -> torch.Tensor:
        opt: Any = self.optimizers()  # one optimizer and one scheduler (configure_optimizers)
        sched: Any = self.lr_schedulers()
        if self._tokens_trained_host is None:
            self._tokens_trained_host = int(self.tokens_trained.item())
        warm = self.hparams.init_from is not None  # b_dec comes from the source SAE
        if self._tokens_trained_host == 0 and hasattr(self.sae, "b_dec") and not warm:
            mean = x.mean(0)
            if dist.is_available() and dist.is_initialized():  # every replica starts from the same b_dec
                dist.all_reduce(mean)
                mean /= dist.get_world_size()
            with torch.no_grad():
                self.sae.b_dec.copy_(mean)  # b_dec starts at the activation mean (docs/methods.md §2)
        dead = self.tokens_since_fired > self.hparams.dead_window_tokens
        if self.settings.architecture == "topk" and self.settings.fast is not False:  # fast null: on for topk
            out = fast_topk_training_forward(cast("TopKTrainingSAE", self.sae), x, dead)
        else:
            out = StepOutput.from_sae_lens(
                self.sae.training_forward_pass(
                    TrainStepInput(
                        sae_in=x,
                        coefficients=_coefficients(self.sae, self.global_step),
                        dead_neuron_mask=dead,
                        n_training_steps=self.global_step,
                        is_logging_step=False,
                    )
                )
            )
        opt.zero_grad()
        # Several steps may share one training_step, which DDP's reducer does not allow:
        # backward without DDP's hooks, then average the gradients ourselves.
        strategy: Any = self.trainer.strategy  # DDP strategies have block_backward_sync
        with (
            strategy.block_backward_sync()
            if hasattr(strategy, "block_backward_sync")
            else contextlib.nullcontext()
        ):
            self.manual_backward(out.loss)
        if dist.is_available() and dist.is_initialized():
            _all_reduce_grads(self.sae)
        opt.step()
        sched.step()
        return self._after_step(x, out)

    @torch.no_grad()
    def _after_step(self, x: torch.Tensor, out: StepOutput) -> torch.Tensor:
        self.tokens_since_fired += x.shape[0]
        self.tokens_since_fired.masked_fill_(out.fired, 0)  # no boolean indexing: no GPU sync
        self.tokens_trained += x.shape[0]
        assert self._tokens_trained_host is not None  # read by _sae_step before its first step
        self._tokens_trained_host += x.shape[0]
        self._step_losses.append(out.loss.detach().float().reshape(()))
        residual = (x - out.sae_out).pow(2).sum()
        fvu = residual / (x - x.mean(0)).pow(2).sum()
        if self.logger is not None and self.trainer.is_global_zero:
            optimizer: Any = self.optimizers()
            logs = {
                "train/loss": out.loss,
                "train/fvu": fvu,
                # raw activations' scale, like val/mse (x is scaled by norm_scale; the loss stays scaled)
                "train/mse": residual / x.numel() / self.norm_scale.float() ** 2,
                "train/l0": out.l0,
                "train/dead_fraction": (self.tokens_since_fired > self.hparams.dead_window_tokens)
                .float()
                .mean(),
                "train/lr": optimizer.param_groups[0]["lr"],
                "train/tokens": self.tokens_trained,
            }
            logs.update({f"train/{k}": v for k, v in out.losses.items()})
            on_device = {k: v for k, v in logs.items() if isinstance(v, torch.Tensor)}
            on_host = {k: float(v) for k, v in logs.items() if k not in on_device}
            values = torch.stack([v.detach().to(torch.float64).reshape(()) for v in on_device.values()])
            self._pending_logs.append((self.global_step, on_host, list(on_device), values))
            if len(self._pending_logs) >= self.trainer.log_every_n_steps:  # pyright: ignore[reportAttributeAccessIssue]
                self._flush_train_logs()
        return fvu

    def _flush_train_logs(self) -> None:
        """Write the pending training scalars, one point per SAE step, with a single device-to-host copy
        (on a GPU each copy waits for the device; steps are logged directly, since several may share a
        training_step). Up to log_every_n_steps - 1 points are lost if the process dies in between."""
        if not self._pending_logs:
            return
        assert self.logger is not None  # logs are queued only with a logger
        values = torch.cat([v for *_, v in self._pending_logs]).tolist()
        start = 0
        for step, on_host, names, _ in self._pending_logs:
            self.logger.log_metrics(
                {**dict(zip(names, values[start : start + len(names)], strict=False)), **on_host}, step=step
            )
            start += len(names)
        self._pending_logs.clear()

    def on_validation_start(self) -> None:
        self._flush_train_logs()
        if self.trainer.state.fn != "fit" and self.resumed_pruning is not None:
            # runs after the callbacks' hooks: a checkpoint of a pruned run is never measured on the dense LM
            check_same_pruning(self.resumed_pruning, self.pruning_info)

    def on_train_epoch_end(self) -> None:
        self._flush_train_logs()

    def on_train_end(self) -> None:
        self._flush_train_logs()

    # --- validation -----------------------------------------------------------------------
    def encode_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw activations x: [n, d_model] -> (features [n, d_sae], reconstruction [n, d_model])."""
        with _without_autocast(x):
            return sae_codec(self.sae, self.norm_scale.item())(x)

    @torch.no_grad()
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        ids = batch["input_ids"]
        ce_rows = self.hparams.ce_eval_sequences - batch_idx * ids.shape[0]
        self.evaluator.update(self.lm_on_device(), self.hparams.hook_layer, ids, self.encode_decode, ce_rows)

    def on_validation_epoch_end(self) -> None:
        self.last_val = self.evaluator.compute()
        recon = self.evaluator.recon
        # compute() syncs the states across DDP ranks and then restores this rank's own: sync again
        # so the firing rates cover every rank's eval tokens, like the metrics (no-op on one process)
        with recon.sync_context():
            self.last_firing_rates = recon.firing_rates().cpu()
        self.log_dict({f"val/{k}": v for k, v in self.last_val.items()}, sync_dist=False)  # already reduced
        # the same numbers under SAEBench's names (docs/metric_names.md), in a section of their own
        aliases = saebench_metrics(self.last_val)
        self.log_dict({f"saebench/{k}": v for k, v in aliases.items()}, sync_dist=False)
        # the hparams tab's metric: the run's headline number (Lightning logged the hparams with -1)
        self.log("hp_metric", self.last_val["fvu"], sync_dist=False)
        experiment: Any = getattr(self.logger, "experiment", None)
        histograms = hasattr(experiment, "add_histogram") and not self.trainer.sanity_checking
        if self.trainer.is_global_zero and histograms:
            live = self.last_firing_rates[self.last_firing_rates > 0]  # dead ones: val/dead_fraction
            if live.numel():
                experiment.add_histogram("val/firing_rate_log10", live.log10(), global_step=self.global_step)
        self.evaluator.reset()

    # --- export ---------------------------------------------------------------------------
    def on_fit_end(self) -> None:
        try:
            self._export()
        except OSError as err:  # a full disk or a folder made read-only during training: the SAE is
            # in the checkpoint (saved before on_fit_end), so say where instead of a traceback
            saved = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or getattr(
                self.trainer.checkpoint_callback, "best_model_path", ""
            )
            kept = f"; the trained SAE is kept in the checkpoint {saved}" if saved else ""
            raise LitPruneError(
                f"model.export_dir: the SAE could not be exported ({err.filename or 'writing'}: "
                f"{err.strerror or err}){kept}"
            ) from None

    def _export(self) -> None:
        if not self.trainer.is_global_zero:
            return
        target = Path(self.hparams.export_dir or _default_export_dir(self.trainer))
        if (
            int(self.tokens_trained) == 0
        ):  # e.g. max_epochs 0: an untrained SAE must not replace a trained one
            rank_zero_warn(f"no SAE step was taken, so nothing is exported to {target}")
            return
        dm = datamodule_of(self.trainer)
        # not export_dir: the record lies in it, and a study renames it into place afterwards
        hparams = {k: v for k, v in _plain(self.hparams).items() if k != "export_dir"}
        export_sae(
            self.sae,
            target,
            self.norm_scale.item(),
            {
                "model": self.hparams.model_name,
                "hook_layer": self.hparams.hook_layer,
                "seed": self.hparams.seed,
                "tokens_trained": int(self.tokens_trained),
                "pruning": self.pruning_info,
                "corpus": getattr(dm, "provenance", {}),
                "hparams": hparams,
                "metrics": getattr(self, "last_val", {}),
                # the training parametrisation a warm start (init_from) restores: the export folds it
                "decoder_norms": self.sae.W_dec.detach().norm(dim=-1).cpu().tolist(),
                "metrics_saebench": saebench_metrics(getattr(self, "last_val", {})),
            },
            _lens_metadata(self.hparams, dm),
        )
        if self.trainer.progress_bar_callback is not None:  # not a study's fit: its step folder is a
            self.print(f"SAE exported to {target}")  # temporary one, renamed when the step is done

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["activation_buffer"] = self.buffer.state_dict()
        checkpoint["pruning"] = pruning_identity(self.pruning_info)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "activation_buffer" in checkpoint:
            self.buffer.load_state_dict(checkpoint["activation_buffer"])
        self.resumed_pruning = checkpoint.get("pruning")


def _lens_metadata(hparams: Any, dm: Any) -> LensMetadata | None:
    """What sae-lens needs to rebuild the SAE's inputs (None without a TokenDataModule)."""
    data = getattr(dm, "hparams", None)
    if data is None or "corpus" not in data:
        return None
    return lens_metadata(
        hparams.model_name,
        hparams.model_cache_dir,
        data.corpus,
        data.cache_dir,
        data.seq_len,
        data.prepend_bos,
    )


def pruning_identity(info: dict[str, Any]) -> dict[str, Any]:
    """The settings that make an LM pruned the way `info` (a run's pruning_info) says."""
    nm = info.get("nm")
    return {
        "method": info.get("method", "dense"),
        "sparsity": float(info.get("sparsity", 0.0)),
        "nm": list(nm) if nm else None,
        "group": info.get("group"),
        **({"recovered": True} if info.get("recovered") else {}),  # absent otherwise: older checkpoints match
    }


def check_same_pruning(resumed: dict[str, Any], current: dict[str, Any]) -> None:
    """A resumed SAE keeps training on the LM it was trained on: the same pruning (or none)."""
    theirs, mine = pruning_identity(resumed), pruning_identity(current)
    if theirs != mine:

        def show(p):
            return (
                "the dense LM"
                if p["method"] == "dense"
                else ", ".join(  # noqa: E731
                    f"{k}={v}" for k, v in p.items() if v is not None
                )
            )

        raise LitPruneError(
            f"--ckpt_path: its SAE was trained on {show(theirs)}, this run's LM is {show(mine)}; "
            "resume with the pruning callback settings of the run that wrote it"
        )


# what a resumed run may change (dotted keys of the model section): where files go and which of the
# equivalent TopK implementations trains
RESUME_FREE = ("model_cache_dir", "export_dir", "sae.fast")


def check_resumed_settings(given: dict[str, Any], resumed: dict[str, Any], prefix: str = "model.") -> None:
    """`fit --ckpt_path` continues the checkpoint's run with its model settings (Lightning puts them
    in place of the config's): a config that says otherwise is a one-line error, not silently ignored."""

    def flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in settings.items():
            out.update(
                flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
            )
        return out

    mine, theirs = flat(given), flat(resumed)
    if "lm_dtype" in mine:  # the checkpoint holds what "auto" chose when it was written
        mine["lm_dtype"] = resolve_lm_dtype(mine["lm_dtype"])
    conflicts = [key for key in mine if key not in RESUME_FREE and key in theirs and mine[key] != theirs[key]]
    if conflicts:
        raise LitPruneError(
            "--ckpt_path: the checkpoint's run has "
            + ", ".join(f"{k}={theirs[k]!r}" for k in conflicts)
            + ", not "
            + ", ".join(f"{prefix}{k}={mine[k]!r}" for k in conflicts)
            + "; a resumed run "
            "keeps its settings: drop these options, or leave out --ckpt_path to start a new run"
        )


def check_precision(value: object) -> None:
    """A one-line error unless Lightning's trainer.precision (32, "bf16", "bf16-mixed", ...) is in PRECISIONS."""
    if {"32": "32-true", "bf16": "bf16-mixed"}.get(str(value), str(value)) not in PRECISIONS:
        raise invalid(
            "trainer.precision",
            value,
            " or ".join(PRECISIONS) + " (the SAE trains in fp32; "
            "model.lm_dtype: bfloat16 casts the LM alone)",
        )


def _without_autocast(x: torch.Tensor) -> torch.autocast:
    """fp32 SAE work inside a bf16-mixed step, whose autocast is meant for the LM forward."""
    return torch.autocast(x.device.type, enabled=False)


def _default_export_dir(trainer: L.Trainer) -> Path:
    """checkpoints/<logger name>/version_<n>/sae: mirrors the TensorBoard run, never overwrites another."""
    logger = trainer.logger
    if logger is None or logger.version in (None, ""):  # no run directory to mirror: a fresh numbered one
        root = Path(trainer.default_root_dir) / "sae"
        n = 0
        while (root / f"version_{n}").exists():
            n += 1
        return root / f"version_{n}"
    return Path("checkpoints") / str(logger.name) / f"version_{logger.version}" / "sae"


def _coefficients(sae: Any, step: int) -> dict[str, float]:
    """sae-lens coefficients (L1 / L0 weights) with their linear warm-up applied."""
    values = {}
    for name, coeff in sae.get_coefficients().items():
        if isinstance(coeff, (int, float)):
            values[name] = float(coeff)
        else:
            values[name] = (
                coeff.value * min(1.0, (step + 1) / coeff.warm_up_steps)
                if coeff.warm_up_steps
                else coeff.value
            )
    return values


def _all_reduce_grads(module: torch.nn.Module) -> None:
    world = dist.get_world_size()
    for param in module.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= world


def _plain(hparams: Any) -> dict[str, Any]:
    return {
        k: (vars(v) if hasattr(v, "__dataclass_fields__") else v)
        for k, v in dict(hparams).items()
        if not k.startswith("_")
    }


def _validate(**values: Any) -> None:
    rules = {
        "seed": (lambda v: 0 <= v < 2**32, "an integer from 0 to 2**32 - 1"),  # as seed_everything
        "lr": (lambda v: v > 0, "a positive float"),
        "decay_fraction": (lambda v: 0 <= v <= 1, "a fraction in [0, 1]"),
        "sae_batch_tokens": (lambda v: v >= 1, "a positive integer"),
        "buffer_batches": (lambda v: v >= 1, "a positive integer"),
        "norm_scale": (lambda v: v is None or v > 0, "a positive float or null"),
        "ce_eval_sequences": (lambda v: v >= 0, "a non-negative integer"),
        "warmup_steps": (lambda v: v >= 0, "a non-negative integer"),
        "dead_window_tokens": (lambda v: v >= 0, "a non-negative integer"),
        "norm_sequences": (lambda v: v >= 1, "a positive integer"),
        "max_sae_steps": (lambda v: v is None or v >= 1, "a positive integer or null"),
    }
    for name, value in values.items():
        ok, allowed = rules[name]
        if not ok(value):
            raise invalid(f"model.{name}", value, allowed)

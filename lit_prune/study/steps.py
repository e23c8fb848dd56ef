"""The steps of a study and what each writes (all under <checkpoints>/<study>/<condition>/<step>/).

dense/seed<s>      Lightning fit of an SAE on the dense LM       sae/, results/sae_metrics.json, sae_firing_rates
dense/perplexity   dense LM perplexity                           results/perplexity.json
dense/rq5          feature importance of the reference SAE       results/rq5_ablation.{json,safetensors}
dense/rq5_seed<s>  the same for dense/seed<s>'s SAE (study.importance_seeds)
<cond>/prune       masks + pruned perplexity                     masks.safetensors, results/perplexity.json
<cond>/seed<s>     fit on the pruned LM + RQ2/RQ4 (+ RQ3 for the reference seed) callbacks
                                                                 sae/, results/{sae_metrics,rq2_survival,rq3_transfer}
<cond>/rq1         seed stability across the seeds' SAEs        results/rq1_seeds.{json,safetensors}
<cond>/pairs       every (dense seed a, seed b) pair matched     results/rq2_pairs.{json,safetensors}
<cond>/functional  functional survival of every RQ5 SAE          results/functional.safetensors
                   (lit_prune.study.functional; only with several importance seeds)
dense/warm<s>, <cond>/warm<s>  RQ2c: dense/seed<s>'s SAE trained further on the dense (control) / pruned
                   LM (lit_prune.study.warm)                     sae/, results/warm_start.{json,safetensors}
<gallery cond>/gallery  top contexts of surviving / lost features  gallery.json
<cond>-recovered/recover  RQ6 (study.recovery): masked fine-tune of <cond>'s pruned model + its perplexity
                                                                 model/ (HF dir + masks), results/perplexity.json
<cond>-recovered/seed<s>, /rq1, /pairs  as for <cond>, on the recovered model

The fits run in the study's process on one device (the default), or, when the study's trainer
settings ask for several (devices > 1, num_nodes > 1), as an ordinary Lightning DDP run in a child
process (`lit_prune.study.fit_worker`) over all of them.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lit_prune.analysis.ablation import feature_importance, sae_parts
from lit_prune.analysis.ablation_summary import summarise, summary_rows
from lit_prune.analysis.figures import scatter_figure
from lit_prune.analysis.perplexity import perplexity
from lit_prune.analysis.results import Condition, make_rows, read_arrays, write_arrays, write_rows
from lit_prune.analysis.saebench import saebench_metrics
from lit_prune.analysis.survival import seed_stability
from lit_prune.commands.prune import MASKS_FILE
from lit_prune.lit.callbacks import PruningCallback
from lit_prune.lit.datamodule import TokenDataModule
from lit_prune.lit.pruned_lm_module import PrunedLMModule
from lit_prune.lit.sae_module import SAEModule
from lit_prune.lit.survival_callback import FeatureSurvivalCallback
from lit_prune.lit.trainer_settings import checked_trainer
from lit_prune.lit.transfer_callback import TransferabilityCallback
from lit_prune.models.registry import load_model, model_dir
from lit_prune.pruning import SparsityMismatch, apply_masks, load_masks, prune_model, save_masks
from lit_prune.sae.build import SAESettings
from lit_prune.sae.io import hook_name, load_sae
from lit_prune.sae.schedule import sae_steps
from lit_prune.study.config import DENSE, TRAINER_KEYS, PruneCondition, StudySettings, rq5_name
from lit_prune.study.fit_worker import device_ids, fit_in_worker, fit_processes
from lit_prune.study.functional import functional_of
from lit_prune.study.gallery import gallery_condition, gallery_step
from lit_prune.study.pairs import pairs_step
from lit_prune.study.runner import Step
from lit_prune.study.warm import warm_steps


@dataclass
class StudyContext:
    """A parsed study: everything the steps need."""

    name: str
    settings: StudySettings
    model: dict[str, Any]
    """SAEModule arguments (sae as a plain dict), study overrides applied."""
    data: dict[str, Any]
    """TokenDataModule arguments, study overrides applied."""
    trainer: dict[str, Any]
    seed_everything: int

    @property
    def root(self) -> Path:
        return Path(self.settings.checkpoints) / self.name

    @property
    def device(self) -> str:
        """Where the steps outside Lightning run: the first device the trainer names (devices: [2]), cuda
        when the accelerator may be a GPU and one is visible, else the CPU."""
        gpu = self.trainer.get("accelerator", "auto") in ("auto", "gpu", "cuda")
        if not (gpu and torch.cuda.is_available()):
            return "cpu"
        ids = device_ids(self.trainer)
        return f"cuda:{ids[0]}" if ids else "cuda"

    def datamodule(self) -> TokenDataModule:
        dm = TokenDataModule(**self.data)
        dm.prepare_data()
        dm.setup("fit")
        return dm

    def logger(self, step: str, condition: str) -> TensorBoardLogger:
        return TensorBoardLogger(
            Path(self.settings.logs) / self.name / condition, name=step, default_hp_metric=False
        )

    def load_lm(self) -> torch.nn.Module:
        lm = load_model(
            self.model["model_name"],
            dtype=self.model.get("lm_dtype", "float32"),
            cache_dir=self.model.get("model_cache_dir", "checkpoints/models"),
        )
        # transformers' typing of PreTrainedModel.to rejects a torch.device
        return lm.to(self.device)  # pyright: ignore[reportArgumentType]

    def load_pruned_lm(self, cond: PruneCondition) -> torch.nn.Module:
        """The LM with the masks of `cond`'s prune step applied."""
        lm = self.load_lm()
        masks = load_masks(self.root / cond.name / "prune" / "masks.safetensors")
        apply_masks(lm, {k: v.to(self.device) for k, v in masks.items()})
        return lm

    def dense_sae(self, seed: int) -> Path:
        """The SAE folder of the dense fit of `seed` (dense/seed<s>/sae)."""
        return self.root / DENSE / f"seed{seed}" / "sae"

    def reference(self) -> str:
        """The reference SAE for RQ2 / RQ3 / RQ5: the pretrained one if given, else dense/seed<ref>/sae."""
        return self.settings.reference_sae or str(self.dense_sae(self.settings.reference_seed))

    def condition(
        self, method: str = DENSE, sparsity: float = 0.0, seed_a: int | None = None, seed_b: int | None = None
    ) -> Condition:
        return Condition(
            model=str(self.model["model_name"]),
            hook=hook_name(self.model["hook_layer"]),
            method=method,
            sparsity=sparsity,
            seed_a=seed_a,
            seed_b=seed_b,
        )


def model_digest(ctx: StudyContext) -> str:
    """The model's identity for the input hashes: its config and the size and modification time of
    its weight files (a rewritten file is a new model; hashing GBs of weights at every start is not)."""
    path = Path(model_dir(ctx.model["model_name"], ctx.model.get("model_cache_dir", "checkpoints/models")))
    if not path.is_dir():  # a hub id resolved by transformers itself
        return str(ctx.model["model_name"])
    parts = [(path / "config.json").read_text()] + [
        f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(path.glob("*.safetensors"))
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def build_steps(ctx: StudyContext, corpus_fingerprint: str) -> list[Step]:
    """Every step of the study in dependency order."""
    st = ctx.settings
    where = ("cache_dir", "model_cache_dir", "num_workers")  # where things are kept, not what they are
    base = {
        "model": _without(ctx.model, where),
        "data": _without(ctx.data, where),
        "trainer": ctx.trainer,
        "seed_everything": ctx.seed_everything,
        "model_files": model_digest(ctx),
        "corpus": corpus_fingerprint,
    }
    ref_key = f"{DENSE}/seed{st.reference_seed}"
    reference: dict[str, Any] = {"reference_sae": st.reference_sae or ref_key}
    if (
        st.reference_sae and Path(st.reference_sae).is_dir()
    ):  # a pretrained SAE on disk: its files, as the model's
        reference["reference_files"] = [
            [f.name, f.stat().st_size, f.stat().st_mtime_ns]
            for f in sorted(Path(st.reference_sae).iterdir())
            if f.is_file()
        ]
    fit_cost = 10.0
    # In dependency order; for several workers also the steps the rest waits on first (the dense
    # fits, the pruned models) and short ones last, to fill the gaps. A model's fits read the same
    # training activations: `shares` keeps them in one process's cache.
    steps = [
        Step(
            DENSE,
            f"seed{s}",
            {**base, "seed": s, "epochs": st.epochs},
            lambda out, s=s: fit_step(ctx, out, s, None),
            cost=fit_cost,
            shares=DENSE,
        )
        for s in st.seeds
    ]
    for cond in st.conditions():
        prune_inputs = {
            **base,
            "method": cond.method,
            "sparsity": cond.sparsity,
            "nm": cond.nm,
            "n": st.perplexity_sequences,
        }
        group = st.magnitude_group_of(cond)
        if group not in (None, "matrix"):  # only then, so that older studies stay done
            prune_inputs["group"] = group
        steps.append(
            Step(
                cond.name,
                "prune",
                prune_inputs,
                lambda out, c=cond: perplexity_step(ctx, out, c),
                cost=1 if cond.method == "magnitude" else 3,
            )
        )
    for s in st.seeds_of_importance():
        steps.append(
            Step(
                DENSE,
                rq5_name(s, st.reference_seed),
                {**base, **reference, "ablation": st.ablation}
                | ({} if s == st.reference_seed else {"seed": s}),
                lambda out, s=s: rq5_step(ctx, out, s),
                deps=[f"{DENSE}/seed{s}"],
                cost=4,
            )
        )
    gallery = gallery_condition(st)
    pruned_seeds = st.seeds_of_pruned()
    recovered = st.recovered_conditions()
    if st.recovery is not None:  # RQ6: only then, so that the steps of studies without it stay as they were
        fine_tune = st.recovery.fine_tune()
        for cond in recovered:
            steps.append(
                Step(
                    cond.name,
                    "recover",
                    {**base, "recovery": fine_tune, "n": st.perplexity_sequences},
                    lambda out, c=cond: recover_step(ctx, out, c),
                    deps=[f"{cond.source.name}/prune"],
                    cost=10,
                )
            )
    for cond in st.conditions() + recovered:
        made = f"{cond.name}/recover" if cond.recovered else f"{cond.name}/prune"
        for s in pruned_seeds:
            inputs = {
                **base,
                **reference,
                "seed": s,
                "epochs": st.epochs,
                "survival": st.survival,
                "transfer": st.transfer if s == st.reference_seed else None,
            }
            steps.append(
                Step(
                    cond.name,
                    f"seed{s}",
                    inputs,
                    lambda out, s=s, c=cond: fit_step(ctx, out, s, c),
                    deps=[made, ref_key] + ([f"{cond.source.name}/prune"] if cond.recovered else []),
                    cost=fit_cost + 4,
                    shares=cond.name,
                )
            )
        if len(pruned_seeds) > 1:
            steps.append(
                Step(
                    cond.name,
                    "rq1",
                    {"seeds": pruned_seeds, **st.rq1_options()},
                    lambda out, c=cond: rq1_step(ctx, out, c.name),
                    deps=[f"{cond.name}/seed{s}" for s in pruned_seeds],
                    cost=0.5,
                )
            )
        if len(st.seeds) > 1:
            steps.append(pairs_of(ctx, cond.name))
        if len(st.seeds_of_importance()) > 1 and not cond.recovered:
            steps.append(functional_of(ctx, base, cond))
        if cond == gallery and st.gallery_features:
            steps.append(
                Step(
                    cond.name,
                    "gallery",
                    {**base, **reference, "n": st.gallery_features, "sequences": st.gallery_sequences},
                    lambda out, c=cond: gallery_step(ctx, out, c),
                    deps=[f"{cond.name}/prune", f"{cond.name}/seed{st.reference_seed}", ref_key]
                    + ([f"{cond.name}/pairs"] if len(st.seeds) > 1 else []),  # the cross-seed cosine
                    cost=1,
                )
            )
    if len(st.seeds) > 1:
        steps.append(
            Step(
                DENSE,
                "rq1",
                {"seeds": st.seeds, **st.rq1_options()},
                lambda out: rq1_step(ctx, out, DENSE),
                deps=[f"{DENSE}/seed{s}" for s in st.seeds],
                cost=0.5,
            )
        )
        steps.append(pairs_of(ctx, DENSE))
    steps.append(
        Step(
            DENSE,
            "perplexity",
            {**base, "n": st.perplexity_sequences},
            lambda out: perplexity_step(ctx, out, None),
            cost=1,
        )
    )
    steps += warm_steps(ctx, base, lambda out, s, c: warm_fit(ctx, out, s, c))  # RQ2c
    return steps


def pairs_of(ctx: StudyContext, name: str) -> Step:
    """The <name>/pairs step (`lit_prune.study.pairs`): every seed pair against the dense SAEs."""
    seeds, pruned = ctx.settings.seeds, ctx.settings.seeds_of_pruned()
    deps = [f"{DENSE}/seed{s}" for s in seeds] + (
        [] if name == DENSE else [f"{name}/seed{s}" for s in pruned]
    )
    inputs = {"seeds": seeds, **ctx.settings.rq1_options()}
    if name != DENSE and pruned != seeds:  # only then, so that studies of every seed stay done
        inputs["pruned_seeds"] = pruned
    return Step(name, "pairs", inputs, lambda out: pairs_step(ctx, out, name), deps=deps, cost=0.5)


def _without(settings: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in keys}


# --- steps ----------------------------------------------------------------------------------
def fit_step(ctx: StudyContext, out: Path, seed: int, cond: PruneCondition | None) -> dict[str, Any]:
    """An ordinary Lightning fit; on a pruned condition with the RQ2/RQ4 (and, for the reference
    seed, RQ3) callbacks against the dense reference SAE.

    One device: in this process. Several (`fit_processes` > 1): a DDP run in a child process
    (`lit_prune.study.fit_worker`) that runs `run_fit` on every rank; same results and summary."""
    if fit_processes(ctx.trainer) > 1:
        return fit_in_worker(ctx, out, seed, cond)
    return run_fit(ctx, out, seed, cond)[1]


def run_fit(
    ctx: StudyContext, out: Path, seed: int, cond: PruneCondition | None, distributed: bool = False
) -> tuple[L.Trainer, dict[str, Any]]:
    """The fit of `fit_step`: (trainer, {"metrics", "tokens_trained"}). Not distributed: devices=1.
    Distributed (every DDP rank calls this): devices / num_nodes / strategy from the study's trainer
    settings; global rank 0 writes the results, every rank returns the summary, whose
    tokens_trained is summed over the ranks (each trains on its own share of the sequences)."""
    st = ctx.settings
    L.seed_everything(ctx.seed_everything + seed, workers=True, verbose=False)
    kwargs = {
        **ctx.model,
        "sae": SAESettings(**ctx.model.get("sae", {})),
        "seed": seed,
        "export_dir": str(out / "sae"),
    }
    callbacks: list[L.Callback] = []
    if cond is not None:
        dense_ref = ctx.dense_sae(st.reference_seed) / "lit_prune.json"
        kwargs["norm_scale"] = json.loads(dense_ref.read_text())[
            "norm_scale"
        ]  # c is fitted on the dense model
        callbacks.append(pruning_callback(ctx, cond))
        callbacks.append(FeatureSurvivalCallback(ctx.reference(), output_dir=str(out), **st.survival))
        if seed == st.reference_seed:
            callbacks.append(TransferabilityCallback(ctx.reference(), output_dir=str(out), **st.transfer))
    module = SAEModule(**kwargs)
    trainer = fit_trainer(
        ctx, distributed, logger=ctx.logger(f"seed{seed}", cond.name if cond else DENSE), callbacks=callbacks
    )
    trainer.fit(module, datamodule=TokenDataModule(**ctx.data))
    tokens = module.tokens_trained
    if distributed:
        tokens = trainer.strategy.reduce(tokens.clone(), reduce_op="sum")
    if trainer.is_global_zero:
        condition = ctx.condition(cond.label if cond else DENSE, cond.sparsity if cond else 0.0, seed_a=seed)
        rows = make_rows(condition, module.last_val, sae="own")
        # the same numbers under SAEBench's names, marked so (docs/metric_names.md)
        rows += make_rows(condition, saebench_metrics(module.last_val), sae="own", names="saebench")
        write_rows(out / "results" / "sae_metrics.json", rows)
        write_arrays(out / "results" / "sae_firing_rates.safetensors", firing_rate=module.last_firing_rates)
    return trainer, {"metrics": module.last_val, "tokens_trained": int(tokens)}


def pruning_callback(ctx: StudyContext, cond: PruneCondition) -> PruningCallback:
    """Prunes a fit's LM with the masks of <cond>/prune; a recovered condition's LM also gets the
    recovered weights of <cond>/recover (the masks of its source's prune step, kept exact)."""
    return PruningCallback(
        cond.method,
        0.0 if cond.nm else cond.sparsity,
        list(cond.nm) if cond.nm else None,
        group=ctx.settings.magnitude_group_of(cond),
        masks_path=str(ctx.root / cond.source.name / "prune" / MASKS_FILE),
        perplexity_sequences=0,
        recovered_model=str(ctx.root / cond.name / "recover" / "model") if cond.recovered else None,
    )


def warm_fit(ctx: StudyContext, out: Path, seed: int, cond: PruneCondition | None) -> dict[str, Any]:
    """RQ2c's fit (`lit_prune.study.warm`): dense/seed<seed>'s SAE trained further on the dense
    (cond None) or pruned LM for study.warm_start.steps steps, on one device, with as many passes over
    the training tokens as those steps need; exports the warm SAE to out/sae."""
    w = ctx.settings.warm_start
    L.seed_everything(ctx.seed_everything + seed, workers=True, verbose=False)
    ids = ctx.datamodule().train_ids
    epochs = -(-w.steps // sae_steps(1, ids.shape[0] * (ids.shape[1] - 1), w.sae_batch_tokens))
    module = SAEModule(
        **{
            **ctx.model,
            "sae": SAESettings(**ctx.model.get("sae", {})),
            "seed": seed,
            "lr": w.lr,
            "sae_batch_tokens": w.sae_batch_tokens,
            "max_sae_steps": w.steps,
            "init_from": str(ctx.dense_sae(seed)),
            "norm_scale": None,  # the source's own c (the dense fit's)
            "export_dir": str(out / "sae"),
        }
    )
    name = cond.name if cond else DENSE
    trainer = fit_trainer(
        ctx,
        False,
        epochs=epochs,
        logger=ctx.logger(f"warm{seed}", name),
        callbacks=[pruning_callback(ctx, cond)] if cond else [],
    )
    trainer.fit(module, datamodule=TokenDataModule(**ctx.data))
    return {
        "metrics": module.last_val,
        "tokens_trained": int(module.tokens_trained),
        "steps": module.global_step,
    }


def fit_trainer(ctx: StudyContext, distributed: bool, epochs: int | None = None, **kwargs: Any) -> L.Trainer:
    """The Trainer of a study fit: the user's trainer settings (TRAINER_KEYS, and DDP_KEYS when
    distributed) with the study's own (`epochs`, default study.epochs, no checkpoints or progress
    bar); Lightning's refusals are one-line errors."""
    if distributed:
        placement = {
            "devices": ctx.trainer.get("devices", 1),
            "num_nodes": ctx.trainer.get("num_nodes", 1),
            "strategy": ctx.trainer.get("strategy") or "ddp",
        }
    else:
        device = torch.device(ctx.device)
        placement = {"devices": [device.index] if device.index is not None else 1}  # the GPU named, if any
    epochs = epochs or ctx.settings.epochs
    return checked_trainer(
        lambda: L.Trainer(
            max_epochs=epochs,
            check_val_every_n_epoch=epochs,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
            **placement,
            **{k: v for k, v in ctx.trainer.items() if k in TRAINER_KEYS},
            **kwargs,
        )
    )


def perplexity_step(ctx: StudyContext, out: Path, cond: PruneCondition | None) -> dict[str, Any]:
    """Perplexity of the dense model, or prune (saving the masks) and measure the pruned one."""
    dm, lm = ctx.datamodule(), ctx.load_lm()
    metrics: dict[str, float] = {}
    if cond is not None:
        started = time.perf_counter()
        masks = prune_model(
            lm,
            cond.method,
            0.0 if cond.nm else cond.sparsity,
            nm=cond.nm,
            group=ctx.settings.magnitude_group_of(cond),
            calibration_ids=dm.calibration_ids,
            max_seq_len=dm.hparams.calibration_seq_len,
            progress=False,
        )
        metrics["prune_seconds"] = time.perf_counter() - started
        save_masks(masks, out / "masks.safetensors", {"method": cond.method, "sparsity": str(cond.sparsity)})
        metrics["realised_sparsity"] = sum(int((~m).sum()) for m in masks.values()) / sum(
            m.numel() for m in masks.values()
        )
    metrics["perplexity"] = perplexity(lm, dm.eval_ids[: ctx.settings.perplexity_sequences].to(ctx.device))
    metrics["perplexity_tokens"] = float(dm.eval_ids[: ctx.settings.perplexity_sequences, 1:].numel())
    condition = ctx.condition(cond.label, cond.sparsity) if cond else ctx.condition()
    write_rows(out / "results" / "perplexity.json", make_rows(condition, metrics))
    logger = ctx.logger("prune" if cond else "perplexity", cond.name if cond else DENSE)
    logger.log_metrics({f"pruning/{k}": v for k, v in metrics.items()}, step=0)
    logger.finalize("success")
    return metrics


def recover_step(ctx: StudyContext, out: Path, cond: PruneCondition) -> dict[str, Any]:
    """RQ6: the masked recovery fine-tune of <source>/prune's model (`PrunedLMModule`: the study's
    dense model with those masks applied, study.recovery's settings, the first study.recovery.tokens
    of the train split, one device), exported to out/model; then its perplexity on the same eval
    sequences as every other condition and its realised sparsity, asserted equal to the masks'."""
    rec = ctx.settings.recovery
    assert rec is not None and cond.recovered
    L.seed_everything(ctx.seed_everything, workers=True, verbose=False)
    started = time.perf_counter()
    module = PrunedLMModule(
        model_name=ctx.model["model_name"],
        masks_path=str(ctx.root / cond.source.name / "prune" / MASKS_FILE),
        apply_masks=True,
        model_cache_dir=ctx.model.get("model_cache_dir", "checkpoints/models"),
        export_dir=str(out / "model"),
        **{k: v for k, v in rec.fine_tune().items() if k not in ("tokens", "batch_size")},
    )
    masked = module.realised_sparsity()
    data = {**ctx.data, "train_tokens": rec.tokens, "batch_size": rec.batch_size}
    trainer = fit_trainer(
        ctx,
        False,
        epochs=1,
        limit_val_batches=0,  # perplexity below, on the study's eval sequences
        logger=ctx.logger("recover", cond.name),
    )
    trainer.fit(module, datamodule=TokenDataModule(**data))
    seconds = time.perf_counter() - started
    realised = module.realised_sparsity()  # raises if a pruned weight is not exactly 0
    if realised != masked:
        raise SparsityMismatch(f"{cond.name}: realised sparsity {realised} after recovery, {masked} before")
    dm = ctx.datamodule()
    ids = dm.eval_ids[: ctx.settings.perplexity_sequences].to(ctx.device)
    lm = module.lm.to(ctx.device)  # pyright: ignore[reportArgumentType]
    metrics = {
        "perplexity": perplexity(lm.eval(), ids),
        "perplexity_tokens": float(ids[:, 1:].numel()),
        "realised_sparsity": realised,
        "recovery_steps": float(trainer.global_step),
        "recovery_tokens": float(trainer.global_step * rec.batch_size * int(ctx.data.get("seq_len", 128))),
        "recovery_seconds": seconds,
    }
    write_rows(
        out / "results" / "perplexity.json", make_rows(ctx.condition(cond.label, cond.sparsity), metrics)
    )
    logger = ctx.logger("recover", cond.name)
    logger.log_metrics({f"recovery/{k}": v for k, v in metrics.items()}, step=trainer.global_step)
    logger.finalize("success")
    return metrics


RQ5_TOKENS = 4096
"""The default RQ5 ablation runs on at least this many eval tokens (study.ablation.eval_sequences)."""


def rq5_step(ctx: StudyContext, out: Path, seed: int) -> dict[str, Any]:
    """RQ5 on the dense model: exact ablation of selected features of dense seed `seed`'s SAE (the
    reference SAE for the reference seed), attribution for all."""
    st, dm, lm = ctx.settings, ctx.datamodule(), ctx.load_lm()
    path = ctx.reference() if seed == st.reference_seed else ctx.dense_sae(seed)
    sae, meta = load_sae(path, device=ctx.device)
    seq_len = int(ctx.data.get("seq_len", 128))
    at_least_4k = -(-RQ5_TOKENS // seq_len)  # docs/methods.md §4 RQ5: 64 / 64 / 64 features on >= 4k tokens
    options = {"n_top": 64, "n_random": 64, "n_rare": 64, "eval_sequences": at_least_4k, "batch_size": 8}
    options.update(st.ablation)
    ids = dm.eval_ids[: options.pop("eval_sequences")].to(ctx.device)
    arrays = feature_importance(
        lm,
        ctx.model["hook_layer"],
        ids,
        sae_parts(sae.eval().requires_grad_(False)),
        seed=ctx.seed_everything,
        **options,
    )
    metrics = summarise(arrays)
    sae_seed = meta.get("seed")  # None for a pretrained reference SAE
    condition = ctx.condition(seed_a=None if sae_seed is None else int(sae_seed))
    write_rows(out / "results" / "rq5_ablation.json", summary_rows(condition, metrics))
    write_arrays(out / "results" / "rq5_ablation.safetensors", **arrays)
    logger = ctx.logger(rq5_name(seed, st.reference_seed), DENSE)
    logger.log_metrics({f"rq5/{k.replace(':', '/')}": v for k, v in metrics.items()}, step=0)
    logger.experiment.add_figure("rq5/exact_vs_attribution", scatter_figure(arrays), 0)
    logger.finalize("success")
    return {k: v for k, v in metrics.items() if k.endswith(":selected")}


def rq1_step(ctx: StudyContext, out: Path, condition_name: str) -> dict[str, Any]:
    """RQ1: pairwise one-to-one matching of the seeds' SAEs on one model; per-feature stability."""
    seeds = ctx.settings.seeds if condition_name == DENSE else ctx.settings.seeds_of_pruned()
    decoders, alive = [], []
    for s in seeds:
        fit = ctx.root / condition_name / f"seed{s}"
        sae, _ = load_sae(fit / "sae")
        decoders.append(sae.W_dec.detach().float())
        alive.append(read_arrays(fit / "results" / "sae_firing_rates.safetensors")["firing_rate"] > 0)
    result = seed_stability(decoders, alive=alive, **ctx.settings.rq1_options())
    method, sparsity = ctx.settings.method_of(condition_name)
    rows = []
    for pair in result["pairs"]:
        cond = ctx.condition(method, sparsity, seeds[pair["i"]], seeds[pair["j"]])
        metrics = {f"shared@{tau:g}": value for tau, value in pair["shared"].items()}
        metrics.update({k: pair[k] for k in ("mmcs_ij", "mmcs_ji", "mean_cosine")})
        rows += make_rows(cond, metrics)
    write_rows(out / "results" / "rq1_seeds.json", rows)
    write_arrays(
        out / "results" / "rq1_seeds.safetensors",
        **{f"stability_seed{s}": v for s, v in zip(seeds, result["stability"], strict=False)},
    )
    logger = ctx.logger("rq1", condition_name)
    logger.log_metrics(
        {
            f"rq1/{r['metric']}/seeds{r['seed_a']}-{r['seed_b']}": r["value"]
            for r in rows
            if r["value"] is not None
        },
        step=0,
    )
    logger.finalize("success")
    return {"pairs": len(result["pairs"])}

"""`python -m lit_prune study --config configs/smollm2.yaml`: the paper's whole grid, resumably, then the report.

Reads the same config as `fit` (its model / data / trainer sections) plus its `study:` section
(`lit_prune.study.config.StudySettings`). Artefacts go to <checkpoints>/<study>/<condition>/<step>/,
TensorBoard runs to <logs>/<study>/<condition>/<step>/. Rerunning skips finished steps whose
inputs are unchanged; `--shard i/n` runs a deterministic part of the conditions (then merge
with `python -m lit_prune report <checkpoints>/<study>`). Within a shard, each SAE fit uses every
device the trainer settings give (`--trainer.devices=4`: a Lightning DDP run in a child process,
`lit_prune.study.fit_worker`; the global batch is then devices x data.batch_size sequences).
"""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lit_prune.cli import IO_ERRORS, check_finite
from lit_prune.errors import LitPruneError, invalid, terminate_on_sigterm
from lit_prune.files import check_writable, write_text_atomic

STUDY_FILE = "study.json"
HELD_FILE = ".study.lock"  # every process running the study holds a shared lock on it
GUARD_FILE = ".study.guard"  # taken while a process compares and writes study.json
RUNS_FILE = "runs.jsonl"
IDENTITY = ("model_name", "hook_layer")


def build_parser():
    from jsonargparse import (
        ActionConfigFile,  # pyright: ignore[reportPrivateImportUsage] (left out of __all__)
        ArgumentParser,
        set_parsing_settings,
    )

    from lit_prune.lit.datamodule import TokenDataModule
    from lit_prune.lit.sae_module import SAEModule
    from lit_prune.study.config import StudySettings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(
        prog="python -m lit_prune study",
        description=(__doc__ or "").split("\n\n")[0],
        exit_on_error=False,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--config", action=ActionConfigFile, help="A model config (configs/*.yaml) with a study: section."
    )
    parser.add_argument(
        "--seed_everything", type=int, default=0, help="Base seed of every run (plus the SAE seed)."
    )
    parser.add_argument(
        "--trainer",
        type=dict[str, Any],
        default={},
        help="Lightning Trainer settings; the study uses accelerator, precision, deterministic and, "
        "for its SAE fits, devices, num_nodes and strategy. devices > 1 (or a list, or auto "
        "finding several GPUs): each fit is a Lightning DDP run (strategy ddp unless given) "
        "in a child process; every rank reads data.batch_size sequences per step, so the "
        "global batch is devices x batch_size. The other steps use one device. "
        "Changing devices reruns the fits.",
    )
    parser.add_class_arguments(SAEModule, "model", skip={"export_dir", "norm_scale"})
    parser.add_class_arguments(TokenDataModule, "data", skip={"model_name", "model_cache_dir"})
    parser.add_class_arguments(StudySettings, "study")
    parser.add_argument(
        "--shard",
        type=str | None,
        default=None,
        help="i/n: run the conditions with index %% n == i (the dense model runs once, locked).",
    )
    parser.add_argument(
        "--worker",
        type=str | None,
        default=None,
        help="Internal: set by the study on its worker processes (study.workers > 1).",
    )
    parser.add_argument(
        "--report",
        type=bool,
        default=True,
        help="Write <study>/report/ at the end (unsharded runs only; shards: use `report`).",
    )
    parser.add_argument("--progress", type=bool, default=True, help="Show the progress bar over the grid.")
    return parser


def _merge(base: dict[str, Any], overrides: dict[str, Any], field: str) -> dict[str, Any]:
    """base with overrides applied (nested dicts merged); unknown keys are an error."""
    out = dict(base)
    for key, value in overrides.items():
        if key not in base:
            raise invalid(
                f"{field}.{key}", value, "a key of the config's section: " + ", ".join(sorted(base))
            )
        out[key] = (
            _merge(base[key], value, f"{field}.{key}")
            if isinstance(value, dict) and isinstance(base[key], dict)
            else value
        )
    return out


def context_from_args(argv: list[str]):
    """Parse argv into (StudyContext, shard, options)."""
    from jsonargparse import Namespace

    from lit_prune.cli_manners import parse_one_line
    from lit_prune.models.registry import resolve_lm_dtype
    from lit_prune.sae.build import SAESettings
    from lit_prune.study.config import StudySettings
    from lit_prune.study.runner import parse_shard
    from lit_prune.study.steps import StudyContext

    cfg = parse_one_line(build_parser(), argv, "study", prefix="")  # one line, with the value and the type
    plain = lambda ns: ns.as_dict() if isinstance(ns, Namespace) else dict(ns)  # noqa: E731
    check_finite({k: v for k, v in plain(cfg).items() if k != "config"})  # YAML's .inf and .nan
    study_fields = plain(cfg.study)
    settings = StudySettings(**study_fields)
    model = _merge(plain(cfg.model), settings.model, "study.model")
    data = _merge(plain(cfg.data), settings.data, "study.data")
    data["model_name"], data["model_cache_dir"] = model["model_name"], model["model_cache_dir"]
    SAESettings(**model["sae"])  # one-line errors for bad SAE settings before any work
    _check_callback_options(settings)
    _check_run_settings(settings, dict(cfg.trainer or {}), int(cfg.seed_everything))
    configs = cfg.get("config") or []
    name = settings.name or (Path(str(configs[0])).stem if configs else "study")
    ctx = StudyContext(
        name=name,
        settings=settings,
        model=model,
        data=data,
        trainer=dict(cfg.trainer or {}),
        seed_everything=int(cfg.seed_everything),
    )
    # the steps' inputs and every worker get the dtype "auto" chose for this study's device
    ctx.model["lm_dtype"] = resolve_lm_dtype(model.get("lm_dtype", "float32"), ctx.device)
    return ctx, parse_shard(cfg.shard), {"report": cfg.report, "progress": cfg.progress, "worker": cfg.worker}


def _check_run_settings(settings, trainer: dict[str, Any], seed_everything: int) -> None:
    """One-line errors, before any work, for what would otherwise fail after the first steps."""
    from lit_prune.lit.sae_module import check_precision
    from lit_prune.sae.io import PRETRAINED_PREFIX, pretrained_id

    if trainer.get("precision") is not None:
        check_precision(trainer["precision"])
    ref = settings.reference_sae
    if ref is not None and (
        pretrained_id(ref) is None if ref.startswith(PRETRAINED_PREFIX) else not Path(ref).is_dir()
    ):
        raise invalid("study.reference_sae", ref, "an SAE directory or sae-lens:<release>:<sae_id>")
    for name in ("checkpoints", "logs"):  # tried before any work, not found unwritable after it
        check_writable(f"study.{name}", Path(getattr(settings, name)).absolute())
    if seed_everything < 0 or seed_everything + max(settings.seeds) >= 2**32:  # a run's seed is their sum
        raise invalid(
            "seed_everything",
            seed_everything,
            "an integer >= 0 with seed_everything + max(study.seeds) < 2**32",
        )
    if settings.workers > 1:
        from lit_prune.study.fit_worker import fit_processes

        if fit_processes(trainer) > 1:
            raise invalid(
                "study.workers", settings.workers, "1 when each fit uses several devices (trainer.devices)"
            )


def _check_trainer(ctx) -> None:
    """Build the fits' Trainer once, for Lightning's own checks of the trainer settings, before any work."""
    from lit_prune.study.fit_worker import fit_processes
    from lit_prune.study.steps import fit_trainer

    distributed = fit_processes(ctx.trainer) > 1
    strategy = ctx.trainer.get("strategy")  # one-device fits ignore it, but a misspelt one is still a mistake
    fit_trainer(
        ctx, distributed, logger=False, **({"strategy": strategy} if strategy and not distributed else {})
    )


def _check_callback_options(settings) -> None:
    """study.survival / study.transfer build the RQ callbacks of every pruned fit: check them now,
    not after the dense fits."""
    from lit_prune.lit.survival_callback import FeatureSurvivalCallback
    from lit_prune.lit.transfer_callback import TransferabilityCallback

    for name, cls in (("survival", FeatureSurvivalCallback), ("transfer", TransferabilityCallback)):
        options = getattr(settings, name)
        allowed = [p for p in inspect.signature(cls).parameters if p not in ("reference_sae", "output_dir")]
        for key, value in options.items():
            if key not in allowed:
                raise invalid(f"study.{name}.{key}", value, "a key among " + ", ".join(allowed))
        try:
            cls("", **options)
        except LitPruneError as err:
            raise LitPruneError(f"study.{name}.{err}") from None
        except (TypeError, ValueError):
            raise invalid(
                f"study.{name}", options, f"the argument types of {cls.__name__} (see its docstring)"
            ) from None


def _check_identity(ctx, root: Path) -> None:
    """Two different studies never share a directory: same name, other model or hook -> error."""
    path = root / STUDY_FILE
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    for key in IDENTITY:
        if old["model"].get(key) != ctx.model.get(key):
            raise invalid(
                "study.name",
                ctx.name,
                f"a new name: {root} holds a study of model.{key}="
                f"{old['model'].get(key)!r} (this config: {ctx.model.get(key)!r})",
            )


def _hold_study(name: str, root: Path, record: dict[str, Any]):
    """Write study.json and hold the study (a shared lock, released when the process ends). Shards
    and reruns of the same settings share it; a process whose steps differ from those of the
    processes holding it refuses, instead of mixing two studies' results in one directory."""
    import fcntl

    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    # the hold is a shared flock taken exclusively first, which filelock's exclusive-only FileLock
    # cannot express; the guard around the comparison and the write is an ordinary exclusive lock
    held = (root / HELD_FILE).open("a")
    with FileLock(root / GUARD_FILE):  # held only for the comparison and the write
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # other processes run this study now: only with the same steps
            theirs = json.loads((root / STUDY_FILE).read_text()) if (root / STUDY_FILE).is_file() else {}
            if theirs.get("steps") != record["steps"]:
                held.close()
                raise invalid(
                    "study.name",
                    name,
                    f"a name no running study uses: another process is running {root} with other "
                    "settings (wait until it ends, or give this study another name)",
                ) from None
        _write_json(root / STUDY_FILE, record)
        fcntl.flock(held, fcntl.LOCK_SH)
    return held


def _check_reference_sae(ctx) -> None:
    """study.reference_sae is loaded and checked against the model (width, hook) before any step,
    not when RQ5 reaches it after the dense fits and the pruning."""
    ref = ctx.settings.reference_sae
    if ref is None:
        return
    from lit_prune.models.registry import model_skeleton
    from lit_prune.sae.io import check_compatible, load_sae

    try:
        sae, meta = load_sae(ref)
    except LitPruneError as err:  # load_sae names its own argument
        raise LitPruneError(str(err).replace("sae_path=", "study.reference_sae=", 1)) from None
    d_model = model_skeleton(ctx.model["model_name"], ctx.model["model_cache_dir"]).config.hidden_size
    check_compatible(sae, meta, d_model, ctx.model["hook_layer"], field="study.reference_sae")


def _write_json(path: Path, record: dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(record, indent=1, sort_keys=True, default=str))


def run_study(argv: list[str]) -> Path:
    from lit_prune.models.activation_cache import sharing_activations
    from lit_prune.sae.io import versions
    from lit_prune.study.workers import WorkerPool

    terminate_on_sigterm()  # stops the study (and, through pool.close, its workers) in any step
    ctx, shard, options = context_from_args(argv)
    from lit_prune.lit.trainer_settings import quiet_lightning

    quiet_lightning()
    root = ctx.root
    _check_identity(ctx, root)
    if options["worker"] is not None:  # started by a study process, which has made the checks below
        _work(ctx, shard, options["worker"])
        return root
    # here, not in context_from_args: a GPU config parses on a CPU machine
    _check_trainer(ctx)
    started = time.time()
    # started first: their imports overlap the set-up
    pool = WorkerPool(argv, ctx.settings.workers, ctx.device) if ctx.settings.workers > 1 else None
    held = None
    try:
        _check_nm_shapes(ctx)
        _check_reference_sae(ctx)
        dm, runner, selected = _plan(ctx, shard)
        held = _hold_study(
            ctx.name,
            root,
            {
                "name": ctx.name,
                "settings": asdict(ctx.settings),
                "model": ctx.model,
                "data": ctx.data,
                "trainer": ctx.trainer,
                "seed_everything": ctx.seed_everything,
                "corpus": dm.provenance,
                "versions": versions(),
                "steps": {key: runner.hashes[key] for key in runner.steps},
            },
        )
        per_worker = None
        if pool is not None:
            pool.release()
            status, per_worker = pool.run(runner, selected, options["progress"])
        else:
            with sharing_activations(int(ctx.settings.cache_gb * (1 << 30))):
                status = runner.run(selected, progress=options["progress"])
    except OSError as err:  # a full disk, a folder made read-only: the finished steps are kept
        if err.errno not in IO_ERRORS:
            raise
        raise LitPruneError(
            f"study {ctx.name}: could not write its results ({err.filename or root}: {err.strerror}); "
            "finished steps are kept: the same command resumes the study"
        ) from None
    finally:
        if pool is not None:
            pool.close()
        if held is not None:
            held.close()  # other processes may now run this study with other settings
    record = {
        "shard": f"{shard[0]}/{shard[1]}",
        "started": started,
        "seconds": time.time() - started,
        "ran": sorted(k for k, v in status.items() if v == "ran"),
        "skipped": sorted(k for k, v in status.items() if v == "done"),
    }
    if per_worker is not None:
        record["workers"] = per_worker  # the steps each worker ran, in order
    with (root / RUNS_FILE).open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(
        f"study {ctx.name}: {len(record['ran'])} steps ran, {len(record['skipped'])} already done, "
        f"{record['seconds']:.0f} s; results in {root}"
    )
    if options["report"] and shard == (0, 1):
        from lit_prune.study.report import write_report

        print(f"report: {write_report(root).with_suffix('.html')} (and report.md beside it)")
    return root


def _plan(ctx, shard: tuple[int, int]):
    """(datamodule, runner, the steps of this shard): validates the corpus and fixes the tokens
    (building them if needed) before any expensive work."""
    from lit_prune.study.runner import Runner
    from lit_prune.study.steps import DENSE, build_steps

    dm = ctx.datamodule()
    runner = Runner(
        ctx.root, build_steps(ctx, dm.provenance["fingerprint"]), Path(ctx.settings.logs) / ctx.name
    )
    order = {c.name: i for i, c in enumerate(ctx.settings.conditions() + ctx.settings.recovered_conditions())}
    return (
        dm,
        runner,
        runner.selected(shard, lambda step: 0 if step.condition == DENSE else order[step.condition]),
    )


def _check_nm_shapes(ctx) -> None:
    """Every N:M pattern's M must divide the inputs of every pruned matrix: known from the model's
    config, so checked before the dense fits rather than at the first N:M condition."""
    if not ctx.settings.nm:
        return
    from lit_prune.models.registry import model_skeleton
    from lit_prune.pruning import check_nm_shape, prunable_linears

    shapes = {
        name: tuple(linear.weight.shape)
        for name, linear in prunable_linears(
            model_skeleton(ctx.model["model_name"], ctx.model["model_cache_dir"])
        ).items()
    }
    for pattern in ctx.settings.nm:
        for name, shape in shapes.items():
            try:
                check_nm_shape(tuple(pattern), shape, name)
            except LitPruneError:
                raise invalid(
                    "study.nm",
                    pattern,
                    f"N:M patterns whose M divides the inputs of every pruned matrix ({name} has {shape[1]})",
                ) from None


def _work(ctx, shard: tuple[int, int], worker: str) -> None:
    """One of the study's worker processes: once released, run the shard's steps beside the others."""
    from lit_prune.models.activation_cache import sharing_activations
    from lit_prune.study.workers import parse_worker, started_file, wait_for_release

    index, folder = parse_worker(worker)
    wait_for_release(folder)
    _, runner, selected = _plan(ctx, shard)
    started: list[str] = []

    def tell(step) -> None:
        started.append(step.key)
        _write_json(started_file(folder, index), {"started": started})

    with sharing_activations(int(ctx.settings.cache_gb * (1 << 30))):
        runner.run(selected, progress=False, on_start=tell)


def main(argv: list[str]) -> int:
    run_study(argv)
    return 0

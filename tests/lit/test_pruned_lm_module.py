"""PrunedLMModule through the same LightningCLI as the SAE fits (configs/recovery.yaml): a short
masked recovery of a Wanda-50% tiny model lowers its eval perplexity, every pruned weight is exactly 0
in the checkpoint and the export, the export is a model prune and PruningCallback accept; bad input is
one line."""

from __future__ import annotations

import functools
import json
import math
import os
import stat
from pathlib import Path

import pytest
import torch
from helpers import ROOT, cli_in_process, run_cli, tiny_prune_options
from lightning.pytorch.callbacks import ModelCheckpoint
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from lit_prune.cli import chooses_model_class, lightning_cli
from lit_prune.commands.prune import MASKS_FILE, run_prune
from lit_prune.errors import LitPruneError
from lit_prune.lit.callbacks import PruningCallback
from lit_prune.lit.pruned_lm_module import RECOVERY_FILE, PrunedLMModule
from lit_prune.pruning import load_masks, prunable_linears, verify_masks

pytestmark = pytest.mark.e2e  # Lightning fits (in process): the end-to-end lane


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, local_corpus, model_cache, data_cache):
    out = tmp_path_factory.mktemp("pruned") / "wanda-0.5"
    run_prune(tiny_prune_options(out, local_corpus, model_cache, data_cache, method="wanda", sparsity=0.5))
    return out


def _args(command, tmp_path, corpus, model_cache, model, *extra):
    return [
        command,
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        "--config",
        str(ROOT / "configs" / "recovery.yaml"),
        f"--model.init_args.model_name={model}",
        f"--model.init_args.model_cache_dir={model_cache}",
        f"--model.init_args.export_dir={tmp_path / 'export'}",
        f"--data.corpus={corpus}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        "--data.train_tokens=4096",
        "--data.eval_tokens=512",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        *extra,
    ]


def _best_checkpoint(cli) -> Path:
    callback = cli.trainer.checkpoint_callback
    assert isinstance(callback, ModelCheckpoint)
    return Path(callback.best_model_path)


def _zero_where_pruned(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    for name, keep in masks.items():
        assert not bool(weights[name][~keep].any()), name


def test_recovery_lowers_perplexity_and_keeps_masks_exact(pruned_dir, tmp_path, local_corpus, model_cache):
    before = lightning_cli(_args("validate", tmp_path, local_corpus, model_cache, pruned_dir))
    assert isinstance(before.model, PrunedLMModule) and before.model.hparams.lr == 2e-5  # recovery.yaml's
    fit = _args("fit", tmp_path, local_corpus, model_cache, pruned_dir, "--model.init_args.lr=0.002")
    after = lightning_cli(fit + ["--trainer.max_steps=16", "--trainer.val_check_interval=16"])
    assert after.model.last_val["perplexity"] < 0.98 * before.model.last_val["perplexity"]  # 520.6 -> 498.8
    masks = load_masks(pruned_dir / MASKS_FILE)

    ckpt = torch.load(_best_checkpoint(after), weights_only=False)
    assert all(torch.equal(ckpt["masks"][n], masks[n]) for n in masks)
    _zero_where_pruned({n: ckpt["state_dict"][f"lm.{n}.weight"] for n in masks}, masks)

    export = tmp_path / "export"
    assert all(torch.equal(m, masks[n]) for n, m in load_masks(export / MASKS_FILE).items())
    model = AutoModelForCausalLM.from_pretrained(export)
    _zero_where_pruned({n: lin.weight for n, lin in prunable_linears(model).items()}, masks)
    verify_masks(model, masks, "wanda", 0.5)  # the export's masks are still exact Wanda-50% masks
    dense = AutoModelForCausalLM.from_pretrained(pruned_dir)
    name = next(iter(masks))
    assert not torch.equal(
        prunable_linears(model)[name].weight, prunable_linears(dense)[name].weight
    )  # it trained
    PruningCallback(method="wanda", sparsity=0.5, masks_path=str(export / MASKS_FILE))  # accepted by fit

    # the export is a model for prune (and so for fit and study, which resolve model names the same way)
    code, err = cli_in_process(
        "prune",
        "--output",
        str(tmp_path / "again"),
        "--model",
        str(export),
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
        "--corpus",
        str(local_corpus),
        "--eval_sequences",
        "2",
        "--no_progress",
        "--cache_dir",
        str(tmp_path / "cache"),
        cwd=tmp_path,
    )
    assert code == 0, err


STEPS = 4  # one epoch: 1024 train tokens are 32 sequences of 32, 4 batches of 8


def _recovery(tmp, corpus, model_cache, model, name, steps, *extra):
    """`fit` of `steps` masked recovery steps (val_check_interval one epoch), exporting to tmp/name."""
    args = _args(
        "fit", tmp, corpus, model_cache, model, "--model.init_args.lr=0.002", "--data.train_tokens=1024"
    )
    args += [f"--trainer.max_steps={steps}", f"--trainer.val_check_interval={STEPS}"]
    return args + [f"--model.init_args.export_dir={tmp / name}", *extra]


@pytest.fixture(scope="module")
def runs(pruned_dir, tmp_path_factory, local_corpus, model_cache):
    """Under umask 027: a STEPS-step fit and its checkpoint, that checkpoint resumed to 2 * STEPS, and an
    uninterrupted 2 * STEPS fit: (tmp, checkpoint, resumed cli, uninterrupted cli)."""
    tmp = tmp_path_factory.mktemp("recovery")
    old = os.umask(0o027)
    try:
        fit = functools.partial(_recovery, tmp, local_corpus, model_cache, pruned_dir)
        first = lightning_cli(fit("first", STEPS))
        ckpt = _best_checkpoint(first)
        resumed = lightning_cli(fit("resumed", 2 * STEPS, f"--ckpt_path={ckpt}"))
        whole = lightning_cli(fit("whole", 2 * STEPS))
    finally:
        os.umask(old)
    return tmp, ckpt, resumed, whole


def _events(cli) -> EventAccumulator:
    acc = EventAccumulator(cli.trainer.logger.log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_a_resumed_recovery_equals_an_uninterrupted_one(runs, pruned_dir):
    tmp, ckpt, resumed, whole = runs
    masks = load_masks(pruned_dir / MASKS_FILE)
    first = torch.load(ckpt, weights_only=False)
    assert first["global_step"] == STEPS and all(torch.equal(first["masks"][n], masks[n]) for n in masks)
    _zero_where_pruned({n: first["state_dict"][f"lm.{n}.weight"] for n in masks}, masks)
    assert resumed.trainer.global_step == whole.trainer.global_step == 2 * STEPS
    mine, theirs = resumed.model.lm.state_dict(), whole.model.lm.state_dict()
    assert mine.keys() == theirs.keys()
    for name in mine:  # the same steps on the same batches in the same order: bit for bit
        assert torch.equal(mine[name], theirs[name]), name
    name = next(iter(masks))
    assert not torch.equal(mine[f"{name}.weight"], first["state_dict"][f"lm.{name}.weight"])  # it trained on
    last = torch.load(_best_checkpoint(resumed), weights_only=False)
    assert last["global_step"] == 2 * STEPS
    _zero_where_pruned({n: last["state_dict"][f"lm.{n}.weight"] for n in masks}, masks)
    export = AutoModelForCausalLM.from_pretrained(tmp / "resumed")
    _zero_where_pruned({n: lin.weight for n, lin in prunable_linears(export).items()}, masks)
    verify_masks(export, load_masks(tmp / "resumed" / MASKS_FILE), "wanda", 0.5)
    # the resumed run's TensorBoard continues the first run's steps with the uninterrupted run's losses
    tail = [(e.step, e.value) for e in _events(whole).Scalars("train/loss")][STEPS:]
    assert [(e.step, e.value) for e in _events(resumed).Scalars("train/loss")] == tail


def test_tensorboard_has_the_recovery_scalars(runs):
    _, _, _, whole = runs
    events = _events(whole)
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "val/loss", "val/perplexity", "val/realised_sparsity"} <= scalars
    assert "recovery/realised_sparsity" in scalars
    assert len(events.Scalars("train/loss")) == 2 * STEPS  # log_every_n_steps=1
    assert [e.step for e in events.Scalars("val/loss")] == [STEPS - 1, 2 * STEPS - 1]  # once an epoch
    val = {
        tag: events.Scalars(tag)[-1].value for tag in ("val/loss", "val/perplexity", "val/realised_sparsity")
    }
    assert val["val/perplexity"] == pytest.approx(math.exp(val["val/loss"]), rel=1e-5)
    assert val["val/perplexity"] == pytest.approx(whole.model.last_val["perplexity"], rel=1e-5)
    assert events.Scalars("hp_metric")[-1].value == pytest.approx(val["val/perplexity"], rel=1e-5)
    assert val["val/realised_sparsity"] == pytest.approx(0.5)
    assert events.Scalars("recovery/realised_sparsity")[0].value == pytest.approx(0.5)


def test_the_export_has_the_umask_modes(runs):
    tmp = runs[0]
    export = tmp / "whole"
    assert (export / MASKS_FILE).is_file() and (export / "model.safetensors").is_file()
    assert stat.S_IMODE(export.stat().st_mode) == 0o750  # umask 027, as the fixture set it
    for path in export.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o750 if path.is_dir() else 0o640), path


def test_export_replaces_only_an_earlier_export(runs):
    tmp, _, _, whole = runs
    assert json.loads((tmp / "first" / RECOVERY_FILE).read_text())["global_step"] == STEPS
    (tmp / "first" / "stale.txt").write_text("from an earlier export")
    whole.model.export(tmp / "first")  # replaced as a whole
    assert json.loads((tmp / "first" / RECOVERY_FILE).read_text())["global_step"] == 2 * STEPS
    assert not (tmp / "first" / "stale.txt").exists()
    (tmp / "notes").mkdir()
    (tmp / "notes" / "mine.txt").write_text("not an export")
    with pytest.raises(LitPruneError, match="^model.export_dir=.*notes' is invalid: .*an earlier export"):
        whole.model.export(tmp / "notes")
    assert (tmp / "notes" / "mine.txt").read_text() == "not an export"
    assert not [p.name for p in tmp.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_a_resume_with_other_masks_is_one_line_error(runs, pruned_dir, tmp_path, local_corpus, model_cache):
    """The checkpoint's masks against this run's model's (a model directory pruned again since, say)."""
    _, ckpt, _, _ = runs
    checkpoint = torch.load(ckpt, weights_only=False)
    name = next(iter(checkpoint["masks"]))
    pruned = int((~checkpoint["masks"][name]).sum())
    checkpoint["masks"][name] = torch.ones_like(checkpoint["masks"][name])
    torch.save(checkpoint, tmp_path / "other.ckpt")
    fit = _recovery(tmp_path, local_corpus, model_cache, pruned_dir, "export", 2 * STEPS)
    code, err = cli_in_process(*fit, f"--ckpt_path={tmp_path / 'other.ckpt'}", cwd=tmp_path)
    # in process, transformers' weight-loading bar may precede it (its switch is read at import)
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("error: --ckpt_path: the checkpoint was trained with other masks"), (
        err
    )
    assert f"({pruned} weights differ)" in line and "Traceback" not in err, err
    assert not (tmp_path / "export").exists()


def test_a_resume_with_other_settings_is_one_line_error(
    runs, pruned_dir, tmp_path, local_corpus, model_cache
):
    """Lightning puts the checkpoint's settings in place of the config's: a differing lr is refused."""
    _, ckpt, _, _ = runs
    fit = _recovery(tmp_path, local_corpus, model_cache, pruned_dir, "export", 2 * STEPS)
    code, err = cli_in_process(*fit, "--model.init_args.lr=0.01", f"--ckpt_path={ckpt}", cwd=tmp_path)
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("error: --ckpt_path: the checkpoint's run has lr=0.002, not "), err
    assert "model.init_args.lr=0.01" in line and "Traceback" not in err, err
    assert not (tmp_path / "export").exists()


def test_ddp_two_processes_match_one_process(pruned_dir, tmp_path, local_corpus, model_cache):
    """Two CPU processes (gloo) with 4 sequences each against one with 8: the same global batch.

    Training is 8 sequences, one batch an epoch, so DDP's shuffling DistributedSampler changes nothing:
    every step averages the gradient over the same 8 x 31 next-token predictions (equal halves), and
    validation sums both ranks' eval shards. Only the order of float sums differs; the replicas must
    be bit-identical and every pruned weight exactly 0."""

    def fit(devices: int) -> Path:
        out = tmp_path / f"devices{devices}"
        args = _args("fit", tmp_path, local_corpus, model_cache, pruned_dir, "--model.init_args.lr=0.002")
        args += ["--data.train_tokens=256", f"--data.batch_size={8 // devices}", "--trainer.max_steps=3"]
        args += ["--trainer.val_check_interval=1", "--trainer.enable_checkpointing=false"]
        args += [f"--trainer.devices={devices}", "--trainer.accelerator=cpu"]
        args += [
            f"--model.init_args.export_dir={out / 'export'}",
            f"--trainer.logger.init_args.save_dir={out}",
        ]
        if devices == 1:
            lightning_cli(args)
            return out / "export"
        args += ["--trainer.strategy=ddp", "--trainer.callbacks+=tests.ddp_probe.DumpReplicas"]
        args += [f"--trainer.callbacks.out_dir={out / 'replicas'}", "--trainer.callbacks.attribute=lm"]
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        return out / "export"

    single, ddp = fit(1), fit(2)
    masks = load_masks(pruned_dir / MASKS_FILE)
    rank0, rank1 = (torch.load(p) for p in sorted((tmp_path / "devices2" / "replicas").glob("rank*.pt")))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    _zero_where_pruned({n: rank1[f"{n}.weight"] for n in masks}, masks)
    one, two = (AutoModelForCausalLM.from_pretrained(path).state_dict() for path in (single, ddp))
    _zero_where_pruned({n: two[f"{n}.weight"] for n in masks}, masks)
    assert all(torch.equal(m, masks[n]) for n, m in load_masks(ddp / MASKS_FILE).items())
    name = next(iter(masks))
    start = prunable_linears(AutoModelForCausalLM.from_pretrained(pruned_dir))[name].weight
    assert not torch.equal(two[f"{name}.weight"], start)  # it trained
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)
    val = [json.loads((path / RECOVERY_FILE).read_text())["metrics"] for path in (single, ddp)]
    assert val[0]["predictions"] == val[1]["predictions"] == 16 * 31  # every eval token once
    assert val[1]["loss"] == pytest.approx(val[0]["loss"], rel=1e-5)


def test_dense_model_and_foreign_masks_are_one_line_errors(pruned_dir, tmp_path, local_corpus, model_cache):
    with pytest.raises(LitPruneError, match="^model.model_name='tiny-llama' is invalid: .*dense model"):
        PrunedLMModule("tiny-llama", model_cache_dir=str(model_cache))
    dense = AutoModelForCausalLM.from_pretrained(pruned_dir)  # a copy whose pruned weights are not 0
    for lin in prunable_linears(dense).values():
        lin.weight.data.add_(1.0)
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(LitPruneError, match="^model.masks_path=.*weights it prunes are not 0"):
        PrunedLMModule(str(tmp_path / "dense"), masks_path=str(pruned_dir / MASKS_FILE))
    with pytest.raises(
        LitPruneError, match="^model.masks_path=.*masks of this model"
    ):  # same shapes, other weights
        PrunedLMModule(
            "tiny-gemma2", masks_path=str(pruned_dir / MASKS_FILE), model_cache_dir=str(model_cache)
        )
    with pytest.raises(LitPruneError, match="^model.lr=-1.0"):
        PrunedLMModule(str(pruned_dir), lr=-1.0)
    code, err = cli_in_process(*_args("fit", tmp_path, local_corpus, model_cache, "tiny-llama"), cwd=tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "dense model" in err, err


def test_only_a_model_class_path_switches_the_cli_to_class_choice(tmp_path):
    assert chooses_model_class(["fit", "--config", str(ROOT / "configs" / "recovery.yaml")])
    assert not chooses_model_class(["fit", "--config", str(ROOT / "configs" / "tiny.yaml")])
    assert chooses_model_class(["fit", "--model.help", "lit_prune.lit.pruned_lm_module.PrunedLMModule"])

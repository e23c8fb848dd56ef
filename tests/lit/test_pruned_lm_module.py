"""PrunedLMModule through the same LightningCLI as the SAE fits (configs/recovery.yaml): a short
masked recovery of a Wanda-50% tiny model lowers its eval perplexity, every pruned weight is exactly 0
in the checkpoint and the export, the export is a model prune and PruningCallback accept; bad input is
one line."""

from __future__ import annotations

import pytest
import torch
from helpers import ROOT, cli_in_process
from transformers import AutoModelForCausalLM

from lit_prune.cli import chooses_model_class, lightning_cli
from lit_prune.commands.prune import MASKS_FILE, PruneOptions, run_prune
from lit_prune.errors import LitPruneError
from lit_prune.lit.callbacks import PruningCallback
from lit_prune.lit.pruned_lm_module import PrunedLMModule
from lit_prune.pruning import load_masks, prunable_linears, verify_masks

pytestmark = pytest.mark.e2e  # Lightning fits (in process): the end-to-end lane


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory, local_corpus, model_cache, data_cache):
    out = tmp_path_factory.mktemp("pruned") / "wanda-0.5"
    run_prune(
        PruneOptions(
            output=str(out),
            model="tiny-llama",
            method="wanda",
            sparsity=0.5,
            corpus=str(local_corpus),
            calibration_sequences=4,
            calibration_seq_len=32,
            eval_sequences=4,
            eval_seq_len=32,
            progress=False,
            model_cache_dir=str(model_cache),
            cache_dir=str(data_cache),
        )
    )
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

    ckpt = torch.load(after.trainer.checkpoint_callback.best_model_path, weights_only=False)
    assert all(torch.equal(ckpt["masks"][n], masks[n]) for n in masks)
    _zero_where_pruned({n: ckpt["state_dict"][f"lm.{n}.weight"] for n in masks}, masks)

    export = tmp_path / "export"
    assert all(torch.equal(m, masks[n]) for n, m in load_masks(export / MASKS_FILE).items())
    model = AutoModelForCausalLM.from_pretrained(export)
    _zero_where_pruned({n: lin.weight for n, lin in prunable_linears(model).items()}, masks)
    verify_masks(model, masks, "wanda", 0.5)  # the export's masks are still exact Wanda-50% masks
    dense = AutoModelForCausalLM.from_pretrained(pruned_dir)
    name = next(iter(masks))
    assert not torch.equal(model.get_submodule(name).weight, dense.get_submodule(name).weight)  # it trained
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

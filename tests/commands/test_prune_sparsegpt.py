"""`python -m lit_prune prune --method sparsegpt` on a tiny model: exact sparsity, pruned weights
exactly 0 in the saved model, OBS-updated kept weights, a valid 2:4 pattern, one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import cli_in_process, tiny_prune_options
from transformers import AutoModelForCausalLM

from lit_prune.commands.prune import MASKS_FILE, REPORT_FILE, PruneOptions, run_prune
from lit_prune.models.registry import load_model
from lit_prune.pruning import load_masks, prunable_linears, verify_masks


def _options(tmp_path, local_corpus, model_cache, data_cache, **kw) -> PruneOptions:
    return tiny_prune_options(
        tmp_path / "out", local_corpus, model_cache, data_cache, method="sparsegpt", batch_size=4, **kw
    )


def test_sparsegpt_output_reloads_pruned_and_updated(tmp_path, local_corpus, model_cache, data_cache):
    o = _options(tmp_path, local_corpus, model_cache, data_cache, sparsity=0.3, column_block=48)
    result = run_prune(o)
    report = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert report["method"] == "sparsegpt" and report["group"] == "matrix"
    assert report["calibration"]["used"] and report["calibration"]["sequences"] == 4
    assert report["options"]["column_block"] == 48 and report["options"]["dampening"] == 0.01
    masks = load_masks(tmp_path / "out" / MASKS_FILE)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    verify_masks(saved, masks, "sparsegpt", 0.3)  # exactly floor(numel * 0.3) per matrix, all zero
    dense = load_model("tiny-llama", cache_dir=str(model_cache))
    for name, lin in prunable_linears(saved).items():
        assert torch.equal(lin.weight, prunable_linears(result.model)[name].weight), name
        assert not torch.equal(lin.weight, dense.get_submodule(name).weight * masks[name]), name


def test_sparsegpt_nm_from_the_command_line(tmp_path, local_corpus, model_cache, data_cache):
    o = _options(tmp_path, local_corpus, model_cache, data_cache)
    argv = ["prune", "--output", o.output, "--model", o.model, "--method", "sparsegpt", "--nm", "2:4"]
    argv += ["--corpus", o.corpus, "--calibration_sequences", "2", "--calibration_seq_len", "16"]
    argv += ["--eval_sequences", "2", "--no_progress", "--model_cache_dir", o.model_cache_dir]
    argv += ["--cache_dir", o.cache_dir]
    code, err = cli_in_process(*argv, cwd=tmp_path)
    assert code == 0, err
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    verify_masks(saved, load_masks(tmp_path / "out" / MASKS_FILE), "sparsegpt", None, nm=(2, 4))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sparsity", "0.5", "--dampening", "0"], "dampening=0.0 is invalid"),
        (["--nm", "2:4", "--column_block", "6"], "column_block=6 is invalid"),
        (["--sparsity", "0.5", "--group", "row"], "group='row' is invalid"),
        (["--sparsity", "0.5", "--calibration_sequences", "0"], "calibration_sequences=0 is invalid"),
    ],
)
def test_bad_sparsegpt_options_are_one_line_errors(tmp_path, extra, message):
    code, err = cli_in_process(
        "prune", "--output", str(tmp_path / "out"), "--method", "sparsegpt", *extra, cwd=tmp_path
    )
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()

"""PruningCallback with method sparsegpt inside a tiny fit: exact masks, zero pruned weights,
masks in the checkpoint; its option errors are one line."""

from __future__ import annotations

import pytest
import torch
from helpers import ROOT

from lit_prune.cli import lightning_cli
from lit_prune.errors import LitPruneError
from lit_prune.lit.callbacks import PruningCallback
from lit_prune.pruning import prunable_linears, verify_masks

pytestmark = pytest.mark.e2e  # Lightning fits (in process): the end-to-end lane


def test_sparsegpt_fit_prunes_exactly_and_checkpoints_masks(tmp_path, local_corpus, model_cache):
    cli = lightning_cli(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            "--config",
            str(ROOT / "configs" / "pruning" / "sparsegpt50.yaml"),
            "--trainer.callbacks.init_args.perplexity_sequences=4",
            "--trainer.callbacks.init_args.column_block=32",
            f"--model.model_cache_dir={model_cache}",
            f"--data.corpus={local_corpus}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            f"--model.export_dir={tmp_path / 'sae'}",
        ]
    )
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, PruningCallback))
    assert callback.method == "sparsegpt" and callback.column_block == 32
    lm = cli.model.lm
    verify_masks(lm, callback.masks, "sparsegpt", 0.5)
    info = cli.model.pruning_info
    assert info["method"] == "sparsegpt" and info["realised_sparsity"] == pytest.approx(0.5)
    assert info["perplexity_pruned"] > 0
    ckpt = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=False)
    state = next(v for k, v in ckpt["callbacks"].items() if "PruningCallback" in k)
    assert state["method"] == "sparsegpt"
    for name, lin in prunable_linears(lm).items():
        assert torch.equal(state["masks"][name], callback.masks[name]), name
        assert not bool(lin.weight[~callback.masks[name].to(lin.weight.device)].any()), name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dampening=-1.0), "pruning.dampening=-1.0"),
        (dict(nm=[2, 4], sparsity=0, column_block=10), "pruning.column_block=10"),
    ],
)
def test_bad_sparsegpt_callback_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(LitPruneError, match=message):
        PruningCallback(method="sparsegpt", **kwargs)

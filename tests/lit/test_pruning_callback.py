"""PruningCallback inside fit: masks applied before training, exact, kept zero, checkpointed."""

from pathlib import Path

import pytest
import torch
from helpers import ROOT

from lit_prune.analysis.evaluate import harvest
from lit_prune.cli import lightning_cli
from lit_prune.lit.callbacks import PruningCallback
from lit_prune.models.registry import load_model
from lit_prune.pruning import prunable_linears
from lit_prune.sae.buffer import fit_norm_scale

pytestmark = pytest.mark.e2e  # Lightning fits (in process): the end-to-end lane


def _fit(tmp_path, local_corpus, model_cache, *extra):
    return lightning_cli(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            f"--model.model_cache_dir={model_cache}",
            f"--data.corpus={local_corpus}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            f"--model.export_dir={tmp_path / 'sae'}",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def pruned_fit(tmp_path_factory, local_corpus, model_cache):
    tmp_path = tmp_path_factory.mktemp("pruned_fit")
    cli = _fit(
        tmp_path,
        local_corpus,
        model_cache,
        "--config",
        str(ROOT / "configs" / "pruning" / "wanda50.yaml"),
        "--trainer.callbacks.init_args.perplexity_sequences=4",
    )
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, PruningCallback))
    return cli, callback, tmp_path


def test_pruned_weights_are_exactly_zero_after_fit(pruned_fit):
    cli, callback, _ = pruned_fit
    for name, linear in prunable_linears(cli.model.lm).items():
        keep = callback.masks[name]
        assert torch.all(linear.weight[~keep] == 0)
        d_out, d_in = keep.shape
        assert int((~keep).sum()) == d_out * (d_in // 2)  # wanda: floor(d_in * 0.5) per row


def test_norm_scale_is_fitted_on_the_dense_model(pruned_fit, model_cache):
    cli, _, _ = pruned_fit
    dense = load_model("tiny-llama", cache_dir=model_cache)
    ids = cli.datamodule.train_ids[: cli.model.hparams.norm_sequences]
    assert cli.model.norm_scale.item() == pytest.approx(fit_norm_scale(harvest(dense, ids, 1)), rel=1e-6)


def test_pruning_info_reaches_the_exported_sae(pruned_fit):
    import json

    _, callback, tmp_path = pruned_fit
    meta = json.loads((tmp_path / "sae" / "lit_prune.json").read_text())
    assert meta["pruning"]["method"] == "wanda" and meta["pruning"]["sparsity"] == 0.5
    assert meta["pruning"]["realised_sparsity"] == pytest.approx(0.5)
    assert meta["pruning"]["perplexity_pruned"] > 0


def test_masks_round_trip_through_the_checkpoint(pruned_fit, model_cache):
    cli, callback, _ = pruned_fit
    ckpt_path = next(Path(cli.trainer.logger.log_dir).glob("checkpoints/*.ckpt"))
    state = torch.load(ckpt_path, weights_only=False)["callbacks"]
    saved = next(v for k, v in state.items() if k.startswith("PruningCallback"))
    restored = PruningCallback(method="wanda", sparsity=0.5)
    restored.load_state_dict(saved)
    assert restored.masks.keys() == callback.masks.keys()
    assert all(torch.equal(restored.masks[k], callback.masks[k]) for k in callback.masks)


def test_resumed_callback_reapplies_saved_masks_without_recomputing(pruned_fit, model_cache):
    cli, callback, _ = pruned_fit
    module, trainer = cli.model, cli.trainer
    fresh = load_model("tiny-llama", cache_dir=model_cache)
    object.__setattr__(module, "lm", fresh)
    resumed = PruningCallback(method="wanda", sparsity=0.5, perplexity_sequences=0)
    resumed.load_state_dict(callback.state_dict())
    original = resumed.masks
    resumed.on_fit_start(trainer, module)
    assert resumed.masks is original
    for name, linear in prunable_linears(fresh).items():
        assert torch.all(linear.weight[~original[name]] == 0)


def test_masks_reapplied_when_lm_weights_train(pruned_fit):
    cli, callback, _ = pruned_fit
    lm = cli.model.lm
    name, linear = next(iter(prunable_linears(lm).items()))
    linear.weight.requires_grad_(True)
    try:
        with torch.no_grad():
            linear.weight.add_(1.0)  # an optimizer step that revives pruned weights
        callback.on_train_batch_end(cli.trainer, cli.model)
        assert torch.all(linear.weight[~callback.masks[name]] == 0)
    finally:
        linear.weight.requires_grad_(False)


def test_bad_pruning_settings_are_one_line_errors():
    from lit_prune.errors import LitPruneError

    with pytest.raises(LitPruneError, match="pruning.method='random'"):
        PruningCallback(method="random")
    with pytest.raises(LitPruneError, match="sparsity=1.0"):
        PruningCallback(sparsity=1.0)
    with pytest.raises(LitPruneError, match="sparsity=0.3"):
        PruningCallback(sparsity=0.3, nm=[2, 4])
    with pytest.raises(LitPruneError, match="pruning.perplexity_sequences=-5"):
        PruningCallback(perplexity_sequences=-5)
    with pytest.raises(LitPruneError, match="pruning.calibration_batch_size=0"):
        PruningCallback(calibration_batch_size=0)


def test_check_pattern_tells_rows_and_nm_groups_apart():
    from lit_prune.pruning import SparsityMismatch, check_pattern

    # keep-masks [2, 8], both pruning 8 of 16: 4 per row and 2 per group of 4 inputs ...
    even = {"w": torch.tensor([[0, 0, 1, 1, 0, 1, 0, 1], [1, 0, 0, 1, 1, 1, 0, 0]], dtype=torch.bool)}
    # ... or 5 / 3 per row and 2, 3, 0, 3 per group
    uneven = {"w": torch.tensor([[0, 0, 1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 0, 0, 1, 0]], dtype=torch.bool)}
    check_pattern(even, 0.5, "row")
    check_pattern(even, 0.5, nm=(2, 4))
    check_pattern(uneven, 0.5, "matrix")  # a magnitude mask may be uneven
    with pytest.raises(SparsityMismatch, match="2 of 2 rows do not have exactly 4"):
        check_pattern(uneven, 0.5, "row")
    with pytest.raises(SparsityMismatch, match="3 of 4 groups of 4 do not have exactly 2"):
        check_pattern(uneven, 0.5, nm=(2, 4))


def test_saved_masks_of_another_method_are_refused(pruned_fit, model_cache, tmp_path):
    from lit_prune.errors import LitPruneError
    from lit_prune.pruning import prune_model, save_masks

    cli, callback, _ = pruned_fit
    magnitude = tmp_path / "magnitude.safetensors"
    save_masks(
        prune_model(load_model("tiny-llama", cache_dir=model_cache), "magnitude", 0.5, progress=False),
        magnitude,
    )
    wanda = tmp_path / "wanda.safetensors"
    save_masks(callback.masks, wanda)
    for path, method, nm, message in (
        (magnitude, "wanda", None, "rows do not have exactly"),
        (wanda, "magnitude", [2, 4], "groups of 4 do not have exactly 2"),
    ):
        object.__setattr__(cli.model, "lm", load_model("tiny-llama", cache_dir=model_cache))
        given = PruningCallback(
            method=method, sparsity=0.0 if nm else 0.5, nm=nm, perplexity_sequences=0, masks_path=str(path)
        )
        with pytest.raises(
            LitPruneError,
            match=f"pruning.masks_path=.* is invalid: expected masks of method={method}.*{message}",
        ):
            given.on_fit_start(cli.trainer, cli.model)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(LitPruneError, match="pruning.masks_path=.*a masks file written by save_masks"):
        PruningCallback(masks_path=str(garbage))

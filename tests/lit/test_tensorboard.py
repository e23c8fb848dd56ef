"""A tiny pruned fit's TensorBoard: one meaning per name (docs/metric_names.md for the saebench/ aliases)."""

from pathlib import Path

import pytest
from helpers import ROOT
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lit_prune.cli import lightning_cli

pytestmark = pytest.mark.e2e  # Lightning fits (in process): the end-to-end lane


@pytest.fixture(scope="module")
def events(tmp_path_factory, local_corpus, model_cache):
    tmp = tmp_path_factory.mktemp("tensorboard")
    cli = lightning_cli(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            "--config",
            str(ROOT / "configs" / "pruning" / "magnitude50.yaml"),
            "--trainer.callbacks.init_args.perplexity_sequences=0",
            f"--model.model_cache_dir={model_cache}",
            f"--data.corpus={local_corpus}",
            f"--data.cache_dir={tmp / 'cache'}",
            f"--trainer.default_root_dir={tmp}",
            f"--trainer.logger.init_args.save_dir={tmp / 'logs'}",
            f"--model.export_dir={tmp / 'sae'}",
        ]
    )
    acc = EventAccumulator(str(Path(cli.trainer.logger.log_dir)), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def _last(acc, tag):
    return acc.Scalars(tag)[-1].value


def test_tags_have_one_meaning_each(events):
    scalars = events.Tags()["scalars"]
    # no stray top-level tags (the progress bar's fvu) beside val/fvu; hp_metric is TensorBoard's own,
    # epoch Lightning's (it adds it to every logged dict)
    assert sorted(t for t in scalars if "/" not in t) == ["epoch", "hp_metric"]
    # no one-point chart per pruned matrix: one histogram and one text table instead
    assert not [t for t in scalars if "model.layers" in t or t.startswith("pruning/sparsity/")]
    assert "pruning/sparsity_per_matrix" in events.Tags()["histograms"]
    assert any(t.startswith("pruning/sparsity_per_matrix") for t in events.Tags()["tensors"])  # the text
    assert "val/firing_rate_log10" in events.Tags()["histograms"]
    # the saebench/ section repeats our numbers under SAEBench's names, nothing else
    assert _last(events, "saebench/ce_loss_score") == pytest.approx(_last(events, "val/ce_recovered"))
    assert _last(events, "saebench/explained_variance") == pytest.approx(
        1 - _last(events, "val/fvu"), abs=1e-6
    )


def test_hp_metric_is_the_val_fvu(events):
    assert _last(events, "hp_metric") == pytest.approx(_last(events, "val/fvu"))
    assert _last(events, "hp_metric") != -1


def test_train_and_val_mse_are_on_one_scale(events):
    """mse / fvu is the activations' variance per element: the same raw-scale number for train and val
    (before, train/mse was on the normalised scale: off by norm_scale^2)."""
    train = _last(events, "train/mse") / _last(events, "train/fvu")
    val = _last(events, "val/mse") / _last(events, "val/fvu")
    assert 1 / 3 < train / val < 3

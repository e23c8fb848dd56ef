"""sae-lens runs our exported SAEs from cfg.json's metadata alone (tiny model, local corpus, offline)."""

import json
from pathlib import Path

import pytest
import torch
from helpers import ROOT
from sae_lens import SAE, ActivationsStore
from sae_lens.evals import EvalConfig, run_evals
from sae_lens.load_model import load_model
from sae_lens.training.activation_scaler import ActivationScaler

from lit_prune.cli import lightning_cli
from lit_prune.sae.io import hook_layer_of, module_hook_name


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, local_corpus, model_cache):
    """A tiny-llama fit (fast_dev_run) on a local corpus folder, exported to <tmp>/sae."""
    tmp = tmp_path_factory.mktemp("interop")
    cli = lightning_cli(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            f"--model.model_cache_dir={model_cache}",
            f"--data.corpus={local_corpus.parent}",  # a folder: what datasets.load_dataset reads
            f"--data.cache_dir={tmp / 'cache'}",
            f"--trainer.default_root_dir={tmp}",
            f"--trainer.logger.init_args.save_dir={tmp / 'logs'}",
            f"--model.export_dir={tmp / 'sae'}",
            "--trainer.fast_dev_run=true",
        ]
    )
    return cli, tmp / "sae"


def test_cfg_metadata_is_complete(fitted):
    cli, path = fitted
    meta = SAE.load_from_disk(path).cfg.metadata
    assert meta.model_class_name == "AutoModelForCausalLM"
    assert meta.model_name == str((Path(cli.model.hparams.model_cache_dir) / "tiny-llama").resolve())
    assert (
        meta.hook_name == module_hook_name(1)
        and meta.hook_name_transformer_lens == "blocks.1.hook_resid_post"
    )
    assert (meta.context_size, meta.prepend_bos) == (32, False)
    assert meta.dataset_path == str(cli.datamodule.hparams.corpus)
    assert list(meta.seqpos_slice) == [1, None]
    assert SAE.load_from_disk(path).cfg.normalize_activations == "none"
    record = json.loads((path / "lit_prune.json").read_text())
    assert record["metrics_saebench"]["ce_loss_score"] == pytest.approx(record["metrics"]["ce_recovered"])


def test_activations_store_from_sae_reads_our_hook(fitted):
    """sae-lens loads the LM and the corpus from the metadata, and its activations are our resid_post
    (HF hidden_states[L + 1]) at positions >= 1."""
    _, path = fitted
    sae = SAE.load_from_disk(path)
    meta = sae.cfg.metadata
    model = load_model(meta.model_class_name, meta.model_name, device="cpu")
    store = ActivationsStore.from_sae(
        model,
        sae,
        meta.dataset_path,
        streaming=False,
        store_batch_size_prompts=2,
        n_batches_in_buffer=2,
        train_batch_size_tokens=32,
        total_tokens=4096,
    )
    tokens = store.get_batch_tokens()
    assert tokens.shape == (2, meta.context_size)
    acts = store.get_activations(tokens)  # [batch, positions (1 on), d_in]
    with torch.no_grad():
        hidden = model.model(tokens, output_hidden_states=True).hidden_states[
            hook_layer_of(meta.hook_name) + 1
        ]
    torch.testing.assert_close(acts, hidden[:, 1:], rtol=1e-5, atol=1e-5)
    batch = store.next_batch()
    assert batch.shape == (32, sae.cfg.d_in)


def test_sae_lens_evals_run(fitted):
    """SAEBench-style metrics from sae-lens' own evals on our SAE (CE, KL, explained variance)."""
    _, path = fitted
    sae = SAE.load_from_disk(path)
    meta = sae.cfg.metadata
    model = load_model(meta.model_class_name, meta.model_name, device="cpu")
    store = ActivationsStore.from_sae(
        model, sae, meta.dataset_path, streaming=False, store_batch_size_prompts=2, n_batches_in_buffer=2
    )
    config = EvalConfig(
        n_eval_reconstruction_batches=1,
        compute_kl=True,
        compute_ce_loss=True,
        n_eval_sparsity_variance_batches=1,
        compute_variance_metrics=True,
    )
    metrics, _ = run_evals(sae, store, model, ActivationScaler(), config, exclude_special_tokens=False)
    ce = metrics["model_performance_preservation"]
    spliced, clean, ablated = ce["ce_loss_with_sae"], ce["ce_loss_without_sae"], ce["ce_loss_with_ablation"]
    assert ce["ce_loss_score"] == pytest.approx((ablated - spliced) / (ablated - clean), rel=1e-4)
    assert -1 <= metrics["reconstruction_quality"]["explained_variance"] <= 1


def test_saebench_aliases_and_their_table():
    from lit_prune.analysis.saebench import ALIASES, EXPLAINED_VARIANCE, saebench_metrics

    ours = {"ce_recovered": 0.9, "kl_score": 0.8, "cos": 0.95, "fvu": 0.25, "l2_ratio": 0.97, "mse": 1e-3}
    named = saebench_metrics({k: torch.tensor(v) for k, v in ours.items()})
    assert named == {
        "ce_loss_score": pytest.approx(0.9),
        "kl_div_score": pytest.approx(0.8),
        "cossim": pytest.approx(0.95),
        "l2_ratio": pytest.approx(0.97),
        "explained_variance": pytest.approx(0.75),
    }
    table = (ROOT / "docs" / "metric_names.md").read_text()
    for alias, name in ALIASES.items():
        assert f"| `{alias}` | `{name}` |" in table
    assert f"| `{EXPLAINED_VARIANCE}` | 1 - `fvu` |" in table

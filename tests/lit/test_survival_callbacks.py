"""RQ2 / RQ3 / RQ4 callbacks: reference checks, self-match, hand-made survival, and a tiny end-to-end fit."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT

from lit_prune.analysis.evaluate import evaluate_sae, harvest, sae_codec
from lit_prune.analysis.fragility import survival_by_bin
from lit_prune.analysis.matching import match_features
from lit_prune.analysis.results import read_arrays, read_rows
from lit_prune.analysis.survival import PearsonAccumulator, functional_survival
from lit_prune.analysis.survival_measures import survival_measurements
from lit_prune.analysis.transfer import (
    PairedPass,
    is_viable,
    paired_features,
    sae_input_sq_norm,
    wanda_prune_sae,
)
from lit_prune.errors import LitPruneError
from lit_prune.lit.survival_callback import FeatureSurvivalCallback
from lit_prune.lit.transfer_callback import TransferabilityCallback
from lit_prune.models.registry import load_model
from lit_prune.sae.build import SAESettings, build_training_sae
from lit_prune.sae.io import export_sae, load_sae

pytestmark = pytest.mark.e2e  # Lightning fits (in process): the end-to-end lane


# --- the reference SAE is checked at setup ---------------------------------------------------
def _fake_module(d_model=64, layer=1):
    return SimpleNamespace(
        lm=SimpleNamespace(config=SimpleNamespace(hidden_size=d_model)),
        hparams=SimpleNamespace(hook_layer=layer, model_name="tiny-llama"),
    )


def _export(path, d_in=64, layer=1, seed=0):
    sae = build_training_sae(SAESettings(expansion=2, k=4), d_in, seed)
    return export_sae(sae, path, 1.0, {"model": "tiny-llama", "hook_layer": layer, "seed": seed})


@pytest.mark.parametrize("callback", [TransferabilityCallback, FeatureSurvivalCallback])
def test_bad_reference_is_one_line_error_naming_the_field(tmp_path, callback):
    cases = {
        "reference_sae.d_in=16 is invalid": _export(tmp_path / "narrow", d_in=16),
        "reference_sae.hook_layer=2 is invalid": _export(tmp_path / "hook", layer=2),
    }
    foreign = _export(tmp_path / "foreign", layer=2)
    (foreign / "lit_prune.json").unlink()  # a foreign sae-lens SAE: only cfg.json records the hook
    cases["reference_sae.hook='model.layers.2' is invalid"] = foreign
    truncated = _export(tmp_path / "truncated")
    weights = truncated / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cases["reference_sae: sae_path="] = truncated
    for message, path in cases.items():
        with pytest.raises(LitPruneError) as err:
            callback(reference_sae=str(path)).setup(None, _fake_module(), "fit")
        assert message in str(err.value) and "\n" not in str(err.value)
    good = callback(reference_sae=str(_export(tmp_path / "good", seed=7)))
    good.setup(None, _fake_module(), "fit")
    assert good.reference_seed == 7 and good.reference.cfg.d_sae == 128


def test_bad_callback_settings_are_one_line_errors(tmp_path):
    with pytest.raises(LitPruneError, match="sae_prune_levels=1.0"):
        TransferabilityCallback("x", sae_prune_levels=(0.5, 1.0))
    with pytest.raises(LitPruneError, match="taus"):
        FeatureSurvivalCallback("x", taus=(0.7, 1.5))
    with pytest.raises(LitPruneError, match="matching='greedy'"):
        FeatureSurvivalCallback("x", matching="greedy")
    with pytest.raises(LitPruneError, match="candidates=0"):
        FeatureSurvivalCallback("x", candidates=0)
    with pytest.raises(LitPruneError, match="functional_threshold=5.0"):
        FeatureSurvivalCallback("x", functional_threshold=5.0)
    with pytest.raises(LitPruneError, match="seed_baseline=0.0"):
        FeatureSurvivalCallback("x", seed_baseline=0.0)
    with pytest.raises(LitPruneError, match=r"ce_factor, fvu_factor=\(-1.0, 2.0\)"):
        TransferabilityCallback("x", ce_factor=-1.0)


def test_rows_of_the_same_condition_and_epoch_are_replaced_not_duplicated(tmp_path):
    callback = FeatureSurvivalCallback("x", output_dir=str(tmp_path))
    row = {
        "model": "m",
        "hook": "h",
        "method": "wanda",
        "sparsity": 0.5,
        "seed_a": 0,
        "seed_b": 1,
        "epoch": 0,
        "metric": "S",
        "value": 0.1,
    }
    other = {**row, "method": "magnitude"}
    callback.write(None, [row, other])
    path = callback.write(None, [{**row, "value": 0.2}])
    assert sorted((r["method"], r["value"]) for r in read_rows(path)) == [("magnitude", 0.1), ("wanda", 0.2)]


# --- the measurement itself ------------------------------------------------------------------
@pytest.fixture(scope="module")
def dense_lm(model_cache):
    return load_model("tiny-llama", cache_dir=model_cache)


def test_dense_lm_is_a_shared_copy_only_when_the_run_was_pruned(dense_lm, model_cache):
    from lit_prune.lit.analysis_callbacks import dense_lm as get_dense
    from lit_prune.lit.analysis_callbacks import release_dense_lm

    pruned_lm = load_model("tiny-llama", cache_dir=model_cache)
    with torch.no_grad():
        pruned_lm.model.layers[0].mlp.up_proj.weight.zero_()
    from lightning.pytorch.utilities.parsing import AttributeDict  # what module.hparams is

    module = SimpleNamespace(
        pruning_info={"method": "dense"},
        lm_on_device=lambda: pruned_lm,
        device="cpu",
        hparams=AttributeDict(model_name="tiny-llama", model_cache_dir=str(model_cache)),
    )
    assert get_dense(module) is pruned_lm  # an unpruned run: its own LM
    module.pruning_info = {"method": "wanda", "sparsity": 0.5}
    copy = get_dense(module)
    assert copy is not pruned_lm and get_dense(module) is copy  # loaded once, then shared
    for (name, p), q in zip(copy.named_parameters(), dense_lm.parameters(), strict=True):
        assert torch.equal(p, q), name  # the dense weights, not the pruned ones
    release_dense_lm(module)
    assert get_dense(module) is not copy


def test_reference_matched_with_itself_survives_completely(dense_lm):
    sae = build_training_sae(SAESettings(expansion=2, k=4), 64, seed=0)
    ids = torch.randint(3, 512, (8, 16), generator=torch.Generator().manual_seed(0))
    paired = paired_features(dense_lm, dense_lm, 1, sae.encode, ids, batch_size=4)
    result = survival_measurements(sae.W_dec, sae.W_dec, sae.W_dec, paired, n_boot=20)
    assert all(result.metrics[tau]["S"] == 1.0 for tau in (0.5, 0.7, 0.9))
    overall = result.metrics[None]
    assert overall["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert overall["mmcs_reference_to_module"] == pytest.approx(1.0, abs=1e-6)
    assert (
        overall["init_cosine_mean"] == pytest.approx(1.0, abs=1e-6) and overall["init_near_fraction"] == 1.0
    )
    assert result.metrics[0.7]["functional_S"] == 1.0
    alive = result.arrays["alive"]
    assert overall["n_alive"] == alive.sum() > 0
    torch.testing.assert_close(
        result.arrays["pearson_r"][alive], torch.ones(int(alive.sum())), rtol=0, atol=1e-6
    )
    assert result.arrays["partner"].tolist() == list(range(128))


def test_survival_on_a_hand_made_condition():
    """Reference e1..e4 in R^8; the run keeps e1, e2, tilts e3 to cos 0.8, e4 (dead) to 0.3."""
    eye = torch.eye(8)
    ref = eye[:4]
    module = torch.stack(
        [eye[0], eye[1], 0.8 * eye[2] + 0.6 * eye[4], 0.3 * eye[3] + math.sqrt(0.91) * eye[5]]
    )
    g = torch.Generator().manual_seed(0)
    fires = torch.rand(400, 4, generator=g) < torch.tensor([0.5, 0.1, 0.02, 0.0])
    f_dense = fires * (1 + torch.rand(400, 4, generator=g))
    f_pruned = f_dense.clone()
    f_pruned[:, 2] = torch.rand(400, generator=g)  # feature 2's activations scrambled: r ~ 0
    acc = PearsonAccumulator()
    acc.update(f_dense, f_pruned)
    rate = fires.double().mean(0)
    paired = PairedPass(acc, rate, (f_pruned > 0).double().mean(0), 400)
    result = survival_measurements(
        ref, module, module, paired, n_bins=3, n_boot=20, seed_baseline=0.8, seed_baseline_tau=0.9
    )
    assert result.metrics[0.5]["S"] == 1.0 and result.metrics[0.7]["S"] == 1.0  # dead e4 is not counted
    assert result.metrics[0.9]["S"] == pytest.approx(2 / 3)
    assert result.metrics[0.9]["S_normalised"] == pytest.approx((2 / 3) / 0.8)
    assert result.metrics[0.7]["functional_S"] == pytest.approx(2 / 3)
    assert result.metrics[None]["n_alive"] == 3 and result.metrics[None]["mean_cosine"] == pytest.approx(
        2.8 / 3
    )
    # bins by firing rate (rarest first): feature 2 (cos 0.8) | feature 1 | feature 0
    assert result.arrays["bin"].tolist() == [2, 1, 0, -1]
    assert (
        torch.equal(result.arrays["max_activation"], f_dense.amax(0))
        and result.arrays["decoder_norm"].tolist() == [1] * 4
    )
    assert [result.metrics[0.9][f"survival_bin{b}"] for b in range(3)] == [0.0, 1.0, 1.0]
    assert result.metrics[0.9]["rho_bin"] == pytest.approx(math.sqrt(3) / 2)  # ranks (1,2,3) vs (1,2.5,2.5)
    for matching in ("hungarian", "exact", "sparse"):  # every solver finds this optimum
        other = survival_measurements(
            ref, module, module, paired, n_bins=3, n_boot=20, matching=matching, candidates=2
        )
        assert (
            torch.equal(other.arrays["partner"], result.arrays["partner"])
            and other.metrics[0.9]["S"] == 2 / 3
        )


# --- end to end: export a dense SAE, then fit on a Wanda-pruned model with both callbacks ----
def _fit(tmp_path, local_corpus, model_cache, name, *extra):
    from lit_prune.cli import lightning_cli

    return lightning_cli(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            f"--model.model_cache_dir={model_cache}",
            f"--data.corpus={local_corpus}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            "--data.train_tokens=2048",
            "--data.eval_tokens=512",
            "--model.ce_eval_sequences=4",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            f"--model.export_dir={tmp_path / name}",
            "--trainer.enable_progress_bar=false",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def analysed_fit(tmp_path_factory, local_corpus, model_cache):
    tmp_path = tmp_path_factory.mktemp("analysis_fit")
    _fit(tmp_path, local_corpus, model_cache, "dense", "--trainer.fast_dev_run=true")
    config = tmp_path / "analysis.yaml"
    config.write_text(
        "trainer:\n  callbacks+:\n"
        f"    - class_path: lit_prune.lit.transfer_callback.TransferabilityCallback\n"
        f"      init_args: {{reference_sae: {tmp_path / 'dense'}, sae_prune_levels: [0.5],"
        " at_fit_end: true}\n"
        f"    - class_path: lit_prune.lit.survival_callback.FeatureSurvivalCallback\n"
        f"      init_args: {{reference_sae: {tmp_path / 'dense'}, n_boot: 20, at_fit_end: true}}\n"
    )
    cli = _fit(
        tmp_path,
        local_corpus,
        model_cache,
        "pruned",
        "--config",
        str(ROOT / "configs" / "pruning" / "wanda50.yaml"),
        "--trainer.callbacks.init_args.perplexity_sequences=2",  # PruningCallback's (listed first)
        "--config",
        str(config),
        "--model.seed=1",
        "--data.shuffle_seed=1",
    )
    reference, _ = load_sae(tmp_path / "dense")
    results = Path(cli.trainer.log_dir) / "results"
    return cli, reference, results


def _value(rows, metric, **keys):
    """The one row's value (rows store NaN as null; read it back as NaN)."""
    (row,) = [r for r in rows if r["metric"] == metric and all(r[k] == v for k, v in keys.items())]
    return math.nan if row["value"] is None else row["value"]


def test_transfer_rows_equal_recomputation(analysed_fit, model_cache):
    cli, reference, results = analysed_fit
    rows = read_rows(results / "rq3_transfer.json")
    saes = {("reference", 0.0), ("retrained", 0.0), ("reference_wanda", 0.5)}
    assert {
        (r["method"], r["sparsity"], r["sae"], r["sae_sparsity"], r["epoch"], r["stage"]) for r in rows
    } == {
        ("dense", 0.0, "reference", 0.0, None, "dense"),
        *{("wanda", 0.5, sae, level, 0, "validation") for sae, level in saes},
        *{("wanda", 0.5, sae, level, None, "fit_end") for sae, level in saes},
    }
    assert {r["seed_a"] for r in rows} == {0} and {r["seed_b"] for r in rows} == {None, 1}
    ids, d_sae, module = cli.datamodule.eval_ids, reference.cfg.d_sae, cli.model
    dense = evaluate_sae(
        load_model("tiny-llama", cache_dir=model_cache), 1, sae_codec(reference), ids, d_sae, 8, 4
    )
    pruned = evaluate_sae(module.lm, 1, sae_codec(reference), ids, d_sae, 8, 4)
    calibration = harvest(module.lm, cli.datamodule.calibration_ids, 1)
    baseline = wanda_prune_sae(reference, sae_input_sq_norm(reference, calibration), 0.5)
    wanda = evaluate_sae(module.lm, 1, sae_codec(baseline), ids, d_sae, 8, 4)
    final = evaluate_sae(module.lm, 1, module.encode_decode, ids, module.sae.cfg.d_sae, 8, 4)
    for metric in ("fvu", "l0", "ce_recovered", "kl_score", "delta_lm_loss", "dead_fraction"):
        assert _value(rows, metric, stage="dense") == pytest.approx(dense[metric], rel=1e-6), metric
        for stage in ("validation", "fit_end"):
            assert _value(rows, metric, sae="reference", stage=stage) == pytest.approx(
                pruned[metric], rel=1e-6
            )
            assert _value(rows, metric, sae="reference_wanda", stage=stage) == pytest.approx(
                wanda[metric], rel=1e-5
            )
        # retrained: the module's own validation metrics, then its final (exported) SAE
        assert _value(rows, metric, sae="retrained", stage="validation") == module.last_val[metric]
        assert _value(rows, metric, sae="retrained", stage="fit_end") == pytest.approx(
            final[metric], rel=1e-6
        )
        # the last training step drains the activation buffer, so validation already saw the final SAE
        assert module.last_val[metric] == pytest.approx(final[metric], rel=1e-6)
    assert _value(rows, "viable", sae="reference", stage="fit_end") == float(is_viable(pruned, dense))
    assert _value(rows, "l0_ratio", sae="reference", stage="fit_end") == pytest.approx(
        pruned["l0"] / dense["l0"]
    )
    assert pruned["ce_clean"] != pytest.approx(
        dense["ce_clean"]
    )  # measured against the pruned model's own CE


def test_survival_rows_equal_arrays_and_recomputation(analysed_fit, model_cache):
    cli, reference, results = analysed_fit
    rows = read_rows(results / "rq2_survival.json")
    arrays = read_arrays(results / "rq2_survival.safetensors")
    fields = ("method", "sparsity", "seed_a", "seed_b", "same_seed", "epoch", "stage")
    keys = {tuple(r[f] for f in fields) for r in rows}
    assert keys == {
        ("wanda", 0.5, 0, 1, False, 0, "validation"),
        ("wanda", 0.5, 0, 1, False, None, "fit_end"),
    }
    rows = [r for r in rows if r["stage"] == "fit_end"]  # the arrays are the latest (fit end) measurement
    alive, cos, r = arrays["alive"], arrays["matched_cosine"], arrays["pearson_r"]
    for tau in (0.5, 0.7, 0.9):
        assert _value(rows, "S", tau=tau) == pytest.approx(float((cos[alive] >= tau).double().mean()))
        expected = survival_by_bin(cos, arrays["firing_rate"], tau)
        assert [_value(rows, f"survival_bin{b}", tau=tau) for b in range(5)] == pytest.approx(
            expected, nan_ok=True
        )
    assert _value(rows, "functional_S", tau=0.7) == pytest.approx(float((r[alive] >= 0.7).double().mean()))
    assert _value(rows, "n_alive", tau=None) == alive.sum()
    # recompute from scratch: reference on the dense and the pruned LM over the same eval tokens
    ids = cli.datamodule.eval_ids
    with torch.no_grad():
        f_dense = reference.encode(harvest(load_model("tiny-llama", cache_dir=model_cache), ids, 1))
        f_pruned = reference.encode(harvest(cli.model.lm, ids, 1))
    torch.testing.assert_close(arrays["firing_rate"], (f_dense > 0).double().mean(0))
    torch.testing.assert_close(arrays["firing_rate_current"], (f_pruned > 0).double().mean(0))
    torch.testing.assert_close(r, functional_survival(f_dense, f_pruned).r, equal_nan=True)
    match = match_features(reference.W_dec, cli.model.sae.W_dec)  # the final SAE, as exported
    torch.testing.assert_close(cos, match.cosine, equal_nan=True)
    assert torch.equal(arrays["partner"], match.partner)
    # the init decoder is the module SAE's own init (seed 1), and init_cosine is measured against it
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, FeatureSurvivalCallback))
    init = build_training_sae(cli.model.settings, 64, seed=1).W_dec
    assert torch.equal(callback.init_decoder, init)
    unit = lambda w: w / w.norm(dim=1, keepdim=True)  # noqa: E731
    torch.testing.assert_close(arrays["init_cosine"], (unit(cli.model.sae.W_dec) * unit(init)).sum(1))


def test_scalars_and_figures_reach_tensorboard(analysed_fit):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli, _, results = analysed_fit
    events = EventAccumulator(cli.trainer.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {
        "rq2/matched_cosine_hist",
        "rq4/survival_by_firing_rate_bin",
        "rq4/firing_rate_hist",
    }
    rows = read_rows(results / "rq2_survival.json")
    for stage, point in (("validation", 0), ("fit_end", -1)):
        assert events.Scalars("rq2/S@0.7")[point].value == pytest.approx(
            _value(rows, "S", tau=0.7, stage=stage), rel=1e-6
        )
    transfer = read_rows(results / "rq3_transfer.json")
    assert events.Scalars("rq3/retrained/fvu")[-1].value == pytest.approx(
        _value(transfer, "fvu", sae="retrained", stage="fit_end"), rel=1e-6
    )
    assert "rq4/rho_feature" in events.Tags()["scalars"]

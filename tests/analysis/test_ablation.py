"""RQ5 feature ablation and attribution: error term kept, hand-computed splices, batching, fit callback."""

import math

import numpy as np
import pytest
import torch
from helpers import ROOT
from scipy import stats as sps

from lit_prune.analysis.ablation import (
    SAEParts,
    ablate_feature_effect,
    ablate_features,
    ablated_logits,
    bh_correct,
    decoder_directions,
    firing_rates,
    gradient_attribution,
    importance_vs_survival,
    sae_parts,
    select_features,
)
from lit_prune.analysis.evaluate import sae_codec
from lit_prune.analysis.metrics import loss_positions, next_token_ce, next_token_kl, spliced_forward
from lit_prune.models.hooks import capture_resid_post, splice_resid_post, valid_positions
from lit_prune.models.registry import load_model
from lit_prune.sae.build import SAESettings, build_training_sae

LAYER, DEAD = 1, 5


@pytest.fixture(scope="module")
def lm(model_cache):
    return load_model("tiny-llama", cache_dir=model_cache)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 512, (4, 16), generator=torch.Generator().manual_seed(0))


def _sae(dtype=torch.float32):
    sae = build_training_sae(SAESettings(expansion=2, k=4), d_in=64, seed=0).to(dtype)
    with torch.no_grad():
        sae.b_enc[DEAD] = -1e4  # never in the top k, never positive: a feature that never fires
    return sae


def _busiest(lm, ids, parts, n):
    """The n features firing on the most positions (all fire somewhere)."""
    rate = firing_rates(lm, LAYER, ids, parts)
    return rate.argsort(descending=True, stable=True)[:n]


def test_parts_are_the_sae_codec(lm, ids):
    sae = _sae()
    x = capture_resid_post(lm, ids, LAYER)[:, 1:].flatten(0, 1)
    for scale in (1.0, 2.5):
        with torch.no_grad():
            for a, b in zip(sae_parts(sae, scale)(x), sae_codec(sae, scale)(x), strict=False):
                assert torch.equal(a, b)


def test_never_firing_feature_changes_nothing_error_term_kept(lm, ids):
    sae = _sae()
    parts = sae_parts(sae, 1.0)
    mask = torch.ones_like(ids)
    valid = valid_positions(mask)
    clean = spliced_forward(lm, ids, mask, LAYER, valid, None)
    recon = spliced_forward(lm, ids, mask, LAYER, valid, lambda x: parts(x)[1])
    assert (recon - clean).abs().max() > 1e-3  # the SAE reconstructs imperfectly...
    assert firing_rates(lm, LAYER, ids, parts)[DEAD] == 0
    assert torch.equal(ablated_logits(lm, LAYER, ids, parts, DEAD), clean)  # ...yet the error term is kept
    for scope in ("firing", "all"):
        assert ablate_feature_effect(lm, LAYER, ids, parts, DEAD, scope) == {
            "ce": 0.0,
            "kl": 0.0,
            "n_tokens": 0,
        }
    batched = ablate_features(lm, LAYER, ids, parts, torch.tensor([DEAD]))
    assert all(float(v[0]) == 0 for v in batched.values())


def test_ablation_equals_hand_computed_splice(lm, ids):
    sae, scale = _sae(), 2.0
    parts = sae_parts(sae, scale)
    mask = torch.ones_like(ids)
    valid = valid_positions(mask)
    (feature,) = _busiest(lm, ids, parts, 1).tolist()
    with torch.no_grad():
        x = capture_resid_post(lm, ids, LAYER)
        f_i = sae.encode(x * scale)[..., feature]  # [b, seq]
        w = sae.W_dec[feature] / sae.W_dec[feature].norm()  # TopK decodes with unit-norm rows
        delta = f_i[..., None] * w / scale
        clean = spliced_forward(lm, ids, mask, LAYER, valid, None)
        ablated = spliced_forward(lm, ids, mask, LAYER, valid, lambda xv: xv - delta[valid])
    fires = (f_i > 0) & valid
    pos = loss_positions(valid)
    firing = fires[:, :-1] & pos
    ce = next_token_ce(ablated, ids) - next_token_ce(clean, ids)
    kl = next_token_kl(clean, ablated)
    n = int(firing.sum())
    assert n > 0 and (fires.sum(1) > 0).sum() >= 2
    expect = {
        "firing": (ce[firing].sum() / n, kl[firing].sum() / n),
        "all": (ce[pos].sum() / n, kl[pos].sum() / n),
    }  # non-firing rows and earlier positions: ~0
    for scope, (ce_ref, kl_ref) in expect.items():
        got = ablate_feature_effect(lm, LAYER, ids, parts, feature, scope)
        assert got["n_tokens"] == n
        assert got["ce"] == pytest.approx(float(ce_ref), rel=1e-4, abs=1e-6)
        assert got["kl"] == pytest.approx(float(kl_ref), rel=1e-4, abs=1e-7)
    assert expect["firing"][1] > 0


def test_batched_multi_feature_ablation_equals_one_at_a_time(lm, ids):
    parts = sae_parts(_sae(), 1.5)
    features = torch.cat([_busiest(lm, ids, parts, 3), torch.tensor([DEAD])])
    single = {
        (f, scope): ablate_feature_effect(lm, LAYER, ids, parts, f, scope)
        for f in features.tolist()
        for scope in ("firing", "all")
    }
    for batch_size in (3, 16):  # pairs split across forwards / all in one forward
        batched = ablate_features(lm, LAYER, ids, parts, features, batch_size=batch_size)
        for j, feature in enumerate(features.tolist()):
            for scope in ("firing", "all"):
                one = single[feature, scope]
                assert int(batched["n_tokens"][j]) == one["n_tokens"]
                assert float(batched[f"ce_{scope}"][j]) == pytest.approx(one["ce"], rel=1e-4, abs=1e-6)
                assert float(batched[f"kl_{scope}"][j]) == pytest.approx(one["kl"], rel=1e-4, abs=1e-7)
    assert (batched["ce_firing"][:3] != 0).all() and (batched["n_tokens"][:3] > 0).all()


def test_max_sequences_ablates_only_each_features_first_firing_sequences(lm, ids):
    """A cap of k sequences per feature equals ablating on the first k sequences where it fires,
    across chunk boundaries (batch_size 1: one sequence per chunk); a cap >= the sequences: no cap."""
    parts = sae_parts(_sae(), 1.5)
    features = torch.cat([_busiest(lm, ids, parts, 3), torch.tensor([DEAD])])
    full = ablate_features(lm, LAYER, ids, parts, features, batch_size=1)
    uncapped = ablate_features(lm, LAYER, ids, parts, features, batch_size=1, max_sequences=4)
    assert all(torch.allclose(full[k].double(), v.double()) for k, v in uncapped.items())
    capped = ablate_features(lm, LAYER, ids, parts, features, batch_size=1, max_sequences=2)
    for j, feature in enumerate(features.tolist()):
        fired = [
            ablate_feature_effect(lm, LAYER, ids[r : r + 1], parts, feature)["n_tokens"] > 0 for r in range(4)
        ]
        fires = torch.tensor(fired).nonzero().flatten()[:2]
        assert int(capped["n_sequences"][j]) == len(fires)
        if len(fires):
            one = ablate_feature_effect(lm, LAYER, ids[fires], parts, feature)
            assert int(capped["n_tokens"][j]) == one["n_tokens"]
            assert float(capped["ce_firing"][j]) == pytest.approx(one["ce"], rel=1e-4, abs=1e-6)


def test_attribution_matches_exact_ablation_for_small_perturbations(model_cache, ids):
    lm = load_model("tiny-llama", cache_dir=model_cache).to(torch.float64)  # no LM rounding in small deltas
    sae, gain = _sae(torch.float64), 3.0
    # decoder rows scaled (encoder untouched) so that f_i W_dec,i is ~1% of ||x||: small, yet far above
    # the fp32 rounding of the CE values (~5e-7 nats)
    parts = SAEParts(encode=lambda x: sae.encode(x), decode=lambda f: sae.decode(f * gain))
    x = capture_resid_post(lm, ids, LAYER)[:, 1:].flatten(0, 1)
    with torch.no_grad():
        assert (parts.encode(x).amax(-1) * gain / x.norm(dim=-1)).max() < 0.02  # unit-norm decoder rows
    attribution = gradient_attribution(lm, LAYER, ids, parts, batch_size=3)
    features = attribution.abs().argsort(descending=True)[:4]
    exact = ablate_features(lm, LAYER, ids, parts, torch.cat([features, torch.tensor([DEAD])]))
    assert attribution[DEAD] == 0 and attribution.shape == (128,)
    for j, feature in enumerate(features.tolist()):
        assert abs(exact["ce_all"][j]) > 1e-3
        assert float(attribution[feature]) == pytest.approx(float(exact["ce_all"][j]), rel=0.05)


def test_attribution_is_the_hand_computed_gradient_product(lm, ids):
    sae = _sae()
    parts = sae_parts(sae, 1.0)
    mask = torch.ones_like(ids)
    valid = valid_positions(mask)
    x = capture_resid_post(lm, ids, LAYER, stop=False).clone().requires_grad_(True)
    with torch.enable_grad(), splice_resid_post(lm, LAYER, lambda _: x):  # x: the activation as a leaf
        logits = lm(input_ids=ids, use_cache=False).logits
        next_token_ce(logits, ids)[loss_positions(valid)].sum().backward()
    f = sae.encode(x.detach())[valid].detach()  # [n, d_sae]
    d = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True)
    counted = torch.cat([loss_positions(valid), torch.zeros(4, 1, dtype=torch.bool)], 1)[valid]
    n = ((f > 0) & counted[:, None]).sum(0).clamp(min=1)
    expected = -(f * (x.grad[valid] @ d.detach().T)).sum(0) / n
    torch.testing.assert_close(
        gradient_attribution(lm, LAYER, ids, parts).float(), expected, rtol=1e-4, atol=1e-6
    )


def test_select_features_hand_computed():
    rate = torch.tensor([0.0, 0.5, 0.1, 0.3, 0.01, 0.0, 0.2, 0.05, 0.1])
    groups = select_features(rate, n_top=2, n_random=10, n_rare=2, seed=0)
    assert groups["top"].tolist() == [1, 3]
    assert groups["rare"].tolist() == [4, 7]
    assert groups["random"].tolist() == [2, 6, 8]  # all that is left; dead 0 and 5 never appear
    small = select_features(rate, n_top=1, n_random=2, n_rare=1, seed=3)
    assert small["top"].tolist() == [1] and small["rare"].tolist() == [4]
    assert len(small["random"]) == 2 and set(small["random"].tolist()) <= {2, 3, 6, 7, 8}
    assert torch.equal(small["random"], select_features(rate, 1, 2, 1, seed=3)["random"])


def test_importance_vs_survival_matches_scipy():
    imp = np.array([0.3, 0.1, 0.7, 0.05, 0.9, 0.2, 0.6, 0.4])
    cos = np.array([0.8, 0.5, 0.95, 0.3, 0.6, 0.75, 0.9, 0.2])
    survived = cos >= 0.7
    out = importance_vs_survival(torch.tensor(imp), torch.tensor(cos), torch.tensor(survived))
    rho = sps.spearmanr(imp, cos)
    mw = sps.mannwhitneyu(imp[survived], imp[~survived], alternative="two-sided")
    assert out["spearman_rho"] == pytest.approx(rho.statistic) and out["spearman_p"] == pytest.approx(
        rho.pvalue
    )
    assert out["mannwhitney_u"] == pytest.approx(mw.statistic) and out["mannwhitney_p"] == pytest.approx(
        mw.pvalue
    )
    assert (out["n_survived"], out["n_lost"]) == (4, 4)
    corrected = bh_correct([out, {**out, "spearman_p": 0.01, "mannwhitney_p": 0.5}])
    for key in ("spearman_p", "mannwhitney_p"):
        ref = sps.false_discovery_control([r[key] for r in (out, corrected[1])])
        assert [r[f"{key}_bh"] for r in corrected] == pytest.approx(list(ref))


@pytest.mark.e2e
def test_callback_in_fit_writes_rows_equal_to_arrays(tmp_path, local_corpus, model_cache):
    from lit_prune.analysis.results import read_arrays, read_rows
    from lit_prune.cli import lightning_cli
    from lit_prune.lit.ablation_callback import AblationCallback

    out = tmp_path / "rq5"
    cli = lightning_cli(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "tiny.yaml"),
            f"--model.model_cache_dir={model_cache}",
            f"--data.corpus={local_corpus}",
            f"--data.cache_dir={tmp_path / 'cache'}",
            "--data.train_tokens=2048",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
            f"--model.export_dir={tmp_path / 'sae'}",
            "--trainer.callbacks+=lit_prune.lit.ablation_callback.AblationCallback",
            "--trainer.callbacks.n_top=4",
            "--trainer.callbacks.n_random=4",
            "--trainer.callbacks.n_rare=4",
            "--trainer.callbacks.eval_sequences=4",
            f"--trainer.callbacks.output_dir={out}",
        ]
    )
    assert any(isinstance(c, AblationCallback) for c in cli.trainer.callbacks)
    arrays = read_arrays(out / "results" / "rq5_ablation.safetensors")
    rows = {(r["metric"], r["group"]): r for r in read_rows(out / "results" / "rq5_ablation.json")}
    row = rows[("ablation_ce_firing_mean", "top")]
    assert row["model"] == "tiny-llama" and row["hook"] == "blocks.1.hook_resid_post"
    assert (row["method"], row["sparsity"], row["seed_a"], row["epoch"]) == ("dense", 0.0, 0, 0)
    assert arrays["features"].shape == (12,) and arrays["firing_rate"].shape == (256,)
    assert (arrays["firing_rate"][arrays["features"]] > 0).all()
    for gi, group in enumerate(("top", "random", "rare")):
        take = arrays["group"] == gi
        assert rows[("n_features", group)]["value"] == 4
        for key in ("ce_firing", "kl_firing", "ce_all", "kl_all"):
            want = float(arrays[f"exact_{key}"][take].mean())
            assert rows[(f"ablation_{key}_mean", group)]["value"] == pytest.approx(want, rel=1e-12, abs=1e-15)
        attr = arrays["attribution"][arrays["features"][take]].double()
        assert rows[("attribution_mean", group)]["value"] == pytest.approx(float(attr.mean()))
    rho = sps.spearmanr(arrays["exact_ce_all"].numpy(), arrays["attribution"][arrays["features"]].numpy())
    got = rows[("spearman_ce_all_vs_attribution", "selected")]["value"]
    assert (got is None and math.isnan(rho.statistic)) or got == pytest.approx(rho.statistic)
    top_rates = arrays["firing_rate"][arrays["features"][:4]]
    assert torch.equal(top_rates, arrays["firing_rate"].sort(descending=True).values[:4])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(cli.trainer.log_dir))
    events.Reload()
    assert "rq5/exact_vs_attribution" in events.Tags()["images"]
    (logged,) = events.Scalars("rq5/ablation_ce_firing_mean/top")
    assert logged.value == pytest.approx(rows[("ablation_ce_firing_mean", "top")]["value"], rel=1e-6)


@pytest.mark.parametrize("chunk", [1, 5, 128, 1024])
def test_decoder_directions_in_any_chunking_equal_decoding_the_whole_identity(chunk):
    """d_i = dec(e_i) - dec(0), decoded chunk by chunk, equals decoding the full [d_sae, d_sae] eye."""
    sae, parts = _sae(), sae_parts(_sae(), scale=2.0)
    eye = torch.eye(sae.cfg.d_sae)
    expected = parts.decode(eye) - parts.decode(torch.zeros(1, sae.cfg.d_sae))
    directions = decoder_directions(parts, sae.cfg.d_sae, sae.W_dec, chunk)
    torch.testing.assert_close(directions, expected, rtol=0, atol=0)
    assert not torch.equal(directions[0], directions[1])


def test_groups_smaller_than_asked_are_warned_about():
    from lit_prune.lit.ablation_callback import AblationCallback

    callback = AblationCallback(n_top=4, n_random=3, n_rare=2)
    metrics = {"n_features:top": 4.0, "n_features:random": 1.0, "n_features:rare": 2.0, "n_alive:all": 7.0}
    with pytest.warns(
        UserWarning, match=r"ablation.n_random=3: only 1 alive features .* \(7 alive in all\)"
    ) as caught:
        callback._warn_if_short(metrics)
    assert len(caught) == 1

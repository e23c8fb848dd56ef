"""RQ3 core: viability rule, SAE Wanda pruning (hand-computed), local metrics, paired passes."""

import math

import pytest
import torch

from lit_prune.analysis.evaluate import evaluate_sae, harvest, sae_codec
from lit_prune.analysis.transfer import (
    is_viable,
    l0_ratio,
    largest_viable_sparsity,
    paired_features,
    sae_feature_sq_norm,
    sae_input_sq_norm,
    transfer_metrics,
    wanda_prune_sae,
)
from lit_prune.errors import LitPruneError
from lit_prune.models.registry import load_model
from lit_prune.pruning.wanda import wanda_mask_reference
from lit_prune.sae.build import SAESettings, build_training_sae

# --- viability -------------------------------------------------------------------------------
DENSE = {"ce_recovered": 0.95, "fvu": 0.10}


@pytest.mark.parametrize(
    "ce, fvu, expected",
    [
        (0.90, 0.15, True),  # 0.90 >= 0.855 and 0.15 <= 0.20
        (0.855, 0.20, True),  # both bounds are inclusive
        (0.85, 0.15, False),  # CE recovered below 0.9 x 0.95
        (0.94, 0.21, False),  # FVU above 2 x 0.10
        (math.nan, 0.1, False),  # unmeasured is never viable
    ],
)
def test_viability_rule_on_hand_made_numbers(ce, fvu, expected):
    assert is_viable({"ce_recovered": ce, "fvu": fvu}, DENSE) is expected


def test_viability_factors_are_options():
    assert not is_viable({"ce_recovered": 0.90, "fvu": 0.15}, DENSE, ce_factor=0.99)
    assert is_viable({"ce_recovered": 0.90, "fvu": 0.25}, DENSE, fvu_factor=3.0)


def test_largest_viable_sparsity_stops_at_first_failure():
    assert largest_viable_sparsity({0.0: True, 0.3: True, 0.5: True, 0.6: False}) == 0.5
    assert largest_viable_sparsity({0.5: True, 0.3: False, 0.6: True}) is None  # unsorted input, lowest fails
    assert largest_viable_sparsity({0.1: True, 0.2: False, 0.3: True}) == 0.1  # no recovery past a failure
    assert largest_viable_sparsity({}) is None


def test_l0_ratio():
    assert l0_ratio(48.0, 32.0) == 1.5
    assert math.isnan(l0_ratio(3.0, 0.0))


# --- SAE Wanda pruning -----------------------------------------------------------------------
def _hand_sae():
    """Standard SAE, d_in = d_sae = 4, with a hand-set encoder (rows = W_enc^T rows = features)."""
    sae = build_training_sae(SAESettings(architecture="standard", expansion=1), d_in=4, seed=0)
    enc_t = torch.tensor(
        [[1.0, -2.0, 3.0, 4.0], [4.0, 3.0, -2.0, 1.0], [3.0, 0.5, 1.0, 0.1], [-1.0, 1.0, -8.0, 0.1]]
    )
    with torch.no_grad():
        sae.W_enc.copy_(enc_t.T)
        sae.W_dec.copy_(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))
    return sae, enc_t


def test_wanda_prune_sae_at_zero_equals_original():
    sae, _ = _hand_sae()
    pruned = wanda_prune_sae(sae, torch.ones(4), 0.0)
    assert pruned is not sae
    for name, param in sae.state_dict().items():
        assert torch.equal(pruned.state_dict()[name], param), name


def test_wanda_prune_sae_half_prunes_lowest_weight_times_input_norm_per_feature():
    sae, enc_t = _hand_sae()
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    sq = torch.tensor([1.0, 4.0, 0.25, 16.0])  # input norms ||x_j|| = 1, 2, 0.5, 4
    pruned = wanda_prune_sae(sae, sq, 0.5)
    # scores |W| * ||x||: [1, 4, 1.5, 16] | [4, 6, 1, 4] (tie: lower column first) | [3, 1, 0.5, 0.4]
    # | [1, 2, 4, 0.4]
    keep = torch.tensor(
        [
            [False, True, False, True],
            [False, True, False, True],
            [True, True, False, False],
            [False, True, True, False],
        ]
    )
    torch.testing.assert_close(pruned.W_enc.T, enc_t * keep, rtol=0, atol=0)
    assert ((pruned.W_enc.T == 0).sum(1) == 2).all()  # floor(4 * 0.5) per feature
    assert torch.equal(pruned.W_dec, sae.W_dec)  # decoder dense by default
    assert torch.equal(pruned.b_enc, sae.b_enc) and torch.equal(pruned.b_dec, sae.b_dec)
    for name, param in sae.state_dict().items():  # the original is untouched
        assert torch.equal(param, before[name]), name


def test_wanda_prune_sae_decoder_uses_feature_norms():
    sae, _ = _hand_sae()
    fsq = torch.tensor([9.0, 0.01, 1.0, 4.0])
    pruned = wanda_prune_sae(sae, torch.ones(4), 0.5, feature_sq_norm=fsq)
    keep = wanda_mask_reference(sae.W_dec.T, fsq, 0.5)  # naive per-output-dim sort: [d_in, d_sae]
    torch.testing.assert_close(pruned.W_dec, sae.W_dec * keep.T, rtol=0, atol=0)
    assert ((pruned.W_dec.T == 0).sum(1) == 2).all()
    with pytest.raises(LitPruneError, match="feature_sq_norm.shape"):
        wanda_prune_sae(sae, torch.ones(4), 0.5, feature_sq_norm=torch.ones(3))
    with pytest.raises(LitPruneError, match="sae_prune_level=1.0"):
        wanda_prune_sae(sae, torch.ones(4), 1.0)


def test_calibration_norms_are_what_the_matmuls_read():
    sae, _ = _hand_sae()
    with torch.no_grad():
        sae.b_dec.copy_(torch.tensor([1.0, 0.0, -1.0, 2.0]))
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(2))
    shift = sae.b_dec if sae.cfg.apply_b_dec_to_input else torch.zeros(4)
    torch.testing.assert_close(sae_input_sq_norm(sae, x), (x - shift).pow(2).mean(0))
    with torch.no_grad():
        torch.testing.assert_close(sae_feature_sq_norm(sae, x, 2.0), sae.encode(2.0 * x).pow(2).mean(0))


# --- metrics on a tiny model -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(model_cache):
    lm = load_model("tiny-llama", cache_dir=model_cache)
    sae = build_training_sae(SAESettings(expansion=2, k=4), 64, seed=0)
    ids = torch.randint(3, 512, (6, 16), generator=torch.Generator().manual_seed(0))
    return lm, sae, ids


def test_transfer_metrics_equal_evaluate_sae_and_give_firing_rates(tiny):
    lm, sae, ids = tiny
    metrics, rates = transfer_metrics(lm, 1, sae_codec(sae, 0.5), ids, 128, batch_size=4, ce_sequences=3)
    expected = evaluate_sae(lm, 1, sae_codec(sae, 0.5), ids, 128, batch_size=4, ce_sequences=3)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert metrics["alive_fraction"] == pytest.approx(1 - expected["dead_fraction"])
    with torch.no_grad():
        feats = sae.encode(harvest(lm, ids, 1) * 0.5)
    torch.testing.assert_close(rates, (feats > 0).double().mean(0))
    assert metrics["tokens"] == 6 * 15  # position 0 excluded


def test_paired_features_of_one_model_with_itself(tiny):
    lm, sae, ids = tiny
    paired = paired_features(lm, lm, 1, sae.encode, ids, batch_size=4)
    assert paired.tokens == 6 * 15
    torch.testing.assert_close(paired.rate_dense, paired.rate_current)
    r = paired.acc.compute()
    alive = paired.rate_dense > 0
    assert alive.any()
    torch.testing.assert_close(r[alive], torch.ones(int(alive.sum())), rtol=0, atol=1e-6)

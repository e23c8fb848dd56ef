import math

import pytest
import torch
import torch.nn.functional as F

from lit_prune.analysis.metrics import (
    ReconstructionMetrics,
    SplicedCEMetrics,
    ce_recovered,
    fvu,
    kl_score,
    loss_positions,
    next_token_ce,
    next_token_kl,
    spliced_forward,
)
from lit_prune.models.hooks import capture_resid_post, valid_positions
from lit_prune.models.registry import load_model


def _recon(x, x_hat, feats):
    metric = ReconstructionMetrics(x.shape[1], feats.shape[1])
    metric.update(x, x_hat, feats)
    return metric.compute()


def test_reconstruction_metrics_hand_computed():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean (2, 0): total variance 2
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 0.0]])  # one squared error of 1
    feats = torch.tensor([[0.5, 0.0, 0.0], [2.0, 1.0, 0.0]])
    out = _recon(x, x_hat, feats)
    assert out["fvu"].item() == pytest.approx(0.5)
    assert out["mse"].item() == pytest.approx(0.25)
    assert out["l0"].item() == pytest.approx(1.5)
    assert out["cos"].item() == pytest.approx((1 / math.sqrt(2) + 1) / 2)
    assert out["dead_fraction"].item() == pytest.approx(1 / 3)
    assert out["dense_fraction"].item() == pytest.approx(2 / 3)


def test_fvu_end_points_and_streaming():
    x = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))
    feats = torch.rand(100, 16)
    assert _recon(x, x, feats)["fvu"].item() == pytest.approx(0.0, abs=1e-12)
    assert _recon(x, x.mean(0).expand_as(x), feats)["fvu"].item() == pytest.approx(1.0)
    streamed = ReconstructionMetrics(8, 16)
    noisy = x + 0.3 * torch.randn_like(x)
    for chunk in range(0, 100, 30):
        streamed.update(x[chunk : chunk + 30], noisy[chunk : chunk + 30], feats[chunk : chunk + 30])
    assert streamed.compute()["fvu"].item() == pytest.approx(_recon(x, noisy, feats)["fvu"].item(), rel=1e-9)


def test_ce_recovered_and_kl_score_formulas():
    assert ce_recovered(ce_clean=2.0, ce_sae=2.5, ce_zero=12.0) == pytest.approx(0.95)
    assert kl_score(kl_sae=0.5, kl_zero=10.0) == pytest.approx(0.95)
    # undefined when ablating the hook costs nothing: NaN, never -inf or a ZeroDivisionError
    assert math.isnan(ce_recovered(ce_clean=2.0, ce_sae=2.5, ce_zero=2.0))
    assert math.isnan(kl_score(kl_sae=0.0, kl_zero=0.0))
    t = torch.tensor
    assert torch.isnan(
        ce_recovered(t(2.0, dtype=torch.float64), t(2.5, dtype=torch.float64), t(2.0, dtype=torch.float64))
    )
    assert kl_score(t(0.5), t(10.0)).item() == pytest.approx(0.95)
    assert torch.isnan(fvu(t(1.0), t(4.0), t([2.0]), t(1.0)))  # constant activations: no variance


@pytest.fixture(scope="module")
def tiny_lm(model_cache):
    return load_model("tiny-llama", cache_dir=model_cache)


def _spliced_metrics(model, replace):
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    valid = valid_positions(mask)
    metric = SplicedCEMetrics()
    clean = spliced_forward(model, ids, mask, 1, valid, None)
    metric.update(
        ids,
        loss_positions(valid),
        clean,
        spliced_forward(model, ids, mask, 1, valid, replace),
        spliced_forward(model, ids, mask, 1, valid, torch.zeros_like),
    )
    return metric.compute()


def test_perfect_reconstruction_recovers_all_ce(tiny_lm):
    out = _spliced_metrics(tiny_lm, lambda x: x.clone())
    assert out["ce_recovered"].item() == pytest.approx(1.0, abs=1e-9)
    assert out["kl_score"].item() == pytest.approx(1.0, abs=1e-9)
    assert out["delta_lm_loss"].item() == pytest.approx(0.0, abs=1e-9)


def test_zero_reconstruction_recovers_nothing(tiny_lm):
    out = _spliced_metrics(tiny_lm, torch.zeros_like)
    assert out["ce_recovered"].item() == pytest.approx(0.0, abs=1e-9)
    assert out["kl_score"].item() == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("replace", [None, torch.zeros_like, lambda x: x * 0.7 + 0.1])
def test_spliced_forward_from_the_captured_resid_is_bit_identical(tiny_lm, replace):
    ids = torch.randint(3, tiny_lm.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[2, 12:] = 0
    valid = valid_positions(mask)
    resid = capture_resid_post(tiny_lm, ids, 1, mask)
    full = spliced_forward(tiny_lm, ids, mask, 1, valid, replace)
    resumed = spliced_forward(tiny_lm, ids, mask, 1, valid, replace, resid)
    torch.testing.assert_close(resumed, full, rtol=0, atol=0)


def test_loss_positions_skip_position_zero_and_padding():
    valid = valid_positions(torch.tensor([[1, 1, 1, 1, 0]]))
    assert loss_positions(valid).tolist() == [[False, True, True, False]]


def test_shared_clean_and_zero_logits_give_identical_sae_metrics(tiny_lm):
    """Inside sharing_activations the clean / zero-ablated forwards of spliced CE are reused across
    SAEs; every metric must equal the uncached evaluation exactly."""
    from lit_prune.analysis.evaluate import evaluate_sae
    from lit_prune.models.activation_cache import sharing_activations

    ids = torch.randint(0, tiny_lm.config.vocab_size, (6, 16), generator=torch.Generator().manual_seed(0))
    codecs = [lambda x: (x.abs(), x * 0.9), lambda x: (x.relu(), x.relu())]
    plain = [evaluate_sae(tiny_lm, 1, c, ids, 64, batch_size=4, ce_sequences=4) for c in codecs]
    with sharing_activations() as cache:
        shared = [evaluate_sae(tiny_lm, 1, c, ids, 64, batch_size=4, ce_sequences=4) for c in codecs]
        assert cache.hits >= 3  # the second SAE reused clean, zero and the activations
    assert shared == plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_ce_and_kl_equal_the_one_pass_formulas(dtype):
    """300 positions cross the 128-position chunks; CE gradients too (attribution uses them)."""
    torch.manual_seed(0)
    p = torch.randn(3, 301, 50).mul(3).to(dtype).requires_grad_(True)
    q = torch.randn(3, 301, 50).mul(3).to(dtype)
    ids = torch.randint(0, 50, (3, 301))
    ce = next_token_ce(p, ids)
    ce_ref = F.cross_entropy(p[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    assert ce.shape == (3, 300) and torch.allclose(ce, ce_ref, atol=1e-5)
    (grad,) = torch.autograd.grad(ce.sum(), p)
    (grad_ref,) = torch.autograd.grad(ce_ref.sum(), p)
    rtol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # bf16 gradients: one rounding of 8 mantissa bits
    assert torch.allclose(grad.float(), grad_ref.float(), rtol=rtol, atol=1e-6)
    logp, logq = F.log_softmax(p[:, :-1].float(), -1), F.log_softmax(q[:, :-1].float(), -1)
    kl_ref = (logp.exp() * (logp - logq)).sum(-1)
    assert torch.allclose(next_token_kl(p, q), kl_ref, atol=1e-5)

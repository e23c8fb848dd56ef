"""The sparse TopK step equals sae-lens' training_forward_pass: loss, every gradient, firing, Adam steps."""

import copy

import pytest
import torch
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

from lit_prune.errors import LitPruneError
from lit_prune.sae.build import SAESettings
from lit_prune.sae.fast import StepOutput, fast_topk_training_forward

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")
LAYOUTS = {"auto": None, "sparse": float("inf"), "dense": 0.0}  # dense_threshold forcing each layout
SIZES = [(16, 64, 4, 128), (32, 256, 8, 256), (64, 512, 32, 512)]  # d_in, d_sae, k, n


def _sae(d_in, d_sae, k, rescale=True, apply_b_dec=True, seed=0):
    """A TopK training SAE perturbed away from init: decoder norms differ, biases non-zero."""
    cfg = TopKTrainingSAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        rescale_acts_by_decoder_norm=rescale,
        apply_b_dec_to_input=apply_b_dec,
        aux_loss_coefficient=0.5,
        decoder_init_norm=0.1,
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sae = TopKTrainingSAE(cfg)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        sae.W_dec.mul_(0.5 + torch.rand(d_sae, 1, generator=gen))
    return sae


def _data(n, d_in, d_sae, n_dead, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen) + 0.3 * torch.randn(
        d_in, generator=gen
    )  # off-centre: b_dec matters
    dead = torch.zeros(d_sae, dtype=torch.bool)
    dead[torch.randperm(d_sae, generator=gen)[:n_dead]] = True
    return x, dead


def _reference(sae, x, dead):
    return sae.training_forward_pass(
        TrainStepInput(
            sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
        )
    )


def _ours(sae, x, dead, layout="auto"):
    threshold = LAYOUTS[layout]
    return (
        fast_topk_training_forward(sae, x, dead)
        if threshold is None
        else fast_topk_training_forward(sae, x, dead, dense_threshold=threshold)
    )


def _close(actual, expected):
    """fp32 agreement: rtol 1e-4, atol 1e-5 of the reference's largest magnitude."""
    scale = max(float(expected.detach().abs().max()), 1e-12)
    torch.testing.assert_close(actual.detach(), expected.detach(), rtol=1e-4, atol=1e-5 * scale)


def _assert_same_step(sae, x, dead, layout="auto"):
    ref_sae = copy.deepcopy(sae)
    ours, ref = _ours(sae, x, dead, layout), _reference(ref_sae, x, dead)
    ours.loss.backward()
    ref.loss.backward()
    _close(ours.loss, ref.loss)
    assert set(ours.losses) == set(ref.losses) == {"mse_loss", "auxiliary_reconstruction_loss"}
    for name in ours.losses:
        _close(ours.losses[name], ref.losses[name])
    _close(ours.sae_out, ref.sae_out)
    adapted = StepOutput.from_sae_lens(ref)
    assert torch.equal(ours.fired, adapted.fired)
    assert ours.l0.item() == adapted.l0.item()
    for name in PARAMS:
        _close(getattr(sae, name).grad, getattr(ref_sae, name).grad)
    return ours, ref


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("d_in, d_sae, k, n", SIZES)
@pytest.mark.parametrize("dead_share", [0.0, 0.03, 0.5])
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("rescale", [True, False])
def test_loss_gradients_and_firing_equal_sae_lens(
    rescale, apply_b_dec, dead_share, d_in, d_sae, k, n, layout
):
    sae = _sae(d_in, d_sae, k, rescale, apply_b_dec)
    x, dead = _data(n, d_in, d_sae, round(dead_share * d_sae))
    ours, ref = _assert_same_step(sae, x, dead, layout)
    if dead_share:  # the auxiliary path really ran (and with fewer dead latents than k_aux when 3%)
        assert ref.losses["auxiliary_reconstruction_loss"] > 0


@pytest.mark.parametrize("layout", ["sparse", "dense"])
def test_negative_top_k_values_are_relu_zeroed_like_sae_lens(layout):
    sae = _sae(32, 128, 16)
    with torch.no_grad():
        sae.b_enc.sub_(0.5)  # many tokens now have negative values among their top k
    x, dead = _data(256, 32, 128, 20)
    ours, ref = _assert_same_step(sae, x, dead, layout)
    assert 0 < ours.l0.item() < 16


def test_no_dead_mask_means_no_aux_loss():
    sae = _sae(16, 64, 4)
    x, _ = _data(128, 16, 64, 0)
    ours, ref = _assert_same_step(sae, x, None)
    assert ours.losses["auxiliary_reconstruction_loss"].item() == 0.0


@pytest.mark.parametrize("layout", ["sparse", "dense"])
def test_gradient_reaches_the_input_like_sae_lens(layout):
    sae = _sae(16, 64, 4)
    x, dead = _data(128, 16, 64, 10)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    _ours(sae, x_ours, dead, layout).loss.backward()
    _reference(copy.deepcopy(sae), x_ref, dead).loss.backward()
    _close(x_ours.grad, x_ref.grad)


@pytest.mark.parametrize("rescale", [True, False])
def test_three_adam_steps_give_the_same_parameters(rescale):
    sae = _sae(32, 256, 8, rescale)
    ref_sae = copy.deepcopy(sae)
    opt, ref_opt = (
        torch.optim.Adam(sae.parameters(), lr=1e-3),
        torch.optim.Adam(ref_sae.parameters(), lr=1e-3),
    )
    for step in range(3):
        x, dead = _data(256, 32, 256, 40, seed=10 + step)
        for model, optimizer, forward in ((sae, opt, _ours), (ref_sae, ref_opt, _reference)):
            optimizer.zero_grad()
            forward(model, x, dead).loss.backward()
            optimizer.step()
    for name in PARAMS:
        torch.testing.assert_close(getattr(sae, name), getattr(ref_sae, name), rtol=1e-4, atol=1e-6)
        assert not torch.equal(getattr(sae, name), _sae(32, 256, 8, rescale).get_parameter(name))  # it moved


def test_fast_is_topk_only():
    assert SAESettings().fast is None and SAESettings(architecture="standard").fast is None
    assert SAESettings(fast=True).fast and SAESettings(architecture="jumprelu", fast=False).fast is False
    message = "sae.fast=True is invalid: expected false or null with architecture='standard'"
    with pytest.raises(LitPruneError, match=message):
        SAESettings(architecture="standard", fast=True)


def test_unsupported_normalisation_is_refused():
    sae = _sae(16, 64, 4)
    sae.cfg.normalize_activations = "layer_norm"
    with pytest.raises(ValueError, match="layer_norm"):
        fast_topk_training_forward(sae, torch.randn(8, 16))


@pytest.mark.parametrize("n, d_in, d_sae, k, n_dead", [(2048, 64, 1024, 16, 102), (1024, 576, 2304, 32, 7)])
def test_gradients_do_not_depend_on_the_thread_count(n, d_in, d_sae, k, n_dead):
    # Run-to-run reproducibility: every reduction in the step has a fixed order, so the gradients
    # with 2 threads equal the single-threaded ones bit for bit (values[idx]'s backward used CPU
    # atomics in thread order, and W_dec's gradient varied in its last bits). With a few dead
    # latents the auxiliary codes take the dense layout, whose products MKL split by thread count.
    x, dead = _data(n, d_in, d_sae, n_dead=n_dead)
    grads = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            sae = _sae(d_in, d_sae, k)
            fast_topk_training_forward(sae, x, dead).loss.backward()
            grads.append({name: p.grad.clone() for name, p in sae.named_parameters()})
    finally:
        torch.set_num_threads(threads)
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


# --- on a real GPU (marked gpu: skipped where torch sees no CUDA device) -----------------------
@pytest.mark.gpu
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("d_in, d_sae, k, n", SIZES)
def test_cuda_step_equals_sae_lens_on_cuda_and_the_cpu_step(d_in, d_sae, k, n, layout):
    sae = _sae(d_in, d_sae, k)
    x, dead = _data(n, d_in, d_sae, n_dead=round(0.03 * d_sae))  # a few dead: the auxiliary loss runs
    on_cpu = copy.deepcopy(sae)
    want = _ours(on_cpu, x, dead, layout)
    want.loss.backward()
    on_gpu = sae.cuda()
    got, _ = _assert_same_step(on_gpu, x.cuda(), dead.cuda(), layout)  # ours equals sae-lens on the GPU
    assert got.loss.device.type == "cuda" and torch.equal(got.fired.cpu(), want.fired)
    _close(got.loss.cpu(), want.loss)
    for name in PARAMS:
        _close(getattr(on_gpu, name).grad.cpu(), getattr(on_cpu, name).grad)

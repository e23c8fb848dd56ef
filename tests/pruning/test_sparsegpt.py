"""SparseGPT against a separately written per-layer implementation (plain loops, float64, no lazy
updates) on tiny models; exact realised sparsity, a valid 2:4 pattern, the OBS closed form on a
hand-checked case, and the dampening rules."""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch
from torch import nn

from lit_prune.errors import LitPruneError
from lit_prune.models.hooks import decoder_layers
from lit_prune.models.tiny import tiny_model
from lit_prune.pruning import (
    prunable_linears,
    prune_model,
    sparsegpt_masks,
    sparsegpt_prune,
    sparsity_report,
    verify_masks,
)


def tiny(arch: str) -> nn.Module:
    return tiny_model(arch)


def calibration(n_seq: int = 5, seq_len: int = 24) -> torch.Tensor:
    return torch.randint(3, 512, (n_seq, seq_len), generator=torch.Generator().manual_seed(7))


def floor_count(n: int, sparsity: float) -> int:
    return math.floor(Fraction(repr(sparsity)) * n)


def reference_layer(weight, inputs, sparsity, nm, dampening, column_block):
    """SparseGPT on one Linear, written from the paper: float64, every OBS update applied at once to
    all later columns (no lazy batches), masks chosen by sorting (score, position) pairs in Python."""
    w = weight.double().clone()
    x = inputs.double()
    d_out, d_in = w.shape
    h = 2 * x.T @ x / x.shape[0]
    for j in range(d_in):
        if h[j, j] == 0:
            h[j, j] = 1
            w[:, j] = 0
    mean_diag = sum(float(h[j, j]) for j in range(d_in)) / d_in
    for j in range(d_in):
        h[j, j] += dampening * mean_diag
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    pruned = torch.zeros(d_out, d_in, dtype=torch.bool)
    for i in range(d_in):
        if i % column_block == 0 and nm is None:
            i2 = min(i + column_block, d_in)
            k = floor_count(d_out * i2, sparsity) - floor_count(d_out * i, sparsity)
            ranked = sorted(
                (float(w[r, c] ** 2 / u[c, c] ** 2), r * (i2 - i) + (c - i), r, c)
                for r in range(d_out)
                for c in range(i, i2)
            )
            for _score, _pos, r, c in ranked[:k]:
                pruned[r, c] = True
        if nm is not None and i % nm[1] == 0:
            for r in range(d_out):
                group = sorted((float(w[r, c] ** 2 / u[c, c] ** 2), c) for c in range(i, i + nm[1]))
                for _score, c in group[: nm[0]]:
                    pruned[r, c] = True
        for r in range(d_out):
            if pruned[r, i]:
                err = w[r, i] / u[i, i]
                w[r, i:] -= err * u[i, i:]
                w[r, i] = 0.0
    return w, ~pruned


@torch.no_grad()
def reference_model(model, ids, sparsity, nm=None, dampening=0.01, column_block=128):
    """Block by block: the whole model (earlier blocks already pruned) on all sequences at once, every
    Linear's inputs stored, each Linear pruned by `reference_layer`."""
    linears = prunable_linears(model)
    masks = {}
    for index in range(len(decoder_layers(model))):
        block = {n: lin for n, lin in linears.items() if n.startswith(f"model.layers.{index}.")}
        stored = {n: [] for n in block}
        handles = [
            lin.register_forward_pre_hook(lambda _m, args, n=n, s=stored: s[n].append(args[0].clone()))
            for n, lin in block.items()
        ]
        model(input_ids=ids, use_cache=False)
        for handle in handles:
            handle.remove()
        for name, lin in block.items():
            inputs = torch.cat(stored[name]).reshape(-1, lin.in_features)
            weight, masks[name] = reference_layer(lin.weight, inputs, sparsity, nm, dampening, column_block)
            lin.weight.copy_(weight)
    return masks


@pytest.mark.e2e
@pytest.mark.parametrize(
    "arch, sparsity, nm, column_block",
    [("tiny-llama", 0.5, None, 48), ("tiny-gemma3", 0.3, None, 128), ("tiny-llama", 0.5, (2, 4), 32)],
)
def test_sequential_sparsegpt_equals_reference(arch, sparsity, nm, column_block) -> None:
    model = tiny(arch)
    reference = copy.deepcopy(model)
    ids = calibration()  # 5 sequences, truncated to 20 tokens, batches of 2 + 2 + 1
    masks = sparsegpt_masks(model, ids, sparsity, nm, 2, 20, False, column_block=column_block)
    expected = reference_model(reference, ids[:, :20], sparsity, nm, column_block=column_block)
    assert masks.keys() == expected.keys() and len(masks) == 28
    for name, lin in prunable_linears(model).items():
        assert torch.equal(masks[name], expected[name]), name
        ref = prunable_linears(reference)[name].weight
        torch.testing.assert_close(lin.weight, ref, rtol=1e-4, atol=1e-5, msg=name)
        assert not bool(lin.weight[~masks[name]].any()), name  # pruned weights exactly 0
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        if "layers" not in name or p.dim() == 1:
            assert torch.equal(p, q), name  # embeddings and norms untouched


@pytest.mark.parametrize("sparsity", [0.25, 0.3, 0.5, 0.6])
def test_realised_sparsity_exact_per_matrix(sparsity) -> None:
    model, dense = tiny("tiny-llama"), tiny("tiny-llama")
    masks = prune_model(
        model, "sparsegpt", sparsity, calibration_ids=calibration(3, 16), column_block=40, progress=False
    )
    report = verify_masks(model, masks, "sparsegpt", sparsity)
    for row in report:
        assert row["pruned"] == floor_count(row["numel"], sparsity) and row["leaked"] == 0, row["name"]
    changed = [
        n
        for n, lin in prunable_linears(model).items()
        if not torch.equal(lin.weight, dense.get_submodule(n).weight * masks[n])
    ]
    assert len(changed) == len(masks)  # unlike Wanda, the kept weights were updated


def test_nm_pattern_valid() -> None:
    model = tiny("tiny-gemma2")
    masks = prune_model(
        model, "sparsegpt", None, nm=(2, 4), calibration_ids=calibration(3, 16), progress=False
    )
    verify_masks(model, masks, "sparsegpt", None, nm=(2, 4))
    for name, keep in masks.items():
        assert torch.equal((~keep).view(-1, 4).sum(1), torch.full((keep.numel() // 4,), 2)), name
    assert all(r["leaked"] == 0 for r in sparsity_report(model, masks))


def test_obs_update_equals_closed_form() -> None:
    # One block, two inputs, H = [[2, 1], [1, 2]] damped by 1% of its mean diagonal (0.02). The smaller
    # score w0 is pruned; the best remaining w1 (least squares on the damped H) is w1 + w0 H10 / H11.
    weight = torch.tensor([[0.1, 1.0]])
    hessian = torch.tensor([[2.0, 1.0], [1.0, 2.0]])
    pruned, keep = sparsegpt_prune(weight, hessian, 0.5, dampening=0.01)
    assert keep.tolist() == [[False, True]]
    assert pruned[0, 0].item() == 0.0
    assert pruned[0, 1].item() == pytest.approx(1.0 + 0.1 * 1.0 / 2.02, rel=1e-6)


def test_obs_update_equals_least_squares() -> None:
    # Column 0 pruned (it holds the only small weight): SparseGPT's update of the later columns equals
    # the exact minimiser of the damped quadratic error with w0 = 0.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g, dtype=torch.float64)
    w = torch.randn(1, 6, generator=g, dtype=torch.float64).abs() + 1
    w[0, 0] = 0.01
    h = 2 * x.T @ x
    pruned, keep = sparsegpt_prune(w.float(), h.float(), 0.1, dampening=0.01)  # floor(6 * 0.1) = 0 pruned
    assert bool(keep.all())
    pruned, keep = sparsegpt_prune(w.float(), h.float(), 0.2, dampening=0.01)  # floor(1.2) = 1 pruned
    hd = h + 0.01 * h.diagonal().mean() * torch.eye(6, dtype=torch.float64)
    best = w[0, 1:] + w[0, 0] * torch.linalg.solve(hd[1:, 1:], hd[1:, 0])
    assert keep[0].tolist() == [False] + [True] * 5
    torch.testing.assert_close(pruned[0, 1:].double(), best, rtol=1e-5, atol=1e-6)


def test_dead_inputs_zeroed_and_pruned_first() -> None:
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    x[:, 3] = 0
    weight = torch.randn(4, 8, generator=torch.Generator().manual_seed(2)) + 5
    pruned, keep = sparsegpt_prune(weight, 2 * x.T @ x, 0.125)  # 4 of 32: exactly the dead column
    assert (~keep).sum().item() == 4 and not bool(keep[:, 3].any())
    assert not bool(pruned[:, 3].any())


def test_indefinite_hessian_raises_dampening() -> None:
    # eigenvalues -2 and 4: only a dampening of 10x the mean diagonal (1) makes it positive definite
    hessian = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    with pytest.warns(UserWarning, match="used 10 of its mean diagonal"):
        pruned, keep = sparsegpt_prune(torch.tensor([[1.0, 0.5]]), hessian, 0.5)
    assert (~keep).sum().item() == 1 and pruned[~keep].item() == 0.0


def test_hopeless_hessian_is_one_line_error() -> None:
    hessian = torch.tensor([[1.0, 1e6], [1e6, 1.0]])
    with pytest.raises(
        LitPruneError, match=r"^dampening=0\.01 is invalid: .*q_proj.*positive definite"
    ) as err:
        sparsegpt_prune(torch.ones(1, 2), hessian, 0.5, name="q_proj")
    assert "\n" not in str(err.value)
    with pytest.raises(LitPruneError, match="non-finite"):
        sparsegpt_prune(torch.ones(1, 2), torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), 0.5)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(dampening=0.0), "dampening"),
        (dict(dampening=float("inf")), "dampening"),
        (dict(column_block=0), "column_block"),
        (dict(nm=(2, 4), column_block=30), "column_block"),
        (dict(group="row"), "group"),
        (dict(calibration_ids=None), "calibration_ids"),
    ],
)
def test_invalid_inputs_name_the_field(kwargs, field) -> None:
    args = dict(method="sparsegpt", sparsity=0.5, calibration_ids=calibration(2, 8), progress=False)
    if "nm" in kwargs:
        args["sparsity"] = None
    with pytest.raises(LitPruneError, match=f"^{field}="):
        prune_model(tiny("tiny-llama"), **{**args, **kwargs})

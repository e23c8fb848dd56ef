"""Pruning whole tiny Llama / Gemma 2 / Gemma 3 models: sequential Wanda against a
brute-force reference, exact realised sparsity, untouched non-prunable weights, input errors."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from lit_prune.errors import LitPruneError
from lit_prune.models.hooks import decoder_layers
from lit_prune.models.tiny import tiny_model
from lit_prune.pruning import (
    count_pruned,
    nm_mask,
    prunable_linears,
    prune_model,
    sparsity_report,
    wanda_mask,
    wanda_mask_reference,
    wanda_masks,
    wanda_scores,
)
from lit_prune.pruning.masks import select_lowest, select_lowest_sorted

# 3 layers, a 256-token vocabulary; Gemma: sliding window 8 < seq_len 16, and a full-attention layer in
# between, so per-layer kwargs matter.
SMALL: dict[str, Any] = dict(vocab_size=256, num_hidden_layers=3)
GEMMA = dict(
    SMALL, sliding_window=8, layer_types=["sliding_attention", "full_attention", "sliding_attention"]
)


def tiny(arch: str) -> nn.Module:
    return tiny_model(f"tiny-{arch}", **(SMALL if arch == "llama" else GEMMA))


def calibration(n_seq: int = 6, seq_len: int = 20) -> torch.Tensor:
    return torch.randint(0, 256, (n_seq, seq_len), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def brute_force_wanda(
    model: nn.Module, ids: torch.Tensor, sparsity: float, nm=None
) -> dict[str, torch.Tensor]:
    """Independent Wanda: for each block L run the WHOLE model (blocks < L already pruned) on all
    sequences in one batch, store every Linear's full input, take norms from the stored tensors."""
    linears = prunable_linears(model)
    masks: dict[str, torch.Tensor] = {}
    for index in range(len(decoder_layers(model))):
        prefix = f"model.layers.{index}."
        block = {n: lin for n, lin in linears.items() if n.startswith(prefix)}
        stored: dict[str, list[torch.Tensor]] = {n: [] for n in block}
        handles = [
            lin.register_forward_pre_hook(lambda _m, args, n=n, s=stored: s[n].append(args[0].clone()))
            for n, lin in block.items()
        ]
        model(input_ids=ids, use_cache=False)
        for handle in handles:
            handle.remove()
        for name, lin in block.items():
            acts = torch.cat(stored[name]).reshape(-1, lin.in_features).double()  # [tokens, d_in]
            sq = acts.pow(2).sum(dim=0)
            if nm is None:
                masks[name] = wanda_mask_reference(lin.weight, sq, sparsity)
            else:
                masks[name] = nm_mask(wanda_scores(lin.weight, sq), *nm)
            lin.weight.mul_(masks[name])
    return masks


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3"])
def test_sequential_wanda_equals_brute_force(arch: str) -> None:
    model = tiny(arch)
    reference = copy.deepcopy(model)
    ids = calibration()  # 6 sequences of 20 tokens; truncated to 16, batches of 4 + 2
    masks = wanda_masks(model, ids, 0.5, batch_size=4, max_seq_len=16, progress=False)
    expected = brute_force_wanda(reference, ids[:, :16], 0.5)
    assert masks.keys() == expected.keys() and len(masks) == 21
    for name in masks:
        assert torch.equal(masks[name], expected[name]), name
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(p, q), name  # the model itself was pruned in place, identically


def test_sequential_wanda_nm_equals_brute_force() -> None:
    model = tiny("gemma3")
    reference = copy.deepcopy(model)
    ids = calibration(4, 16)
    masks = prune_model(model, "wanda", None, nm=(2, 4), calibration_ids=ids, batch_size=3, progress=False)
    expected = brute_force_wanda(reference, ids, 0.5, nm=(2, 4))
    for name in masks:
        assert torch.equal(masks[name], expected[name]), name
        assert torch.equal((~masks[name]).view(-1, 4).sum(1), torch.full((masks[name].numel() // 4,), 2))


def test_sequential_wanda_is_not_one_shot() -> None:
    # Block 2 must see the outputs of pruned blocks 0-1: norms from the dense model give other masks.
    model, dense = tiny("llama"), tiny("llama")
    ids = calibration(4, 16)
    masks = wanda_masks(model, ids, 0.5, progress=False)
    name = "model.layers.2.mlp.down_proj"
    lin = prunable_linears(dense)[name]
    stored = []
    handle = lin.register_forward_pre_hook(lambda _m, args: stored.append(args[0].clone()))
    with torch.no_grad():
        dense(input_ids=ids, use_cache=False)
    handle.remove()
    one_shot = wanda_mask_reference(lin.weight, stored[0].reshape(-1, lin.in_features).pow(2).sum(0), 0.5)
    assert not torch.equal(one_shot, masks[name])


@pytest.mark.parametrize(
    ("method", "sparsity", "group", "nm"),
    [
        ("magnitude", 0.3, None, None),
        ("magnitude", 0.37, "row", None),
        ("magnitude", 0.5, "global", None),
        ("magnitude", 0.5, None, (2, 4)),
        ("wanda", 0.3, None, None),
    ],
)
def test_realised_sparsity_exact_and_rest_untouched(method, sparsity, group, nm) -> None:
    model = tiny("llama")
    dense = {n: p.clone() for n, p in model.named_parameters()}
    ids = calibration(4, 16) if method == "wanda" else None
    masks = prune_model(model, method, sparsity, nm=nm, group=group, calibration_ids=ids, progress=False)
    linears = prunable_linears(model)
    assert masks.keys() == linears.keys() and len(masks) == 21
    total = 0
    for row in sparsity_report(model, masks, sparsity):
        d_out, d_in = row["shape"]
        if nm is not None:
            want = d_out * d_in // 2
        elif method == "wanda" or group == "row":
            want = d_out * count_pruned(d_in, sparsity)
        elif group is None:
            want = count_pruned(d_out * d_in, sparsity)
        else:
            want = row["pruned"]
        assert row["pruned"] == row["zeros"] == want, row  # random init holds no exact zeros
        assert row["sparsity"] == want / row["numel"]
        total += row["pruned"]
    if group == "global":
        assert total == count_pruned(sum(lin.weight.numel() for lin in linears.values()), sparsity)
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        if module not in linears:  # embeddings, lm_head (tied), norms
            assert torch.equal(p, dense[name]), name
        else:
            assert torch.equal(p, dense[name] * masks[module]), name


def test_global_keeps_every_larger_weight() -> None:
    model = tiny("llama")
    masks = prune_model(model, "magnitude", 0.4, group="global")
    weights = {n: lin.weight.abs() for n, lin in prunable_linears(tiny("llama")).items()}
    kept = torch.cat([weights[n][masks[n]] for n in masks])
    pruned = torch.cat([weights[n][~masks[n]] for n in masks])
    assert pruned.max() <= kept.min()


def test_wanda_zero_sparsity_is_dense() -> None:
    model = tiny("llama")
    masks = prune_model(model, "wanda", 0.0, calibration_ids=calibration(2, 8), progress=False)
    assert all(bool(m.all()) for m in masks.values())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(method="magnitude", sparsity=1.0), "sparsity"),
        (dict(method="magnitude", sparsity=-0.1), "sparsity"),
        (dict(method="magnitude", sparsity=None), "sparsity"),
        (dict(method="random", sparsity=0.5), "method"),
        (dict(method="magnitude", sparsity=0.5, group="column"), "group"),
        (dict(method="wanda", sparsity=0.5, group="matrix", calibration_ids=calibration()), "group"),
        (dict(method="magnitude", sparsity=None, nm=(4, 4)), "nm"),
        (dict(method="magnitude", sparsity=None, nm=(2, 0)), "nm"),
        (dict(method="magnitude", sparsity=None, nm=(2, 3)), "nm"),  # 3 does not divide d_in = 64
        (dict(method="magnitude", sparsity=0.3, nm=(2, 4)), "sparsity"),
        (dict(method="wanda", sparsity=0.5), "calibration_ids"),
        (
            dict(method="wanda", sparsity=0.5, calibration_ids=torch.zeros(0, 16, dtype=torch.long)),
            "calibration_ids",
        ),
        (dict(method="wanda", sparsity=0.5, calibration_ids=torch.full((2, 8), 256)), "calibration_ids"),
        (dict(method="wanda", sparsity=0.5, calibration_ids=torch.full((2, 8), -1)), "calibration_ids"),
        (dict(method="wanda", sparsity=0.5, calibration_ids=torch.rand(2, 8)), "calibration_ids"),
        (dict(method="wanda", sparsity=0.5, calibration_ids=calibration(), batch_size=0), "batch_size"),
    ],
)
def test_invalid_inputs_name_the_field(kwargs: dict, field: str) -> None:
    model = tiny("llama")
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(LitPruneError) as err:
        prune_model(model, progress=False, **kwargs)
    message = str(err.value)
    assert message.startswith(f"{field}=") and "\n" not in message
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing pruned


def test_nm_sparsity_convention() -> None:
    for sparsity in (None, 0, 0.5):
        masks = prune_model(tiny("llama"), "magnitude", sparsity, nm=(2, 4))
        assert all(int((~m).sum()) == m.numel() // 2 for m in masks.values())


def _stable_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Naive selection: the first k of a stable argsort of each row (lower index wins ties)."""
    out = torch.zeros_like(scores, dtype=torch.bool)
    return out.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :k], True)


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.6])
def test_wanda_mask_bit_identical_to_sort_on_model_shapes(sparsity: float) -> None:
    # Real-size rows (SmolLM2: d_in 576 / 1536) where most rows have a unique k-th score and some
    # rows tie it many times over (quantised weights, whole-column norm ties): both paths of the
    # selection (plain threshold, counted ties in the tied rows only) must equal the full sort.
    gen = torch.Generator().manual_seed(5)
    for d_out, d_in in [(192, 576), (64, 1536)]:
        smooth = torch.randn(d_out, d_in, generator=gen)
        tied = torch.randint(-4, 5, (d_out, d_in), generator=gen).float() / 8  # 4-bit-like, zeros included
        mixed = torch.where(torch.rand(d_out, 1, generator=gen) < 0.3, tied, smooth)  # tied rows among smooth
        norms = torch.rand(d_in, generator=gen) + 0.5
        col_ties = torch.randint(1, 4, (d_in,), generator=gen).float()  # few distinct norms
        for weight, sq in [(smooth, norms), (tied, col_ties), (mixed, col_ties), (mixed, torch.zeros(d_in))]:
            fast = wanda_mask(weight, sq, sparsity)
            assert torch.equal(fast, wanda_mask_reference(weight, sq, sparsity))
            assert torch.equal(~fast, _stable_lowest(wanda_scores(weight, sq), count_pruned(d_in, sparsity)))


def test_select_lowest_same_on_numpy_kthvalue_and_gpu_sort_paths() -> None:
    # fp32 rows go through np.partition, bf16 rows through torch.kthvalue, GPU rows through a
    # stable sort (run here on CPU): same answer as the sort, tied scores included.
    gen = torch.Generator().manual_seed(6)
    scores = (torch.randint(0, 6, (50, 96), generator=gen).float() / 2).abs()
    for k in (1, 17, 48, 95):
        want = _stable_lowest(scores, k)
        assert torch.equal(select_lowest(scores, k), want)
        assert torch.equal(select_lowest(scores.bfloat16(), k), want)  # values 0..2.5 are exact in bf16
        assert torch.equal(select_lowest(scores.t().contiguous().t(), k), want)  # strided input
        assert torch.equal(select_lowest_sorted(scores, k), want)
        one_row = scores.reshape(1, -1)  # a per-matrix (magnitude) selection
        assert torch.equal(select_lowest_sorted(one_row, 50 * k), _stable_lowest(one_row, 50 * k))


def test_magnitude_mask_equals_stable_sort_on_tied_weights() -> None:
    # 4-bit-like weights (few distinct |W|): matrix and row groups against a stable full sort,
    # in float32 (numpy path) and bfloat16 (torch path).
    from lit_prune.pruning import magnitude_mask

    gen = torch.Generator().manual_seed(7)
    weight = torch.randint(-4, 5, (96, 160), generator=gen).float() / 8
    for w in (weight, weight.bfloat16()):
        for sparsity in (0.3, 0.5):
            flat = _stable_lowest(weight.abs().reshape(1, -1), count_pruned(weight.numel(), sparsity))
            assert torch.equal(~magnitude_mask(w, sparsity, "matrix"), flat.view(weight.shape))
            rows = _stable_lowest(weight.abs(), count_pruned(160, sparsity))
            assert torch.equal(~magnitude_mask(w, sparsity, "row"), rows)


# --- on a real GPU (marked gpu: skipped where torch sees no CUDA device) -----------------------
@pytest.mark.gpu
def test_select_lowest_on_cuda_equals_the_stable_sort() -> None:
    # CUDA takes the stable-sort path (kthvalue crawls there): tied scores, bf16 and one long row
    gen = torch.Generator().manual_seed(6)
    scores = (torch.randint(0, 6, (50, 96), generator=gen).float() / 2).abs()
    one_row = scores.reshape(1, -1)
    for k in (1, 17, 48, 95):
        want = _stable_lowest(scores, k)
        assert torch.equal(select_lowest(scores.cuda(), k).cpu(), want)
        assert torch.equal(select_lowest(scores.bfloat16().cuda(), k).cpu(), want)
        assert torch.equal(select_lowest(one_row.cuda(), 50 * k).cpu(), _stable_lowest(one_row, 50 * k))


@pytest.mark.gpu
@pytest.mark.parametrize(
    "method, sparsity, group, nm",
    [
        ("magnitude", 0.5, "matrix", None),
        ("magnitude", 0.3, "row", None),
        ("magnitude", 0.5, "global", None),
        ("magnitude", None, None, (2, 4)),
        ("wanda", 0.5, None, None),
        ("wanda", None, None, (2, 4)),
    ],
)
def test_prune_model_on_cuda_equals_cpu(method, sparsity, group, nm) -> None:
    def masks_on(device: str) -> dict[str, torch.Tensor]:
        model = tiny("llama").to(device)
        masks = prune_model(model, method, sparsity, nm, group, calibration(), progress=False)
        pruned = {name: lin.weight.detach().eq(0).cpu() for name, lin in prunable_linears(model).items()}
        assert all(torch.equal(~masks[name].cpu(), pruned[name]) for name in masks)  # applied where kept
        return {name: mask.cpu() for name, mask in masks.items()}

    cpu, cuda = masks_on("cpu"), masks_on("cuda")
    assert cpu.keys() == cuda.keys()
    if method == "magnitude":  # |W| is the same number on both devices: the same masks, bit for bit
        assert all(torch.equal(cuda[name], cpu[name]) for name in cpu)
        return
    # Wanda's activation norms are sums whose order differs between devices: a score within float
    # rounding of its row's k-th one may swap sides, nothing more; every row still prunes exactly k
    differ = sum(int((cuda[name] != cpu[name]).sum()) for name in cpu)
    assert differ <= 1e-3 * sum(mask.numel() for mask in cpu.values())
    assert all(torch.equal(cuda[name].sum(dim=1), cpu[name].sum(dim=1)) for name in cpu)

"""Mask selection on hand-computed 4x8 examples, mask bookkeeping and mask files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lit_prune.errors import LitPruneError
from lit_prune.pruning import (
    SparsityMismatch,
    apply_masks,
    check_realised,
    count_pruned,
    load_masks,
    magnitude_mask,
    magnitude_masks,
    nm_mask,
    prunable_linears,
    save_masks,
    sparsity_report,
    wanda_mask,
    wanda_mask_reference,
    wanda_scores,
)

# 4x8 weights with exact ties in |W|: 0.0 (x2), 0.1 (x3), 0.2 (x4), 0.3 (x5 incl. a whole group of row 2).
W = torch.tensor(
    [
        [0.1, -0.8, 0.3, 0.0, -0.5, 0.9, -0.2, 0.7],
        [-0.6, 0.4, -0.1, 0.8, 0.2, -0.3, 0.5, -0.9],
        [0.3, 0.3, -0.3, 0.3, 0.6, -0.6, 0.1, 0.2],
        [1.0, -0.4, 0.5, -0.7, 0.0, 0.2, -0.8, 0.6],
    ]
)


def keep(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.bool)


# Wanda's column norms: their square roots [2, 1, 1, 1, 1, 1, 1, 4] scale |W| column by column.
NORMS = torch.tensor([4.0, 1, 1, 1, 1, 1, 1, 16])
# row 0 [.2 .8 .3 0 .5 .9 .2 2.8] -> col 3, then the 0.2 tie -> col 0 (not 6)
# row 1 [1.2 .4 .1 .8 .2 .3 .5 3.6] -> cols 2, 4
# row 2 [.6 .3 .3 .3 .6 .6 .1 .8] -> col 6, then the 0.3 tie -> col 1 (magnitude would take col 7)
# row 3 [2 .4 .5 .7 0 .2 .8 2.4] -> cols 4, 5
WANDA_025 = [
    [0, 1, 1, 0, 1, 1, 1, 1],
    [1, 1, 0, 1, 0, 1, 1, 1],
    [1, 0, 1, 1, 1, 1, 0, 1],
    [1, 1, 1, 1, 0, 0, 1, 1],
]


@pytest.mark.parametrize(
    ("select", "expected"),
    [
        # s = 0.25 -> floor(32 * 0.25) = 8: both 0.0, all three 0.1, and the first three 0.2 by flat
        # index (flat 6, 12, 23); the fourth 0.2 at flat 29 is kept.
        pytest.param(
            lambda: magnitude_mask(W, 0.25, "matrix"),
            [
                [0, 1, 1, 0, 1, 1, 0, 1],
                [1, 1, 0, 1, 0, 1, 1, 1],
                [1, 1, 1, 1, 1, 1, 0, 0],
                [1, 1, 1, 1, 0, 1, 1, 1],
            ],
            id="magnitude-matrix",
        ),
        # s = 0.5 -> 4 per row; row 2 has 0.1, 0.2 then four tied 0.3: columns 0 and 1 go.
        pytest.param(
            lambda: magnitude_mask(W, 0.5, "row"),
            [
                [0, 1, 0, 0, 1, 1, 0, 1],
                [1, 0, 0, 1, 0, 0, 1, 1],
                [0, 0, 1, 1, 1, 1, 0, 0],
                [1, 0, 0, 1, 0, 0, 1, 1],
            ],
            id="magnitude-row",
        ),
        # Per group of 4 columns the 2 smallest |W| go; row 2's first group is all 0.3 -> columns 0, 1.
        pytest.param(
            lambda: nm_mask(W.abs(), 2, 4),
            [
                [0, 1, 1, 0, 0, 1, 0, 1],
                [1, 0, 0, 1, 0, 0, 1, 1],
                [0, 0, 1, 1, 1, 1, 0, 0],
                [1, 0, 0, 1, 0, 0, 1, 1],
            ],
            id="nm-2:4",
        ),
        # scores per row (above), 2 lowest pruned (s = 0.25), by the fast path and the reference
        pytest.param(lambda: wanda_mask(W, NORMS, 0.25), WANDA_025, id="wanda"),
        pytest.param(lambda: wanda_mask_reference(W, NORMS, 0.25), WANDA_025, id="wanda-reference"),
    ],
)
def test_hand_computed(select, expected: list[list[int]]) -> None:
    assert torch.equal(select(), keep(expected))


def test_all_equal_weights_prune_lowest_indices_first() -> None:
    ones = torch.ones(4, 8)
    # matrix: floor(32 * 0.3) = 9 -> the whole of row 0 and column 0 of row 1.
    expected = torch.ones(32, dtype=torch.bool)
    expected[:9] = False
    assert torch.equal(magnitude_mask(ones, 0.3, "matrix"), expected.view(4, 8))
    # row: floor(8 * 0.3) = 2 -> columns 0, 1 of every row.
    row = magnitude_mask(ones, 0.3, "row")
    assert torch.equal(row, torch.arange(8).expand(4, 8) >= 2)
    # Wanda with equal scores behaves the same, and so does N:M.
    assert torch.equal(wanda_mask(ones, torch.ones(8), 0.3), row)
    assert torch.equal(nm_mask(ones, 2, 4), (torch.arange(8) % 4 >= 2).expand(4, 8))


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.3, 0.5, 0.7, 0.99])
def test_wanda_mask_equals_full_sort_reference(sparsity: float) -> None:
    gen = torch.Generator().manual_seed(1)
    tied_w = torch.randint(-3, 4, (24, 40), generator=gen).float() / 4  # many exact ties, some zeros
    tied_norms = torch.randint(0, 3, (40,), generator=gen).float()  # zero norms tie whole columns
    smooth_w = torch.randn(24, 40, generator=gen)
    smooth_norms = torch.rand(40, generator=gen)
    for weight, norms in [(tied_w, tied_norms), (smooth_w, smooth_norms), (tied_w, torch.ones(40))]:
        fast = wanda_mask(weight, norms, sparsity)
        assert torch.equal(fast, wanda_mask_reference(weight, norms, sparsity))
        assert torch.equal((~fast).sum(dim=1), torch.full((24,), count_pruned(40, sparsity)))


def test_wanda_scores_take_the_correctly_rounded_sqrt() -> None:
    """sqrt(282.26858) = 16.8008499 < sqrt(282.26862) = 16.8008518 in float32, one ulp apart; a float32
    sqrt that rounds the first up (torch 2.13's on CPU did) ties them, and the tie then prunes column 0."""
    sq = torch.tensor([282.26861572265625, 282.2685852050781])  # column 1 has the lower score
    weight = torch.ones(1, 2)
    expected_root = torch.from_numpy(np.sqrt(sq.numpy()))  # numpy's float32 sqrt is correctly rounded
    assert torch.equal(wanda_scores(weight, sq)[0], expected_root) and expected_root[1] < expected_root[0]
    for mask in (wanda_mask(weight, sq, 0.5), wanda_mask_reference(weight, sq, 0.5)):
        assert mask.tolist() == [[True, False]]
    assert nm_mask(wanda_scores(weight.repeat(1, 2), sq.repeat(2)), 2, 4).tolist() == [
        [True, False, True, False]
    ]
    wide = torch.from_numpy(
        np.random.default_rng(0).integers(1, 0x7F800000, 1_000_000, dtype=np.uint32).view(np.float32)
    )  # positive finite floats of every exponent
    assert torch.equal(
        wanda_scores(torch.ones(1, wide.numel()), wide)[0], torch.from_numpy(np.sqrt(wide.numpy()))
    )


def test_count_pruned_reads_sparsity_as_decimal() -> None:
    assert count_pruned(100, 0.29) == 29  # float 0.29 * 100 = 28.999...
    assert count_pruned(32, 0.3) == 9
    assert count_pruned(7, 0.0) == 0


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4, bias=False)
        self.norm = nn.LayerNorm(8)


class _Toy(nn.Module):
    """model.model.layers with one 4x8 Linear per block, plus an embedding and lm_head outside."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(10, 8)
        self.model.layers = nn.ModuleList([_Block(), _Block()])
        self.lm_head = nn.Linear(8, 10, bias=False)


def _toy() -> _Toy:
    toy = _Toy()
    with torch.no_grad():
        toy.model.layers[0].proj.weight.copy_(W)
        toy.model.layers[1].proj.weight.fill_(0.25)
    return toy


def test_prunable_linears_names_and_exclusions() -> None:
    assert list(prunable_linears(_toy())) == ["model.layers.0.proj", "model.layers.1.proj"]


def test_global_magnitude_hand_computed() -> None:
    # 64 weights, s = 0.5 -> 32 pruned: the 9 values of layer 0 below 0.25 (0.0 x2, 0.1 x3, 0.2 x4),
    # then 23 of the 32 tied 0.25 of layer 1, lowest flat index first.
    masks = magnitude_masks(_toy(), 0.5, "global")
    assert torch.equal(masks["model.layers.0.proj"], W.abs() >= 0.25)
    assert torch.equal(masks["model.layers.1.proj"], torch.arange(32).view(4, 8) >= 23)


def test_apply_report_and_check() -> None:
    toy = _toy()
    embed, head = toy.model.embed_tokens.weight.clone(), toy.lm_head.weight.clone()
    masks = magnitude_masks(toy, 0.25, "matrix")
    apply_masks(toy, masks)
    assert torch.equal(toy.model.layers[0].proj.weight, W * masks["model.layers.0.proj"])
    assert torch.equal(toy.model.embed_tokens.weight, embed) and torch.equal(toy.lm_head.weight, head)
    report = sparsity_report(toy, masks, target=0.25)
    assert [(r["pruned"], r["sparsity"], r["leaked"], r["target"]) for r in report] == [
        (8, 0.25, 0, 0.25)
    ] * 2
    assert report[0]["zeros"] == 8  # W's two exact zeros were among the pruned
    check_realised(report, 0.25)
    with pytest.raises(SparsityMismatch, match="model.layers.0.proj"):
        check_realised(report, 0.3)  # expects floor(32 * 0.3) = 9
    with pytest.raises(SparsityMismatch, match="not zero"):
        toy.model.layers[1].proj.weight.data.fill_(1.0)
        check_realised(sparsity_report(toy, masks, 0.25), 0.25)


def test_apply_masks_rejects_unknown_name_and_shape() -> None:
    toy = _toy()
    with pytest.raises(LitPruneError, match="masks"):
        apply_masks(toy, {"lm_head": torch.ones(10, 8, dtype=torch.bool)})
    with pytest.raises(LitPruneError, match="masks"):
        apply_masks(toy, {"model.layers.0.proj": torch.ones(8, 4, dtype=torch.bool)})


def test_save_load_round_trip(tmp_path) -> None:
    masks = magnitude_masks(_toy(), 0.5, "global")
    path = tmp_path / "sub" / "masks.safetensors"
    save_masks(masks, path, metadata={"method": "magnitude"})
    assert [p.name for p in path.parent.iterdir()] == ["masks.safetensors"]  # no temp file left
    with safe_open(str(path), framework="pt") as f:
        info = f.metadata()
        assert info["method"] == "magnitude" and info["lit_prune.masks"] == "packbits-v1"
        packed = f.get_tensor("model.layers.1.proj")
    weight = masks["model.layers.1.proj"]
    assert info["shape:model.layers.1.proj"] == ",".join(map(str, weight.shape))
    assert packed.dtype == torch.uint8 and packed.numel() == -(-weight.numel() // 8)  # one bit per weight
    loaded = load_masks(path)
    assert loaded.keys() == masks.keys()
    for name, mask in masks.items():
        assert loaded[name].dtype == torch.bool and torch.equal(loaded[name], mask)


def test_packed_masks_of_odd_sizes_and_old_byte_files(tmp_path) -> None:
    """Sizes that are no multiple of 8 round-trip; files of one uint8 per weight (before packing) load."""
    g = torch.Generator().manual_seed(0)
    masks = {f"m{n}": torch.rand(n, 3, generator=g) > 0.5 for n in (1, 5, 11)}
    save_masks(masks, tmp_path / "packed.safetensors")
    assert all(torch.equal(load_masks(tmp_path / "packed.safetensors")[k], m) for k, m in masks.items())
    save_file({k: m.to(torch.uint8) for k, m in masks.items()}, str(tmp_path / "old.safetensors"))
    assert all(torch.equal(load_masks(tmp_path / "old.safetensors")[k], m) for k, m in masks.items())
    save_file(
        {"m5": torch.zeros(3, dtype=torch.uint8)},
        str(tmp_path / "bad.safetensors"),
        {"lit_prune.masks": "packbits-v1"},
    )
    with pytest.raises(LitPruneError, match=r"masks\[m5\]"):
        load_masks(tmp_path / "bad.safetensors")  # no shape recorded


@pytest.mark.embedded
def test_embedded_model_masks_take_a_sixth_of_one_byte_per_weight(tmp_path) -> None:
    """SmolLM2-135M's 210 prunable matrices: one byte per weight took 106 MB; packed takes 1/8 of it.
    The size depends on the shapes only, so the model is built on the meta device from its config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lit_prune.models.registry import model_dir
    from lit_prune.pruning.masks import prunable_linears

    config = AutoConfig.from_pretrained(model_dir("smollm2-135m"))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(0)
    masks = {
        name: torch.rand(m.weight.shape, generator=g) > 0.5 for name, m in prunable_linears(model).items()
    }
    weights = sum(mask.numel() for mask in masks.values())
    save_masks(masks, tmp_path / "masks.safetensors")
    size = (tmp_path / "masks.safetensors").stat().st_size
    assert len(masks) == 210 and weights > 105_000_000  # the one-byte file's 106 MB
    assert size <= 106e6 / 6 and size < weights / 8 + 100_000  # bits plus a header of names and shapes
    loaded = load_masks(tmp_path / "masks.safetensors")
    assert all(torch.equal(loaded[name], mask) for name, mask in masks.items())

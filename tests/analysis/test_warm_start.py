"""RQ2c warm-start survival: hand-computed cosines, survival, control ratio, bins and the CI."""

import math

import numpy as np
import pytest
import torch

from lit_prune.analysis.warm_start import (
    decoder_cosines,
    movement_by_bin,
    ratio,
    ratio_ci,
    warm_start_summary,
    warm_survival,
)
from lit_prune.errors import LitPruneError


def test_decoder_cosines_by_hand():
    before = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    after = torch.tensor([[2.0, 0.0], [1.0, 1.0], [-3.0, -4.0], [1.0, 0.0]])
    cos = decoder_cosines(before, after)
    assert cos.dtype == torch.float64
    assert cos[:3].tolist() == pytest.approx([1.0, 1 / math.sqrt(2), -1.0])
    assert math.isnan(cos[3])  # a zero row has no direction


def test_decoder_cosines_need_equal_shapes():
    with pytest.raises(LitPruneError, match="decoder shapes"):
        decoder_cosines(torch.zeros(3, 2), torch.zeros(4, 2))


def test_warm_survival_counts_alive_features_only():
    cos = [0.95, 0.75, 0.55, 0.2, float("nan"), 0.99]
    alive = [True, True, True, True, True, False]  # the last is dead: not counted although 0.99
    assert warm_survival(cos, alive) == {0.5: 3 / 5, 0.7: 2 / 5, 0.9: 1 / 5}
    assert math.isnan(warm_survival(cos, [False] * 6)[0.7])


def test_ratio_to_control():
    assert ratio(0.3, 0.6) == 0.5
    assert math.isnan(ratio(0.3, 0.0))


def test_ratio_ci_brackets_the_ratio_and_collapses_without_variance():
    cos, ctl, alive = np.full(10, 0.8), np.full(10, 0.95), np.ones(10, bool)
    cos[::2] = 0.1  # 5 of 10 survive at 0.7 in the condition, 10 of 10 in the control
    lo, hi = ratio_ci([(cos, ctl, alive), (cos, ctl, alive)], 0.7, n_boot=200)
    assert 0.2 <= lo <= 0.5 <= hi <= 0.8
    # every feature survives on both sides: each resample's ratio is 1
    lo, hi = ratio_ci([(np.full(4, 0.8), np.full(4, 0.9), np.ones(4, bool))], 0.7, n_boot=50)
    assert lo == hi == 1.0


def test_ratio_ci_includes_seed_variance():
    """Two starts that disagree (ratio 1 and 0.2): the seed-aware CI spans them; either alone is tight."""
    n = 200
    ctl, alive = np.full(n, 0.9), np.ones(n, bool)
    same = np.full(n, 0.9)
    moved = np.full(n, 0.9)
    moved[: int(0.8 * n)] = 0.0
    both = ratio_ci([(same, ctl, alive), (moved, ctl, alive)], 0.7, n_boot=400, seed=1)
    only_moved = ratio_ci([(moved, ctl, alive)], 0.7, n_boot=400, seed=1)
    assert both[0] <= 0.25 and both[1] >= 0.95
    assert only_moved[1] - only_moved[0] < 0.2


def test_movement_by_bin_by_hand():
    # 4 alive features, rates 1e-4, 1e-3, 1e-2, 1e-1 -> one per bin with 4 bins; one dead feature
    rate = [1e-4, 1e-3, 1e-2, 1e-1, 0.0]
    cos = [0.9, 0.6, 0.2, float("nan"), 0.0]
    ctl = [1.0, 0.9, 0.8, 0.5, 0.0]
    out = movement_by_bin(cos, ctl, rate, tau=0.7, n_bins=4)
    assert out["n"] == [1, 1, 1, 1]
    assert out["survival"] == [1, 0, 0, 0]
    assert out["control_survival"] == [1, 1, 1, 0]
    assert out["ratio"][:3] == [1, 0, 0] and math.isnan(out["ratio"][3])
    assert out["movement"] == pytest.approx([0.1, 0.4, 0.8, 1.0])  # NaN cosine moves fully
    assert out["excess_movement"] == pytest.approx([0.1, 0.3, 0.6, 0.5])


def test_summary_rows_are_consistent():
    rng = np.random.default_rng(0)
    n = 100
    rate = 10 ** rng.uniform(-4, -1, n)
    ctl = np.full(n, 0.95)
    cos = np.where(np.log10(rate) > -2.5, 0.3, 0.95)  # the frequent features move
    out = warm_start_summary(cos, ctl, rate, n_boot=50)
    assert out["warm_control@0.7"] == 1.0
    assert out["warm_survival@0.7"] == pytest.approx(np.mean(np.log10(rate) <= -2.5))
    assert out["warm_ratio@0.7"] == out["warm_survival@0.7"]
    assert out["warm_ratio_lo@0.7"] <= out["warm_ratio@0.7"] <= out["warm_ratio_hi@0.7"]
    assert out["warm_bin0_excess_movement"] == 0.0 and out["warm_bin4_excess_movement"] == pytest.approx(0.65)
    assert out["warm_rho_bin_excess_movement"] > 0.8  # frequent features move more

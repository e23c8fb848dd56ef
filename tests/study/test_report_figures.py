"""The report's figures: geometric survival on its own axis, legends outside the data, no constant
panels, one number format."""

import pytest

from lit_prune.study.report import figures as F
from lit_prune.study.report.analysis import TAU


def _rows(key_values):
    rows = [{"method": "dense", "sparsity": 0.0}]
    for method in ("magnitude", "wanda"):
        for s, values in key_values:
            rows.append({"method": method, "sparsity": s, **values})
    return rows


def test_survival_puts_geometric_on_its_own_axis_and_the_legend_outside():
    rows = _rows(
        [(0.3, {f"S@{TAU:g}": 0.04, "functional_S": 0.8}), (0.5, {f"S@{TAU:g}": 0.02, "functional_S": 0.6})]
    )
    baseline = {"mean": 0.05, "min": 0.04, "max": 0.06, "n": 3}
    fig = F.survival_figure(rows, baseline)
    geometric, functional = fig.axes
    assert geometric.get_ylim()[1] < 0.2  # scaled to its values (~0.05), not flat at the bottom of 0-1
    assert functional.get_ylim() == pytest.approx((-0.02, 1.05))
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "seed baseline: dense cross-seed shared@0.7 (mean, 0.050)" in labels  # fmt's format


def test_transfer_drops_the_constant_l0_ratio_panel():
    def values(fvu, ce):
        return {"fvu": fvu, "ce_recovered": ce, "kl_score": ce, "l0_ratio": 1.0, "sae_kind": "reference"}

    rows = _rows([(0.3, values(0.2, 0.9)), (0.5, values(0.3, 0.8))])
    rows[0].update(fvu=0.1, ce_recovered=0.95, kl_score=0.95, sae_kind="reference")
    fig = F.transfer_figure(rows)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["RQ3: fvu vs sparsity", "RQ3: ce_recovered vs sparsity", "RQ3: kl_score vs sparsity"]
    assert len(fig.legends) == 1

"""study.pruned_seeds: fewer SAE fits on the pruned models, every cross-seed pair still counted."""

from __future__ import annotations

import pytest
from helpers import ROOT

from lit_prune.commands.study import context_from_args
from lit_prune.errors import LitPruneError
from lit_prune.study.config import StudySettings
from lit_prune.study.steps import build_steps


def _keys(*overrides: str) -> dict[str, object]:
    ctx, _, _ = context_from_args(["--config", str(ROOT / "configs" / "tiny.yaml"), *overrides])
    return {f"{s.condition}/{s.name}": s for s in build_steps(ctx, "fingerprint")}


def test_pruned_models_train_only_the_pruned_seeds_and_pairs_wait_for_them():
    steps = _keys("--study.seeds=[0, 1, 2]", "--study.pruned_seeds=[0]", "--study.sparsities=[0.5]")
    for method in ("magnitude", "wanda"):
        cond = f"{method}-0.5"
        assert [k for k in steps if k.startswith(f"{cond}/seed")] == [f"{cond}/seed0"]
        assert f"{cond}/rq1" not in steps  # one pruned SAE: no pruned-model seed pairs
        deps = set(steps[f"{cond}/pairs"].deps)
        assert deps == {"dense/seed0", "dense/seed1", "dense/seed2", f"{cond}/seed0"}
    assert {f"dense/seed{s}" for s in (0, 1, 2)} <= set(steps)


def test_default_trains_every_seed_on_every_model():
    steps = _keys("--study.seeds=[0, 1]", "--study.sparsities=[0.5]")
    assert {"wanda-0.5/seed0", "wanda-0.5/seed1", "wanda-0.5/rq1"} <= set(steps)
    assert "pruned_seeds" not in steps["wanda-0.5/pairs"].inputs  # older studies stay done


@pytest.mark.parametrize("pruned", [[1], [0, 0], [0, 5], []])
def test_pruned_seeds_must_be_distinct_seeds_with_the_reference(pruned):
    with pytest.raises(LitPruneError, match="study.pruned_seeds"):
        StudySettings(seeds=[0, 1, 2], pruned_seeds=pruned)

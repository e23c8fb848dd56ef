"""SparseGPT as a study method: accepted, named like the others, not in the default grid."""

from __future__ import annotations

from lit_prune.study.config import StudySettings


def test_sparsegpt_conditions_are_named_and_optional():
    assert StudySettings().methods == ["magnitude", "wanda"]  # the default study's time budget is unchanged
    names = [c.name for c in StudySettings(methods=["sparsegpt"], sparsities=[0.5], nm=[[2, 4]]).conditions()]
    assert names == ["sparsegpt-0.5", "sparsegpt-2of4"]

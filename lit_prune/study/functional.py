"""The study's <condition>/functional step: functional survival of every SAE that RQ5 ablates.

The pruned fit of the reference seed measures the reference SAE's functional survival: per feature,
the Pearson r of its activations on the dense vs the pruned model, token by token (docs/methods.md §3).
RQ5 over several dense SAEs (study.importance_seeds) needs it for each of them, without a pruned fit
of each: this step runs each of those SAEs on both models over the same eval sequences as the fits'
survival callback and writes results/functional.safetensors: pearson_r [R, d_sae] (NaN: the feature
never fires on one of the models) and seed [R], the reference first.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lit_prune.analysis.results import write_arrays
from lit_prune.analysis.transfer import paired_features
from lit_prune.sae.io import load_sae
from lit_prune.study.config import DENSE, PruneCondition
from lit_prune.study.runner import Step

if TYPE_CHECKING:  # steps imports this module
    from lit_prune.study.steps import StudyContext

ARRAYS = "functional.safetensors"


def functional_of(ctx: StudyContext, base: dict[str, Any], cond: PruneCondition) -> Step:
    seeds = ctx.settings.seeds_of_importance()
    return Step(
        cond.name,
        "functional",
        {**base, "seeds": seeds, "sequences": ctx.settings.survival.get("functional_sequences")},
        lambda out: functional_step(ctx, out, cond),
        deps=[f"{cond.name}/prune"] + [f"{DENSE}/seed{s}" for s in seeds],
        cost=0.5,
    )


def functional_step(ctx: StudyContext, out: Path, cond: PruneCondition) -> dict[str, Any]:
    """Each RQ5 SAE on the dense and the pruned model (module doc); returns the mean r per seed."""
    seeds = ctx.settings.seeds_of_importance()
    ids = ctx.datamodule().eval_ids[: ctx.settings.survival.get("functional_sequences")]
    dense, pruned = ctx.load_lm(), ctx.load_pruned_lm(cond)
    batch = int(ctx.data.get("batch_size", 32))
    rs = []
    for s in seeds:
        sae, _ = load_sae(ctx.dense_sae(s), device=ctx.device)
        passed = paired_features(dense, pruned, ctx.model["hook_layer"], sae.encode, ids, batch)
        rs.append(passed.acc.compute().float().cpu())
    r = torch.stack(rs)
    write_arrays(out / "results" / ARRAYS, pearson_r=r, seed=torch.tensor(seeds))
    return {f"mean_r_seed{s}": float(torch.nanmean(r[i].double())) for i, s in enumerate(seeds)}

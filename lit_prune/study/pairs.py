"""The study's <condition>/pairs step: every cross-seed pair of RQ1 / RQ2 (docs/methods.md §4, §4b).

dense/pairs matches every ordered pair (a, b), a != b, of the dense SAEs (the seed baseline S_seed,
per pair and per firing-rate bin); <cond>/pairs matches every dense SAE a to every SAE b trained on
the pruned model, cross-seed pairs (a != b, RQ2's primary measure) and same-seed pairs (a == b,
reported apart). Only the decoders are matched: cheap beside a fit. Functional survival needs only
the reference and stays in the fit's survival callback.

Writes results/rq2_pairs.json (one row set per pair: S@tau, survivors, alive features, same_seed) and
results/rq2_pairs.safetensors: cosine [P, n] (matched cosine of SAE a's features, NaN unmatched),
firing_rate [P, n] (SAE a's firing rate on the dense eval split), seed_a, seed_b [P], same_seed [P].
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lit_prune.analysis.results import make_rows, read_arrays, write_arrays, write_rows
from lit_prune.analysis.survival import TAUS, pair_cosines, seed_pairs
from lit_prune.sae.io import load_sae
from lit_prune.study.config import DENSE

if TYPE_CHECKING:  # steps imports this module
    from lit_prune.study.steps import StudyContext

RESULTS, ARRAYS = "rq2_pairs.json", "rq2_pairs.safetensors"


def _decoders(ctx: StudyContext, condition_name: str, seeds: list[int]) -> dict[int, torch.Tensor]:
    return {
        s: load_sae(ctx.root / condition_name / f"seed{s}" / "sae")[0].W_dec.detach().float() for s in seeds
    }


def _dense_rate(ctx: StudyContext, seed: int) -> torch.Tensor:
    path = ctx.root / DENSE / f"seed{seed}" / "results" / "sae_firing_rates.safetensors"
    return read_arrays(path)["firing_rate"].double()


def pairs_step(ctx: StudyContext, out: Path, condition_name: str) -> dict[str, Any]:
    """Match every seed pair of a condition (module doc); returns the pair counts."""
    seeds, opts = ctx.settings.seeds, ctx.settings.rq1_options()
    taus = tuple(opts.get("taus", TAUS))
    match = {k: opts[k] for k in ("method", "candidates") if k in opts}
    dense = _decoders(ctx, DENSE, seeds)
    if condition_name == DENSE:
        cross, same = seed_pairs(seeds)
        cosine = pair_cosines(dense, None, cross, **match)
    else:
        pruned = ctx.settings.seeds_of_pruned()
        cross, same = seed_pairs(seeds, pruned)
        cosine = pair_cosines(dense, _decoders(ctx, condition_name, pruned), cross + same, **match)
    pairs = cross + same
    rates = {a: _dense_rate(ctx, a) for a in seeds}
    rate = torch.stack([rates[a] for a, _ in pairs])
    method, sparsity = ctx.settings.method_of(condition_name)
    rows = []
    for k, (a, b) in enumerate(pairs):
        alive = rate[k] > 0
        c = torch.nan_to_num(cosine[k].double(), nan=0.0)[alive]
        metrics = {f"S@{t:g}": float((c >= t).double().mean()) if c.numel() else float("nan") for t in taus}
        metrics.update({f"survivors@{t:g}": float((c >= t).sum()) for t in taus})
        metrics["n_alive"] = float(alive.sum())
        rows += make_rows(ctx.condition(method, sparsity, a, b), metrics, same_seed=a == b)
    write_rows(out / "results" / RESULTS, rows)
    write_arrays(
        out / "results" / ARRAYS,
        cosine=cosine.float(),
        firing_rate=rate,
        seed_a=torch.tensor([a for a, _ in pairs]),
        seed_b=torch.tensor([b for _, b in pairs]),
        same_seed=torch.tensor([a == b for a, b in pairs]),
    )
    return {"cross_pairs": len(cross), "same_seed_pairs": len(same)}

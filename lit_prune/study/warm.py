"""The study's RQ2c steps: survival under retraining from the dense SAE (docs/methods.md §4).

dense/warm<s>   dense/seed<s>'s SAE trained further on the dense model (the control A'(0))
<cond>/warm<s>  the same SAE trained further on the pruned model (A'(m, s)), same steps and data order

Each trains study.warm_start.steps SAE steps from the export of dense/seed<s> (same input scale c;
a fresh optimizer) and writes sae/ (the warm SAE), results/warm_start.json and
results/warm_start.safetensors: `cosine` [d_sae], each feature's decoder cosine to its start, and
`firing_rate` [d_sae] (the source's, on the dense eval split). The rows are its own S_warm per tau
(`warm_survival@<tau>`, over the source's alive features), survivors and median cosine, and the warm
SAE's validation metrics prefixed `val_`. The comparison with the control (ratio, CI over seeds and
features, movement by firing-rate bin) is the report's, from the arrays (`warm_comparison`): so a
condition's warm start never waits for the control's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lit_prune.analysis.results import make_rows, read_arrays, write_arrays, write_rows
from lit_prune.analysis.survival import TAUS
from lit_prune.analysis.warm_start import (
    decoder_cosines,
    ratio,
    ratio_ci,
    warm_start_summary,
    warm_survival,
)
from lit_prune.sae.io import load_sae
from lit_prune.study.config import DENSE, PruneCondition
from lit_prune.study.runner import Step

if TYPE_CHECKING:  # steps imports this module
    from lit_prune.study.steps import StudyContext

RESULTS, ARRAYS = "warm_start.json", "warm_start.safetensors"
Fit = Callable[[Path, int, "PruneCondition | None"], dict[str, Any]]
"""(out, seed, condition or None for the control) -> the fit's summary; exports the SAE to out/sae."""


def warm_steps(ctx: StudyContext, base: dict[str, Any], fit: Fit) -> list[Step]:
    """The control and every condition's warm start, for each seed of study.warm_start (none when off).

    The inputs hold the warm-start settings; the source SAE enters through the dense fit's hash."""
    st = ctx.settings
    w = st.warm_start
    inputs = {**base, "warm_start": {"steps": w.steps, "lr": w.lr, "sae_batch_tokens": w.sae_batch_tokens}}
    steps = []
    for s in st.warm_seeds():
        source = f"{DENSE}/seed{s}"
        steps.append(
            Step(
                DENSE,
                f"warm{s}",
                {**inputs, "seed": s},
                lambda out, s=s: warm_step(ctx, out, s, None, fit),
                deps=[source],
                cost=2,
                shares=DENSE,
            )
        )
        for cond in st.conditions():
            steps.append(
                Step(
                    cond.name,
                    f"warm{s}",
                    {**inputs, "seed": s},
                    lambda out, s=s, c=cond: warm_step(ctx, out, s, c, fit),
                    deps=[f"{cond.name}/prune", source],
                    cost=2,
                    shares=cond.name,
                )
            )
    return steps


def warm_step(
    ctx: StudyContext, out: Path, seed: int, cond: PruneCondition | None, fit: Fit
) -> dict[str, Any]:
    """Train the warm start, then measure each feature's movement (module doc)."""
    summary = fit(out, seed, cond)
    source = ctx.root / DENSE / f"seed{seed}"
    start, _ = load_sae(source / "sae")
    after, _ = load_sae(out / "sae")
    cosine = decoder_cosines(start.W_dec.detach(), after.W_dec.detach())
    rate = read_arrays(source / "results" / "sae_firing_rates.safetensors")["firing_rate"].double()
    taus = tuple(ctx.settings.survival.get("taus", TAUS))
    alive = rate > 0
    metrics = {f"warm_survival@{t:g}": v for t, v in warm_survival(cosine, alive, taus).items()}
    metrics |= {f"warm_survivors@{t:g}": float((cosine[alive] >= t).sum()) for t in taus}
    metrics["warm_median_cosine"] = float(cosine[alive].nanmedian()) if alive.any() else float("nan")
    condition = (
        ctx.condition(cond.label, cond.sparsity, seed_a=seed, seed_b=seed)
        if cond
        else ctx.condition(seed_a=seed, seed_b=seed)
    )
    metrics |= {f"val_{k}": v for k, v in summary["metrics"].items()}
    metrics |= {"warm_steps": summary["steps"], "warm_tokens": summary["tokens_trained"]}
    write_rows(out / "results" / RESULTS, make_rows(condition, metrics))
    write_arrays(out / "results" / ARRAYS, cosine=cosine, firing_rate=rate)
    logger = ctx.logger(f"warm{seed}", cond.name if cond else DENSE)
    logger.log_metrics({f"rq2c/{k}": v for k, v in metrics.items() if k.startswith("warm_")}, step=0)
    logger.finalize("success")
    return {k: v for k, v in metrics.items() if k.startswith("warm_survival@")}


def warm_comparison(
    read: Callable[[str], dict[str, torch.Tensor] | None],
    cond_name: str,
    seeds: list[int],
    taus: tuple[float, ...] = TAUS,
    n_boot: int = 1000,
) -> dict[str, Any] | None:
    """A condition's warm starts against their controls, over the seeds with both steps finished
    (`read(key)` returns a step's warm_start arrays or None): `per_seed` summaries
    (`warm_start_summary`: S_warm, control, ratio with a feature CI, movement by bin), and the ratio
    pooled over the seeds with a CI over seeds, then features (`ratio_ci`). None when none finished."""
    arms, per_seed = [], []
    for s in seeds:
        mine, control = read(f"{cond_name}/warm{s}"), read(f"{DENSE}/warm{s}")
        if mine is None or control is None:
            continue
        arms.append((mine["cosine"], control["cosine"], mine["firing_rate"] > 0))
        per_seed.append(
            warm_start_summary(mine["cosine"], control["cosine"], mine["firing_rate"], taus, n_boot=n_boot)
        )
    if not arms:
        return None
    pooled = {}
    for t in taus:
        hits = sum(float((c[a] >= t).sum()) for c, _, a in arms)
        control_hits = sum(float((c0[a] >= t).sum()) for _, c0, a in arms)
        pooled[f"ratio@{t:g}"] = ratio(hits, control_hits)
        pooled[f"ratio_ci@{t:g}"] = ratio_ci(arms, t, n_boot=n_boot)
    return {"per_seed": per_seed, "pooled": pooled}

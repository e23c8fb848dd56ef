"""The feature gallery step: top-activating eval contexts of a few surviving and a few lost
reference features, on the dense and on the pruned model (written to gallery.json)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lit_prune.analysis.evaluate import harvest
from lit_prune.analysis.results import read_arrays
from lit_prune.errors import invalid
from lit_prune.models.registry import load_tokenizer
from lit_prune.pruning import apply_masks, load_masks
from lit_prune.sae.io import load_sae
from lit_prune.study.config import PruneCondition, StudySettings

if TYPE_CHECKING:  # steps imports this module
    from lit_prune.study.steps import StudyContext


def gallery_condition(st: StudySettings) -> PruneCondition:
    conditions = st.conditions()
    if st.gallery_condition is not None:
        for cond in conditions:
            if cond.name == st.gallery_condition:
                return cond
        raise invalid("study.gallery_condition", st.gallery_condition, ", ".join(c.name for c in conditions))
    unstructured = [c for c in conditions if c.nm is None] or conditions
    for method in ("wanda", "magnitude"):
        mine = [c for c in unstructured if c.method == method]
        if mine:
            at_most_half = [c for c in mine if c.sparsity <= 0.5] or mine
            return max(at_most_half, key=lambda c: c.sparsity)
    return unstructured[0]


@torch.no_grad()
def gallery_step(ctx: StudyContext, out: Path, cond: PruneCondition) -> dict[str, Any]:
    """Top-activating eval contexts of a few surviving and a few lost reference features, on the
    dense and on the pruned model (survival: the functional Pearson r of the reference-seed fit)."""
    st, dm, layer = ctx.settings, ctx.datamodule(), ctx.model["hook_layer"]
    sae, _ = load_sae(ctx.reference(), device=ctx.device)
    arrays = read_arrays(
        ctx.root / cond.name / f"seed{st.reference_seed}" / "results" / "rq2_survival.safetensors"
    )
    r, rate, cosine = (
        arrays["pearson_r"].double(),
        arrays["firing_rate"].double(),
        arrays["matched_cosine"].double(),
    )
    threshold = float(st.survival.get("functional_threshold", 0.7))
    usable = (rate >= 1e-3) & ~torch.isnan(r)  # fires often enough to show several contexts
    order = torch.argsort(torch.where(usable, r, torch.nan).nan_to_num(-2.0), descending=True)
    survivors = [int(i) for i in order[: st.gallery_features] if usable[i] and r[i] >= threshold]
    lost_order = torch.argsort(torch.where(usable, r, torch.nan).nan_to_num(2.0))
    lost = [int(i) for i in lost_order[: st.gallery_features] if usable[i] and r[i] < threshold]
    chosen = survivors + lost
    ids = dm.eval_ids[: st.gallery_sequences]
    dense = ctx.load_lm()
    pruned = ctx.load_lm()
    apply_masks(
        pruned,
        {
            k: v.to(ctx.device)
            for k, v in load_masks(ctx.root / cond.name / "prune" / "masks.safetensors").items()
        },
    )
    tokenizer = load_tokenizer(
        ctx.model["model_name"], ctx.model.get("model_cache_dir", "checkpoints/models")
    )
    acts = {}
    for name, lm in (("dense", dense), ("pruned", pruned)):
        chunks = [
            sae.encode(harvest(lm, batch.to(ctx.device), layer))[:, chosen].cpu() for batch in ids.split(16)
        ]
        acts[name] = torch.cat(chunks) if chosen else torch.zeros(0, 0)
    features = []
    for j, feature in enumerate(chosen):
        entry = {
            "feature": feature,
            "status": "survived" if feature in survivors else "lost",
            "pearson_r": float(r[feature]),
            "matched_cosine": float(cosine[feature]),
            "firing_rate": float(rate[feature]),
        }
        for name in ("dense", "pruned"):
            entry[name] = _top_contexts(acts[name][:, j], ids, tokenizer)
        features.append(entry)
    record = {
        "condition": cond.name,
        "method": cond.label,
        "sparsity": cond.sparsity,
        "threshold": threshold,
        "sequences": int(ids.shape[0]),
        "features": features,
    }
    (out / "gallery.json").write_text(json.dumps(record, indent=1))
    return {"survived": len(survivors), "lost": len(lost)}


def _top_contexts(
    values: torch.Tensor, ids: torch.Tensor, tokenizer: Any, n: int = 3, left: int = 12, right: int = 3
) -> list[dict[str, Any]]:
    """The n highest activations (positions >= 1 of fixed-length rows) with their surrounding tokens."""
    per_row = ids.shape[1] - 1
    out = []
    for flat in torch.argsort(values, descending=True)[:n].tolist():
        if values[flat] <= 0:
            break
        row, pos = divmod(flat, per_row)
        pos += 1
        seq = ids[row].tolist()
        out.append(
            {
                "activation": float(values[flat]),
                "left": tokenizer.decode(seq[max(0, pos - left) : pos]),
                "token": tokenizer.decode(seq[pos : pos + 1]),
                "right": tokenizer.decode(seq[pos + 1 : pos + 1 + right]),
            }
        )
    return out

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


DUPLICATE_COSINE = 0.9
"""Two gallery features whose reference decoder directions have a cosine above this are one feature."""
SEPARATOR_ONLY = 0.9
"""A feature whose firing positions are at least this fraction special tokens (<|im_end|>, end of
document, ...) is marked as a separator feature, and at most one such feature is shown per status."""


def cross_seed_cosine(ctx: StudyContext, cond: PruneCondition) -> torch.Tensor | None:
    """Per reference feature: the mean matched cosine over the cross-seed pairs (reference seed a, seed
    b != a on the pruned model) of the pairs step; None when the study has no cross-seed pair."""
    path = ctx.root / cond.name / "pairs" / "results" / "rq2_pairs.safetensors"
    if not path.is_file():
        return None
    arr = read_arrays(path)
    ref = ctx.settings.reference_seed
    rows = (arr["seed_a"] == ref) & (arr["seed_b"] != ref)
    return arr["cosine"][rows].double().nan_to_num(0.0).mean(0) if rows.any() else None


def _fires(sae: Any, lm: torch.nn.Module, ids: torch.Tensor, layer: int, features: list[int], device: str):
    """Activations [tokens (positions >= 1), len(features)] of the chosen features on these ids."""
    chunks = [sae.encode(harvest(lm, b.to(device), layer))[:, features].cpu() for b in ids.split(16)]
    return torch.cat(chunks) if features else torch.zeros(0, 0)


def separator_fraction(acts: torch.Tensor, ids: torch.Tensor, special: list[int]) -> torch.Tensor:
    """Per feature: the fraction of its firing positions (>= 1) whose token is a special token."""
    tokens = ids[:, 1:].reshape(-1)
    is_special = torch.isin(tokens, torch.tensor(special, dtype=tokens.dtype))[:, None]
    fired = acts > 0
    return (fired & is_special).sum(0) / fired.sum(0).clamp(min=1)


def pick_distinct(
    order: list[int],
    decoder: torch.Tensor,
    separator: dict[int, bool],
    n: int,
    threshold: float = DUPLICATE_COSINE,
) -> list[int]:
    """The first n features of `order` whose unit decoder rows have cosine <= threshold with every
    one already picked, with at most one separator-only feature."""
    unit = torch.nn.functional.normalize(decoder.double(), dim=-1)
    picked: list[int] = []
    for f in order:
        if len(picked) == n:
            break
        if separator.get(f) and any(separator.get(g) for g in picked):
            continue
        if picked and float((unit[picked] @ unit[f]).max()) > threshold:
            continue
        picked.append(f)
    return picked


@torch.no_grad()
def gallery_step(ctx: StudyContext, out: Path, cond: PruneCondition) -> dict[str, Any]:
    """Top-activating eval contexts of a few surviving and a few lost reference features, on the
    dense and on the pruned model (survival: the functional Pearson r of the reference-seed fit).

    Features are distinct (no two with decoder cosine > DUPLICATE_COSINE), separator-only ones are
    marked (and one per status at most), and the matched cosine shown is the cross-seed one."""
    st, dm, layer = ctx.settings, ctx.datamodule(), ctx.model["hook_layer"]
    sae, _ = load_sae(ctx.reference(), device=ctx.device)
    arrays = read_arrays(
        ctx.root / cond.name / f"seed{st.reference_seed}" / "results" / "rq2_survival.safetensors"
    )
    r, rate = arrays["pearson_r"].double(), arrays["firing_rate"].double()
    same_cosine = arrays["matched_cosine"].double()
    cross = cross_seed_cosine(ctx, cond)
    threshold = float(st.survival.get("functional_threshold", 0.7))
    usable = (rate >= 1e-3) & ~torch.isnan(r)  # fires often enough to show several contexts
    pool = 8 * st.gallery_features  # candidates, before duplicates and separator features are dropped
    order = torch.argsort(torch.where(usable, r, torch.nan).nan_to_num(-2.0), descending=True)
    survivors = [int(i) for i in order[:pool] if usable[i] and r[i] >= threshold]
    lost_order = torch.argsort(torch.where(usable, r, torch.nan).nan_to_num(2.0))
    lost = [int(i) for i in lost_order[:pool] if usable[i] and r[i] < threshold]
    ids = dm.eval_ids[: st.gallery_sequences]
    dense = ctx.load_lm()
    tokenizer = load_tokenizer(
        ctx.model["model_name"], ctx.model.get("model_cache_dir", "checkpoints/models")
    )
    candidates = survivors + lost
    sep = separator_fraction(
        _fires(sae, dense, ids, layer, candidates, ctx.device), ids, list(tokenizer.all_special_ids)
    )
    is_sep = {f: bool(sep[j] >= SEPARATOR_ONLY) for j, f in enumerate(candidates)}
    decoder = sae.W_dec.detach().cpu()
    survivors = pick_distinct(survivors, decoder, is_sep, st.gallery_features)
    lost = pick_distinct(lost, decoder, is_sep, st.gallery_features)
    chosen = survivors + lost
    pruned = ctx.load_pruned_lm(cond)
    acts = {
        name: _fires(sae, lm, ids, layer, chosen, ctx.device)
        for name, lm in (("dense", dense), ("pruned", pruned))
    }
    features = []
    for j, feature in enumerate(chosen):
        entry = {
            "feature": feature,
            "status": "survived" if feature in survivors else "lost",
            "pearson_r": float(r[feature]),
            "matched_cosine": float(cross[feature]) if cross is not None else None,
            "matched_cosine_same_seed": float(same_cosine[feature]),
            "firing_rate": float(rate[feature]),
            "separator_fraction": float(sep[candidates.index(feature)]),
        }
        if is_sep[feature]:
            entry["note"] = "fires only on separator / end-of-document tokens"
        for name in ("dense", "pruned"):
            entry[name] = _top_contexts(acts[name][:, j], ids, tokenizer)
        features.append(entry)
    record = {
        "condition": cond.name,
        "method": cond.label,
        "sparsity": cond.sparsity,
        "threshold": threshold,
        "sequences": int(ids.shape[0]),
        "matched_cosine": "cross-seed" if cross is not None else "not measured (one seed)",
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

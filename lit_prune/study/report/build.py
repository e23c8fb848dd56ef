"""The study report: `write_report(<study dir>)` -> <study dir>/report/{report.md, report.html, figures/, tables/}.

Reads only finished steps (done.json whose hash matches study.json; see `report.data`), so a
partial study renders too, with "–" for what is not measured yet and a list of missing / stale
steps. The report is built in a temp directory beside report/ and renamed into place only when
complete: a failed re-render leaves the previous report as it was.

"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from lit_prune.errors import invalid
from lit_prune.files import staging_dir
from lit_prune.study.report import analysis as A
from lit_prune.study.report import figures as F
from lit_prune.study.report import recovery as RQ6
from lit_prune.study.report import tables as T
from lit_prune.study.report.claims import headline, same_seed_text
from lit_prune.study.report.data import StudyData, load_study
from lit_prune.study.report.render import (
    Block,
    Bullets,
    FigureRef,
    Gallery,
    Heading,
    Para,
    Pre,
    markdown,
    page,
)

REPORT_DIR = "report"


def write_report(root: str | Path) -> Path:
    """Write <root>/report/ atomically; returns the path of report.md. LitPruneError for a bad study dir."""
    data = load_study(root)
    title, blocks, figures = build_report(data)
    root = Path(root)
    try:
        tmp = staging_dir(root, f".{REPORT_DIR}-")
    except OSError as err:
        raise invalid(
            "study_dir", str(root), f"a directory the report can be written into ({err.strerror})"
        ) from None
    try:
        (tmp / "figures").mkdir()
        (tmp / "tables").mkdir()
        images = {name: F.png(fig) for name, fig in figures.items()}
        for name, image in images.items():
            (tmp / "figures" / f"{name}.png").write_bytes(image)
        for table in (b for b in blocks if isinstance(b, T.Table)):
            (tmp / "tables" / f"{table.name}.csv").write_text(table.csv(), encoding="utf-8")
        (tmp / "report.md").write_text(markdown(title, blocks), encoding="utf-8")
        (tmp / "report.html").write_text(page(title, blocks, images), encoding="utf-8")
        _swap_into_place(tmp, root / REPORT_DIR)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / REPORT_DIR / "report.md"


def _swap_into_place(new: Path, final: Path) -> None:
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        if old.exists():
            os.replace(old, final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def build_report(data: StudyData) -> tuple[str, list[Block], dict[str, Figure]]:
    """(title, blocks, figures by name) of a loaded study."""
    st, model = data.settings, data.study.get("model", {})
    reference = (
        f"the pretrained SAE {st['reference_sae']}"
        if st.get("reference_sae")
        else f"our dense-model SAE of seed {data.reference_seed}"
    )
    ppl, sae, surv = A.perplexity(data), A.sae_metrics(data), A.survivals(data)
    transfer, baseline = A.transfer(data), A.seed_baseline(data)
    viable, importance, fragile = A.viability(transfer), A.importance(data), A.fragility_by_method(data)
    pairs = [p for c in data.conditions for p in A.seed_pairs(data, c)]
    r0 = float(st.get("survival", {}).get("functional_threshold", 0.7))
    recovered = RQ6.recovery_rows(data, r0)
    figures: dict[str, Figure] = {}
    captions: dict[str, str] = {}

    def figure(name: str, fig: Figure | None, caption: str) -> list[Block]:
        if fig is None:
            return [Para(f"(No figure yet: {caption}. Its steps have not finished.)")]
        figures[name], captions[name] = fig, caption
        return [FigureRef(name, caption)]

    blocks: list[Block] = [
        Para(
            f"How pruning reshapes SAE features, reproducing arXiv 2603.25325 on {model.get('model_name', '?')} "
            f"(residual stream after block {model.get('hook_layer', '?')}). Reference SAE: {reference}. "
            f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from {data.root.resolve()}."
        ),
        Para(_status(data)),
        Heading("Headline: the paper's claims and ours"),
        Para(
            same_seed_text(surv)
            + " Verdicts are for this study's model and grid only."
            + (
                ""
                if len(data.seeds) > 1 or st.get("reference_sae")
                else " This study has one SAE seed, so no cross-seed SAE: geometric survival, fragility and the RQ5 "
                "survival tests need two or more seeds (study.seeds)."
            )
        ),
        T.headline_table(
            _headline(data, surv, viable, reference, r0)
            + ([RQ6.recovery_claim(recovered, r0)] if recovered else [])
        ),
        Heading("Perplexity"),
        T.perplexity_table(ppl),
        *figure("perplexity", F.perplexity_figure(ppl), "Perplexity vs sparsity per method (log scale)"),
        Heading("SAE quality on each model"),
        T.sae_table(sae),
        Heading("RQ1: seed stability"),
        T.rq1_table(pairs),
        Heading("RQ2: feature survival"),
        T.survival_table(surv, r0),
        *figure(
            "survival",
            F.survival_figure(surv, baseline, r0),
            "Survival vs sparsity: geometric (cross-seed, τ = 0.7) and functional, with the seed baseline band",
        ),
        *_warm_start(data, figure),
        Heading("RQ3: SAE transferability"),
        T.transfer_table(transfer),
        *figure(
            "transfer",
            F.transfer_figure(transfer),
            "Transfer metrics of the dense-model SAE vs sparsity, with the viability limits",
        ),
        Heading("RQ4: feature fragility"),
        *T.bins_tables(surv, r0),
        *figure(
            "survival_bins",
            F.bins_figure(surv, r0),
            "Survival by firing-rate bin per condition (bin 0 = rarest)",
        ),
        T.fragility_table(fragile),
        *figure(
            "fragility",
            F.fragility_figure(fragile),
            "Fragility F of each reference feature vs its firing rate on the dense model, per method",
        ),
        Heading("RQ5: causal relevance"),
        T.rq5_table(A.rq5_groups(data)),
        T.importance_table(importance),
        T.importance_effects_table(A.importance_effects(data, r0=r0)),
        *figure(
            "importance",
            F.importance_figure(importance["attribution"]),
            "Importance (|gradient attribution|) vs cross-seed matched cosine of each alive reference feature",
        ),
        *_recovery(recovered, figure),
        Heading("Feature gallery"),
        *_gallery(data),
        Heading("Configuration and provenance"),
        *_provenance(data),
    ]
    return f"Study report: {data.study.get('name', data.root.name)}", blocks, figures


def _warm_start(data: StudyData, figure: Callable[[str, Figure | None, str], list[Block]]) -> list[Block]:
    """RQ2c beside the cross-seed numbers: warm-start survival against its control."""
    rows = A.warm_start(data)
    if not rows:
        return []
    return [
        Heading("RQ2c: survival under retraining (warm start)"),
        Para(
            "The dense SAE trained further on each pruned model, against the same SAE trained further on the "
            "dense model for the same steps and data order: no matching and no seed noise, so a ratio below "
            "1 whose CI excludes 1 is pruning moving features beyond what retraining alone moves."
        ),
        T.warm_start_table(rows),
        *figure(
            "warm_start",
            F.warm_start_figure(rows),
            "Warm-start survival relative to its dense control vs sparsity (τ = 0.7, 95% CI over seeds and "
            "features), and which features move by firing-rate bin",
        ),
    ]


def _recovery(
    rows: list[dict[str, Any]], figure: Callable[[str, Figure | None, str], list[Block]]
) -> list[Block]:
    """RQ6 (study.recovery): each recovered model beside its pruned twin."""
    if not rows:
        return []
    return [
        Heading("RQ6: does recovery restore features?"),
        Para(
            "Each chosen pruned model fine-tuned with its masks kept exact (study.recovery), then measured "
            "like the pruned models: a verdict is 'restored' only when the CI of S_recovered / S_pruned "
            "lies above 1 (the pairs and features of both drawn jointly), with the reason when not "
            "determinable. "
            + " ".join(
                f"{r['condition']}: {r['verdict']} ({r['reason']}); functional: {r['functional_verdict']}; "
                f"lost features that come back: {r['which']} ({r['which_reason']})"
                + ("; the recovered S is back within the seed band." if r["back_in_seed_band"] else ".")
                for r in rows
            )
        ),
        RQ6.recovery_table(rows),
        RQ6.recovery_bins_table(rows),
        *figure(
            "recovery",
            RQ6.recovery_figure(rows),
            "Pruned vs recovered: perplexity, geometric survival (cross-seed, τ = 0.7, 95% CI) with the seed "
            "baseline, functional survival, and the net return of lost features per firing-rate bin",
        ),
    ]


def _headline(
    data: StudyData, surv: list[dict[str, Any]], viable: dict[str, Any], reference: str, r0: float
) -> list[dict[str, str]]:
    """The claims with effect sizes and seed-level CIs (`report.claims`; docs/methods.md §4b)."""
    geo = [{"condition": c.name, "effects": A.cross_effects(data, c)} for c in data.pruned]
    func = [{"condition": c.name, "effects": A.functional_effects(data, c, r0)} for c in data.pruned]
    wanda_f = ", ".join(
        f"s={r['sparsity']:g}: {r['functional_S']:.3f}"
        for r in surv
        if r["method"] == "wanda" and r.get("functional_S") is not None
    )
    return headline(
        geo,
        func,
        A.method_contrasts(data, r0=r0),
        viable,
        A.importance_effects(data, r0=r0),
        A.dense_baseline(data),
        reference,
        r0,
        f"functional S of Wanda: {wanda_f}" if wanda_f else "–",
    )


def _status(data: StudyData) -> str:
    total = len(data.study.get("steps", {}))
    if not data.missing and not data.stale:
        return f"Status: complete, all {total} steps finished."
    return (
        f"Status: incomplete, {len(data.finished)} of {total} steps finished ({len(data.missing)} missing, "
        f"{len(data.stale)} stale and ignored); the tables show what is finished and '–' for the rest. "
        "See 'Missing and stale steps' at the end."
    )


def _gallery(data: StudyData) -> list[Block]:
    for c in data.pruned:
        record = data.json(f"{c.name}/gallery", "gallery.json")
        if record is not None:
            return [
                Para(
                    f"Top-activating eval contexts of reference features on the dense and on the {c.title} model "
                    f"({record.get('sequences', '?')} eval sequences searched). Survived / lost: functional "
                    f"survival, Pearson r >= {record.get('threshold', 0.7):g} between the feature's activations "
                    "on the two models; matched cosine: mean over the cross-seed pairs (the reference against "
                    "the SAEs of the other seeds on the pruned model). Features are distinct (decoder cosine "
                    "<= 0.9); ⚑ marks features that fire only on separator / end-of-document tokens. "
                    "⏎ marks a newline; the highlighted token is where the feature fires."
                ),
                Gallery(record),
            ]
    return [Para("No finished gallery step yet.")]


def _provenance(data: StudyData) -> list[Block]:
    st, study = data.settings, data.study
    corpus: dict[str, Any] = study.get("corpus", {}) or {}
    model: dict[str, Any] = study.get("model", {}) or {}
    versions = ", ".join(f"{k} {v}" for k, v in sorted((study.get("versions") or {}).items()))
    wall = sum(float(r.get("seconds") or 0.0) for r in data.runs)
    items = [
        f"study: {study.get('name')} in {data.root.resolve()}",
        f"model: {model.get('model_name')}, hook layer {model.get('hook_layer')}",
        f"methods: {', '.join(st.get('methods', []))}; sparsities: "
        f"{', '.join(f'{s:g}' for s in st.get('sparsities', []))}"
        + (f"; N:M: {st['nm']}" if st.get("nm") else ""),
        f"SAE seeds: {', '.join(map(str, data.seeds))} (reference seed {data.reference_seed}); seed_everything "
        f"{study.get('seed_everything')}",
        f"reference SAE: {st.get('reference_sae') or 'own dense-model SAE'}",
        f"corpus: {corpus.get('corpus')}, fingerprint {corpus.get('fingerprint')}, train / eval / calibration "
        f"tokens {corpus.get('train_tokens')} / {corpus.get('eval_tokens')} / {corpus.get('calibration_tokens')}",
        f"versions: {versions or '–'}",
        f"time: {data.step_seconds:.0f} s in the {len(data.finished)} finished steps; {wall:.0f} s of wall time "
        f"over {len(data.runs)} invocation(s)",
    ]
    blocks: list[Block] = [Bullets(items), T.runs_table(data.runs), Heading("Missing and stale steps", 3)]
    if not (data.missing or data.stale or data.extra):
        blocks.append(Para("None: every step of the grid is finished and current."))
    else:
        blocks.append(
            Bullets(
                [f"missing: {k}" for k in data.missing]
                + [f"stale (finished with other inputs; ignored): {k}" for k in data.stale]
                + [f"not in this grid (ignored): {k}" for k in data.extra]
            )
        )
    blocks += [
        Heading("study.json", 3),
        Pre(
            json.dumps(study, indent=1, sort_keys=True, default=str),
            "json",
            collapsed="study.json (click to expand)",
        ),
    ]
    return blocks

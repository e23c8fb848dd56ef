"""The study report on a hand-written synthetic study directory: aggregates, verdicts, files, errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_prune.analysis.results import Condition, make_rows, write_arrays, write_rows
from lit_prune.analysis.stats import spearman
from lit_prune.errors import LitPruneError
from lit_prune.study.report import analysis as A
from lit_prune.study.report import build as R
from lit_prune.study.report import tables as T
from lit_prune.study.report.data import load_study

N = 40  # reference features
S_07 = {("magnitude", 0.25): 0.4, ("magnitude", 0.5): 0.1, ("wanda", 0.25): 0.5, ("wanda", 0.5): 0.37}
RHO_BIN = {("magnitude", 0.25): -1.0, ("magnitude", 0.5): -1.0, ("wanda", 0.25): 0.5, ("wanda", 0.5): -1.0}
FUNC_RHO = {("magnitude", 0.25): -1.0, ("magnitude", 0.5): 0.2, ("wanda", 0.25): 0.3, ("wanda", 0.5): None}
VIABLE = {("magnitude", 0.25): 1.0, ("magnitude", 0.5): 0.0, ("wanda", 0.25): 1.0, ("wanda", 0.5): 1.0}
CONDS = list(S_07)


def _cond(method="dense", s=0.0, a=None, b=None):
    return Condition(
        model="tiny-llama", hook="blocks.1.hook_resid_post", method=method, sparsity=s, seed_a=a, seed_b=b
    )


DECODER_NORM = torch.linspace(2.0, 1.0, N)


def _cosines(method, s):
    """Per-feature cross-seed matched cosines; feature 0: 0.8 at s=0.25 and 0.6 at s=0.5 for both methods."""
    rng = np.random.default_rng(int(s * 100) + (7 if method == "wanda" else 0))
    cos = rng.uniform(0.2, 0.95, N)
    cos[0] = 0.8 if s == 0.25 else 0.6
    cos[1] = np.nan  # unmatched: read as 0
    return cos


ATTRIBUTION = np.where(np.arange(N) % 3 == 0, -1.0, 1.0) * np.linspace(
    1e-3, 4e-2, N
)  # signs differ: |.| matters
RATE = np.r_[np.linspace(1e-3, 0.2, N - 1), 0.0]  # the last feature is dead


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("studies") / "synthetic"
    keys = ["dense/seed0", "dense/seed1", "dense/perplexity", "dense/rq5", "dense/rq1"]
    for m, s in CONDS:
        keys += [f"{m}-{s:g}/{step}" for step in ("prune", "seed0", "seed1", "rq1")]
    keys.append("wanda-0.25/gallery")
    steps = {k: f"h-{k}" for k in keys}
    root.mkdir()
    (root / "study.json").write_text(
        json.dumps(
            {
                "name": "synthetic",
                "settings": {
                    "methods": ["magnitude", "wanda"],
                    "sparsities": [0.25, 0.5],
                    "nm": [],
                    "seeds": [0, 1],
                    "reference_sae": None,
                },
                "model": {"model_name": "tiny-llama", "hook_layer": 1},
                "corpus": {"corpus": "python-docs", "fingerprint": "fp123"},
                "versions": {"torch": "x"},
                "seed_everything": 0,
                "steps": steps,
            }
        )
    )
    (root / "runs.jsonl").write_text(
        json.dumps({"shard": "0/1", "started": 1.0e9, "seconds": 100.0, "ran": keys, "skipped": []}) + "\n"
    )

    def done(key, hash_=None, seconds=2.0):
        (root / key).mkdir(parents=True, exist_ok=True)
        (root / key / "done.json").write_text(json.dumps({"hash": hash_ or steps[key], "seconds": seconds}))

    def res(key):
        return root / key / "results"

    write_rows(res("dense/perplexity") / "perplexity.json", make_rows(_cond(), {"perplexity": 10.0}))
    done("dense/perplexity")
    for seed, fvu in ((0, 0.1), (1, 0.2)):
        write_rows(
            res(f"dense/seed{seed}") / "sae_metrics.json",
            make_rows(_cond(a=seed), {"fvu": fvu, "l0": 8}, sae="own"),
        )
        done(f"dense/seed{seed}")
    write_rows(
        res("dense/rq1") / "rq1_seeds.json",
        make_rows(_cond(a=0, b=1), {"shared@0.7": 0.4, "shared@0.5": 0.6}),
    )
    write_arrays(
        res("dense/rq1") / "rq1_seeds.safetensors",
        stability_seed0=torch.linspace(0, 1, N),
        stability_seed1=torch.zeros(N),
    )
    done("dense/rq1")
    exact_features = torch.tensor([2, 3, 4, 5, 6, 7])
    write_arrays(
        res("dense/rq5") / "rq5_ablation.safetensors",
        attribution=torch.tensor(ATTRIBUTION),
        firing_rate=torch.tensor(RATE),
        features=exact_features,
        group=torch.tensor([0, 0, 1, 1, 2, 2]),
        exact_ce_firing=torch.linspace(0.1, 0.6, 6, dtype=torch.float64),
        eval_tokens=torch.tensor(1000),
    )
    write_rows(
        res("dense/rq5") / "rq5_ablation.json", make_rows(_cond(a=0), {"n_features": 2.0}, group="top")
    )
    done("dense/rq5")
    for m, s in CONDS:
        name = f"{m}-{s:g}"
        ppl = {
            ("magnitude", 0.25): 20.0,
            ("magnitude", 0.5): 400.0,
            ("wanda", 0.25): 12.0,
            ("wanda", 0.5): 999.0,
        }
        write_rows(
            res(f"{name}/prune") / "perplexity.json",
            make_rows(_cond(m, s), {"perplexity": ppl[m, s], "realised_sparsity": s}),
        )
        done(f"{name}/prune", hash_="stale" if name == "wanda-0.5" else None)  # wanda-0.5's prune is stale
        for seed in (0, 1):
            rows = make_rows(_cond(m, s, a=seed), {"fvu": 0.3 + 0.1 * seed}, sae="own")
            write_rows(res(f"{name}/seed{seed}") / "sae_metrics.json", rows)
        # cross-seed fit (seed 1): an early epoch with other values, then the final one
        kw = dict(same_seed=False, stage="validation")
        old = make_rows(_cond(m, s, 0, 1), {"S": 0.0, "rho_bin": 1.0}, tau=0.7, epoch=0, **kw)
        rows = [
            *make_rows(
                _cond(m, s, 0, 1),
                {"S": S_07[m, s], "rho_bin": RHO_BIN[m, s], "survival_bin0": 0.9, "survival_bin1": 0.1},
                tau=0.7,
                epoch=1,
                **kw,
            ),
            *make_rows(_cond(m, s, 0, 1), {"S": 0.9}, tau=0.5, epoch=1, **kw),
            *make_rows(
                _cond(m, s, 0, 1),
                {"functional_S": 0.8, "functional_rho_bin": FUNC_RHO[m, s] or math.nan},
                tau=0.7,
                epoch=1,
                **kw,
            ),
        ]
        write_rows(res(f"{name}/seed1") / "rq2_survival.json", old + rows)
        cos = _cosines(m, s)
        write_arrays(
            res(f"{name}/seed1") / "rq2_survival.safetensors",
            matched_cosine=torch.tensor(cos).float(),
            firing_rate=torch.tensor(RATE),
            alive=torch.tensor(RATE > 0),
            decoder_norm=DECODER_NORM,
        )
        write_rows(
            res(f"{name}/seed0") / "rq2_survival.json",
            make_rows(_cond(m, s, 0, 0), {"S": 0.99}, tau=0.7, epoch=1, same_seed=True, stage="validation"),
        )
        dense_rows = make_rows(
            _cond(a=0),
            {"fvu": 0.1, "ce_recovered": 0.9},
            sae="reference",
            sae_sparsity=0.0,
            epoch=None,
            stage="dense",
        )
        ref_rows = make_rows(
            _cond(m, s, 0, 0),
            {"fvu": 0.15, "ce_recovered": 0.85, "viable": VIABLE[m, s]},
            sae="reference",
            sae_sparsity=0.0,
            epoch=1,
            stage="validation",
        )
        write_rows(res(f"{name}/seed0") / "rq3_transfer.json", dense_rows + ref_rows)
        for seed in (0, 1):
            done(f"{name}/seed{seed}")
        if name != "wanda-0.5":  # wanda-0.5's rq1 is missing
            write_rows(
                res(f"{name}/rq1") / "rq1_seeds.json", make_rows(_cond(m, s, 0, 1), {"shared@0.7": 0.3})
            )
            done(f"{name}/rq1")
    (root / "wanda-0.25" / "gallery").mkdir(parents=True)
    (root / "wanda-0.25" / "gallery" / "gallery.json").write_text(
        json.dumps(
            {
                "condition": "wanda-0.25",
                "threshold": 0.7,
                "sequences": 4,
                "features": [
                    {
                        "feature": 3,
                        "status": "survived",
                        "pearson_r": 0.9,
                        "matched_cosine": 0.8,
                        "firing_rate": 0.01,
                        "dense": [
                            {
                                "activation": 1.5,
                                "left": "<script>alert(1)</script> a",
                                "token": "<b>",
                                "right": " & c\n",
                            }
                        ],
                        "pruned": [],
                    }
                ],
            }
        )
    )
    done("wanda-0.25/gallery")
    return root


def test_aggregates_are_the_hand_computed_values(study):
    data = load_study(study)
    assert data.stale == ["wanda-0.5/prune"] and data.missing == ["wanda-0.5/rq1"]
    ppl = {r["condition"]: r["perplexity"] for r in A.perplexity(data)}
    assert ppl == {
        "dense": 10.0,
        "magnitude-0.25": 20.0,
        "magnitude-0.5": 400.0,
        "wanda-0.25": 12.0,
        "wanda-0.5": None,
    }
    dense_fvu = A.sae_metrics(data)[0]["fvu"]
    assert dense_fvu["mean"] == pytest.approx(0.15) and dense_fvu["sd"] == pytest.approx(math.sqrt(0.005))
    assert dense_fvu["n"] == 2 and (dense_fvu["min"], dense_fvu["max"]) == (0.1, 0.2)
    surv = {(r["method"], r["sparsity"]): r for r in A.survivals(data)}
    for key in CONDS:  # the latest measurement (epoch 1), cross-seed
        assert (
            surv[key]["S@0.7"] == S_07[key] and surv[key]["S@0.5"] == 0.9 and surv[key]["S_same@0.7"] == 0.99
        )
        assert surv[key]["rho_bin"] == RHO_BIN[key] and surv[key]["bins"] == [0.9, 0.1]
        assert surv[key]["S_seed"] == 0.4 and surv[key]["S_tilde"] == pytest.approx(S_07[key] / 0.4)
    assert A.count_rho_minus_one(r["rho_bin"] for r in surv.values()) == (3, 4)
    assert A.count_rho_minus_one(r["functional_rho_bin"] for r in surv.values()) == (1, 3)
    ratio = A.wanda_vs_magnitude(list(surv.values()))
    assert ratio["ratio"] == {0.25: pytest.approx(1.25), 0.5: pytest.approx(3.7)} and ratio["argmax"] == 0.5
    viable = A.viability(A.transfer(data))
    assert viable["wanda"]["largest"] == 0.5 and viable["magnitude"]["largest"] == 0.25
    assert A.seed_baseline(data)["mean"] == 0.4


def test_importance_and_fragility_use_the_right_arrays(study):
    data = load_study(study)
    results = A.importance(data)
    keep = RATE > 0  # alive on the dense model and firing in RQ5: the dead last feature is left out
    for r in results["attribution"]:
        cos = np.nan_to_num(_cosines(r["method"], r["sparsity"]), nan=0.0)
        assert r["n"] == N - 1
        assert r["spearman_rho"] == pytest.approx(spearman(np.abs(ATTRIBUTION[keep]), cos[keep])[0])
        assert r["n_survived"] == int((cos[keep] >= 0.7).sum())
        assert 0 <= r["spearman_p_bh"] <= 1
    assert [r["n"] for r in results["exact"]] == [6] * 4
    frag = A.fragility_by_method(data)
    F = frag["magnitude"]["F"]
    assert F[0] == pytest.approx(1 - (0.8 + 0.6) / 2) and frag["magnitude"]["s_star"][0] == 0.5
    assert F[1] == pytest.approx(1.0)  # unmatched at both sparsities: nothing preserved
    assert set(frag["wanda"]["predictors"]) == {
        "log10 firing rate",
        "seed stability (dense RQ1)",
        "decoder norm",
    }
    alive = frag["magnitude"]["alive"]
    expected = spearman(F[alive], DECODER_NORM.double().numpy()[alive])
    assert frag["magnitude"]["predictors"]["decoder norm"] == pytest.approx(expected, nan_ok=True)


def test_headline_verdicts(study):
    """This study has no pairs steps (every cross-seed pair) and no functional arrays: the survival
    verdicts are "not measured", never read off the fits' point values; RQ3 viability still decides."""
    data = load_study(study)
    claims = R._headline(data, A.survivals(data), A.viability(A.transfer(data)), "ref", 0.7)
    verdicts = [c["verdict"] for c in claims]
    assert verdicts[:4] == ["not measured", "not measured", "reproduced", "not measured"]
    assert [c["functional verdict"] for c in claims[:2]] == ["not measured", "not measured"]
    assert "wanda: up to 0.5" in claims[2]["ours"] and "magnitude: up to 0.25" in claims[2]["ours"]
    assert all(set(c) == set(T.COLUMNS) for c in claims)


def test_labels_name_the_study_functional_threshold(study, monkeypatch):
    data = load_study(study)
    for r0, other in ((0.7, 0.6), (0.6, 0.7)):
        monkeypatch.setitem(data.study["settings"], "survival", {"functional_threshold": r0})
        _, blocks, figures = R.build_report(data)
        tables = {b.name: b for b in blocks if isinstance(b, T.Table)}
        assert f"r >= {r0:g}" in tables["fragility_bins_functional"].title
        assert f"Pearson r >= {r0:g}" in tables["survival"].note
        assert f"fraction with r >= {r0:g}" in repr(tables["headline"].rows[0])  # the rare-features claim
        fig = figures["survival"]
        boxes = [ax.get_legend() for ax in fig.axes if ax.get_legend()] + list(fig.legends)
        legends = [t.get_text() for box in boxes for t in box.get_texts()]
        assert any(f"r ≥ {r0:g}" in t for t in legends)
        assert not any(f"r ≥ {other:g}" in t for t in legends)


def test_every_figure_has_labels_title_and_legend(study):
    _, _, figures = R.build_report(load_study(study))
    assert set(figures) == {"perplexity", "survival", "transfer", "survival_bins", "fragility", "importance"}
    for name, fig in figures.items():
        axes = [ax for ax in fig.axes if ax.get_visible()]
        assert axes, name
        for ax in axes:
            assert ax.get_xlabel() and ax.get_ylabel(), name
            assert "(" in ax.get_xlabel() and "(" in ax.get_ylabel(), f"{name}: units in parentheses"
            assert ax.get_title() or fig.get_suptitle(), name
            assert ax.get_legend() is not None or fig.legends, name  # or one legend outside the panels


def test_write_report_is_self_contained_and_complete(study):
    md = R.write_report(study)
    out = study / "report"
    assert md == out / "report.md" and md.is_file()
    text = md.read_text()
    assert (
        "stale (finished with other inputs; ignored): wanda-0.5/prune" in text
        and "missing: wanda-0.5/rq1" in text
    )
    assert {p.name for p in (out / "figures").glob("*.png")} == {
        f"{n}.png" for n in ("perplexity", "survival", "transfer", "survival_bins", "fragility", "importance")
    }
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in (out / "figures").glob("*.png"))
    tables = {p.stem for p in (out / "tables").glob("*.csv")}
    assert {
        "headline",
        "perplexity",
        "sae_metrics",
        "survival",
        "transfer",
        "fragility",
        "rq5_importance_vs_survival",
        "rq1_seed_stability",
    } <= tables
    ppl_csv = (out / "tables" / "perplexity.csv").read_text().splitlines()
    assert ppl_csv[0].startswith("condition,method,sparsity,perplexity")
    assert "wanda-0.5,wanda,0.5,," in ppl_csv[-1]  # stale: missing, not 999
    assert "| wanda | 0.5 | – |" in text  # missing renders as –
    page = (out / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "<script" not in page.lower() and "<link" not in page.lower()
    imgs = re.findall(r"<img [^>]*src=\"([^\"]*)\"", page)
    assert len(imgs) == 6 and all(src.startswith("data:image/png;base64,") for src in imgs)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<mark>&lt;b&gt;</mark>" in page
    assert not list(study.glob(".report*"))  # no temp dirs left behind


def test_failed_rerender_keeps_the_previous_report(study, monkeypatch):
    R.write_report(study)
    before = (study / "report" / "report.md").read_text()

    def broken(fig):
        raise RuntimeError("disk full")

    monkeypatch.setattr(R.F, "png", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        R.write_report(study)
    assert (study / "report" / "report.md").read_text() == before
    assert len(list((study / "report" / "figures").glob("*.png"))) == 6
    assert not list(study.glob(".report*"))


def test_partial_study_renders_with_dashes(tmp_path):
    root = tmp_path / "partial"
    (root / "dense" / "perplexity" / "results").mkdir(parents=True)
    (root / "study.json").write_text(
        json.dumps(
            {
                "name": "partial",
                "settings": {"seeds": [0, 1]},
                "steps": {"dense/perplexity": "a", "wanda-0.5/prune": "b"},
            }
        )
    )
    write_rows(
        root / "dense" / "perplexity" / "results" / "perplexity.json", make_rows(_cond(), {"perplexity": 9.0})
    )
    (root / "dense" / "perplexity" / "done.json").write_text(json.dumps({"hash": "a", "seconds": 1.0}))
    text = R.write_report(root).read_text()
    assert "Status: incomplete, 1 of 2 steps finished" in text and "missing: wanda-0.5/prune" in text
    assert "| not measured |" in text and "| wanda | 0.5 | – |" in text


@pytest.mark.parametrize("case", ["unknown", "no_study_json", "nothing_finished"])
def test_bad_study_dir_is_a_one_line_error(tmp_path, case):
    root = tmp_path / "s"
    if case != "unknown":
        root.mkdir()
    if case == "nothing_finished":
        (root / "study.json").write_text(
            json.dumps({"name": "s", "settings": {}, "steps": {"dense/seed0": "x"}})
        )
    with pytest.raises(LitPruneError, match=r"^study_dir=.*study\.json") as err:
        R.write_report(root)
    assert "\n" not in str(err.value)
    assert not (root / "report").exists()


def test_report_command(study, capsys):
    from lit_prune.cli import main as cli_main
    from lit_prune.commands.report import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0 and "study.json" in capsys.readouterr().out
    assert cli_main(["report", str(study.parent / "nowhere")]) == 2
    assert "study_dir=" in capsys.readouterr().err

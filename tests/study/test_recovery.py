"""RQ6 (study.recovery): the option's one-line errors, the steps it adds (and that studies without it
keep theirs), the report's numbers and verdicts on hand-built studies whose answer is known, and one
tiny study end to end with recovery enabled."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli
from test_study import _study_args

from lit_prune.analysis.results import Condition, make_rows, read_arrays, write_arrays, write_rows
from lit_prune.analysis.survival import seed_pairs
from lit_prune.errors import LitPruneError
from lit_prune.study.config import RecoverySettings, StudySettings
from lit_prune.study.report import claims as C
from lit_prune.study.report import recovery as RQ6
from lit_prune.study.report.build import build_report
from lit_prune.study.report.data import load_study, parse_condition
from lit_prune.study.report.tables import Table


# --- the option ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("recovery", "match"),
    [
        (
            {"conditions": ["wanda-0.7"]},
            r"^study.recovery.conditions=\['wanda-0.7'\] is invalid: .*wanda-0.5",
        ),
        ({"conditions": []}, r"^study.recovery.conditions=\[\] is invalid"),
        (
            {"conditions": ["wanda-0.5"], "tokens": 0},
            r"^study.recovery.tokens=0 is invalid: expected an integer >= 1",
        ),
        ({"conditions": ["wanda-0.5"], "tokens": -5}, r"^study.recovery.tokens=-5 is invalid"),
        (
            {"conditions": ["wanda-0.5"], "lr": math.nan},
            r"^study.recovery.lr=nan is invalid: expected a finite",
        ),
        ({"conditions": ["wanda-0.5"], "lr": math.inf}, r"^study.recovery.lr=inf is invalid"),
        (
            {"conditions": ["wanda-0.5"], "mode": "qlora"},
            r"^study.recovery.mode='qlora' is invalid: expected full or lora",
        ),
        ({"conditions": ["wanda-0.5"], "batch_size": 0}, r"^study.recovery.batch_size=0 is invalid"),
    ],
)
def test_bad_recovery_settings_are_one_line_errors(recovery, match):
    with pytest.raises(LitPruneError, match=match) as err:
        StudySettings(sparsities=[0.5], recovery=recovery)  # pyright: ignore[reportArgumentType]
    assert "\n" not in str(err.value)


def test_recovered_conditions_are_named_after_their_source():
    chosen = {"conditions": ["wanda-2of4", "wanda-0.5"]}  # as parsed from a config: a dict
    st = StudySettings(sparsities=[0.25, 0.5], nm=[[2, 4]], recovery=chosen)  # pyright: ignore[reportArgumentType]
    assert isinstance(st.recovery, RecoverySettings)
    rec = st.recovered_conditions()
    assert [c.name for c in rec] == ["wanda-0.5-recovered", "wanda-2of4-recovered"]
    assert [c.label for c in rec] == ["wanda-recovered", "wanda-2:4-recovered"]
    assert [c.source.name for c in rec] == ["wanda-0.5", "wanda-2of4"]
    assert st.method_of("wanda-0.5-recovered") == ("wanda-recovered", 0.5)
    assert all(not c.recovered for c in st.conditions())  # conditions() never holds the recovered ones
    for c in rec:  # the report reads the same names back
        parsed = parse_condition(c.name)
        assert parsed.recovered and parsed.label == c.label and parsed.source.name == c.source.name


def _ctx(tmp_path: Path, recovery: dict | None = None):
    from lit_prune.models.tiny import build_tiny
    from lit_prune.study.steps import StudyContext

    if not (tmp_path / "m").is_dir():  # once: the steps' inputs hold the weights' modification time
        build_tiny("tiny-llama", tmp_path / "m")
    return StudyContext(
        name="s",
        settings=StudySettings(
            sparsities=[0.5],
            seeds=[0, 1],
            recovery=RecoverySettings(**recovery) if recovery else None,
            checkpoints=str(tmp_path),
        ),
        model={"model_name": str(tmp_path / "m"), "hook_layer": 1},
        data={"seq_len": 32},
        trainer={},
        seed_everything=0,
    )


def test_recovery_adds_steps_and_leaves_every_other_step_as_it_was(tmp_path):
    from lit_prune.study.runner import Runner
    from lit_prune.study.steps import build_steps

    plain = build_steps(_ctx(tmp_path), "corpus")
    rec = build_steps(_ctx(tmp_path, {"conditions": ["wanda-0.5"], "tokens": 1024}), "corpus")
    old = {s.key: s for s in plain}
    new = {s.key: s for s in rec}
    added = sorted(set(new) - set(old))
    assert added == [
        "wanda-0.5-recovered/pairs",
        "wanda-0.5-recovered/recover",
        "wanda-0.5-recovered/rq1",
        "wanda-0.5-recovered/seed0",
        "wanda-0.5-recovered/seed1",
    ]
    assert set(old) <= set(new)
    hashes = lambda steps: Runner(tmp_path / "r", steps).hashes  # noqa: E731
    before, after = hashes(plain), hashes(rec)
    assert all(before[k] == after[k] for k in old)  # a finished study stays done
    assert new["wanda-0.5-recovered/recover"].deps == ["wanda-0.5/prune"]
    assert "wanda-0.5-recovered/recover" in new["wanda-0.5-recovered/seed0"].deps
    assert new["wanda-0.5-recovered/recover"].inputs["recovery"]["tokens"] == 1024
    other = build_steps(_ctx(tmp_path, {"conditions": ["wanda-0.5"], "tokens": 2048}), "corpus")
    changed = {k for k, h in hashes(other).items() if h != after[k]}
    assert changed == set(added)  # other recovery settings redo only RQ6's steps


# --- the report on hand-built studies --------------------------------------------------------------
SEEDS = [0, 1, 2]
N = 1000  # 200 features per firing-rate quintile
RATE = np.logspace(-4, -1, N)
BIN = np.arange(N) // (N // 5)


def _pairs(root: Path, name: str, p: np.ndarray, rng) -> None:
    cross, same = seed_pairs(SEEDS) if name == "dense" else seed_pairs(SEEDS, SEEDS)
    labels = cross + same
    hit = rng.random((len(labels), N)) < p
    write_arrays(
        root / name / "pairs" / "results" / "rq2_pairs.safetensors",
        cosine=torch.tensor(np.where(hit, 0.9, 0.3), dtype=torch.float32),
        firing_rate=torch.tensor(np.tile(RATE, (len(labels), 1))),
        seed_a=torch.tensor([a for a, _ in labels]),
        seed_b=torch.tensor([b for _, b in labels]),
        same_seed=torch.tensor([a == b for a, b in labels]),
    )


def _rows(path: Path, method: str, metrics: dict[str, float], **extra) -> None:
    cond = Condition(
        model="tiny", hook="blocks.1.hook_resid_post", method=method, sparsity=0.5, seed_a=0, seed_b=0
    )
    write_rows(path, make_rows(cond, metrics, **extra))


def make_study(root: Path, dense, pruned, recovered, functional=(0.3, 0.8)) -> Path:
    """A finished study: dense, wanda-0.5 and wanda-0.5-recovered with every seed pair (survival
    probability per feature as given), the reference fits' functional r (r >= 0.7 with probability
    functional[0] on the pruned, functional[1] on the recovered model), perplexities and RQ3 rows."""
    rng = np.random.default_rng(0)
    keys = [
        "dense/seed0",
        "dense/pairs",
        "dense/perplexity",
        "wanda-0.5/prune",
        "wanda-0.5-recovered/recover",
    ]
    _pairs(root, "dense", dense, rng)
    for name, p, f, ppl, ce in (
        ("wanda-0.5", pruned, functional[0], 80.0, 0.7),
        ("wanda-0.5-recovered", recovered, functional[1], 40.0, 0.9),
    ):
        keys += [f"{name}/pairs", f"{name}/seed0"]
        _pairs(root, name, p, rng)
        write_arrays(
            root / name / "seed0" / "results" / "rq2_survival.safetensors",
            pearson_r=torch.tensor(np.where(rng.random(N) < f, 0.9, 0.1), dtype=torch.float32),
            firing_rate=torch.tensor(RATE),
            matched_cosine=torch.full((N,), 0.3),
        )
        label = "wanda-recovered" if name.endswith("recovered") else "wanda"
        _rows(
            root / name / "seed0" / "results" / "rq3_transfer.json",
            label,
            {"ce_recovered": ce, "fvu": 1 - ce},
            sae="reference",
            stage="validation",
            epoch=0,
        )
        step = "recover" if name.endswith("recovered") else "prune"
        _rows(root / name / step / "results" / "perplexity.json", label, {"perplexity": ppl})
    _rows(root / "dense" / "perplexity" / "results" / "perplexity.json", "dense", {"perplexity": 20.0})
    for k in keys:
        (root / k).mkdir(parents=True, exist_ok=True)
        (root / k / "done.json").write_text(json.dumps({"hash": f"h-{k}"}))
    settings = {"methods": ["wanda"], "sparsities": [0.5], "seeds": SEEDS, "survival": {"n_boot": 200}}
    steps = {k: f"h-{k}" for k in keys}
    (root / "study.json").write_text(json.dumps({"name": "r", "settings": settings, "steps": steps}))
    return root


def _row(root: Path) -> dict:
    data = load_study(root)
    assert [c.name for c in data.recovered] == ["wanda-0.5-recovered"]
    assert "wanda-0.5-recovered" not in [c.name for c in data.conditions]  # the other tables are unchanged
    (row,) = RQ6.recovery_rows(data)
    return row


def test_recovery_that_brings_back_the_rare_features_is_restored(tmp_path):
    """Pruning keeps 20% of the features (the dense seed pairs share 60%); recovery brings the rarest
    quintile back to 60% and the most frequent to 20%: S doubles with a CI far above 1, and the net
    return falls from the rare to the frequent bins."""
    recovered = 0.6 - 0.1 * BIN  # 0.6, 0.5, 0.4, 0.3, 0.2 per bin: mean 0.4
    row = _row(make_study(tmp_path, np.full(N, 0.6), np.full(N, 0.2), recovered))
    g = row["geometric"]
    assert g["n_pairs"] == 6
    assert g["ratio"]["value"] == pytest.approx(2.0, rel=0.1) and g["ratio"]["lo"] > 1.5
    assert row["verdict"] == RQ6.RESTORED, row["reason"]
    # net return per bin: (p_rec - p_pruned) / (1 - p_pruned) = 0.5, 0.375, 0.25, 0.125, 0
    assert g["net_bins"] == pytest.approx([0.5, 0.375, 0.25, 0.125, 0.0], abs=0.07)
    assert g["returned_bins"] == pytest.approx(list(recovered[::200]), abs=0.05)  # independent draws
    assert g["rho_net"]["value"] == pytest.approx(-1.0)
    # seed-relative: (p_rec - p_pruned) / (p_seed - p_pruned) = 1, 0.75, 0.5, 0.25, 0
    assert g["seed_relative_bins"] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0], abs=0.15)
    assert g["rho_seed"]["value"] == pytest.approx(-1.0) and g["rho_seed"]["hi"] < 0
    assert row["which"] == RQ6.RARE, row["which_reason"]
    assert row["functional_verdict"] == RQ6.RESTORED  # r >= 0.7 for 30% -> 80% of the features
    assert (row["perplexity_dense"], row["perplexity_pruned"], row["perplexity_recovered"]) == (
        20.0,
        80.0,
        40.0,
    )
    assert row["transfer_pruned"]["ce_recovered"] == 0.7 and row["transfer_recovered"]["ce_recovered"] == 0.9
    assert row["S_tilde_pruned"]["hi"] < 1 and not row["back_in_seed_band"]

    _, blocks, figures = build_report(load_study(tmp_path))
    assert "recovery" in figures
    names = {getattr(b, "name", None) for b in blocks}
    assert {"rq6_recovery", "rq6_returns"} <= names
    tables = {b.name: b for b in blocks if isinstance(b, Table)}
    headline = tables["headline"]
    claim = next(r for r in headline.rows if r[0].startswith("RQ6"))
    assert claim[3] == RQ6.RESTORED and "the rare ones" in claim[2]
    table = tables["rq6_recovery"]
    assert [r[3] for r in table.rows] == ["pruned", "recovered"] and [r[4] for r in table.rows] == [
        80.0,
        40.0,
    ]


def test_recovery_that_changes_nothing_is_not_restored(tmp_path):
    row = _row(make_study(tmp_path, np.full(N, 0.6), np.full(N, 0.3), np.full(N, 0.3), functional=(0.5, 0.5)))
    assert (
        row["geometric"]["ratio"]["lo"] > 1 / C.RATIO_BOUND
        and row["geometric"]["ratio"]["hi"] < C.RATIO_BOUND
    )
    assert row["verdict"] == RQ6.NOT_RESTORED and "no difference" in row["reason"]
    assert row["functional_verdict"] == RQ6.NOT_RESTORED
    assert row["which"] in (RQ6.NEITHER, C.NOT_DETERMINABLE)  # no net return anywhere


def test_which_come_back_is_read_against_each_bins_seed_ceiling(tmp_path):
    """The frequent features are the seed-stable ones (dense pairs share 0.2 ... 0.6 per bin); pruning
    halves every bin and recovery gives back half of each bin's loss. The raw net return still rises
    with the firing rate (rho +1: "the frequent ones"), but relative to the seed ceiling every bin gets
    the same half back, so the verdict must not name the frequent ones."""
    ceiling = 0.2 + 0.1 * BIN
    pruned = ceiling / 2
    row = _row(make_study(tmp_path, ceiling, pruned, pruned + (ceiling - pruned) / 2))
    g = row["geometric"]
    assert g["rho_net"]["value"] == pytest.approx(1.0)
    assert g["seed_relative_bins"] == pytest.approx([0.5] * 5, abs=0.2)
    assert row["which"] in (RQ6.NEITHER, C.NOT_DETERMINABLE), row["which_reason"]


def test_noise_floor_and_seed_band_are_not_determinable(tmp_path):
    """About 20-30 survivors of 1,000 per pair: no verdict, whatever the ratio's point value."""
    row = _row(make_study(tmp_path / "floor", np.full(N, 0.03), np.full(N, 0.02), np.full(N, 0.03)))
    assert row["verdict"] == C.NOT_DETERMINABLE and "fewer than 30 survivors" in row["reason"]
    # the pruned model is within the seed band: nothing measurably lost, so nothing to restore
    row = _row(make_study(tmp_path / "band", np.full(N, 0.5), np.full(N, 0.5), np.full(N, 0.7)))
    assert row["geometric"]["ratio"]["lo"] > 1  # the ratio alone would say "restored"
    assert row["verdict"] == C.NOT_DETERMINABLE and "seed band" in row["reason"]


def test_restored_verdict_rules():
    ci = lambda v, lo, hi: {"value": v, "lo": lo, "hi": hi}  # noqa: E731
    assert RQ6.restored_verdict(ci(1.5, 1.2, 1.9), [100, 100])[0] == RQ6.RESTORED
    assert RQ6.restored_verdict(ci(0.6, 0.5, 0.7), [100, 100])[0] == RQ6.NOT_RESTORED
    assert RQ6.restored_verdict(ci(1.0, 0.9, 1.1), [100, 100])[0] == RQ6.NOT_RESTORED
    # above 1 but inside the band (the embedded model's functional 1.01x [1.00, 1.01]): too small to count
    assert RQ6.restored_verdict(ci(1.01, 1.005, 1.015), [100, 100])[0] == RQ6.NOT_RESTORED
    assert RQ6.restored_verdict(ci(1.2, 0.7, 1.9), [100, 100])[0] == C.NOT_DETERMINABLE
    assert RQ6.restored_verdict(ci(1.5, 1.2, 1.9), [100, 29])[0] == C.NOT_DETERMINABLE
    assert RQ6.restored_verdict(ci(1.5, 1.2, 1.9), [100, 100], pruned_in_band=True)[0] == C.NOT_DETERMINABLE
    assert RQ6.restored_verdict(None, [100])[0] == C.NOT_MEASURED


# --- a tiny study end to end -----------------------------------------------------------------------
@pytest.mark.e2e
def test_tiny_study_with_recovery_measures_the_recovered_model(tmp_path, local_corpus, model_cache):
    recovery = json.dumps({"conditions": ["wanda-0.5"], "tokens": 2048, "lr": 1e-3, "batch_size": 4})
    args = _study_args(
        tmp_path,
        local_corpus,
        model_cache,
        f"--study.recovery={recovery}",
        "--study.warm_start.enabled=false",
    )
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = tmp_path / "checkpoints" / "tiny"
    rec = study / "wanda-0.5-recovered"
    ppl = {
        r["metric"]: r["value"]
        for r in json.loads((rec / "recover" / "results" / "perplexity.json").read_text())
    }
    pruned = {
        r["metric"]: r["value"]
        for r in json.loads((study / "wanda-0.5" / "prune" / "results" / "perplexity.json").read_text())
    }
    assert ppl["realised_sparsity"] == pytest.approx(pruned["realised_sparsity"])
    assert (
        ppl["recovery_steps"] == 2048 // 32 // 4 and ppl["perplexity_tokens"] == pruned["perplexity_tokens"]
    )
    assert ppl["perplexity"] != pruned["perplexity"]  # another model, the same eval sequences

    # the export keeps the masks exactly, and its Linears are what the fits measured
    from transformers import AutoModelForCausalLM

    from lit_prune.pruning import load_masks, prunable_linears

    masks = load_masks(study / "wanda-0.5" / "prune" / "masks.safetensors")
    model = AutoModelForCausalLM.from_pretrained(rec / "recover" / "model")
    for name, lin in prunable_linears(model).items():
        assert not bool(lin.weight[~masks[name]].any()), name

    rows = json.loads((rec / "seed0" / "results" / "rq2_survival.json").read_text())
    assert {r["method"] for r in rows} == {"wanda-recovered"}
    assert (rec / "seed0" / "results" / "rq3_transfer.json").is_file()
    survival = read_arrays(rec / "seed0" / "results" / "rq2_survival.safetensors")
    assert "pearson_r" in survival
    pairs = {
        (r["seed_a"], r["seed_b"])
        for r in json.loads((rec / "pairs" / "results" / "rq2_pairs.json").read_text())
    }
    assert pairs == {(0, 1), (1, 0), (0, 0), (1, 1)}

    report = (study / "report" / "report.md").read_text()
    assert (
        "RQ6: does recovery restore features?" in report
        and (study / "report" / "figures" / "recovery.png").is_file()
    )
    assert (study / "report" / "tables" / "rq6_recovery.csv").is_file()
    # the recovered model's rows do not leak into the other tables
    assert "wanda-recovered" not in (study / "report" / "tables" / "perplexity.csv").read_text()


def test_which_return_reads_the_band_first():
    lost = [100.0] * 5
    assert RQ6.which_return({"value": 0.1, "lo": 0.05, "hi": 0.15}, lost)[0] == RQ6.NEITHER
    assert RQ6.which_return({"value": -0.8, "lo": -1.0, "hi": -0.3}, lost)[0] == RQ6.RARE
    assert RQ6.which_return({"value": 0.8, "lo": 0.3, "hi": 1.0}, lost)[0] == RQ6.FREQUENT
    assert RQ6.which_return({"value": 0.1, "lo": -0.5, "hi": 0.7}, lost)[0] == C.NOT_DETERMINABLE


def test_returns_average_each_pair_first():
    """Two pairs of one bin; pooled, pair A's three lost features would outweigh pair B's one.
    Returned: A 1/3, B 1 -> 2/3 (pooled 1/2); newly lost: A 0/1, B 1/3 -> 1/6; S_u 0.5, S_r 0.625,
    net (0.625 - 0.5) / (1 - 0.5) = 0.25; lost per pair 2."""
    u = np.array([[0, 0, 0, 1], [0, 1, 1, 1]], dtype=float)
    r = np.array([[1, 0, 0, 1], [1, 1, 1, 0]], dtype=float)
    back = RQ6._returns(u, r, np.zeros((1, 4), dtype=int))
    assert back["returned"][0] == pytest.approx(2 / 3)
    assert back["newly_lost"][0] == pytest.approx(1 / 6)
    assert back["net"][0] == pytest.approx(0.25)
    assert back["lost"].tolist() == [2.0, 0.0, 0.0, 0.0, 0.0]
    assert np.isnan(back["returned"][1:]).all() and np.isnan(back["net"][1:]).all()

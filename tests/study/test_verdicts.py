"""The headline's verdict rules (docs/methods.md §4b) on synthetic studies with every seed pair:
"not determinable at this budget" at the noise floor, "reproduced" where the effect is clear."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lit_prune.analysis.results import write_arrays
from lit_prune.analysis.survival import seed_pairs
from lit_prune.study.report import analysis as A
from lit_prune.study.report import build as R
from lit_prune.study.report import claims as C
from lit_prune.study.report.data import load_study

SEEDS = [0, 1, 2]
N = 1000  # features per dense SAE: 200 per firing-rate quintile
RATE = np.logspace(-4, -1, N)  # bin b = features 200 b .. 200 b + 199 (rarest first)
BIN = np.arange(N) // (N // 5)


def _cosines(rng, p_survive: np.ndarray, n_pairs: int) -> torch.Tensor:
    """[n_pairs, N] matched cosines: 0.9 with probability p_survive[feature], else 0.3."""
    hit = rng.random((n_pairs, N)) < p_survive
    return torch.tensor(np.where(hit, 0.9, 0.3), dtype=torch.float32)


def _write_pairs(root: Path, name: str, p_survive: np.ndarray, rng, pruned: list[int] = SEEDS) -> None:
    cross, same = seed_pairs(SEEDS) if name == "dense" else seed_pairs(SEEDS, pruned)
    labels = cross + same
    write_arrays(
        root / name / "pairs" / "results" / "rq2_pairs.safetensors",
        cosine=_cosines(rng, p_survive, len(labels)),
        firing_rate=torch.tensor(np.tile(RATE, (len(labels), 1))),
        seed_a=torch.tensor([a for a, _ in labels]),
        seed_b=torch.tensor([b for _, b in labels]),
        same_seed=torch.tensor([a == b for a, b in labels]),
    )


def make_study(root: Path, dense: np.ndarray, wanda: np.ndarray, magnitude: np.ndarray, importance) -> Path:
    """A finished study with the pairs steps, the reference fits' functional r and dense/rq5.

    dense / wanda / magnitude: per-feature survival probabilities of the seed pairs (functional r is
    0.9 with the same probability as wanda's / magnitude's geometric survival)."""
    rng = np.random.default_rng(0)
    keys = ["dense/seed0", "dense/pairs", "dense/rq5"]
    _write_pairs(root, "dense", dense, rng)
    for method, p in (("wanda", wanda), ("magnitude", magnitude)):
        name = f"{method}-0.5"
        keys += [f"{name}/pairs", f"{name}/seed0"]
        _write_pairs(root, name, p, rng)
        r = np.where(rng.random(N) < p, 0.9, 0.1)
        write_arrays(
            root / name / "seed0" / "results" / "rq2_survival.safetensors",
            pearson_r=torch.tensor(r, dtype=torch.float32),
            firing_rate=torch.tensor(RATE),
            matched_cosine=torch.full((N,), 0.3),
        )
    write_arrays(
        root / "dense" / "rq5" / "results" / "rq5_ablation.safetensors",
        features=torch.arange(N),
        exact_ce_firing=torch.tensor(importance(rng), dtype=torch.float64),
    )
    steps = {k: f"h-{k}" for k in keys}
    for k in keys:
        (root / k).mkdir(parents=True, exist_ok=True)
        (root / k / "done.json").write_text(json.dumps({"hash": steps[k]}))
    settings = {
        "methods": ["magnitude", "wanda"],
        "sparsities": [0.5],
        "seeds": SEEDS,
        "survival": {"n_boot": 200},
    }
    (root / "study.json").write_text(json.dumps({"name": "v", "settings": settings, "steps": steps}))
    return root


def _claims(root: Path) -> dict[str, dict[str, str]]:
    data = load_study(root)
    rows = R._headline(data, A.survivals(data), {}, "ref", 0.7)
    return {c["claim"].split()[0]: c for c in rows}  # Rare, Wanda, Dense-model, Geometric, ...


def test_noise_floor_is_not_determinable(tmp_path):
    """S ~ 0.03 everywhere (about 30 survivors of 1,000 per pair, about 6 per bin): the ratio and
    rho_bin cannot decide, whatever their point values."""
    floor = np.full(N, 0.03)
    claims = _claims(make_study(tmp_path, floor, np.full(N, 0.035), np.full(N, 0.02), lambda g: g.random(N)))
    for name in ("Rare", "Wanda"):
        assert claims[name]["verdict"] == C.NOT_DETERMINABLE, claims[name]["ours"]
        assert "fewer than 30 survivors" in claims[name]["ours"]
    assert claims["Wanda"]["functional verdict"] == C.NOT_DETERMINABLE


def test_clear_effects_are_reproduced(tmp_path):
    """Wanda keeps 50%, magnitude 10% (ratio 5, 100 survivors per pair); wanda's survival falls from
    the rarest bin (0.8) to the most frequent (0.2) over a flat dense baseline; importance is
    independent of survival over 1,000 features: every claim decides, and as built."""
    wanda = 0.8 - 0.15 * BIN
    claims = _claims(make_study(tmp_path, np.full(N, 0.6), wanda, np.full(N, 0.1), lambda g: g.random(N)))
    assert claims["Wanda"]["verdict"] == C.REPRODUCED, claims["Wanda"]["ours"]
    assert claims["Wanda"]["functional verdict"] == C.REPRODUCED
    rare = claims["Rare"]
    assert "wanda-0.5: -1.00" in rare["ours"] and "exact p 0.0167" in rare["ours"]
    assert "1 of 2 reproduced" in rare["ours"]  # magnitude's flat bins: inside ±0.2 or undecided
    assert rare["verdict"] in (C.REPRODUCED, C.PARTLY)
    assert claims["Geometric"]["verdict"] == C.REPRODUCED, claims["Geometric"]["ours"]
    assert claims["Geometric"]["functional verdict"] == C.REPRODUCED


def test_a_direction_of_rho_needs_its_ci_and_the_exact_p():
    """5 bins: only the two orders with |rho| = 1 reach the exact two-sided p 2/120 < 0.05; a
    bootstrap CI off 0 with p 0.35 (rho -0.6) decides nothing."""
    enough = [100.0] * 5
    ci_only = {"value": -0.6, "lo": -1.0, "hi": -0.3, "p": 0.35}
    assert C.negative_rho_verdict(ci_only, enough, False) == (
        C.NOT_DETERMINABLE,
        "CI below 0 but exact p 0.35 >= 0.05",
    )
    both = {"value": -1.0, "lo": -1.0, "hi": -0.9, "p": 2 / 120}
    assert C.negative_rho_verdict(both, enough, False) == (C.REPRODUCED, "CI below 0")
    opposite = {"value": 1.0, "lo": 0.9, "hi": 1.0, "p": 2 / 120}
    assert C.negative_rho_verdict(opposite, enough, False) == (C.NOT_REPRODUCED, "CI above 0 (the opposite)")
    assert (
        C.negative_rho_verdict({**opposite, "value": 0.7, "p": 0.233}, enough, False)[0] == C.NOT_DETERMINABLE
    )
    flat = {"value": 0.0, "lo": -0.1, "hi": 0.15, "p": 1.0}  # equivalence needs no p
    assert C.negative_rho_verdict(flat, enough, False) == (C.NOT_REPRODUCED, "CI inside ±0.2: no relation")


def test_importance_that_follows_survival_is_not_a_dissociation(tmp_path):
    wanda = np.full(N, 0.5)
    root = make_study(tmp_path, np.full(N, 0.6), wanda, np.full(N, 0.4), lambda g: np.zeros(N))
    # importance = the reference pairs' mean matched cosine of wanda-0.5: a strong relation there
    cos = A.pairs(load_study(root), A.Cond("wanda-0.5", "wanda", 0.5))
    rows = [i for i, (a, b) in enumerate(cos.labels) if a == 0 and b != 0]
    imp = np.nan_to_num(cos.cosine[rows], nan=0.0).mean(0)
    write_arrays(
        root / "dense" / "rq5" / "results" / "rq5_ablation.safetensors",
        features=torch.arange(N),
        exact_ce_firing=torch.tensor(imp),
    )
    effects = {r["condition"]: r for r in A.importance_effects(load_study(root))}
    assert effects["wanda-0.5"]["geometric"]["value"] == pytest.approx(1.0)
    assert C.dissociation_verdict(effects["wanda-0.5"]["geometric"])[0] == C.NOT_REPRODUCED


def test_geometric_importance_without_a_cross_seed_partner_names_the_missing_seed(tmp_path):
    """study.pruned_seeds [0]: the reference's features have no cross-seed pruned partner."""
    root = make_study(tmp_path, np.full(N, 0.6), np.full(N, 0.5), np.full(N, 0.1), lambda g: g.random(N))
    for name in ("wanda-0.5", "magnitude-0.5"):
        _write_pairs(root, name, np.full(N, 0.5), np.random.default_rng(1), pruned=[0])
    claim = _claims(root)["Geometric"]
    assert claim["verdict"] == C.NOT_MEASURED
    assert claim["ours"].count("no pruned SAE of a seed other than the reference 0") == 2
    assert claim["functional verdict"] != C.NOT_MEASURED  # the functional r needs no second seed


def _mark_done(root: Path, key: str) -> None:
    study = json.loads((root / "study.json").read_text())
    study["steps"][key] = f"h-{key}"
    (root / "study.json").write_text(json.dumps(study))
    (root / key / "done.json").write_text(json.dumps({"hash": f"h-{key}"}))


def test_geometric_importance_falls_back_to_the_warm_start_of_the_reference(tmp_path):
    """pruned_seeds [0] with RQ2c: the reference's warm-start cosines stand in for the cross-seed
    ones. Wanda's cosine rises with importance (rho = 1: no dissociation); magnitude's is unrelated
    noise over 1,000 features (CI inside ±0.2)."""
    root = make_study(tmp_path, np.full(N, 0.6), np.full(N, 0.5), np.full(N, 0.1), lambda g: g.random(N))
    for name in ("wanda-0.5", "magnitude-0.5"):
        _write_pairs(root, name, np.full(N, 0.5), np.random.default_rng(1), pruned=[0])
    imp = load_study(root).arrays("dense/rq5", "rq5_ablation.safetensors")["exact_ce_firing"].numpy()
    rank = (imp.argsort().argsort() + 0.5) / N  # no cosine exactly at tau
    cosines = {"wanda-0.5": 0.5 + 0.4 * rank, "magnitude-0.5": np.random.default_rng(2).random(N)}
    for name, cos in cosines.items():
        write_arrays(
            root / name / "warm0" / "results" / "warm_start.safetensors",
            cosine=torch.tensor(cos, dtype=torch.float32),
            firing_rate=torch.tensor(RATE),
        )
        _mark_done(root, f"{name}/warm0")
    effects = {r["condition"]: r["geometric"] for r in A.importance_effects(load_study(root))}
    assert effects["wanda-0.5"]["source"] == "warm start"
    assert effects["wanda-0.5"]["value"] == pytest.approx(1.0)
    assert effects["wanda-0.5"]["n_survived"] == N // 2  # rank >= 0.5: cosine >= 0.7
    assert C.dissociation_verdict(effects["wanda-0.5"])[0] == C.NOT_REPRODUCED
    assert C.dissociation_verdict(effects["magnitude-0.5"])[0] == C.REPRODUCED
    claim = _claims(root)["Geometric"]
    assert "wanda-0.5 (warm start): ρ 1.00" in claim["ours"] and claim["verdict"] == C.PARTLY
    write_arrays(  # the RQ5 table's gradient attribution: here the same importance for every feature
        root / "dense" / "rq5" / "results" / "rq5_ablation.safetensors",
        features=torch.arange(N),
        exact_ce_firing=torch.tensor(imp),
        attribution=torch.tensor(imp),
        firing_rate=torch.tensor(RATE),
    )
    table = A.importance(load_study(root))
    wanda = next(r for r in table["attribution"] if r["condition"] == "wanda-0.5")
    assert wanda["survival"] == "warm start" and wanda["n"] == N
    assert wanda["spearman_rho"] == pytest.approx(1.0) and wanda["n_survived"] == N // 2


def test_rq4_bins_are_normalised_by_each_bins_own_seed_baseline(tmp_path):
    """Survival that only follows the dense seed stability (frequent bins more stable) is no
    firing-rate effect: the raw rho_bin is +1, the normalised one is not."""
    stability = 0.2 + 0.15 * BIN
    root = make_study(tmp_path, stability, stability, stability * 0.5, lambda g: g.random(N))
    effects = A.cross_effects(load_study(root), A.Cond("wanda-0.5", "wanda", 0.5))
    assert effects["rho_bin_raw"]["value"] == pytest.approx(1.0)
    assert effects["normalised_bins"] == pytest.approx([1.0] * 5, abs=0.1)
    assert effects["n_pairs"] == 6 and len(effects["per_pair"]) == 6
    assert C.in_seed_band(effects["S_tilde"])  # wanda = the dense baseline: within the seed band
    verdict, why = C.negative_rho_verdict(effects["rho_bin"], effects["bin_survivors"], True)
    assert verdict == C.NOT_DETERMINABLE and "seed band" in why


def test_survival_rows_use_every_pair_and_report_same_seed_pairs_apart(tmp_path):
    root = make_study(tmp_path, np.full(N, 0.6), np.full(N, 0.5), np.full(N, 0.1), lambda g: g.random(N))
    data = load_study(root)
    row = next(r for r in A.survivals(data) if r["condition"] == "wanda-0.5")
    arr = A.pairs(data, A.Cond("wanda-0.5", "wanda", 0.5))
    cross = ~arr.same
    assert row["n_cross"] == 6 and row["n_same"] == 3
    assert row["S@0.7"] == pytest.approx(float((arr.cosine[cross] >= 0.7).mean()))
    assert row["S_same@0.7"] == pytest.approx(float((arr.cosine[~cross] >= 0.7).mean()))
    baseline = A.dense_baseline(data)
    assert baseline["n_pairs"] == 6 and baseline["S_seed"]["value"] == pytest.approx(0.6, abs=0.03)


def test_the_equivalence_band_is_read_before_the_null():
    """A CI that excludes the null but lies inside the band is an effect too small to count: the
    ratio 1.05x [1.01, 1.09] (Wanda vs magnitude at 25%) must not read "reproduced"."""
    assert C.decide({"lo": 1.01, "hi": 1.09}, 1.0, 0.8, 1.25) == 0
    assert C.decide({"lo": 1.10, "hi": 1.40}, 1.0, 0.8, 1.25) == 1
    assert C.decide({"lo": 0.50, "hi": 0.90}, 1.0, 0.8, 1.25) == -1
    assert C.decide({"lo": 0.70, "hi": 1.40}, 1.0, 0.8, 1.25) is None
    assert C.decide({"lo": None, "hi": None}, 1.0, 0.8, 1.25) is None
    assert C.decide({"lo": -0.1, "hi": 0.2}, 0.0, -0.2, 0.2) is None  # the band is open: 0.2 is out
    small = {"value": 1.05, "lo": 1.01, "hi": 1.09}
    assert C.ratio_verdict(small, [760, 726], [False, False]) == (
        C.NOT_REPRODUCED,
        "CI inside (0.80, 1.25): no difference worth the name",
    )
    assert (
        C.ratio_verdict({"value": 1.41, "lo": 1.20, "hi": 1.48}, [556, 394], [False, False])[0]
        == C.REPRODUCED
    )
    tiny_rho = {"value": -0.15, "lo": -0.19, "hi": -0.11, "p": 0.001}
    assert C.negative_rho_verdict(tiny_rho, [100.0] * 5, False) == (
        C.NOT_REPRODUCED,
        "CI inside ±0.2: no relation",
    )
    assert C.dissociation_verdict({"value": 0.1, "lo": 0.02, "hi": 0.18}) == (C.REPRODUCED, "CI inside ±0.2")


def test_a_relation_must_be_worth_the_name_to_refute_a_dissociation():
    """A CI off 0 that still reaches into ±0.2 decides nothing; one wholly beyond it refutes."""
    verdict = lambda lo, hi: C.dissociation_verdict({"value": (lo + hi) / 2, "lo": lo, "hi": hi})  # noqa: E731
    assert verdict(0.10, 0.203) == (
        C.NOT_DETERMINABLE,
        "CI not inside ±0.2 and excludes 0 but reaches into the band",
    )
    assert verdict(-0.05, 0.25) == (C.NOT_DETERMINABLE, "CI not inside ±0.2 and contains 0")
    assert verdict(0.21, 0.40) == (C.NOT_REPRODUCED, "CI beyond ±0.2: a relation worth the name")
    assert verdict(-0.50, -0.20)[0] == C.NOT_REPRODUCED


def test_a_claim_over_conditions_needs_half_of_them():
    R, NR, ND = C.REPRODUCED, C.NOT_REPRODUCED, C.NOT_DETERMINABLE
    assert C.overall([R, ND, ND, ND]) == ND  # one condition of four deciding is not the claim
    assert C.overall([R, R, ND, ND]) == R
    assert C.overall([NR, ND]) == NR
    assert C.overall([R, NR, ND, ND]) == C.PARTLY
    assert C.overall([R, C.NOT_MEASURED, C.NOT_MEASURED]) == R  # counted over the measured ones
    assert C.overall([C.NOT_MEASURED]) == C.NOT_MEASURED and C.overall([]) == C.NOT_MEASURED
    assert C.overall([ND, ND]) == ND


def _several_rq5_saes(root: Path, warm: dict[int, np.ndarray], functional: bool = False) -> None:
    """RQ5 of dense seeds 1 and 2 beside the reference's, each SAE's wanda-0.5 warm-start cosine
    `warm[seed]` (pruned_seeds [0]: no cross-seed partner of the reference), and with `functional`
    the functional step's r of all three SAEs (r = the warm cosine)."""
    _write_pairs(root, "wanda-0.5", np.full(N, 0.5), np.random.default_rng(1), pruned=[0])
    imp = load_study(root).arrays("dense/rq5", "rq5_ablation.safetensors")["exact_ce_firing"]
    for s in (1, 2):
        write_arrays(
            root / "dense" / f"rq5_seed{s}" / "results" / "rq5_ablation.safetensors",
            features=torch.arange(N),
            exact_ce_firing=imp,
        )
        _mark_done(root, f"dense/rq5_seed{s}")
    for s, cos in warm.items():
        write_arrays(
            root / "wanda-0.5" / f"warm{s}" / "results" / "warm_start.safetensors",
            cosine=torch.tensor(cos, dtype=torch.float32),
            firing_rate=torch.tensor(RATE),
        )
        _mark_done(root, f"wanda-0.5/warm{s}")
    if functional:
        write_arrays(
            root / "wanda-0.5" / "functional" / "results" / "functional.safetensors",
            pearson_r=torch.tensor(np.stack([warm[s] for s in SEEDS]), dtype=torch.float32),
            seed=torch.tensor(SEEDS),
        )
        _mark_done(root, "wanda-0.5/functional")


def test_rq5_averages_rho_over_the_saes_and_resamples_them(tmp_path):
    """Three SAEs with the same importance: survival rises with it in two (rho 1) and falls in one
    (rho -1). rho = (1 + 1 - 1) / 3 with the t interval over the three SAEs, 1/3 ± 2.87, clipped to
    [-1, 1]: not determinable, where the reference alone (rho 1, a narrow feature CI) would have read
    "not reproduced"."""
    root = make_study(tmp_path, np.full(N, 0.6), np.full(N, 0.5), np.full(N, 0.1), lambda g: g.random(N))
    imp = load_study(root).arrays("dense/rq5", "rq5_ablation.safetensors")["exact_ce_firing"].numpy()
    rank = (imp.argsort().argsort() + 0.5) / N
    _several_rq5_saes(root, {0: rank, 1: rank, 2: 1 - rank}, functional=True)
    row = next(r for r in A.importance_effects(load_study(root)) if r["condition"] == "wanda-0.5")
    for kind in ("geometric", "functional"):
        e = row[kind]
        assert e["n_references"] == 3 and row["n"] == 3 * N
        assert e["value"] == pytest.approx(1 / 3)
        assert e["lo"] == pytest.approx(-1.0) and e["hi"] == pytest.approx(1.0)
        assert C.dissociation_verdict(e)[0] == C.NOT_DETERMINABLE
        assert e["n_survived"] == 3 * 300  # survival >= 0.7: 30% of each SAE's features
    assert row["geometric"]["source"] == "warm start"


def test_rq5_over_unrelated_saes_is_a_dissociation(tmp_path):
    """Survival independent of importance in each of three SAEs (1,000 features each, so each rho is
    about 0 ± 0.03): the mean rho and its t interval over the SAEs lie inside ±0.2."""
    root = make_study(tmp_path, np.full(N, 0.6), np.full(N, 0.5), np.full(N, 0.1), lambda g: g.random(N))
    rng = np.random.default_rng(3)
    _several_rq5_saes(root, {s: rng.random(N) for s in SEEDS}, functional=True)
    row = next(r for r in A.importance_effects(load_study(root)) if r["condition"] == "wanda-0.5")
    for kind in ("geometric", "functional"):
        assert row[kind]["n_references"] == 3
        assert C.dissociation_verdict(row[kind]) == (C.REPRODUCED, "CI inside ±0.2")


def test_rq5_without_every_saes_survival_uses_the_reference_alone(tmp_path):
    """Only the reference has a warm start and a functional r: its features alone, not a mixture."""
    root = make_study(tmp_path, np.full(N, 0.6), np.full(N, 0.5), np.full(N, 0.1), lambda g: g.random(N))
    rng = np.random.default_rng(4)
    _several_rq5_saes(root, {0: rng.random(N)})
    row = next(r for r in A.importance_effects(load_study(root)) if r["condition"] == "wanda-0.5")
    assert row["geometric"]["n_references"] == 1 and row["functional"]["n_references"] == 1


def test_importance_over_studies_pools_every_studys_saes():
    """Two seed sets' SAEs: rho 0.1, 0.2 / 0.3 (geometric) -> mean 0.2, t interval over the three
    0.2 ± 0.248 (not determinable); functional only in the first study: its two SAEs alone."""
    first = [
        {
            "condition": "wanda-0.5",
            "geometric": {"per_sae": {0: 0.1, 1: 0.2}},
            "functional": {"per_sae": {0: 0.0, 1: 0.02}},
        }
    ]
    second = [{"condition": "wanda-0.5", "geometric": {"per_sae": {3: 0.3}}}]
    (row,) = A.importance_over_studies([first, second])
    geo = row["geometric"]
    assert geo["n_references"] == 3 and geo["value"] == pytest.approx(0.2)
    assert (geo["lo"], geo["hi"]) == pytest.approx((0.2 - 0.248414, 0.2 + 0.248414), abs=1e-6)
    assert row["functional"]["n_references"] == 2
    text = C.importance_over_studies_text([row]).splitlines()
    assert text[0].startswith(f"geometric, 3 SAEs: **{C.NOT_DETERMINABLE}**")
    assert text[1].startswith("functional, 2 SAEs:")


def test_importance_over_studies_keeps_each_rho_s_feature_noise():
    """The same three rho over 23 features each: Spearman variances (1 - rho^2)^2 (1 + rho^2 / 2) / 20
    = 0.0492502, 0.0470016, 0.0432682, mean 0.0465067 > sd^2 = 0.01, so 0.2 ± 4.302653 ·
    sqrt(0.0465067 / 3) = 0.2 ± 0.535714 (not ± 0.248)."""
    first = [
        {"condition": "wanda-0.5", "geometric": {"per_sae": {0: 0.1, 1: 0.2}, "per_sae_n": {0: 23, 1: 23}}}
    ]
    second = [{"condition": "wanda-0.5", "geometric": {"per_sae": {3: 0.3}, "per_sae_n": {3: 23}}}]
    (row,) = A.importance_over_studies([first, second])
    assert (row["geometric"]["lo"], row["geometric"]["hi"]) == pytest.approx(
        (0.2 - 0.535714, 0.2 + 0.535714), abs=1e-5
    )

"""The study runner: resumability, input hashes, atomic results, shards, and the CLI end to end on tiny models."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, cli_in_process, run_cli

from lit_prune.analysis.results import read_arrays
from lit_prune.errors import LitPruneError
from lit_prune.study.config import StudySettings
from lit_prune.study.runner import Runner, Step, parse_shard


# --- runner, without any model ------------------------------------------------------------------
def _steps(log: list[str], value: int = 1, fail: str | None = None) -> list[Step]:
    def make(key: str, payload: int):
        def run(out: Path) -> dict:
            if key == fail:
                (out / "partial.txt").write_text("half")
                raise RuntimeError("boom")
            log.append(key)
            (out / "value.txt").write_text(str(payload))
            return {"value": payload}

        return run

    return [
        Step("dense", "a", {"v": 1}, make("dense/a", 1)),
        Step("c1", "b", {"v": value}, make("c1/b", value), deps=["dense/a"]),
        Step("c1", "c", {"v": 3}, make("c1/c", 3), deps=["c1/b"]),
        Step("c2", "b", {"v": 4}, make("c2/b", 4), deps=["dense/a"]),
    ]


def test_rerun_skips_finished_steps_and_redoes_changed_ones_downstream(tmp_path):
    log: list[str] = []
    steps = _steps(log)
    Runner(tmp_path, steps).run(steps, progress=False)
    assert log == ["dense/a", "c1/b", "c1/c", "c2/b"]
    log.clear()
    Runner(tmp_path, steps).run(steps, progress=False)
    assert log == []
    changed = _steps(log, value=2)
    status = Runner(tmp_path, changed).run(changed, progress=False)
    assert log == ["c1/b", "c1/c"]  # c1/c reads c1/b, so its inputs changed too
    assert status == {"dense/a": "done", "c1/b": "ran", "c1/c": "ran", "c2/b": "done"}
    assert (tmp_path / "c1" / "b" / "value.txt").read_text() == "2"


def test_failed_step_keeps_the_previous_good_result(tmp_path):
    log: list[str] = []
    steps = _steps(log)
    Runner(tmp_path, steps).run(steps, progress=False)
    failing = _steps(log, value=2, fail="c1/b")
    with pytest.raises(RuntimeError):
        Runner(tmp_path, failing).run(failing, progress=False)
    assert (tmp_path / "c1" / "b" / "value.txt").read_text() == "1"  # old result intact, not half-replaced
    assert not (tmp_path / "c1" / "b" / "partial.txt").exists()
    runner = Runner(tmp_path, failing)
    assert not runner.is_done("c1/b")  # but it is no longer current


def test_a_damaged_done_record_reruns_its_step(tmp_path):
    log: list[str] = []
    steps = _steps(log)
    Runner(tmp_path, steps).run(steps, progress=False)
    (tmp_path / "c2" / "b" / "done.json").write_text('{"trunc')
    log.clear()
    Runner(tmp_path, steps).run(steps, progress=False)
    assert log == ["c2/b"]


def test_model_identity_follows_rewritten_weights(tmp_path, model_cache):
    """Weights rewritten at the same size are a new model: its steps' inputs change."""
    import os
    from types import SimpleNamespace

    from lit_prune.models.tiny import build_tiny
    from lit_prune.study.steps import model_digest

    build_tiny("tiny-llama", tmp_path / "m")
    ctx = SimpleNamespace(model={"model_name": str(tmp_path / "m"), "model_cache_dir": str(model_cache)})
    before = model_digest(ctx)
    weights = next((tmp_path / "m").glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert model_digest(ctx) != before and weights.stat().st_size == stat.st_size


def test_shards_partition_the_owned_steps_and_pull_in_dependencies(tmp_path):
    steps = _steps([])
    runner = Runner(tmp_path, steps)
    owner = {"dense": 0, "c1": 0, "c2": 1}
    shard0 = [s.key for s in runner.selected((0, 2), lambda s: owner[s.condition])]
    shard1 = [s.key for s in runner.selected((1, 2), lambda s: owner[s.condition])]
    assert shard0 == ["dense/a", "c1/b", "c1/c"]
    assert shard1 == ["dense/a", "c2/b"]  # dense/a is a dependency: run once, under its lock
    assert [s.key for s in runner.selected((0, 1), lambda s: owner[s.condition])] == [s.key for s in steps]


def test_steps_another_process_holds_are_skipped_until_free(tmp_path):
    import threading

    from lit_prune.study.runner import _try_lock, _unlock

    log: list[str] = []
    steps = _steps(log)
    steps[1].shares = steps[2].shares = "c1"  # c1's steps read the same activations: one process runs both
    runner = Runner(tmp_path, steps)
    other = _try_lock(tmp_path / ".shares-c1.lock")  # held as another process would
    thread = threading.Thread(target=runner.run, args=(steps,), kwargs={"progress": False, "poll": 0.02})
    thread.start()
    for _ in range(500):
        if len(log) == 2:
            break
        time.sleep(0.02)
    time.sleep(0.2)
    assert log == ["dense/a", "c2/b"]  # c2/b went ahead of c1, which waits on the other process
    _unlock(other)
    thread.join(10)
    assert log == ["dense/a", "c2/b", "c1/b", "c1/c"]


def test_steps_whose_dependencies_nobody_runs_are_refused(tmp_path):
    steps = _steps([])
    with pytest.raises(ValueError, match="neither given nor done"):
        Runner(tmp_path, steps).run(steps[1:], progress=False)


@pytest.mark.parametrize("text", ["2/2", "-1/2", "a/b", "1", "0/0"])
def test_bad_shard_is_one_line_error(text):
    with pytest.raises(LitPruneError, match="--shard"):
        parse_shard(text)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"sparsities": [0.5, 0.5]}, "study.sparsities"),
        ({"sparsities": [1.0]}, "study.sparsities"),
        ({"sparsities": [-0.1]}, "study.sparsities"),
        ({"methods": ["obs"]}, "study.methods"),
        ({"seeds": []}, "study.seeds"),
        ({"nm": [[4, 2]]}, "study.nm"),
        ({"magnitude_group": "layer"}, "study.magnitude_group"),
        ({"survival": {"taus": [0.5, 0.9]}}, "study.survival.taus"),  # the report needs 0.7
        ({"ablation": {"n_tops": 3}}, "study.ablation.n_tops"),
        ({"ablation": {"eval_sequences": 0}}, "study.ablation.eval_sequences"),
        ({"seeds": [-1]}, "study.seeds"),
        ({"sparsities": [0.1234561, 0.1234562]}, "study.sparsities"),  # both would be magnitude-0.123456
        ({"cache_gb": float("inf")}, "study.cache_gb"),
        ({"warm_start": {"steps": 0}}, "study.warm_start.steps"),
        ({"warm_start": {"lr": 0.0}}, "study.warm_start.lr"),
        ({"warm_start": {"sae_batch_tokens": 1.5}}, "study.warm_start.sae_batch_tokens"),
        ({"warm_start": {"seeds": [2]}}, "study.warm_start.seeds"),  # not among study.seeds [0, 1]
        ({"warm_start": {"seeds": []}}, "study.warm_start.seeds"),
        ({"importance_seeds": [1]}, "study.importance_seeds"),  # without the reference seed 0
        ({"importance_seeds": [0, 0]}, "study.importance_seeds"),
        ({"importance_seeds": [0, 2]}, "study.importance_seeds"),  # not among study.seeds [0, 1]
    ],
)
def test_bad_grid_is_rejected(kwargs, field):
    with pytest.raises(LitPruneError, match=field):
        StudySettings(**kwargs)


def test_rq5_ablates_the_importance_seeds_reference_first():
    assert StudySettings(seeds=[3, 4, 5]).seeds_of_importance() == [3, 4, 5]
    assert StudySettings(seeds=[3, 4, 5], importance_seeds=[5, 3]).seeds_of_importance() == [3, 5]
    pretrained = StudySettings(seeds=[3, 4], reference_sae="sae-lens:release/id")
    assert pretrained.seeds_of_importance() == [3]  # only the pretrained reference is ablated


def test_rq1_matches_seeds_with_the_survival_settings():
    assert StudySettings().rq1_options() == {}
    survival = {
        "taus": [0.5, 0.6, 0.7, 0.9],
        "seed_baseline_tau": 0.6,
        "matching": "hungarian",
        "candidates": 4,
        "n_boot": 10,
    }
    assert StudySettings(survival=survival).rq1_options() == {
        "taus": [0.5, 0.6, 0.7, 0.9],
        "stability_tau": 0.6,
        "method": "hungarian",
        "candidates": 4,
    }


def test_grid_without_pruned_conditions_is_rejected():
    with pytest.raises(LitPruneError, match="no pruned conditions"):
        StudySettings(sparsities=[0.0]).conditions()


def test_conditions_are_named_and_ordered():
    names = [c.name for c in StudySettings(sparsities=[0.5, 0.25], nm=[[2, 4]]).conditions()]
    assert names == [
        "magnitude-0.25",
        "magnitude-0.5",
        "wanda-0.25",
        "wanda-0.5",
        "magnitude-2of4",
        "wanda-2of4",
    ]


# --- the study command on a tiny model ---------------------------------------------------------
def _study_args(tmp_path: Path, corpus: Path, model_cache: Path, *extra: str) -> list[str]:
    return [
        "study",
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        f"--data.corpus={corpus}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--model.model_cache_dir={model_cache}",
        f"--study.checkpoints={tmp_path / 'checkpoints'}",
        f"--study.logs={tmp_path / 'logs'}",
        "--progress=false",
        *extra,
    ]


def _results(study: Path) -> dict[str, object]:
    """Every result row and array of a study (timings and paths dropped)."""
    out: dict[str, object] = {}
    for path in sorted(study.glob("*/*/results/*")):
        key = str(path.relative_to(study))
        if path.suffix == ".json":
            out[key] = [r for r in json.loads(path.read_text()) if "seconds" not in r["metric"]]
        else:
            # bytes, not lists: NaN (a feature that never fires) must compare equal to itself
            out[key] = {
                k: (str(v.dtype), tuple(v.shape), v.numpy().tobytes()) for k, v in read_arrays(path).items()
            }
    for path in sorted(study.glob("*/gallery/gallery.json")):
        out[str(path.relative_to(study))] = json.loads(path.read_text())
    return out


def _assert_results_close(study: Path, reference: Path, rel: float = 1e-5) -> None:
    """The results of two studies agree: the same rows, arrays and gallery, floats to `rel`."""
    import math

    import torch

    got, want = _results(study), _results(reference)
    assert got.keys() == want.keys()

    def close(a, b):
        return a == b or (
            isinstance(a, float)
            and isinstance(b, float)  # noqa: E731
            and (math.isclose(a, b, rel_tol=rel, abs_tol=1e-6) or (math.isnan(a) and math.isnan(b)))
        )

    for key, rows in want.items():
        if key.endswith(".safetensors"):
            arrays, expected = read_arrays(study / key), read_arrays(reference / key)
            assert arrays.keys() == expected.keys(), key
            for name, value in expected.items():
                torch.testing.assert_close(
                    arrays[name], value, rtol=rel, atol=1e-7, equal_nan=True, msg=f"{key}:{name}"
                )
        elif key.endswith("gallery.json"):
            assert got[key] == rows, key
        else:
            assert [{k: v for k, v in r.items() if k != "value"} for r in got[key]] == [
                {k: v for k, v in r.items() if k != "value"} for r in rows
            ], key
            for a, b in zip(got[key], rows, strict=False):
                assert close(a["value"], b["value"]), (key, a["metric"], a["value"], b["value"])


def _ran(study: Path) -> list[list[str]]:
    return [json.loads(line)["ran"] for line in (study / "runs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference_study(tmp_path_factory, local_corpus, model_cache):
    """One uninterrupted tiny study: the baseline the other runs must reproduce exactly."""
    tmp = tmp_path_factory.mktemp("reference_study")
    result = run_cli(*_study_args(tmp, local_corpus, model_cache, "--report=false"), cwd=tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "checkpoints" / "tiny"


@pytest.mark.e2e
def test_study_writes_every_result(reference_study):
    results = _results(reference_study)
    conditions = ["dense", "magnitude-0.5", "wanda-0.5"]
    for cond in conditions:
        assert f"{cond}/rq1/results/rq1_seeds.json" in results
        for seed in (0, 1):
            assert f"{cond}/seed{seed}/results/sae_metrics.json" in results
    for cond in conditions[1:]:
        assert f"{cond}/prune/results/perplexity.json" in results
        assert f"{cond}/seed0/results/rq3_transfer.json" in results  # RQ3: reference seed only
        assert f"{cond}/seed1/results/rq2_survival.json" in results
    assert "dense/rq5/results/rq5_ablation.json" in results
    assert "dense/rq5_seed1/results/rq5_ablation.json" in results  # RQ5 ablates every dense seed's SAE
    assert "wanda-0.5/gallery/gallery.json" in results
    for cond in conditions[1:]:  # the functional step's r of the reference = the reference fit's
        functional = read_arrays(reference_study / cond / "functional" / "results" / "functional.safetensors")
        fit = read_arrays(reference_study / cond / "seed0" / "results" / "rq2_survival.safetensors")
        assert functional["seed"].tolist() == [0, 1]
        torch.testing.assert_close(functional["pearson_r"][0], fit["pearson_r"], equal_nan=True)

    # every seed pair (docs/methods.md §4b): dense pairs a != b; pruned pairs cross and same-seed
    def pairs(c):
        return {
            (r["seed_a"], r["seed_b"], r["same_seed"]) for r in results[f"{c}/pairs/results/rq2_pairs.json"]
        }

    assert pairs("dense") == {(0, 1, False), (1, 0, False)}
    assert pairs("wanda-0.5") == {(0, 1, False), (1, 0, False), (0, 0, True), (1, 1, True)}
    # survival rows: cross-seed (seed 1 vs the seed-0 reference) and same-seed
    rows = results["wanda-0.5/seed1/results/rq2_survival.json"]
    assert {(r["seed_a"], r["seed_b"], r["same_seed"]) for r in rows} == {(0, 1, False)}
    ppl = {r["metric"]: r["value"] for r in results["wanda-0.5/prune/results/perplexity.json"]}
    assert ppl["realised_sparsity"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.e2e
def test_study_warm_starts_every_condition_against_its_control(reference_study):
    """RQ2c: each dense seed's SAE trained a few steps further on every model; rows read back."""
    results = _results(reference_study)
    for seed in (0, 1):
        for cond in ("dense", "magnitude-0.5", "wanda-0.5"):
            rows = results[f"{cond}/warm{seed}/results/warm_start.json"]
            got = {r["metric"]: r["value"] for r in rows}
            assert {(r["seed_a"], r["seed_b"]) for r in rows} == {(seed, seed)}
            assert "val_fvu" in got and got["warm_steps"] == 20
            arrays = read_arrays(
                reference_study / cond / f"warm{seed}" / "results" / "warm_start.safetensors"
            )
            alive = arrays["firing_rate"] > 0
            assert got["warm_survival@0.7"] == pytest.approx(
                float((arrays["cosine"][alive] >= 0.7).double().mean())
            )
    # the report's RQ2c section: a row per condition with the seed-aware ratio CI, and its figure
    from lit_prune.study.report.analysis import warm_start
    from lit_prune.study.report.build import build_report
    from lit_prune.study.report.data import load_study

    data = load_study(reference_study)
    rows = warm_start(data)
    assert [(r["condition"], r["seeds"]) for r in rows] == [("magnitude-0.5", 2), ("wanda-0.5", 2)]
    control = [results[f"dense/warm{s}/results/warm_start.json"] for s in (0, 1)]
    control_s = sum(next(x["value"] for x in c if x["metric"] == "warm_survival@0.7") for c in control) / 2
    for r in rows:
        lo, hi = r["ratio_ci@0.7"]
        assert lo is None or lo <= r["ratio@0.7"] <= hi
        assert r["control@0.7"] == pytest.approx(control_s)  # the control is the dense warm start
    _, blocks, figures = build_report(data)
    assert "warm_start" in figures and any(getattr(b, "name", None) == "warm_start" for b in blocks)


@pytest.mark.e2e
def test_rerun_does_nothing_and_a_changed_setting_reruns_only_what_it_touches(
    reference_study, tmp_path, local_corpus, model_cache
):
    import shutil

    study_root = tmp_path / "checkpoints"
    shutil.copytree(reference_study, study_root / "tiny")
    before = _results(study_root / "tiny")
    result = run_cli(*_study_args(tmp_path, local_corpus, model_cache, "--report=false"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _ran(study_root / "tiny")[-1] == []
    assert _results(study_root / "tiny") == before
    # a different SAE-pruning baseline level changes only the RQ3 (reference-seed) fits and the steps
    # that read them (RQ1 matching, the gallery)
    result = run_cli(
        *_study_args(
            tmp_path,
            local_corpus,
            model_cache,
            "--report=false",
            "--study.transfer={sae_prune_levels: [0.25]}",
        ),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(_ran(study_root / "tiny")[-1]) == [
        "magnitude-0.5/pairs",
        "magnitude-0.5/rq1",
        "magnitude-0.5/seed0",
        "wanda-0.5/gallery",
        "wanda-0.5/pairs",
        "wanda-0.5/rq1",
        "wanda-0.5/seed0",
    ]


@pytest.mark.e2e
def test_magnitude_group_reprunes_only_magnitude(reference_study, tmp_path, local_corpus, model_cache):
    import shutil

    from lit_prune.pruning import load_masks

    study = tmp_path / "checkpoints" / "tiny"
    shutil.copytree(reference_study, study)
    result = run_cli(
        *_study_args(tmp_path, local_corpus, model_cache, "--report=false", "--study.magnitude_group=global"),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(_ran(study)[-1]) == [
        "magnitude-0.5/functional",
        "magnitude-0.5/pairs",
        "magnitude-0.5/prune",
        "magnitude-0.5/rq1",
        "magnitude-0.5/seed0",
        "magnitude-0.5/seed1",
        "magnitude-0.5/warm0",
        "magnitude-0.5/warm1",
    ]
    masks = load_masks(study / "magnitude-0.5" / "prune" / "masks.safetensors")
    pruned = {name: int((~m).sum()) for name, m in masks.items()}
    total = sum(m.numel() for m in masks.values())
    assert sum(pruned.values()) == total // 2  # one global ranking: exact overall, uneven per matrix
    assert len({round(pruned[n] / masks[n].numel(), 3) for n in masks}) > 1


@pytest.mark.e2e
def test_sigkilled_study_resumes_to_identical_results(reference_study, tmp_path, local_corpus, model_cache):
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "lit_prune",
        *_study_args(tmp_path, local_corpus, model_cache, "--report=false"),
    ]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    study = tmp_path / "checkpoints" / "tiny"
    while len(list(study.glob("*/*/done.json"))) < 5 and proc.poll() is None:  # until some steps are done
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # mid-study: some steps done, one usually half-written
    proc.wait()
    assert 0 < len(list(study.glob("*/*/done.json"))) < len(list(reference_study.glob("*/*/done.json")))
    result = run_cli(*_study_args(tmp_path, local_corpus, model_cache, "--report=false"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _results(study) == _results(reference_study)


@pytest.mark.e2e
def test_shards_and_report_equal_one_unsharded_run(reference_study, tmp_path, local_corpus, model_cache):
    for shard in ("0/2", "1/2"):
        result = run_cli(*_study_args(tmp_path, local_corpus, model_cache, f"--shard={shard}"), cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    study = tmp_path / "checkpoints" / "tiny"
    first, second = _ran(study)
    assert not set(first) & set(second)  # no step ran twice
    assert _results(study) == _results(reference_study)
    result = run_cli("report", str(study), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (study / "report" / "report.md").is_file() and (study / "report" / "report.html").is_file()


@pytest.mark.e2e
def test_workers_share_the_steps_and_reproduce_one_process(
    reference_study, tmp_path, local_corpus, model_cache
):
    result = run_cli(
        *_study_args(tmp_path, local_corpus, model_cache, "--report=false", "--study.workers=2"), cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    study = tmp_path / "checkpoints" / "tiny"
    # Workers have one thread each: torch splits long sums differently, so values move in the last bits
    _assert_results_close(study, reference_study)
    first, second = json.loads((study / "runs.jsonl").read_text())["workers"]
    assert first and second
    assert sorted(first + second) == sorted(_ran(study)[0])  # every step ran, once
    assert len(set(first + second)) == len(first + second) == len(list(reference_study.glob("*/*/done.json")))
    for cond in ("dense", "magnitude-0.5", "wanda-0.5"):  # a condition's fits share one worker's cache
        assert {f"{cond}/seed0", f"{cond}/seed1"} <= set(first) or {f"{cond}/seed0", f"{cond}/seed1"} <= set(
            second
        )


@pytest.mark.e2e
def test_a_failing_worker_stops_the_study_with_its_one_line_error(
    tmp_path, local_corpus, model_cache, monkeypatch
):
    empty = tmp_path / "not_an_sae"
    empty.mkdir()  # a directory without an SAE: refused up front, before the workers run any step
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))  # where the workers' folder goes
    (tmp_path / "tmp").mkdir()
    result = run_cli(
        *_study_args(
            tmp_path, local_corpus, model_cache, "--study.workers=2", f"--study.reference_sae={empty}"
        ),
        cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: study.reference_sae=") and "cfg.json" in last, last
    assert "Traceback" not in result.stderr
    study = tmp_path / "checkpoints" / "tiny"
    assert not list(study.glob("*/rq5/done.json")) and not (study / "runs.jsonl").exists()
    assert list((tmp_path / "tmp").iterdir()) == []  # the one line says it all: no log folder is kept


@pytest.mark.e2e
def test_study_help_explains_the_grid():
    result = run_cli("study", "--help", cwd=ROOT)
    assert result.returncode == 0
    for option in ("--study.sparsities", "--study.seeds", "--shard", "--study.model"):
        assert option in result.stdout


@pytest.mark.parametrize(
    "override, field",
    [
        ("--study.sparsities=[0.5, 0.5]", "study.sparsities"),
        ("--study.sparsities=[1.5]", "study.sparsities"),
        ("--study.sparsities=[0.0]", "no pruned conditions"),
        ("--shard=3/2", "--shard"),
        ("--study.workers=0", "study.workers"),
        ("--study.model={no_such_option: 1}", "study.model.no_such_option"),
        ("--trainer.precision=bf16-true", "trainer.precision='bf16-true' is invalid"),
        ("--study.survival={matching: greedy}", "study.survival.matching='greedy' is invalid"),
        ("--study.transfer={no_such_option: 1}", "study.transfer.no_such_option"),
        ("--seed_everything=-5", "seed_everything=-5 is invalid"),
        ("--study.reference_sae=sae-lens:foo", "study.reference_sae='sae-lens:foo' is invalid"),
        ("--study.workers=abc", "Got value: abc"),  # jsonargparse's whole message, in one line
        ("--study.logs=/dev/null/logs", "study.logs='/dev/null/logs' is invalid"),
        ("--study.nm=[[3, 7]]", "study.nm=[3, 7] is invalid"),
        ("--trainer.strategy=foo", "error: trainer settings: You selected an invalid strategy name"),
        (
            "--trainer={devices: 2, strategy: ddp_spawn}",
            "trainer.strategy=\"DDPStrategy(start_method='spawn')\"",
        ),  # the tiny model's widths are not multiples of 7
    ],
)
def test_study_bad_input_is_one_line_error_and_writes_nothing(
    tmp_path, local_corpus, model_cache, override, field
):
    code, stderr = cli_in_process(*_study_args(tmp_path, local_corpus, model_cache, override), cwd=tmp_path)
    assert code == 2, stderr[-2000:]
    assert field in stderr
    assert not (tmp_path / "checkpoints" / "tiny").exists()


def test_workers_with_multi_device_fits_is_one_line_error():
    from lit_prune.commands.study import context_from_args

    with pytest.raises(LitPruneError, match="study.workers=2 is invalid"):
        context_from_args(
            [
                "--config",
                str(ROOT / "configs" / "smollm2.yaml"),
                "--study.workers=2",
                "--trainer={devices: 2}",
            ]
        )


def test_report_of_unknown_directory_is_one_line_error(tmp_path):
    code, stderr = cli_in_process("report", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert code == 2 and stderr.startswith("error: ")


def test_ctrl_c_in_a_study_says_that_the_same_command_resumes_it(tmp_path, monkeypatch):
    import lit_prune.commands.study

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(lit_prune.commands.study, "main", interrupted)
    code, stderr = cli_in_process("study", cwd=tmp_path)
    assert (code, stderr) == (
        130,
        "interrupted: finished steps are kept; the same command resumes the study\n",
    )


@pytest.mark.parametrize("name", ["smollm2", "llama", "gemma2", "gemma3"])
def test_shipped_study_configs_parse(name):
    from lit_prune.commands.study import context_from_args

    ctx, shard, _ = context_from_args(["--config", str(ROOT / "configs" / f"{name}.yaml")])
    settings = ctx.settings
    assert ctx.name == name and shard == (0, 1)
    assert set(settings.methods) == {"magnitude", "wanda"} and len(settings.seeds) >= 2
    # the CPU default trades sparsities for SAE steps above the seed noise (configs/smollm2.yaml)
    assert len([s for s in settings.sparsities if s > 0]) >= (2 if name == "smollm2" else 3)
    assert len(settings.seeds) >= 3
    assert ctx.data["model_name"] == ctx.model["model_name"]
    assert ctx.model["lm_dtype"] in ("float32", "bfloat16")  # auto is resolved before steps hash it
    if name.startswith("gemma"):
        assert settings.reference_sae.startswith("sae-lens:")  # Gemma Scope as the pretrained reference
    if name != "smollm2":
        assert max(settings.sparsities) == 0.6 and ctx.data["corpus"].startswith("hf:")


def test_quick_study_keeps_the_sae_budget_and_cuts_the_grid():
    from lit_prune.commands.study import context_from_args

    default, _, _ = context_from_args(["--config", str(ROOT / "configs" / "smollm2.yaml")])
    quick, _, _ = context_from_args(
        [
            "--config",
            str(ROOT / "configs" / "smollm2.yaml"),
            "--config",
            str(ROOT / "configs" / "smollm2_quick.yaml"),
        ]
    )
    assert quick.name == "smollm2_quick"
    q, d = quick.settings, default.settings
    assert (q.sparsities, q.seeds, q.pruned_seeds) == ([0.5], [0, 1], [0])
    assert {k: q.ablation[k] for k in ("n_top", "n_random", "n_rare")} == {
        "n_top": 64,
        "n_random": 64,
        "n_rare": 64,
    }
    # RQ5 on the reference SAE alone: 192 features against the default's 3 x 192
    assert (q.seeds_of_importance(), d.seeds_of_importance()) == ([0], [0, 1, 2])
    assert {k: d.ablation[k] for k in ("n_top", "n_random", "n_rare")} == {
        "n_top": 64,
        "n_random": 64,
        "n_rare": 64,
    }
    # each feature in its first 2 firing sequences, not 4: the rest of the ablation is the default's
    assert (q.ablation["max_sequences"], d.ablation["max_sequences"]) == (2, 4)
    assert {k: v for k, v in q.ablation.items() if k != "max_sequences" and not k.startswith("n_")} == {
        k: v for k, v in d.ablation.items() if k != "max_sequences" and not k.startswith("n_")
    }
    # the SAE budget, which keeps the seed pairs above the noise floor, is the default's
    assert (q.epochs, q.methods, quick.model, quick.data) == (
        d.epochs,
        d.methods,
        default.model,
        default.data,
    )


@pytest.mark.e2e
@pytest.mark.parametrize(
    "config, arch", [("llama", "tiny-llama"), ("gemma2", "tiny-gemma2"), ("gemma3", "tiny-gemma3")]
)
def test_paper_configs_run_end_to_end_on_tiny_local_copies(config, arch, tmp_path, local_corpus, model_cache):
    """Each paper config's study on a tiny save_pretrained copy of its architecture, a tiny sae-lens
    SAE on disk as the pretrained reference (Gemma configs) and a local corpus: everything but the sizes."""
    from lit_prune.models.tiny import build_tiny
    from lit_prune.sae.build import SAESettings, build_training_sae
    from lit_prune.sae.io import export_sae

    model = tmp_path / arch
    build_tiny(arch, model)
    extra = []
    if config.startswith("gemma"):
        reference = tmp_path / "pretrained_sae"
        export_sae(
            build_training_sae(SAESettings(expansion=4, k=8), 64, seed=7),
            reference,
            1.0,
            {"model": str(model), "hook_layer": 1},
        )
        (reference / "lit_prune.json").unlink()  # a foreign sae-lens SAE: no lit_prune metadata
        extra.append(f"--study.reference_sae={reference}")
    args = [
        "study",
        "--config",
        str(ROOT / "configs" / f"{config}.yaml"),
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        f"--model.model_name={model}",
        "--study.model={}",
        "--study.data={}",
        "--study.methods=[wanda]",
        "--study.seeds=[0]",
        f"--data.corpus={local_corpus}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        f"--model.model_cache_dir={model_cache}",
        f"--study.checkpoints={tmp_path / 'checkpoints'}",
        f"--study.logs={tmp_path / 'logs'}",
        "--progress=false",
        *extra,
    ]
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    study = tmp_path / "checkpoints" / config
    assert (
        study / "wanda-2of4" / "seed0" / "results" / "rq3_transfer.json"
    ).is_file()  # the config's N:M condition
    assert (study / "report" / "report.html").is_file()


def test_workers_take_the_visible_gpus_in_turn(monkeypatch):
    from lit_prune.study.workers import worker_gpus

    assert worker_gpus("cpu", 2) == [None, None]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert worker_gpus("cuda", 2) == [None, None]  # one GPU: shared
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert worker_gpus("cuda", 4) == ["0", "1", "2", "0"]
    assert worker_gpus("cuda:1", 2) == [None, None]  # a GPU named by trainer.devices: every worker there
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5, 7")
    assert worker_gpus("cuda", 3) == ["5", "7", "5"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,-1,2")  # CUDA stops at the first invalid entry
    assert worker_gpus("cuda", 3) == ["0", "1", "0"]


def test_a_finished_step_keeps_only_its_own_tensorboard_run(tmp_path):
    log: list[str] = []
    steps = _steps(log)
    runs = tmp_path / "logs" / "c1" / "b"
    for n in (0, 1, 10):  # an earlier result's run, a killed attempt's, and (numbered last) this run's
        (runs / f"version_{n}").mkdir(parents=True)
    (runs / "notes").mkdir()
    Runner(tmp_path / "study", steps, logs=tmp_path / "logs").run(steps, progress=False)
    assert sorted(p.name for p in runs.iterdir()) == ["notes", "version_10"]

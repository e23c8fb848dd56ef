"""A study whose trainer asks for two CPU devices: its SAE fits run as Lightning DDP child processes
(`lit_prune.study.fit_worker`), every other step as before."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import ROOT, run_cli

from lit_prune.analysis.results import read_arrays
from lit_prune.errors import LitPruneError

# The fewest steps with both kinds of fit: dense, and pruned with the rank-0-only RQ2 / RQ3
# callbacks (one pruned condition, one seed, no gallery). 16k training tokens at lr 3e-3 train the
# tiny SAE to FVU ~0.4, so comparing the two runs means something.
GRID = [
    "--study.methods=[wanda]",
    "--study.seeds=[0]",
    "--study.gallery_features=0",
    "--study.perplexity_sequences=4",
    "--study.survival={n_boot: 10}",
    "--data.train_tokens=16384",
    "--data.eval_tokens=512",
    "--model.ce_eval_sequences=4",
    "--model.lr=0.003",
]
# The one-device run's global batch (8 sequences per LM batch, 256 tokens per SAE step), halved per rank.
DDP = [
    '--trainer={"accelerator": "cpu", "devices": 2}',
    "--data.batch_size=4",
    "--model.sae_batch_tokens=128",
]
FITS = ("dense/seed0", "wanda-0.5/seed0")
# |DDP - one device| allowed; see the test's docstring.
TOLERANCE = {"fvu": 0.06, "cos": 0.05}


def _args(tmp: Path, corpus: Path, model_cache: Path, name: str, *extra: str) -> list[str]:
    return [
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        f"--data.corpus={corpus}",
        f"--data.cache_dir={tmp / 'cache'}",
        f"--model.model_cache_dir={model_cache}",
        f"--study.name={name}",
        f"--study.checkpoints={tmp / 'checkpoints'}",
        f"--study.logs={tmp / 'logs'}",
        "--progress=false",
        "--report=false",
        *GRID,
        *extra,
    ]


def _metrics(fit: Path) -> dict[str, float]:
    return {r["metric"]: r["value"] for r in json.loads((fit / "results" / "sae_metrics.json").read_text())}


def _snapshot(study: Path) -> dict[str, bytes]:
    return {str(p.relative_to(study)): p.read_bytes() for p in sorted(study.glob("*/*/**/*")) if p.is_file()}


@pytest.mark.e2e
def test_two_device_study_runs_ddp_fits_that_match_one_device(tmp_path, local_corpus, model_cache):
    """The DDP study against the same study on one device, at the same global batch and seed.

    Exact: the eval token count (torchmetrics reduces over both ranks' eval shards), L0 (TopK: k),
    the tokens trained summed over the ranks (each rank trains on its half of the sequences, and
    rank 0's exported SAE records its own half, as `fit` does), norm_scale. Not exact: the training
    loader's DistributedSampler shuffles, so the SAE sees the sequences in another order (see
    tests/test_ddp_equivalence.py). Measured on this configuration: a one-device run with another
    data.shuffle_seed moved FVU by 0.019-0.022 and cos by 0.011-0.012; DDP against one device moved
    them by 0.025-0.026 and 0.017-0.019. The bounds are ~2-3x those. Spliced CE / KL are not
    compared: ce_eval_sequences counts per rank, so the DDP run splices twice the sequences.
    """
    from lit_prune.commands.study import run_study

    result = run_cli("study", *_args(tmp_path, local_corpus, model_cache, "ddp", *DDP), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = tmp_path / "checkpoints" / "ddp"
    run_study(_args(tmp_path, local_corpus, model_cache, "single"))  # one device: in this process
    single = tmp_path / "checkpoints" / "single"
    for fit in FITS:
        d, s = ddp / fit, single / fit
        assert sorted(p.name for p in d.iterdir()) == sorted(
            p.name for p in s.iterdir()
        )  # no worker files left
        assert sorted(p.name for p in (d / "results").iterdir()) == sorted(
            p.name for p in (s / "results").iterdir()
        )
        summary = json.loads((d / "done.json").read_text())["summary"]
        assert (
            summary["tokens_trained"]
            == json.loads((s / "done.json").read_text())["summary"]["tokens_trained"]
            > 0
        )
        d_meta, s_meta = (json.loads((f / "sae" / "lit_prune.json").read_text()) for f in (d, s))
        assert d_meta["tokens_trained"] * 2 == summary["tokens_trained"]  # rank 0 counts its half
        assert d_meta["norm_scale"] == s_meta["norm_scale"]
        dm, sm = _metrics(d), _metrics(s)
        assert summary["metrics"] == d_meta["metrics"]  # (also under SAEBench's names)
        common = summary["metrics"].keys() & dm.keys()  # the results file also has SAEBench's names
        assert {"fvu", "l0", "ce_recovered"} <= common
        assert {k: summary["metrics"][k] for k in common} == pytest.approx({k: dm[k] for k in common})
        assert dm["tokens"] == sm["tokens"] == 16 * 31 and dm["l0"] == sm["l0"] == 8.0
        for key, tol in TOLERANCE.items():
            assert abs(dm[key] - sm[key]) <= tol, (fit, key, sm[key], dm[key])
        # firing rates over both ranks' eval tokens, like the metrics: the dead latents agree
        rates = read_arrays(d / "results" / "sae_firing_rates.safetensors")["firing_rate"]
        assert float((rates == 0).double().mean()) == dm["dead_fraction"]
        assert float(rates.sum()) == pytest.approx(8.0)
    assert (ddp / "wanda-0.5" / "seed0" / "results" / "rq3_transfer.json").is_file()
    assert len(list((tmp_path / "logs" / "ddp" / "wanda-0.5" / "seed0").iterdir())) == 1  # rank 0 logs, once

    before = _snapshot(ddp)
    run_study(_args(tmp_path, local_corpus, model_cache, "ddp", *DDP))  # a rerun: everything is done
    runs = (ddp / "runs.jsonl").read_text().splitlines()
    assert (
        json.loads(runs[-1])["ran"] == [] and len(json.loads(runs[-1])["skipped"]) == 7
    )  # with the warm starts
    assert _snapshot(ddp) == before


@pytest.mark.parametrize(
    "trainer, processes",
    [
        ({}, 1),
        ({"devices": 1}, 1),
        ({"devices": 2}, 2),
        ({"devices": "2"}, 2),
        ({"devices": [0, 1]}, 2),
        ({"devices": "0,1"}, 2),
        ({"devices": "0,"}, 1),
        ({"accelerator": "cpu", "devices": "auto"}, 1),
        ({"accelerator": "cpu", "devices": -1}, 1),
        ({"devices": 2, "num_nodes": 2}, 4),
        ({"devices": 1, "num_nodes": 2}, 2),
    ],
)
def test_fit_processes(trainer, processes):
    from lit_prune.study.fit_worker import fit_processes

    assert fit_processes(trainer) == processes


@pytest.mark.parametrize(
    "devices, ids",
    [
        (1, None),
        ("2", None),
        ("auto", None),
        ([2], [2]),
        ("2,", [2]),
        ("0, 3", [0, 3]),
        ((1, "2"), [1, 2]),
    ],
)
def test_device_ids_and_the_device_of_steps_outside_lightning(monkeypatch, devices, ids):
    from lit_prune.study.fit_worker import device_ids
    from lit_prune.study.steps import StudyContext

    assert device_ids({"devices": devices}) == ids
    ctx = StudyContext(
        name="s", settings=None, model={}, data={}, trainer={"devices": devices}, seed_everything=0
    )
    assert ctx.device == "cpu"  # no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ctx.device == (f"cuda:{ids[0]}" if ids else "cuda")
    ctx.trainer["accelerator"] = "cpu"
    assert ctx.device == "cpu"


def test_device_ids_that_are_not_numbers_are_one_line_errors():
    from lit_prune.study.fit_worker import device_ids, fit_processes

    with pytest.raises(LitPruneError, match=r"trainer.devices.*list of device ids"):
        device_ids({"devices": ["cuda:0"]})
    with pytest.raises(LitPruneError, match=r"^trainer.devices='x' is invalid"):
        fit_processes({"devices": "x"})


def test_failed_worker_is_one_line_error_naming_the_step(tmp_path, monkeypatch):
    from lit_prune.study import fit_worker
    from lit_prune.study.config import PruneCondition, StudySettings
    from lit_prune.study.steps import StudyContext

    monkeypatch.setattr(fit_worker.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1))
    ctx = StudyContext(
        name="s",
        settings=StudySettings(checkpoints=str(tmp_path)),
        model={},
        data={},
        trainer={"accelerator": "cpu", "devices": 2, "logger": object()},
        seed_everything=0,
    )
    with pytest.raises(LitPruneError, match=r"study step wanda-0.5/seed1: .*exited with status 1") as err:
        fit_worker.fit_in_worker(ctx, tmp_path, 1, PruneCondition("wanda", 0.5))
    assert "\n" not in str(err.value)
    spec = json.loads((tmp_path / fit_worker.SPEC).read_text())  # the trainer's other settings stay out
    assert spec["trainer"] == {"accelerator": "cpu", "devices": 2} and spec["condition"]["method"] == "wanda"

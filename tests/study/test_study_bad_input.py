"""Issue #25 for `study`: reference_sae, section types, non-finite values and writability are checked
before any step runs; a full disk is one line keeping the finished steps; and a second study of the
same name with other settings refuses while the first holds it. Each refusal leaves the study's
directory byte for byte as it was."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, cli_in_process
from test_study import _study_args as _study  # the same tiny study's arguments

import lit_prune.study.runner
from lit_prune.sae.build import SAESettings, build_training_sae
from lit_prune.sae.io import export_sae

TINY_D_MODEL = 64  # lit_prune.models.tiny: hidden_size of tiny-llama


def _error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def no_steps(monkeypatch):
    """Any step starting is a failure: these inputs must be refused before the first one."""

    def refuse(*args, **kwargs):
        raise AssertionError("a step ran before the input was checked")

    monkeypatch.setattr(lit_prune.study.runner.Runner, "run", refuse)


def _sae_dir(path: Path, d_in: int, hook_layer: int = 1) -> Path:
    sae = build_training_sae(SAESettings(architecture="topk", expansion=2, k=4), d_in, seed=0)
    return export_sae(sae, path, 1.0, {"model": "tiny-llama", "hook_layer": hook_layer})


# --- 4: reference_sae checked before any step ----------------------------------------------
def _wrong_width(tmp: Path) -> Path:
    return _sae_dir(tmp / "wide", TINY_D_MODEL + 8)


def _truncated(tmp: Path) -> Path:
    path = _sae_dir(tmp / "truncated", TINY_D_MODEL)
    weights = path / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return path


def _foreign(tmp: Path) -> Path:
    path = tmp / "foreign"
    path.mkdir()
    (path / "cfg.json").write_text("not json")
    return path


def _other_hook(tmp: Path) -> Path:
    return _sae_dir(tmp / "other_hook", TINY_D_MODEL, hook_layer=0)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            _wrong_width,
            f"error: study.reference_sae.d_in={TINY_D_MODEL + 8} is invalid: expected the model's",
        ),
        (_truncated, "error: study.reference_sae='{path}' is not a loadable sae-lens SAE"),
        (_foreign, "error: study.reference_sae='{path}' is not a loadable sae-lens SAE"),
        (_other_hook, "error: study.reference_sae.hook_layer=0 is invalid: expected the hooked block 1"),
    ],
)
def test_reference_sae_is_checked_before_any_step(
    tmp_path, local_corpus, model_cache, no_steps, make, message
):
    path = make(tmp_path)
    args = _study(tmp_path, local_corpus, model_cache, f"--study.reference_sae={path}")
    code, stderr = cli_in_process(*args, cwd=tmp_path)
    assert code == 2 and _error(stderr).startswith(message.format(path=path))
    assert not (tmp_path / "checkpoints").exists()


# --- 5 and 3: sections of the wrong type, non-finite values ---------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        ("study:\n- methods: [wanda]\n  sparsities: [0.5]\n", "error: study=[{"),
        ("study:\n  survival: [1, 2]\n", "error: study.survival=[1, 2] is invalid: expected a mapping"),
        ("study:\n  cache_gb: .inf\n", "error: study.cache_gb=inf is invalid: expected a finite number"),
        ("model:\n  lr: .nan\n", "error: model.lr=nan is invalid: expected a finite number"),
        ("study:\n  model:\n    lr: .inf\n", "study.model.lr"),
        ("study:\n  sparsities: [0.5, .nan]\n", "error: study.sparsities=[0.5, nan] is invalid"),
        ("", "expected a YAML mapping of sections (the file holds none)"),
    ],
)
def test_bad_sections_and_values_are_one_line(tmp_path, local_corpus, model_cache, no_steps, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    code, stderr = cli_in_process(
        *_study(tmp_path, local_corpus, model_cache, "--config", str(config)), cwd=tmp_path
    )
    assert code == 2 and message in _error(stderr)
    assert not (tmp_path / "checkpoints").exists()


# --- 6: writability before the work, a full disk during it ---------------------------------
@pytest.mark.parametrize("name", ["checkpoints", "logs"])
def test_unwritable_study_folders_are_refused_before_any_step(
    tmp_path, local_corpus, model_cache, no_steps, name
):
    args = _study(tmp_path, local_corpus, model_cache, f"--study.{name}=/proc/lit_prune_{name}")
    code, stderr = cli_in_process(*args, cwd=tmp_path)
    line = _error(stderr)
    assert code == 2 and line.startswith(
        f"error: study.{name}='/proc/lit_prune_{name}' is invalid: expected a directory"
    )


def test_a_full_disk_during_the_study_is_one_line_that_keeps_finished_steps(
    tmp_path, local_corpus, model_cache, monkeypatch
):
    full = tmp_path / "checkpoints" / "tiny" / "dense" / "seed0" / "results.json"

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(full))

    monkeypatch.setattr(lit_prune.study.runner.Runner, "run", disk_full)
    code, stderr = cli_in_process(*_study(tmp_path, local_corpus, model_cache), cwd=tmp_path)
    line = _error(stderr)
    assert code == 2 and f"({full}: No space left on device)" in line
    assert line.endswith("finished steps are kept: the same command resumes the study")


# --- 10: two studies of the same name at once -----------------------------------------------
@pytest.mark.e2e
def test_a_second_study_with_other_settings_refuses_while_the_first_runs(tmp_path, local_corpus, model_cache):
    study = tmp_path / "checkpoints" / "tiny"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(
        [sys.executable, "-m", "lit_prune", *_study(tmp_path, local_corpus, model_cache), "--report=false"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not (study / "study.json").is_file():  # the first holds the study once it wrote this
            assert first.poll() is None, "the first study ended before it held the study"
            time.sleep(0.5)
        before = (study / "study.json").read_bytes()
        other = _study(tmp_path, local_corpus, model_cache, "--study.sparsities=[0.25]", "--report=false")
        code, stderr = cli_in_process(*other, cwd=tmp_path)
        assert first.poll() is None, "the first study ended before the second was refused"
        line = _error(stderr)
        assert code == 2 and line.startswith(
            "error: study.name='tiny' is invalid: expected a name no running"
        )
        assert (study / "study.json").read_bytes() == before
        assert not list(study.glob("magnitude-0.25*")) and not list(study.glob("wanda-0.25*"))
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_the_same_settings_share_the_study_and_the_lock_goes_with_the_process(tmp_path):
    """Shards of one study hold it together; a refused process holds nothing afterwards."""
    import json

    from lit_prune.commands.study import _hold_study
    from lit_prune.errors import LitPruneError

    root = tmp_path / "study"
    mine = {"name": "s", "steps": {"dense/seed0": "a"}}
    first = _hold_study("s", root, mine)
    second = _hold_study("s", root, mine)  # another shard: same steps
    with pytest.raises(LitPruneError, match="study.name='s' is invalid"):
        _hold_study("s", root, {"name": "s", "steps": {"dense/seed0": "b"}})
    assert json.loads((root / "study.json").read_text())["steps"] == mine["steps"]
    first.close()
    second.close()
    _hold_study("s", root, {"name": "s", "steps": {"dense/seed0": "b"}}).close()  # free again: a rerun
    assert json.loads((root / "study.json").read_text())["steps"] == {"dense/seed0": "b"}

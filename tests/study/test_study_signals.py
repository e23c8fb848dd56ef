"""SIGTERM stops a study at once, with its workers: finished steps stay done, no step is half-written,
and the same command resumes. (Lightning's own SIGTERM handler only sets a flag its training loop
checks, so a study used to carry on through validation, analyses and the next steps.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, run_cli
from test_study import _study_args  # tests/study is on sys.path: pytest puts it there

from lit_prune.errors import Terminated, terminate_on_sigterm

STOP_TIMEOUT = 180  # s: a bound on the wait, generous for a loaded machine; stopping takes seconds
TERMINATED = "terminated: finished steps are kept; the same command resumes the study"


def test_sigterm_inside_a_lightning_run_raises_there():
    """Lightning calls our handler after its own: the run stops where it is (here in a validation
    hook, where Lightning alone would go on) and ends as after Ctrl-C, its context Terminated."""
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    class SigtermInHook(L.Callback):
        went_on = False

        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.0)  # the handlers run here
            self.went_on = True

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    hook = SigtermInHook()
    trainer = L.Trainer(
        callbacks=[hook],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
    )
    try:
        terminate_on_sigterm()
        with pytest.raises(SystemExit) as exit_:  # Lightning's exit after its KeyboardInterrupt shutdown
            trainer.validate(BoringModel(), verbose=False)
    finally:
        for signum, handler in previous.items():  # Lightning leaves SIGINT ignored
            signal.signal(signum, handler)
    assert isinstance(exit_.value.__context__, Terminated) and not hook.went_on


def _processes_of(tmp_path: Path) -> list[int]:
    """Processes (the study's workers, their fits) whose command line names tmp_path."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if str(tmp_path).encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:  # ended meanwhile
            continue
    return found


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_stops_the_study_and_its_workers_and_the_rerun_resumes(
    tmp_path, local_corpus, model_cache, workers
):
    args = _study_args(tmp_path, local_corpus, model_cache, f"--study.workers={workers}", "--report=false")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lit_prune", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    study = tmp_path / "checkpoints" / "tiny"
    try:
        while len(list(study.glob("*/*/done.json"))) < 3 and proc.poll() is None:  # mid-study
            time.sleep(0.2)
        assert proc.poll() is None, "the study ended before it could be stopped"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=STOP_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, err[-3000:]
    assert err.splitlines()[-1] == TERMINATED
    assert _processes_of(tmp_path) == []  # no worker or fit left running
    steps = [p for p in study.glob("*/*") if p.is_dir() and not p.name.startswith(".")]
    assert steps and all((p / "done.json").is_file() for p in steps)  # nothing half-written in place
    finished = {str(p.relative_to(study)) for p in steps}

    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rerun = json.loads((study / "runs.jsonl").read_text().splitlines()[-1])
    assert finished <= set(rerun["skipped"]) and rerun["ran"]  # resumed: the finished steps kept

"""Study workers: `study.workers` processes on one machine share a study's steps.

The study process starts the workers (`python -m lit_prune study ... --worker=i:FOLDER`) before it
builds the corpus and converts the model, so their imports overlap that set-up, then releases them
(FOLDER/ready) and shows their progress. Each worker runs `Runner.run` over the same steps with its
share of the CPU threads: the runner's file locks give every step to one worker, and a condition's
fits to the worker that took the first of them (they share its activation cache). FOLDER (a temp
directory) holds what each worker has started and its output; it is kept only if a worker failed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lit_prune.errors import LitPruneError, invalid

READY = "ready"
STUDY_PID = "LIT_PRUNE_STUDY_PID"  # the environment variable that gives a worker its study's pid
STOP_SECONDS = 10.0  # how long close() gives a worker to stop on SIGTERM before it kills it


def parse_worker(text: str) -> tuple[int, Path]:
    """ "i:FOLDER" (the internal --worker option) -> (i, FOLDER)."""
    index, _, folder = text.partition(":")
    if not index.isdigit() or not folder:
        raise invalid("--worker", text, "INDEX:FOLDER, set by the study for its worker processes")
    return int(index), Path(folder)


def worker_gpus(device: str, workers: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each worker: the visible GPUs in turn when the steps run on "cuda" (no
    GPU named) and torch sees several; else None (every worker sees what the study sees)."""
    import torch

    count = torch.cuda.device_count() if device == "cuda" and torch.cuda.is_available() else 0
    if count < 2:
        return [None] * workers
    listed = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    visible = (listed or [str(i) for i in range(count)])[:count]  # CUDA stops at the first invalid entry
    return [visible[i % len(visible)] for i in range(workers)]


class WorkerPool:
    """`workers` worker processes of the study run by `argv`, started at once and waiting for `release`.
    On several GPUs (device "cuda") each worker gets one of them, in turn."""

    def __init__(self, argv: list[str], workers: int, device: str = "cpu") -> None:
        import torch

        from lit_prune.study.fit_worker import child_env

        self.folder = Path(tempfile.mkdtemp(prefix="lit_prune-workers-"))
        threads = str(max(1, torch.get_num_threads() // workers))
        env = child_env(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, **{STUDY_PID: str(os.getpid())})
        command = [sys.executable, "-m", "lit_prune", "study", *argv, "--progress=false", "--report=false"]
        self.procs = []
        self.failed = False
        for i, gpu in enumerate(worker_gpus(device, workers)):
            with self.log(i).open("w") as log:
                self.procs.append(
                    subprocess.Popen(
                        [*command, f"--worker={i}:{self.folder}"],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env if gpu is None else {**env, "CUDA_VISIBLE_DEVICES": gpu},
                    )
                )

    def log(self, worker: int) -> Path:
        return self.folder / f"{worker}.log"

    def release(self) -> None:
        """Let the workers start on the steps (the corpus, model and study directory are ready)."""
        (self.folder / READY).touch()

    def run(self, runner: Any, steps: list, progress: bool) -> tuple[dict[str, str], list[list[str]]]:
        """Wait for the workers to run `steps`, showing their progress; returns ({key: "done" | "ran"}
        like Runner.run, the keys each worker ran, in order). A failed worker stops the others and is
        reported in one line, with the end of its output printed above."""
        from lit_prune.study.runner import progress_bar

        done_before = {s.key for s in steps if runner.is_done(s.key)}
        total = sum(s.cost for s in steps if s.key not in done_before)
        bar = progress_bar(total, progress)
        shown, drawn = None, 0.0
        try:
            while any(p.poll() is None for p in self.procs):
                self._check()
                finished = [s for s in steps if s.key not in done_before and runner.is_done(s.key)]
                running = [ran[-1] for ran in self.started() if ran and not runner.is_done(ran[-1])]
                if (
                    len(finished),
                    running,
                ) != shown or time.time() - drawn > 10:  # spare logs a line a second
                    shown, drawn = (len(finished), running), time.time()
                    bar.set_description(
                        f"study ({len(self.procs)} workers): {', '.join(running) or 'waiting'}", refresh=False
                    )
                    bar.set_postfix_str(
                        f"{len(done_before) + len(finished)} of {len(steps)} steps finished", refresh=False
                    )
                    bar.update(round(sum(s.cost for s in finished), 3) - bar.n)
                    bar.refresh()
                time.sleep(1.0)
            self._check()
        finally:
            bar.close()
        left = [s.key for s in steps if not runner.is_done(s.key)]
        if left:
            raise LitPruneError(
                f"the study's workers exited leaving {len(left)} steps unfinished ({left[0]}, ...); "
                f"see {self.folder}/*.log"
            )
        return {s.key: "done" if s.key in done_before else "ran" for s in steps}, self.started()

    def started(self) -> list[list[str]]:
        """The steps each worker has started, in order."""
        paths = [started_file(self.folder, i) for i in range(len(self.procs))]
        return [json.loads(p.read_text())["started"] if p.is_file() else [] for p in paths]

    def _check(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc.poll() not in (None, 0):
                tail = self.log(i).read_text(errors="replace").splitlines()[-20:]
                if tail and tail[-1].startswith("error: "):  # the worker's own one-line error says it all
                    raise LitPruneError(f"study worker {i}: {tail[-1][len('error: ') :]}")
                self.failed = True  # keep the folder: the message points to the log
                print("\n".join(tail), file=sys.stderr)
                raise LitPruneError(
                    f"study worker {i} exited with status {proc.returncode}; its output is in {self.log(i)}"
                )

    def close(self) -> None:
        """Stop any worker still running (SIGTERM, SIGKILL after STOP_SECONDS: a step it was running is
        left unfinished, to be redone); remove the folder unless a worker failed without a one-line
        error (the message points to its log there)."""
        running = [proc for proc in self.procs if proc.poll() is None]
        for proc in running:
            proc.terminate()
        deadline = time.monotonic() + STOP_SECONDS
        for proc in running:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not self.failed:
            shutil.rmtree(self.folder, ignore_errors=True)


def wait_for_release(folder: Path) -> None:
    """In a worker: block until the study releases the workers (dies with the study if it dies)."""
    from lit_prune.study.fit_worker import die_with_parent

    die_with_parent()
    study = os.environ.get(STUDY_PID)
    while not (folder / READY).is_file():
        if study is not None and str(os.getppid()) != study:  # the study died before prctl
            os._exit(1)  # (a subreaper, not init, may have adopted this process)
        time.sleep(0.2)


def started_file(folder: Path, worker: int) -> Path:
    """Where a worker records {"started": the keys of the steps it has started (the last is running)}."""
    return folder / f"{worker}.json"

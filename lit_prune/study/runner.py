"""Resumable execution of a study's steps: input hashes, atomic results, locks, shards, progress.

A step's results live in <study dir>/<condition>/<step>/ with a `done.json` that records the
hash of the step's inputs (its settings plus the hashes of the steps it reads). A step runs in
a temp directory beside that and is renamed into place only when complete, so a killed study
leaves either the old complete result or none. A rerun skips steps whose recorded hash equals
the current one and redoes the others (and, through the hashes, everything downstream).
Steps take an exclusive file lock, so processes that share a step (shards, workers) never both run
it; a process skips a step another one holds and takes the next ready one instead. Steps that
read the same cached activations (a condition's SAE fits) all go to the process that took the first.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from lit_prune.errors import invalid

DONE = "done.json"


@dataclass
class Step:
    """One unit of resumable work."""

    condition: str
    """dense, or a pruned condition's name (wanda-0.5)."""
    name: str
    """seed0, prune, rq1, ..."""
    inputs: dict[str, Any]
    """Everything the result depends on (JSON-able); hashed with the deps' hashes."""
    run: Callable[[Path], dict[str, Any]]
    """Writes the results into the given (temp) directory; returns a summary for done.json."""
    deps: list[str] = field(default_factory=list)
    """Keys (condition/name) of the steps whose results this one reads."""
    cost: float = 1.0
    """Rough relative cost, for the progress bar's time estimate."""
    shares: str | None = None
    """Steps with the same value read the same activations (shared through a process's cache): when
    several processes run a study, the one that takes the first of them runs them all."""

    @property
    def key(self) -> str:
        return f"{self.condition}/{self.name}"


def parse_shard(text: str | None) -> tuple[int, int]:
    """ "i/n" -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise invalid("--shard", text, "i/n with integers 0 <= i < n, e.g. 0/2") from None
    if not 0 <= i < n:
        raise invalid("--shard", text, "i/n with integers 0 <= i < n, e.g. 0/2")
    return i, n


class Runner:
    """Runs steps in order under <root>, skipping the ones already done with the same inputs."""

    def __init__(self, root: Path, steps: list[Step], logs: Path | None = None) -> None:
        self.root = Path(root)
        self.logs = logs  # <logs>/<condition>/<step>/version_<n>/: a step's TensorBoard runs
        self.steps = {s.key: s for s in steps}
        self.hashes: dict[str, str] = {}
        for step in steps:  # steps are given in dependency order
            missing = [d for d in step.deps if d not in self.hashes]
            if missing:
                raise ValueError(f"step {step.key} depends on {missing}, which come later or do not exist")
            payload = json.dumps(
                {"inputs": step.inputs, "deps": {d: self.hashes[d] for d in step.deps}},
                sort_keys=True,
                default=str,
            )
            self.hashes[step.key] = hashlib.sha256(payload.encode()).hexdigest()[:20]

    def directory(self, key: str) -> Path:
        return self.root / key

    def record(self, key: str) -> dict[str, Any] | None:
        path = self.directory(key) / DONE
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except (json.JSONDecodeError, UnicodeDecodeError):  # damaged by hand or disk: run the step again
            return None

    def is_done(self, key: str) -> bool:
        record = self.record(key)
        return record is not None and record.get("hash") == self.hashes[key]

    def selected(self, shard: tuple[int, int], owner: Callable[[Step], int | None]) -> list[Step]:
        """The steps shard i of n runs: those it owns (owner(step) % n == i) and, for each, every step
        it depends on (shared ones are guarded by locks). owner None: needed by all shards."""
        i, n = shard
        wanted: set[str] = set()

        def want(key: str) -> None:
            if key not in wanted:
                wanted.add(key)
                for dep in self.steps[key].deps:
                    want(dep)

        for step in self.steps.values():
            who = owner(step)
            if who is not None and who % n == i:
                want(step.key)
        return [s for s in self.steps.values() if s.key in wanted]

    def run(
        self,
        steps: list[Step],
        progress: bool = True,
        poll: float = 0.5,
        on_start: Callable[[Step], None] | None = None,
    ) -> dict[str, str]:
        """Run `steps`; returns {key: "done" | "ran"}. Time left is estimated from the steps' costs.

        Other processes may run the same steps at the same time (shards, study workers): each time
        this one takes the first step in order whose dependencies are done and that no other process
        holds, and it polls every `poll` s while all that is left waits on the others."""
        keys = {s.key for s in steps}
        for step in steps:
            lost = [d for d in step.deps if d not in keys and not self.is_done(d)]
            if lost:
                raise ValueError(f"step {step.key} depends on {lost}, which are neither given nor done")
        status: dict[str, str] = {}
        pending = list(steps)
        groups: dict[str, FileLock] = {}  # `shares` groups this process has taken, with their held locks
        bar = progress_bar(sum(s.cost for s in steps if not self.is_done(s.key)), progress)
        try:
            while pending:
                taken = self._take(pending, groups)
                if taken is None:
                    time.sleep(poll)
                    continue
                step, lock = taken
                pending.remove(step)
                bar.set_description(f"study: {step.key}")
                bar.set_postfix_str(
                    f"{len(status)} of {len(steps)} steps finished, {len(pending)} left after this"
                )
                try:
                    if self.is_done(step.key):
                        status[step.key] = "done"
                    else:
                        if on_start is not None:
                            on_start(step)
                        self._execute(step)
                        status[step.key] = "ran"
                        bar.update(step.cost)
                finally:
                    _unlock(lock)
                for name in [g for g in groups if not any(s.shares == g for s in pending)]:
                    _unlock(groups.pop(name))
            bar.set_postfix_str(f"{len(steps)} of {len(steps)} steps finished")
        finally:
            bar.close()
            for lock in groups.values():
                _unlock(lock)
        return status

    def _take(self, pending: list[Step], groups: dict[str, FileLock]) -> tuple[Step, FileLock] | None:
        """The first pending step that is ready and free, with its lock held; None if there is none."""
        for step in pending:
            if not all(self.is_done(d) for d in step.deps):
                continue
            if step.shares is not None and step.shares not in groups:
                group = _try_lock(self.root / f".shares-{step.shares}.lock")
                if group is None:
                    continue  # another process runs this group
                groups[step.shares] = group
            lock = _try_lock(self.directory(step.key).parent / f".{step.name}.lock")
            if lock is not None:
                return step, lock
        return None

    def _execute(self, step: Step) -> None:
        final = self.directory(step.key)
        tmp = final.parent / f".{step.name}.tmp"
        old = final.parent / f".{step.name}.old"
        for leftover in (tmp, old):  # a killed earlier attempt
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
        started = time.time()
        summary = step.run(tmp)
        record = {
            "hash": self.hashes[step.key],
            "step": step.key,
            "inputs": step.inputs,
            "deps": {d: self.hashes[d] for d in step.deps},
            "seconds": time.time() - started,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "summary": summary,
        }
        (tmp / DONE).write_text(json.dumps(record, indent=1, sort_keys=True, default=str))
        if final.exists():
            os.replace(final, old)  # the old result stays complete until the new one is
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        if self.logs is not None:
            keep_newest_run(self.logs / step.key)


def keep_newest_run(folder: Path) -> None:
    """Delete all but the newest version_<n> TensorBoard run in `folder`: the runs of results since
    replaced, and of killed attempts. Called when a step has finished, so the newest run is its own."""
    runs = sorted(
        (p for p in folder.glob("version_*") if p.name[8:].isdigit()), key=lambda p: int(p.name[8:])
    )
    for run in runs[:-1]:
        shutil.rmtree(run, ignore_errors=True)


def progress_bar(total_cost: float, show: bool) -> tqdm:
    """The study's progress bar over step costs (its time left is estimated from them)."""
    return tqdm(
        total=round(total_cost, 3),
        disable=not show,
        unit="cost",
        dynamic_ncols=True,
        bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}",
    )


def _try_lock(path: Path) -> FileLock | None:
    """An exclusive lock on path (created if missing), or None if another process (or another lock
    object of this one) holds it. filelock's, an flock: it goes with the process, so a killed one
    leaves nothing held."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return None
    return lock


def _unlock(lock: FileLock) -> None:
    lock.release()

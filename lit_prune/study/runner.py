"""Resumable execution of a study's steps: input hashes, atomic results, locks, shards, progress.

A step's results live in <study dir>/<condition>/<step>/ with a `done.json` that records the
hash of the step's inputs (its settings plus the hashes of the steps it reads). A step runs in
a temp directory beside that and is renamed into place only when complete, so a killed study
leaves either the old complete result or none. A rerun skips steps whose recorded hash equals
the current one and redoes the others (and, through the hashes, everything downstream).
Steps take an exclusive file lock, so shards that share a step (the dense model) never both run it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

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

    @property
    def key(self) -> str:
        return f"{self.condition}/{self.name}"


def parse_shard(text: str | None) -> tuple[int, int]:
    """"i/n" -> (i, n) with 0 <= i < n; None -> (0, 1)."""
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

    def __init__(self, root: Path, steps: list[Step]) -> None:
        self.root = Path(root)
        self.steps = {s.key: s for s in steps}
        self.hashes: dict[str, str] = {}
        for step in steps:  # steps are given in dependency order
            missing = [d for d in step.deps if d not in self.hashes]
            if missing:
                raise ValueError(f"step {step.key} depends on {missing}, which come later or do not exist")
            payload = json.dumps({"inputs": step.inputs, "deps": {d: self.hashes[d] for d in step.deps}},
                                 sort_keys=True, default=str)
            self.hashes[step.key] = hashlib.sha256(payload.encode()).hexdigest()[:20]

    def directory(self, key: str) -> Path:
        return self.root / key

    def record(self, key: str) -> dict[str, Any] | None:
        path = self.directory(key) / DONE
        return json.loads(path.read_text()) if path.is_file() else None

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

    def run(self, steps: list[Step], progress: bool = True) -> dict[str, str]:
        """Run `steps`; returns {key: "done" | "ran"}. Time left is estimated from the steps' costs."""
        status: dict[str, str] = {}
        todo = sum(s.cost for s in steps if not self.is_done(s.key))
        bar = tqdm(total=round(todo, 3), disable=not progress, unit="cost", dynamic_ncols=True,
                   bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}")
        try:
            for n, step in enumerate(steps):
                bar.set_description(f"study: {step.key}")
                bar.set_postfix_str(f"{n} of {len(steps)} steps finished, {len(steps) - n - 1} left after this")
                with self._lock(step.key):
                    if self.is_done(step.key):
                        status[step.key] = "done"
                        continue
                    self._execute(step)
                    status[step.key] = "ran"
                bar.update(step.cost)
            bar.set_postfix_str(f"{len(steps)} of {len(steps)} steps finished")
        finally:
            bar.close()
        return status

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        path = self.directory(key).parent / f".{self.steps[key].name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _execute(self, step: Step) -> None:
        final = self.directory(step.key)
        tmp = final.parent / f".{step.name}.tmp"
        old = final.parent / f".{step.name}.old"
        for leftover in (tmp, old):  # a killed earlier attempt
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
        started = time.time()
        summary = step.run(tmp)
        record = {"hash": self.hashes[step.key], "step": step.key, "inputs": step.inputs,
                  "deps": {d: self.hashes[d] for d in step.deps}, "seconds": time.time() - started,
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "summary": summary}
        (tmp / DONE).write_text(json.dumps(record, indent=1, sort_keys=True, default=str))
        if final.exists():
            os.replace(final, old)  # the old result stays complete until the new one is
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

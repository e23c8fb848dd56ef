"""Reading a study directory for the report: finished steps only, latest measurement of each fit.

A step counts iff `<root>/<condition>/<step>/done.json` exists and its hash equals study.json's
`steps[key]`; a done.json with another hash is *stale* (an older grid's result) and is ignored.
Files of analysis callbacks accumulate rows per measurement (epoch, stage); the report uses the
latest one of each file: the fit-end measurement if there is one, else the last validation epoch.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from lit_prune.analysis.results import read_arrays, read_rows
from lit_prune.errors import invalid

STUDY_FILE = "study.json"
RUNS_FILE = "runs.jsonl"
DONE = "done.json"
DENSE = "dense"
RECOVERED = "recovered"
_NAME = re.compile(
    r"^(?P<method>[a-z_]+)-(?:(?P<n>\d+)of(?P<m>\d+)|(?P<s>[0-9.eE+-]+?))(?P<rec>-" + RECOVERED + ")?$"
)
STUDY_HELP = "a study directory with study.json (written by python -m lit_prune study)"


@dataclass(frozen=True)
class Cond:
    """One model of the grid, parsed from its directory name."""

    name: str
    """Directory name: dense, wanda-0.5, magnitude-2of4."""
    label: str
    """Method label as in the result rows: dense, wanda, wanda-2:4, wanda-recovered."""
    sparsity: float
    recovered: bool = False
    """RQ6: the pruned model after its recovery fine-tune (wanda-0.5-recovered)."""

    @property
    def dense(self) -> bool:
        return self.name == DENSE

    @property
    def nm(self) -> bool:
        return ":" in self.label

    @property
    def title(self) -> str:
        return "dense" if self.dense else f"{self.label} s={self.sparsity:g}"

    @property
    def source(self) -> Cond:
        """The unrecovered pruned condition (itself when not recovered)."""
        if not self.recovered:
            return self
        suffix = f"-{RECOVERED}"
        return Cond(self.name.removesuffix(suffix), self.label.removesuffix(suffix), self.sparsity)


def parse_condition(name: str) -> Cond:
    if name == DENSE:
        return Cond(name, DENSE, 0.0)
    match = _NAME.match(name)
    if not match:
        raise invalid(
            "condition", name, "dense, <method>-<sparsity> or <method>-<N>of<M>, optionally with -recovered"
        )
    rec = f"-{RECOVERED}" if match["rec"] else ""
    if match["n"]:
        n, m = int(match["n"]), int(match["m"])
        return Cond(name, f"{match['method']}-{n}:{m}{rec}", n / m, bool(rec))
    return Cond(name, match["method"] + rec, float(match["s"]), bool(rec))


def latest(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of the latest measurement (fit_end, else the highest epoch), plus stage "dense" rows."""

    def rank(row: dict[str, Any]) -> tuple[int, int]:
        epoch = row.get("epoch")
        return (1 if row.get("stage") == "fit_end" else 0, -1 if epoch is None else int(epoch))

    measured = [r for r in rows if r.get("stage") != "dense"]
    if not measured:
        return rows
    best = max(rank(r) for r in measured)
    return [r for r in rows if r.get("stage") == "dense" or rank(r) == best]


def value(rows: list[dict[str, Any]], metric: str, **where: Any) -> float | None:
    """The value of the first row with this metric whose extra keys match `where` (floats: isclose)."""
    for row in rows:
        if row.get("metric") == metric and all(_same(row.get(k), v) for k, v in where.items()):
            return _num(row.get("value"))
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), abs_tol=1e-9)
    return a == b


def _num(v: Any) -> float | None:
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


@dataclass
class Fit:
    """One SAE fit on one condition: its seed and the latest rows of each of its results files."""

    seed: int
    same_seed: bool | None
    """rq2 rows' same_seed (None if the fit has no rq2 rows, e.g. on the dense model)."""
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """results file name -> latest rows."""
    directory: Path | None = None


@dataclass
class StudyData:
    """A (possibly partial) study: settings, which steps are finished, stale or missing."""

    root: Path
    study: dict[str, Any]
    runs: list[dict[str, Any]]
    finished: dict[str, dict[str, Any]]
    """step key -> done.json record, for current finished steps only."""
    stale: list[str]
    missing: list[str]
    extra: list[str]
    """Finished steps that are not in study.json's grid (ignored)."""
    _fits: dict[str, list[Fit]] = field(default_factory=dict, repr=False)

    @property
    def settings(self) -> dict[str, Any]:
        return self.study.get("settings", {})

    @property
    def seeds(self) -> list[int]:
        return [int(s) for s in self.settings.get("seeds", [])]

    @property
    def reference_seed(self) -> int | None:
        return self.seeds[0] if self.seeds else None

    @cached_property
    def _all_conditions(self) -> list[Cond]:
        names: list[str] = []
        for key in self.study.get("steps", {}):
            cond = key.split("/")[0]
            if cond not in names:
                names.append(cond)
        conds = [parse_condition(n) for n in names]
        return sorted(conds, key=lambda c: (not c.dense, c.nm, c.label, c.sparsity))

    @property
    def conditions(self) -> list[Cond]:
        """Every condition of the grid, dense first, then sorted by method and sparsity; the recovered
        models (RQ6) are apart, in `recovered`."""
        return [c for c in self._all_conditions if not c.recovered]

    @property
    def recovered(self) -> list[Cond]:
        """RQ6: the recovered models (study.recovery), each with its unrecovered `source`."""
        return [c for c in self._all_conditions if c.recovered]

    @property
    def pruned(self) -> list[Cond]:
        return [c for c in self.conditions if not c.dense]

    def done(self, key: str) -> bool:
        return key in self.finished

    def rows(self, key: str, filename: str, all_measurements: bool = False) -> list[dict[str, Any]]:
        """Rows of results/<filename> of a finished step ([] if unfinished or absent)."""
        path = self.root / key / "results" / filename
        if not self.done(key) or not path.is_file():
            return []
        rows = _parsed(path, read_rows)
        return rows if all_measurements else latest(rows)

    def arrays(self, key: str, filename: str) -> dict[str, torch.Tensor] | None:
        path = self.root / key / "results" / filename
        if not self.done(key) or not path.is_file():
            return None
        return read_arrays(path)

    def json(self, key: str, filename: str) -> dict[str, Any] | None:
        path = self.root / key / filename
        if not self.done(key) or not path.is_file():
            return None
        return _parsed(path, lambda p: json.loads(p.read_text(encoding="utf-8")))

    def fits(self, cond: Cond) -> list[Fit]:
        """The finished SAE fits of a condition, in seed order."""
        if cond.name in self._fits:
            return self._fits[cond.name]
        out = []
        for seed in self.seeds:
            key = f"{cond.name}/seed{seed}"
            if not self.done(key):
                continue
            files = {
                name: self.rows(key, name)
                for name in ("sae_metrics.json", "rq2_survival.json", "rq3_transfer.json")
            }
            same = {r.get("same_seed") for r in files["rq2_survival.json"]} - {None}
            out.append(Fit(seed, bool(same.pop()) if len(same) == 1 else None, files, self.root / key))
        self._fits[cond.name] = out
        return out

    def cross_fits(self, cond: Cond) -> list[Fit]:
        """Fits whose SAE seed differs from the reference's (RQ2's primary, cross-seed measure)."""
        return [f for f in self.fits(cond) if f.same_seed is False]

    @property
    def step_seconds(self) -> float:
        return float(sum(float(r.get("seconds") or 0.0) for r in self.finished.values()))


def load_study(root: str | Path) -> StudyData:
    """Read study.json, runs.jsonl and every done.json under root; LitPruneError for bad input."""
    root = Path(root)
    if not root.is_dir():
        raise invalid("study_dir", str(root), STUDY_HELP)
    path = root / STUDY_FILE
    if not path.is_file():
        raise invalid("study_dir", str(root), STUDY_HELP + "; this directory has no study.json")
    try:
        study = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise invalid(
            "study_dir", str(root), f"{STUDY_HELP}; its study.json does not parse ({err.msg})"
        ) from None
    if not isinstance(study, dict) or not isinstance(study.get("steps"), dict):
        raise invalid("study_dir", str(root), f"{STUDY_HELP}; its study.json has no steps")
    finished, stale, missing = {}, [], []
    for key, expected in study["steps"].items():
        record = _done_record(root / key / DONE)
        if record is None:
            missing.append(key)
        elif record.get("hash") != expected:
            stale.append(key)
        else:
            finished[key] = record
    found = (f"{p.parent.parent.name}/{p.parent.name}" for p in root.glob(f"*/*/{DONE}"))
    extra = sorted(
        k for k in found if k not in study["steps"] and not any(part.startswith(".") for part in k.split("/"))
    )
    data = StudyData(root, study, _runs(root / RUNS_FILE), finished, stale, missing, extra)
    if not finished:
        raise invalid(
            "study_dir",
            str(root),
            f"{STUDY_HELP} and at least one finished step (none of its "
            f"{len(study['steps'])} steps has a current done.json yet)",
        )
    return data


def _parsed(path: Path, read: Any) -> Any:
    """read(path), or a one-line error naming a damaged file of a finished step."""
    try:
        return read(path)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise invalid(
            "results file",
            str(path),
            "valid JSON: delete its step directory and rerun the study to redo that step",
        ) from None


def _done_record(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _runs(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a killed process
    return out

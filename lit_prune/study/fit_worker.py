"""Launching one fit step of a study as an ordinary Lightning DDP run in a child process.

A study whose trainer settings ask for several devices (`fit_processes` > 1) runs each fit
step through `fit_in_worker`: the study process writes the step's spec (its StudyContext, seed and
prune condition) into the step's temp directory, runs this module on it as a child process and
waits (`python -m lit_prune.study.fit_child SPEC.json`). Lightning's DDP launcher re-runs this same
command line for the other ranks (harmless here;
a re-run study would re-enter its runner and wait on the step's lock). Every rank runs
`steps.run_fit`; global rank 0 writes the step's results, `fit_result.json` (the summary the
in-process fit returns) and waits for the other ranks before it exits.

Each process has its own activation cache (`sharing_activations`, study.cache_gb each) for the
duration of its fit; it shares nothing with the study process's cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lit_prune.errors import invalid

SPEC = "fit_spec.json"
RESULT = "fit_result.json"
_DEVICES_ALLOWED = 'a device count, "auto", or a list of device ids like [0, 2]'


def device_ids(trainer: dict[str, Any]) -> list[int] | None:
    """The device ids the trainer names (Lightning's devices: [2] or "0,2" or "2,"), or None when it
    gives a count or "auto"."""
    devices = trainer.get("devices", 1)
    if isinstance(devices, str) and "," in devices:
        devices = [d for d in devices.split(",") if d.strip()]
    if not isinstance(devices, (list, tuple)):
        return None
    if not all(str(d).strip().isdigit() for d in devices):
        raise invalid("trainer.devices", devices, _DEVICES_ALLOWED)
    return [int(d) for d in devices]


def fit_processes(trainer: dict[str, Any]) -> int:
    """How many processes a fit step uses under these study trainer settings: devices x num_nodes.

    devices absent counts as 1 (as before DDP fits, the study never takes every device unasked);
    "auto" / -1 count the visible CUDA devices when the accelerator may be a GPU, else 1 (Lightning's
    CPU "auto" is one process; more CPU processes need an explicit devices: n)."""
    import torch

    ids = device_ids(trainer)
    devices = trainer.get("devices", 1)
    if ids is not None:
        count = len(ids)
    elif str(devices).strip() in ("auto", "-1"):
        gpu = trainer.get("accelerator", "auto") in ("auto", "gpu", "cuda")
        count = torch.cuda.device_count() if gpu and torch.cuda.is_available() else 1
    elif str(devices).strip().isdigit():
        count = int(devices)
    else:
        raise invalid("trainer.devices", devices, _DEVICES_ALLOWED)
    return max(count, 1) * max(int(trainer.get("num_nodes", 1) or 1), 1)


def fit_in_worker(ctx: Any, out: Path, seed: int, cond: Any) -> dict[str, Any]:
    """Run the fit step (seed, cond: a PruneCondition or None for dense) in a DDP child process;
    returns what rank 0 wrote to fit_result.json. A failed child: a one-line LitPruneError."""
    import torch

    from lit_prune.errors import LitPruneError
    from lit_prune.study.config import DDP_KEYS, DENSE, TRAINER_KEYS

    out = Path(out).resolve()
    step = f"{cond.name if cond is not None else DENSE}/seed{seed}"
    strategy = ctx.trainer.get("strategy")
    if strategy is not None and not isinstance(strategy, str):
        raise LitPruneError(
            f"trainer.strategy={strategy!r} is invalid: expected a strategy name (e.g. ddp) for "
            "a study's multi-device fits"
        )
    spec = {
        "name": ctx.name,
        "settings": asdict(ctx.settings),
        "model": ctx.model,
        "data": ctx.data,
        "trainer": {k: v for k, v in ctx.trainer.items() if k in TRAINER_KEYS + DDP_KEYS},
        "seed_everything": ctx.seed_everything,
        "seed": seed,
        "condition": None if cond is None else asdict(cond),
        "out": str(out),
    }
    spec_path = out / SPEC
    spec_path.write_text(json.dumps(spec, indent=1))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # the ranks need the memory this process's earlier steps cached
    command = [sys.executable, "-m", "lit_prune.study.fit_child", str(spec_path)]
    code = subprocess.run(command, env=child_env()).returncode
    result_path = out / RESULT
    if code != 0 or not result_path.is_file():
        why = f"exited with status {code}" if code != 0 else f"wrote no {RESULT}"
        raise LitPruneError(
            f"study step {step}: the DDP fit ({' '.join(command[1:])}) {why}; see its output above"
        )
    result = json.loads(result_path.read_text())
    spec_path.unlink()
    result_path.unlink()
    return result


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment plus `extra`, with this package first on PYTHONPATH (a source
    checkout run without installing still imports the same code in the child)."""
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, **extra, "PYTHONPATH": path}


def die_with_parent() -> None:
    """Linux: get SIGKILL when the parent (the study, or rank 0 for the other ranks) dies, so a
    killed study leaves no rank writing into its temp directory or waiting in a collective."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() == 1:  # the parent died before prctl
        os._exit(1)

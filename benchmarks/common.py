"""Helpers shared by the benchmark scripts: repository path, common flags, timing, the printed
`name: ours X, baseline Y, ratio Z` line and the atomic JSON write to benchmarks/results/.

Imported as `common` by scripts run as `python benchmarks/<script>.py` (their folder is on
sys.path); importing it also puts the repository root on sys.path so `lit_prune` resolves.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # benchmarks never reach a hub

import torch  # noqa: E402


def add_common_args(p: argparse.ArgumentParser, script: str) -> None:
    """--threads, --output (default benchmarks/results/<script>.json), --model_cache_dir, --cache_dir."""
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--output", type=Path, default=RESULTS / f"{script}.json", help="JSON result path")
    p.add_argument("--model_cache_dir", default="checkpoints/models", help="converted-model cache")
    p.add_argument("--cache_dir", default="checkpoints", help="corpus and token caches")


def add_device_arg(p: argparse.ArgumentParser) -> None:
    """--device: where the LM and tensors run (default cuda when torch sees a GPU, else cpu)."""
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device for the LM and tensors (default: cuda if available, else cpu)",
    )


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work, so that a wall time covers it (nothing to wait for on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: str | torch.device) -> float:
    """time.perf_counter() once the device's queued work is done."""
    synchronize(device)
    return time.perf_counter()


def apply_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def environment() -> dict:
    """What the numbers depend on: versions, torch threads, CPU count and load, and any GPU."""
    from lit_prune.sae.io import versions

    gpu = (
        {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda} if torch.cuda.is_available() else {}
    )
    return {
        "versions": versions(),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_end": list(os.getloadavg()),
        **gpu,
    }


def timed(fn: Callable[[], object], repeats: int = 3, warmup: int = 0, device: str = "cpu") -> list[float]:
    """Wall seconds of `repeats` calls of fn() after `warmup` untimed calls (each waiting for `device`)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = clock(device)
        fn()
        out.append(clock(device) - start)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def compare(
    name: str,
    ours: float,
    baseline: float,
    unit: str = "s",
    higher_is_better: bool = False,
    fmt: str = ".3f",
    **extra: object,
) -> dict:
    """Print `name: ours X unit, baseline Y unit, ratio Z` and return it as a row.

    ratio > 1 means ours is better: baseline / ours for times, ours / baseline for rates.
    """
    ratio = ours / baseline if higher_is_better else baseline / ours
    print(
        f"{name}: ours {ours:{fmt}} {unit}, baseline {baseline:{fmt}} {unit}, ratio {ratio:.2f}", flush=True
    )
    return {"name": name, "ours": ours, "baseline": baseline, "unit": unit, "ratio": ratio, **extra}


def write_json(path: Path, result: dict) -> None:
    """Atomic write (temp file + rename): a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".json.tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(path)
    print(f"wrote {path}")


def write_result(path: Path, result: dict, started: float) -> None:
    """`result` plus seconds_total (since the perf_counter value `started`) and `environment()`,
    written with `write_json`."""
    write_json(path, {**result, "seconds_total": time.perf_counter() - started, "environment": environment()})


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far, GiB (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def token_splits(model: str, corpus: str = "python-docs", seed: int = 0, **settings: object):
    """A set-up `TokenDataModule` (same splits as the CLI); `seed` is its shuffle seed, whatever
    the DataModule's current name for it. settings: other TokenDataModule arguments."""
    import inspect

    from lit_prune.lit.datamodule import TokenDataModule

    params = inspect.signature(TokenDataModule.__init__).parameters
    seed_name = next((n for n in ("shuffle_seed", "seed") if n in params), None)
    if seed_name is not None:
        settings[seed_name] = seed
    dm = TokenDataModule(model_name=model, corpus=corpus, **settings)
    dm.prepare_data()
    dm.setup()
    return dm

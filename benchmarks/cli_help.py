"""How long `python -m lit_prune ... --help` takes: the top-level help, and each Lightning command's
help built (an empty help cache) and then read from the cache.

    .venv/bin/python benchmarks/cli_help.py [--repeats 3]

Prints one line per case (median wall seconds) and the ratio built / cached. Not a test: wall time
depends on the machine and its load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _seconds(args: list[str], cache: str) -> float:
    env = {**os.environ, "XDG_CACHE_HOME": cache, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lit_prune", *args], env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats
    top = statistics.median(_seconds(["--help"], "/nonexistent") for _ in range(repeats))
    print(f"top-level --help: {top:.2f} s")
    for command in ("fit", "validate"):
        built, cached = [], []
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as cache:
                built.append(_seconds([command, "--help"], cache))
                cached.append(_seconds([command, "--help"], cache))
        b, c = statistics.median(built), statistics.median(cached)
        print(f"{command} --help: built {b:.2f} s, cached {c:.2f} s, ratio {b / c:.0f}x")


if __name__ == "__main__":
    main()

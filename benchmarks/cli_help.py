"""How long `python -m lit_prune [<command>] --help` takes on a fresh clone: every command's help,
each run in a new process with an empty cache folder (XDG_CACHE_HOME).

    .venv/bin/python benchmarks/cli_help.py [--repeats 3]

Prints one line per command (median wall seconds of the repeats, and the runs). Not a test: wall time
depends on the machine and its load; tests/test_cli_help.py checks what the help imports instead.
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
COMMANDS = ("", "fit", "validate", "study", "prune", "report", "export")


def _seconds(args: list[str]) -> float:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "XDG_CACHE_HOME": cache, "PYTHONPATH": str(ROOT)}
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lit_prune", *args], env=env, check=True, capture_output=True)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    repeats = parser.parse_args().repeats
    for command in COMMANDS:
        args = [command, "--help"] if command else ["--help"]
        runs = [_seconds(args) for _ in range(repeats)]
        shown = ", ".join(f"{s:.2f}" for s in runs)
        print(f"{' '.join(args):<16} median {statistics.median(runs):.2f} s  ({shown})", flush=True)


if __name__ == "__main__":
    main()

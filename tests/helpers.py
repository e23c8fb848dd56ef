"""Builders and runners shared by the tests: the repository root and the two ways of running the CLI."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path, timeout: int = 600):
    """`python -m lit_prune ARGS` in a fresh process; returns the CompletedProcess."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "lit_prune", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_in_process(*args: str, cwd: Path) -> tuple[int, str]:
    """`python -m lit_prune ARGS` run by this process, for tests of its errors without a new
    process's start-up: (exit status, what it wrote to stderr). An error that escapes `main` (the
    shell would print its traceback) fails the test."""
    import contextlib
    import io
    import sys

    from lit_prune.cli import main

    stderr, old, argv = io.StringIO(), Path.cwd(), sys.argv
    os.chdir(cwd)
    sys.argv = ["lit_prune"]  # not pytest's: LightningCLI warns when it sees both
    try:
        with contextlib.redirect_stderr(stderr):
            try:
                code = main(list(args))
            except SystemExit as exit_:  # jsonargparse's parser errors
                code = exit_.code
    finally:
        os.chdir(old)
        sys.argv = argv
    return code, stderr.getvalue()


def tiny_fit_args(tmp_path: Path, corpus: Path, model_cache: Path, *extra: str) -> list[str]:
    """`fit` of configs/tiny.yaml on a local corpus, its caches under tmp_path, plus `extra` options."""
    return [
        "fit",
        "--config",
        str(ROOT / "configs" / "tiny.yaml"),
        f"--model.model_cache_dir={model_cache}",
        f"--data.corpus={corpus}",
        f"--data.cache_dir={tmp_path / 'cache'}",
        *extra,
    ]


def tiny_prune_options(output: Path, corpus: Path, model_cache: Path, data_cache: Path, **options):
    """PruneOptions of a quick `prune` of the tiny Llama on a local corpus (4 calibration and 4 eval
    sequences of 32 tokens, no progress bar) into `output`; `options` override or add fields."""
    from lit_prune.commands.prune import PruneOptions

    base = dict(
        output=str(output),
        model="tiny-llama",
        corpus=str(corpus),
        calibration_sequences=4,
        calibration_seq_len=32,
        eval_sequences=4,
        progress=False,
        model_cache_dir=str(model_cache),
        cache_dir=str(data_cache),
    )
    return PruneOptions(**{**base, **options})

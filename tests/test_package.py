"""The package's face: its version, its lazy public API and its console script."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

import lit_prune


def test_version_is_single_sourced():
    assert lit_prune.__version__ == metadata.version("lit_prune")


def test_console_script_is_the_cli_main():
    (script,) = [ep for ep in metadata.entry_points(group="console_scripts") if ep.name == "lit-prune"]
    from lit_prune.cli import main

    assert script.load() is main  # the same function `python -m lit_prune` calls, exit codes included


@pytest.mark.parametrize(
    "name, module",
    [
        ("prune_model", "lit_prune.pruning"),
        ("load_sae", "lit_prune.sae.io"),
        ("export_sae", "lit_prune.sae.io"),
        ("match_features", "lit_prune.analysis.matching"),
        ("seed_stability", "lit_prune.analysis.survival"),
        ("write_report", "lit_prune.study.report.build"),
    ],
)
def test_public_api_is_the_defining_function(name, module):
    assert name in lit_prune.__all__ and name in dir(lit_prune)
    assert getattr(lit_prune, name) is getattr(sys.modules[module], name)


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        lit_prune.no_such_name  # noqa: B018


def test_import_is_lazy():
    """`import lit_prune` loads neither torch nor Lightning (the API imports them on first use)."""
    code = "import sys, lit_prune; print(sorted({'torch', 'lightning'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

"""`--help`: no command's help imports torch, Lightning, transformers or sae-lens (a help answers at
once, on a fresh clone too), and the help of fit, validate and study, read from lit_prune/help.json,
is the text their parsers build."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT

from lit_prune.cli_manners import HELP_FILE, help_versions, render_help

HEAVY = ("torch", "lightning", "transformers", "sae_lens")
COMMANDS = ("", "fit", "validate", "study", "prune", "report", "export")

_RUN_HELP = """
import contextlib, io, json, sys
from lit_prune.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    try:
        status = main(sys.argv[1:])
    except SystemExit as exit_:  # jsonargparse's help action exits
        status = exit_.code
print(json.dumps({"status": status, "help": out.getvalue(), "heavy": sorted(set(HEAVY) & set(sys.modules))}))
"""


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c or "top-level")
def test_help_imports_no_torch_lightning_transformers_or_sae_lens(command):
    argv = [command, "--help"] if command else ["--help"]
    code = f"HEAVY = {HEAVY!r}\n{_RUN_HELP}"
    result = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, check=True
    )
    out = json.loads(result.stdout)
    assert out["status"] in (0, None) and out["help"].startswith("usage: python -m lit_prune")
    assert out["heavy"] == []


def test_stored_help_is_current_for_these_versions():
    """help.json was written under the installed versions (else --help builds the parsers: ~10 s)."""
    assert json.loads(HELP_FILE.read_text())["versions"] == help_versions()


def test_every_stored_option_is_explained():
    for command, spec in json.loads(HELP_FILE.read_text())["commands"].items():
        for action in spec["actions"]:
            assert action["help"] and action["help"].strip(), (command, action["options"])


@pytest.mark.parametrize("width", ["50", "80", "140"])
def test_stored_parts_render_as_the_parser_does(monkeypatch, width):
    """The renderer on a parser with positionals, nargs, required options and a config file (export's):
    argparse lays out the stored parts exactly as jsonargparse lays out the parser."""
    from lit_prune.commands.export import build_parser
    from lit_prune.help_snapshot import parser_spec

    monkeypatch.setenv("COLUMNS", width)
    parser = build_parser()
    spec = json.loads(json.dumps(parser_spec(parser)))  # as read back from help.json
    assert render_help(spec) == parser.format_help()


def test_stored_help_equals_the_parsers_help():
    """Each command's parser, built in a fresh process, against help.json (laid out at several widths)."""
    result = subprocess.run(
        [sys.executable, "-m", "lit_prune.help_snapshot", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]

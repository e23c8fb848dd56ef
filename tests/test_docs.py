"""The docs hold: every command they show parses, every relative link resolves, nothing points outside
the repository, and the README stays a short guide with the two commands at the top."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, cli_in_process

DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
DOCS = [p for p in DOCS if p.exists()]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FAILING_ON_PURPOSE = {"bad_inputs.md"}  # its commands show errors: they must not parse
LIGHTNING = ("fit", "validate", "study")  # parsers with --print_config
# what the repository's files must not name: places outside it and run-specific scratch
OUTSIDE = re.compile(r"\.\./shared|(?<![\w.])/(?:tmp|work)/|\bMETHODS\.md")
SCRATCH = re.compile(r"\bfresh[A-Z0-9]\b|\bciR\b|\b20\d\d-\d\d-\d\d\b")
SKIP_DIRS = {".git", ".venv", "checkpoints", "logs", "results", "__pycache__", ".gpu_bundle", ".pytest_cache"}
TEXT = {".py", ".md", ".yaml", ".yml", ".toml", ".sh", ".txt", ".cfg", ".ini"}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _shell_commands(text: str) -> list[str]:
    """The command lines of the bash / sh / console blocks, continuation lines joined."""
    out: list[str] = []
    for lang, body in FENCE.findall(text):
        if lang not in ("bash", "sh", "shell", "console"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(line)
    return out


def _inline_commands(text: str) -> list[str]:
    """Inline code that is a whole command of ours (placeholders such as <dir> or … left out)."""
    found = [m.strip() for m in INLINE.findall(text)]
    return [
        c
        for c in found
        if re.match(r"(python -m lit_prune|python benchmarks/)", c) and not re.search(r"[<…]|\.\.\.", c)
    ]


def _commands() -> list[tuple[str, str]]:
    pairs = []
    for path in (p for p in DOCS if p.name not in FAILING_ON_PURPOSE):
        text = path.read_text(encoding="utf-8")
        for line in _shell_commands(text) + _inline_commands(text):
            pairs.append((_rel(path), line))
    return list(dict.fromkeys(pairs))


def _argv(line: str) -> list[str]:
    """The words of a command line: comments dropped, shell variables given a value."""
    line = re.sub(r"\$\{?\w+\}?", "0", line)
    return shlex.split(line, comments=True)


def _ours(words: list[str]) -> list[str] | None:
    """The arguments after `python -m lit_prune` / `lit-prune`, else None."""
    if words[:3] == ["python", "-m", "lit_prune"]:
        return words[3:]
    if words[:1] == ["lit-prune"]:
        return words[1:]
    return None


COMMANDS = _commands()
CLI = [(doc, line) for doc, line in COMMANDS if _ours(_argv(line)) is not None]
MODULES = [(doc, line) for doc, line in COMMANDS if re.match(r"python -m lit_prune\.", line)]
SCRIPTS = [(doc, line) for doc, line in COMMANDS if re.match(r"python benchmarks/|bash benchmarks/", line)]


def _parse_own(module: str, argv: list[str]) -> None:
    """Parse argv with a command module's `build_parser()`, as its main() does, without running it."""
    parser = importlib.import_module(module).build_parser()
    with contextlib.redirect_stdout(io.StringIO()):
        parser.parse_args(argv)


def test_the_docs_show_commands():
    assert len(CLI) >= 10 and SCRIPTS, "the command extraction found too little: check FENCE / INLINE"


@pytest.mark.parametrize("doc, line", CLI, ids=[f"{d}: {c[:70]}" for d, c in CLI])
def test_every_lit_prune_command_in_the_docs_parses(doc, line, monkeypatch):
    monkeypatch.chdir(ROOT)  # configs/... paths are relative to the repository root
    from lit_prune.cli import EXTRA_COMMANDS

    argv = _ours(_argv(line)) or ["--help"]  # the bare command: its help
    command = argv[0]
    if len(argv) == 1 and not command.startswith("-"):  # a command named in prose: its help
        code, out = cli_in_process(command, "--help", cwd=ROOT)
        assert code == 0, f"{doc}: {line}\n{out[-2000:]}"
    elif command in LIGHTNING:
        code, out = cli_in_process(*argv, "--print_config", cwd=ROOT)
        assert code == 0, f"{doc}: {line}\n{out[-2000:]}"
    elif command in EXTRA_COMMANDS:
        _parse_own(EXTRA_COMMANDS[command].split(":")[0], argv[1:])
    else:
        code, out = cli_in_process(*argv, cwd=ROOT)
        assert code == 0, f"{doc}: {line}\n{out[-2000:]}"


@pytest.mark.parametrize("doc, line", MODULES, ids=[f"{d}: {c[:70]}" for d, c in MODULES])
def test_every_lit_prune_module_in_the_docs_exists_and_parses(doc, line):
    words = _argv(line)
    module = words[2]
    assert importlib.util.find_spec(module) is not None, f"{doc}: {line}: no module {module}"
    if hasattr(importlib.import_module(module), "build_parser") and len(words) > 3:
        _parse_own(module, words[3:])


@pytest.mark.e2e
@pytest.mark.parametrize("doc, line", SCRIPTS, ids=[f"{d}: {c[:70]}" for d, c in SCRIPTS])
def test_every_benchmark_command_in_the_docs_exists_with_its_options(doc, line):
    words = _argv(line)
    script = ROOT / words[1]
    assert script.is_file(), f"{doc}: {line}: no {words[1]}"
    if words[0] == "bash":
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{doc}: {line}\n{result.stderr[-2000:]}"
    for option in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
        assert option in result.stdout, f"{doc}: {line}: {option} is not an option of {words[1]}"


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces -> '-'."""
    headings = re.findall(r"^#+\s+(.*)$", path.read_text(encoding="utf-8"), re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS, ids=_rel)
def test_every_relative_link_resolves_inside_the_repository(doc):
    text = FENCE.sub("", doc.read_text(encoding="utf-8"))
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (doc.parent / path).resolve() if path else doc
        assert not path.startswith("/"), f"{_rel(doc)}: absolute link {target}"
        assert resolved.is_relative_to(ROOT), f"{_rel(doc)}: {target} points outside the repository"
        figure = " (a report figure: copy it from checkpoints/<study>/report/figures/)" * ("img" in path)
        assert resolved.exists(), f"{_rel(doc)}: {target} does not exist{figure}"
        if anchor and resolved.suffix == ".md":
            assert anchor in _anchors(resolved), f"{_rel(doc)}: no heading #{anchor} in {_rel(resolved)}"


def _repository_text_files() -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in filenames:
            path = Path(dirpath) / name
            if (path.suffix in TEXT or name in ("Makefile", "run")) and path != Path(__file__):
                out.append(path)
    return out


def test_no_file_points_outside_the_repository():
    found = []
    for path in _repository_text_files():
        for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{_rel(path)}:{n}: {line.strip()[:100]}")
    assert not found, "cite docs/methods.md and paths inside the repository:\n" + "\n".join(found)


@pytest.mark.parametrize("doc", [p for p in DOCS if p.name != "CHANGELOG.md"], ids=_rel)
def test_docs_name_no_scratch_run_or_run_date(doc):
    found = [line for line in doc.read_text(encoding="utf-8").splitlines() if SCRATCH.search(line)]
    assert not found, f"{_rel(doc)} names one-off runs or dates of runs: {found[:3]}"


def test_readme_is_a_short_guide_with_the_two_commands_first():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300
    first_block = FENCE.search("\n".join(lines))
    assert first_block is not None and first_block.start() < 200, "the README opens with the commands"
    commands = [c.split("#")[0].strip() for c in first_block.group(2).splitlines()]
    assert commands[:2] == ["make run", "make test"]
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^run:", makefile, re.MULTILINE) and re.search(r"^test:", makefile, re.MULTILINE)

"""What the command line says when it is asked for help or given a misspelt option.

Kept apart from `lit_prune.cli` so that `python -m lit_prune --help` imports neither torch nor
Lightning: the top-level help is written here, and a command's help (which jsonargparse builds from
the classes' signatures, seconds of imports) is cached per version of the code that makes it.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import sys
from argparse import ArgumentError
from pathlib import Path

COMMAND_SUMMARIES = {
    "fit": "train an SAE on a (pruned) LM's activations (LightningCLI; --config configs/<model>.yaml)",
    "validate": "evaluate a trained SAE (LightningCLI; --ckpt_path)",
    "prune": "write a pruned model (magnitude, wanda or sparsegpt) and its masks",
    "study": "the whole grid of fits and analyses, resumable, with a report",
    "report": "write a study's report from its finished steps",
    "export": "SAEs as a release for sae-lens' pretrained registry and Neuronpedia",
}


def top_level_help(description: str) -> str:
    """`python -m lit_prune --help`: every command with one line, without building any parser."""
    width = max(map(len, COMMAND_SUMMARIES))
    lines = [f"  {name:<{width}}  {text}" for name, text in COMMAND_SUMMARIES.items()]
    return (
        "usage: python -m lit_prune <command> [options]\n\n"
        + description
        + "\n\ncommands:\n"
        + "\n".join(lines)
        + "\n\n`python -m lit_prune <command> --help` lists a command's options.\n"
    )


_UNRECOGNIZED = re.compile(r"unrecognized arguments: (.*)")


def with_suggestion(err: ArgumentError, parser, argv: list[str]) -> ArgumentError:
    """`unrecognized arguments: --model.learning_rate 1` -> one line naming the closest valid option
    of the command (argv[0]) it was given to."""
    found = _UNRECOGNIZED.search(str(err))
    if found is None:
        return err
    subcommand = argv[0] if argv and not argv[0].startswith("-") else None
    unknown = [a.split("=")[0] for a in found.group(1).split() if a.startswith("--")]
    if not unknown:
        return err
    options = option_names(parser, subcommand)
    bad = unknown[0]
    best = closest(bad, options)
    hint = f": did you mean {best}?" if best else f" (`{subcommand or ''} --help` lists them)"
    return ArgumentError(None, f"unknown option {bad}{hint}")


def option_names(parser, subcommand: str | None) -> list[str]:
    """The long options of `parser` (or of its subcommand's parser)."""
    action = getattr(parser, "_subcommands_action", None)
    if subcommand and action is not None and subcommand in action._name_parser_map:
        parser = action._name_parser_map[subcommand]
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]


def closest(bad: str, options: list[str]) -> str | None:
    """The option `bad` most likely meant: in the same section (`--model.`), by spelling, or one whose
    name is an abbreviation of it (lr for learning_rate)."""
    section, _, leaf = bad.rpartition(".")
    same = [o for o in options if o.rpartition(".")[0] == section] or options

    def score(option: str) -> float:
        name = option.rpartition(".")[2]
        ratio = difflib.SequenceMatcher(None, leaf, name).ratio()
        initials = "".join(part[0] for part in leaf.split("_") if part)
        return max(ratio, 0.8 if name in (initials, leaf[: len(name)]) and len(name) > 1 else 0.0)

    best = max(same, key=score, default=None)
    return best if best is not None and score(best) >= 0.5 else None


def _help_key(argv: list[str]) -> str:
    """The cached help's name: the arguments, terminal width and every file and version that shape it."""
    import lit_prune

    root = Path(lit_prune.__file__).parent
    digest = hashlib.sha256(" ".join(argv).encode())
    digest.update(os.environ.get("COLUMNS", "").encode())
    for path in sorted(root.rglob("*.py")):
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for config in argv:
        if Path(config).is_file():
            digest.update(Path(config).read_bytes())
    from importlib.metadata import version

    for name in ("lightning", "jsonargparse", "sae-lens", "transformers", "torch"):
        digest.update(version(name).encode())
    return digest.hexdigest()[:24]


def help_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lit_prune" / "help"


def print_cached_help(argv: list[str], build) -> int:
    """A command's --help from the cache, or built by `build()` (which prints it and exits) and cached.
    A cache that cannot be written only costs the next call its speed."""
    path = help_cache_dir() / f"{_help_key(argv)}.txt"
    if path.is_file():
        sys.stdout.write(path.read_text(encoding="utf-8"))
        return 0
    import contextlib
    import io

    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out):
        try:
            build()
        except SystemExit as exit_:
            code = exit_.code or 0
    sys.stdout.write(out.getvalue())
    if code == 0 and out.getvalue():
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(out.getvalue(), encoding="utf-8")
            os.replace(tmp, path)
    return code  # pyright: ignore[reportReturnType] (commands exit with an int status)

"""What the command line says when it is asked for help or given a misspelt option.

Kept apart from `lit_prune.cli` so that no `--help` imports torch or Lightning: the top-level help is
written here, and the help of fit, validate and study (which jsonargparse builds from the signatures
of Lightning's Trainer and of our LightningModule, ~10 s of imports) is read from lit_prune/help.json,
which `python -m lit_prune.help_snapshot --write` writes from those parsers and a test keeps equal to
them.
"""

from __future__ import annotations

import difflib
import json
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
    subcommand = argv[0] if argv and not argv[0].startswith("-") else None
    return _unknown_option(err, option_names(parser, subcommand), subcommand or "")


def parse_one_line(parser, argv: list[str], command: str, prefix: str = "arguments: "):
    """`parser.parse_args(argv)` for the commands with a jsonargparse parser of their own (prune, study,
    report, export): an error is a one-line LitPruneError, a misspelt option names the closest one."""
    from jsonargparse import ArgumentError as ParserError

    from lit_prune.errors import LitPruneError

    try:
        return parser.parse_args(argv)
    except ParserError as err:
        unknown = _unknown_option(err, option_names(parser, None), command)
        if unknown is not err:
            raise LitPruneError(str(unknown)) from None
        raise LitPruneError(prefix + " ".join(str(err).split())) from None


def _unknown_option(err: ArgumentError, options: list[str], command: str) -> ArgumentError:
    found = _UNRECOGNIZED.search(str(err))
    if found is None:
        return err
    unknown = [a.split("=")[0] for a in found.group(1).split() if a.startswith("--")]
    if not unknown:
        return err
    bad = unknown[0]
    best = closest(bad, options)
    hint = f": did you mean {best}?" if best else f" (`{command} --help` lists them)"
    return ArgumentError(None, f"unknown option {bad}{hint}")


def option_names(parser, subcommand: str | None) -> list[str]:
    """The long options of `parser` (or of its subcommand's parser)."""
    action = getattr(parser, "_subcommands_action", None)
    if subcommand and action is not None and subcommand in action._name_parser_map:
        parser = action._name_parser_map[subcommand]
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]


def closest(bad: str, options: list[str]) -> str | None:
    """The option `bad` most likely meant: in the same section (`--model.`), one it abbreviates
    (--rel for --release), by spelling, or one whose name is an abbreviation of it (lr for learning_rate)."""
    section, _, leaf = bad.rpartition(".")
    leaf = leaf.lstrip("-")
    same = [o for o in options if o.rpartition(".")[0] == section] or options

    def score(option: str) -> float:
        name = option.rpartition(".")[2].lstrip("-")
        ratio = difflib.SequenceMatcher(None, leaf, name).ratio()
        initials = "".join(part[0] for part in leaf.split("_") if part)
        abbreviates = len(leaf) > 1 and name.startswith(leaf)
        return max(
            ratio, 0.8 if name in (initials, leaf[: len(name)]) and len(name) > 1 else 0.0, 0.9 * abbreviates
        )

    best = max(same, key=score, default=None)
    return best if best is not None and score(best) >= 0.5 else None


HELP_FILE = Path(__file__).with_name("help.json")  # written by `python -m lit_prune.help_snapshot --write`
# the packages whose signatures, docstrings or formatting shape the commands' help texts
HELP_PACKAGES = ("lightning", "jsonargparse", "docstring-parser", "torch", "transformers", "sae-lens")


def help_versions() -> dict[str, str]:
    """The versions the help texts depend on: Python's (argparse) and HELP_PACKAGES'."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": f"{sys.version_info[0]}.{sys.version_info[1]}"}
    for name in HELP_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def stored_help(argv: list[str]) -> str | None:
    """`<command> --help` of fit, validate and study from lit_prune/help.json: the text jsonargparse
    would build, without importing torch and Lightning for it (~10 s). None (build it) for other
    arguments, which may change the defaults shown, or where the installed versions differ from the
    ones the file was written under."""
    if len(argv) != 2 or argv[1] not in ("--help", "-h") or not HELP_FILE.is_file():
        return None
    stored = json.loads(HELP_FILE.read_text(encoding="utf-8"))
    command = stored["commands"].get(argv[0])
    if command is None or stored["versions"] != help_versions():
        return None
    return render_help(command)


def render_help(spec: dict) -> str:
    """A parser's help text from its stored parts (help_snapshot.parser_spec), laid out by argparse
    for this terminal's width exactly as jsonargparse's formatter lays out the parser's own."""
    import argparse

    actions = [
        argparse.Action(
            action["options"],
            dest=f"option{i}",
            nargs=action.get("nargs", 0 if action["args"] is None else None),
            metavar=action["args"],
            required=action["required"],
            help=None if action["help"] is None else action["help"].replace("%", "%%"),
        )
        for i, action in enumerate(spec["actions"])
    ]
    formatter = argparse.HelpFormatter(spec["prog"])
    formatter.add_usage(None, [actions[i] for i in spec["usage"]], [])
    formatter.add_text(spec["description"])
    for group in spec["groups"]:
        formatter.start_section(group["title"])
        formatter.add_text(group["description"])
        formatter.add_arguments([actions[i] for i in group["actions"]])
        formatter.end_section()
    formatter.add_text(spec["epilog"])
    return formatter.format_help()

"""`python -m lit_prune.help_snapshot --write | --check`: lit_prune/help.json, the help texts of fit,
validate and study, taken from the parsers that build them.

Those parsers come from the signatures of Lightning's Trainer, SAEModule and TokenDataModule, so
building one imports torch and Lightning (~10 s); `python -m lit_prune <command> --help` prints the
stored text instead (`cli_manners.stored_help`), laid out for the terminal by argparse as the parser
itself would. Each command's parser is built in a fresh process, as `--help` would build it (the
"known subclasses" jsonargparse lists depend on what is imported). `--check` (run by
tests/test_cli_help.py) fails when the file differs from the parsers or the rendered text from
theirs: after changing an option, a docstring or a pinned version, run `--write`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

from lit_prune.cli_manners import HELP_FILE, help_versions, render_help

COMMANDS = ("fit", "validate", "study")
WIDTHS = (60, 80, 100, 150)  # the terminal widths --check compares the texts at


def live_parser(command: str):
    """The jsonargparse parser that `python -m lit_prune <command> --help` would print the help of."""
    if command == "study":
        from lit_prune.commands.study import build_parser

        return build_parser()
    from lit_prune.cli import lightning_parser

    return lightning_parser([command, "--help"])._subcommands_action._name_parser_map[command]


def parser_spec(parser) -> dict[str, Any]:
    """What render_help needs to lay out `parser`'s help: each shown option's strings, argument text
    and expanded help (as jsonargparse's formatter writes them), the usage line's options and the
    sections."""
    if parser.usage is not None or parser._mutually_exclusive_groups:
        raise ValueError(f"{parser.prog}: a custom usage or mutually exclusive groups are not stored")
    entries: dict[int, dict[str, Any]] = {}
    usage: list[int] = []

    class Spy(argparse.HelpFormatter):  # below jsonargparse's formatter: sees what it hands argparse
        def entry(self, action) -> dict[str, Any]:
            if id(action) not in entries:
                entry: dict[str, Any] = {"options": list(action.option_strings)}
                if not action.option_strings:  # its name, and the nargs that make its usage
                    default = self._get_default_metavar_for_positional(action)
                    entry.update(args=self._metavar_formatter(action, default)(1)[0], nargs=action.nargs)
                elif action.nargs == 0:
                    entry["args"] = None
                else:  # the text after the option, in the usage line and in the option's own line
                    entry["args"] = self._format_args(action, self._get_default_metavar_for_optional(action))
                entries[id(action)] = {**entry, "required": bool(action.required), "help": None}
            return entries[id(action)]

        def _format_usage(self, usage_text, actions, groups, prefix):
            usage[:] = [id(a) for a in actions if a.help is not argparse.SUPPRESS and self.entry(a)]
            return super()._format_usage(usage_text, actions, groups, prefix)

        def _format_action_invocation(self, action) -> str:
            self.entry(action)
            return super()._format_action_invocation(action)

    formatter_class = parser.formatter_class

    class Recording(formatter_class, Spy):  # pyright: ignore[reportGeneralTypeIssues] (a class from a variable)
        def _expand_help(self, action) -> str:  # jsonargparse's does not call argparse's
            text = super()._expand_help(action)
            self.entry(action)["help"] = text  # the last expansion is the one shown
            return text

    parser.formatter_class = Recording
    try:
        parser.format_help()
    finally:
        parser.formatter_class = formatter_class
    order = list(entries)
    groups = [
        {
            "title": group.title,
            "description": group.description,
            "actions": [order.index(id(a)) for a in group._group_actions if a.help is not argparse.SUPPRESS],
        }
        for group in parser._action_groups
    ]
    return {
        "prog": parser.prog,
        "description": parser.description,
        "epilog": parser.epilog,
        "usage": [order.index(i) for i in usage],
        "groups": groups,
        "actions": [entries[i] for i in order],
    }


def capture(command: str) -> dict[str, Any]:
    """In this process: the command's spec, checked to render as the parser's own help at WIDTHS."""
    parser = live_parser(command)
    spec = parser_spec(parser)
    for width in WIDTHS:
        os.environ["COLUMNS"] = str(width)  # argparse's formatters read it when they are made
        if render_help(spec) != parser.format_help():
            raise SystemExit(f"{command} --help: the stored parts render otherwise at width {width}")
    return spec


def snapshot() -> dict[str, Any]:
    """Every command's spec, each captured in a fresh process (`--capture COMMAND`)."""
    commands = {}
    for command in COMMANDS:
        out = subprocess.run(
            [sys.executable, "-m", "lit_prune.help_snapshot", "--capture", command],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"},
        ).stdout
        commands[command] = json.loads(out)
    return {"versions": help_versions(), "commands": commands}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lit_prune.help_snapshot", description=__doc__)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help=f"write {HELP_FILE.name} from the parsers")
    mode.add_argument("--check", action="store_true", help=f"exit 1 if {HELP_FILE.name} differs from them")
    mode.add_argument("--capture", choices=COMMANDS, help="print one command's spec as JSON (internal)")
    args = parser.parse_args(argv)
    if args.capture:
        print(json.dumps(capture(args.capture)))
        return 0
    text = json.dumps(snapshot(), indent=1, sort_keys=True) + "\n"
    if args.write:
        HELP_FILE.write_text(text, encoding="utf-8")
        print(f"wrote {HELP_FILE}")
        return 0
    if not HELP_FILE.is_file() or HELP_FILE.read_text(encoding="utf-8") != text:
        print(f"{HELP_FILE} is out of date: run python -m lit_prune.help_snapshot --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The project's own subcommands (`python -m lit_prune <name>`), registered in `lit_prune.cli.EXTRA_COMMANDS`.

Each module exposes `main(argv: list[str]) -> int`; bad input raises `LitPruneError`,
which the CLI prints as one line and turns into exit status 2.
"""

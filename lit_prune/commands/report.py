"""`python -m lit_prune report <study dir>`: write the study's report from its finished steps.

The study dir is <checkpoints>/<study name> as written by `python -m lit_prune study` (it holds
study.json). Writes <study dir>/report/: report.md, a self-contained report.html (figures
embedded; opens offline), figures/*.png and tables/*.csv. Works on partial studies (e.g. after
some shards) and replaces an existing report only once the new one is complete.
"""

from __future__ import annotations

_DOC = __doc__ or ""
STUDY_DIR_HELP = (
    "A study directory with study.json, e.g. checkpoints/smollm2 (<study.checkpoints>/<study name> of "
    "`python -m lit_prune study`). May also come from --config (a YAML file with study_dir: ...)."
)


def build_parser():
    """The jsonargparse parser (the style of `prune` and `study`): a positional study dir and --config."""
    from jsonargparse import (
        ActionConfigFile,  # pyright: ignore[reportPrivateImportUsage] (left out of __all__)
        ArgumentParser,
    )

    parser = ArgumentParser(
        prog="python -m lit_prune report",
        description=_DOC.split("\n\n")[0],
        epilog=_DOC.split("\n\n", 1)[1].replace("\n", " "),
        exit_on_error=False,
        allow_abbrev=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file with study_dir: <study dir>.")
    parser.add_argument("study_dir", type=str, help=STUDY_DIR_HELP)
    parser.add_argument(
        "--markdown_summary",
        default=None,
        help="Also write every table of the report into this Markdown file.",
    )
    parser.add_argument(
        "--fill",
        nargs="+",
        default=[],
        help="Also refill the <!-- NAME:begin --> ... <!-- NAME:end --> blocks of these Markdown files "
        "(README.md, docs/results.md) with the study's tables (lit_prune.study.report.summary).",
    )
    return parser


def parse_options(argv: list[str]):
    """argv (after `report`) -> the parsed options; parser errors become one-line LitPruneErrors."""
    from lit_prune.cli_manners import parse_one_line

    return parse_one_line(build_parser(), argv, "report")


def parse_study_dir(argv: list[str]) -> str:
    """argv (after `report`) -> the study dir."""
    return str(parse_options(argv).study_dir)


def main(argv: list[str]) -> int:
    """Entry point of `python -m lit_prune report ARGS`; bad input raises LitPruneError (exit 2)."""
    options = parse_options(argv)
    from lit_prune.study.report import write_report

    path = write_report(options.study_dir)
    print(f"report: {path.with_suffix('.html')} (and report.md beside it)")
    if options.markdown_summary or options.fill:
        from lit_prune.files import write_text_atomic
        from lit_prune.study.report import summary

        if options.markdown_summary:
            write_text_atomic(options.markdown_summary, summary.all_tables_markdown(options.study_dir))
            print(f"summary: {options.markdown_summary}")
        for doc, names in summary.fill_files(options.fill, summary.study_blocks(options.study_dir)).items():
            print(f"{doc}: filled {', '.join(names) or 'nothing (no marker of these blocks)'}")
    return 0

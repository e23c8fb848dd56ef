"""`python -m lit_prune report <study dir>`: write the study's report from its finished steps.

The study dir is <checkpoints>/<study name> as written by `python -m lit_prune study` (it holds
study.json). Writes <study dir>/report/: report.md, a self-contained report.html (figures
embedded; opens offline), figures/*.png and tables/*.csv. Works on partial studies (e.g. after
some shards) and replaces an existing report only once the new one is complete.
"""

from __future__ import annotations

from lit_prune.errors import LitPruneError

STUDY_DIR_HELP = (
    "A study directory with study.json, e.g. checkpoints/smollm2 (<study.checkpoints>/<study name> of "
    "`python -m lit_prune study`). May also come from --config (a YAML file with study_dir: ...)."
)


def build_parser():
    """The jsonargparse parser (the style of `prune` and `study`): a positional study dir and --config."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(
        prog="python -m lit_prune report",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1].replace("\n", " "),
        exit_on_error=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML file with study_dir: <study dir>.")
    parser.add_argument("study_dir", type=str, help=STUDY_DIR_HELP)
    return parser


def parse_study_dir(argv: list[str]) -> str:
    """argv (after `report`) -> the study dir; parser errors become one-line LitPruneErrors."""
    from jsonargparse import ArgumentError

    try:
        return str(build_parser().parse_args(argv).study_dir)
    except ArgumentError as err:
        raise LitPruneError("arguments: " + " ".join(str(err).split())) from None


def main(argv: list[str]) -> int:
    """Entry point of `python -m lit_prune report ARGS`; bad input raises LitPruneError (exit 2)."""
    study_dir = parse_study_dir(argv)
    from lit_prune.study.report import write_report

    path = write_report(study_dir)
    print(f"report: {path} (and {path.with_suffix('.html')})")
    return 0

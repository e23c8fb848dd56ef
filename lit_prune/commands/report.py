"""`python -m lit_prune report <study dir>`: write the study's report from its finished steps.

The study dir is <checkpoints>/<study name> as written by `python -m lit_prune study` (it holds
study.json). Writes <study dir>/report/: report.md, a self-contained report.html (figures
embedded; opens offline), figures/*.png and tables/*.csv. Works on partial studies (e.g. after
some shards) and replaces an existing report only once the new one is complete.
"""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lit_prune report",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "study_dir",
        help="A study directory with study.json, e.g. checkpoints/smollm2 "
        "(<study.checkpoints>/<study name> of `python -m lit_prune study`).",
    )
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from lit_prune.study.report import write_report

    path = write_report(args.study_dir)
    print(f"report: {path} (and {path.with_suffix('.html')})")
    return 0

"""`report`'s command line: jsonargparse like `prune` and `study`, a positional study dir or --config."""

from __future__ import annotations

import pytest
from helpers import cli_in_process

from lit_prune.commands.report import parse_study_dir
from lit_prune.errors import LitPruneError


def test_study_dir_positional_or_from_config(tmp_path):
    assert parse_study_dir(["checkpoints/smollm2"]) == "checkpoints/smollm2"
    config = tmp_path / "report.yaml"
    config.write_text("study_dir: checkpoints/other\n")
    assert parse_study_dir(["--config", str(config)]) == "checkpoints/other"


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "required: study_dir"),
        (["a", "b"], "unrecognized arguments: b"),
        (["--config", "no-such.yaml"], "no-such.yaml"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message):
    with pytest.raises(LitPruneError, match=message) as err:
        parse_study_dir(argv)
    assert str(err.value).startswith("arguments: ") and "\n" not in str(err.value)


def test_cli_status_and_message(tmp_path):
    code, stderr = cli_in_process("report", cwd=tmp_path)
    assert code == 2 and stderr == "error: arguments: the following arguments are required: study_dir\n"
    code, stderr = cli_in_process("report", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert code == 2 and stderr.startswith("error: study_dir=") and stderr.count("\n") == 1

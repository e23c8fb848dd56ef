"""Generated doc blocks: a study's tables as Markdown, marked blocks refilled in place, benchmark rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_report import study  # noqa: F401  (the hand-written synthetic study directory)

from lit_prune.errors import LitPruneError
from lit_prune.study.report import summary as S

DOC = """# Title

<!-- results:begin -->
old table
<!-- results:end -->

text between

<!-- other:begin -->
kept as it is
<!-- other:end -->
"""


def test_fill_replaces_only_the_named_blocks_and_is_idempotent():
    new, filled = S.fill_text(DOC, {"results": "| a |\n|---|\n| 1 |"})
    assert filled == ["results"]
    assert "old table" not in new and "| 1 |" in new
    assert "kept as it is" in new and new.startswith("# Title") and "text between" in new
    again, _ = S.fill_text(new, {"results": "| a |\n|---|\n| 1 |"})
    assert again == new
    assert new.count("<!-- results:begin -->") == 1 and new.count("<!-- results:end -->") == 1


def test_fill_without_an_end_marker_is_an_error():
    with pytest.raises(LitPruneError, match="results:end"):
        S.fill_text("<!-- results:begin -->\nx\n", {"results": "y"})


def test_blocks_of_a_study_are_its_report_tables(study):  # noqa: F811
    blocks = S.study_blocks(study)
    assert {"headline", "results", "perplexity", "survival", "provenance"} <= blocks.keys()
    assert blocks["results"].startswith("| claim | paper | ours | verdict | functional verdict |")
    ppl = blocks["perplexity"]
    assert ppl.splitlines()[0].startswith("| ") and "|---|" in ppl.splitlines()[1]
    assert "400" in ppl and "20" in ppl  # magnitude 0.5 and 0.25 of the synthetic study
    assert "fp123" in blocks["provenance"] and "0, 1 (reference seed 0)" in blocks["provenance"]
    assert "| LM dtype | float32 |" in blocks["provenance"]  # a study.json from before the field
    labelled = S.study_blocks(study, label="seeds01")
    assert set(labelled) == {f"seeds01.{k}" for k in blocks}


def test_stability_puts_each_study_in_a_column(study):  # noqa: F811
    table = S.stability_markdown([study, study]).splitlines()
    assert table[0] == "| claim | seeds 0, 1 | seeds 0, 1 |"
    assert len(table) > 2
    for row in table[2:]:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        assert cells[1] == cells[2]  # the same study twice: the same verdicts
    wanda = next(row for row in table if row.startswith("| Wanda preserves"))
    assert wanda.split(" | ")[1].startswith("**") and "; functional: " in wanda


def test_benchmark_rows_are_found_anywhere_in_the_json(tmp_path):
    (tmp_path / "prune.json").write_text(
        json.dumps(
            {
                "results": [
                    {"name": "wanda_mask_selection", "ours": 0.5, "baseline": 2.0, "unit": "s", "ratio": 4.0}
                ],
                "environment": {"torch_threads": 2},
            }
        )
    )
    (tmp_path / "study_parts.json").write_text(
        json.dumps({"rows": {"a": [{"name": "kl", "ours": 1, "baseline": 3, "unit": "s", "ratio": 3.0}]}})
    )
    rows = S.benchmark_rows(tmp_path)
    assert [(r["script"], r["name"], r["ratio"]) for r in rows] == [
        ("prune", "wanda_mask_selection", 4.0),
        ("study_parts", "kl", 3.0),
    ]
    table = S.benchmarks_markdown(tmp_path)
    assert "| prune | wanda_mask_selection | 0.5 s | 2.00 s | 4.00x | CPU, 2 threads |" in table


def test_command_fills_files_and_writes_the_tables(study, tmp_path, capsys):  # noqa: F811
    doc = tmp_path / "README.md"
    doc.write_text(DOC)
    tables = tmp_path / "tables.md"
    assert S.main([str(study), "--fill", str(doc), "--markdown", str(tables)]) == 0
    out = capsys.readouterr().out
    assert f"{doc}: filled results" in out and f"wrote {tables}" in out
    assert "old table" not in doc.read_text() and "kept as it is" in doc.read_text()
    text = tables.read_text()
    assert text.startswith("# Summary tables: synthetic") and "## Provenance" in text


@pytest.mark.parametrize(
    "argv, field",
    [([], "study_dir"), (["--markdown", "x.md", "--benchmarks", "."], "markdown"), (["--nope"], "arguments")],
)
def test_command_bad_input_is_one_line(argv, field, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "b.json").write_text(json.dumps([{"name": "x", "ours": 1, "baseline": 2, "ratio": 2}]))
    assert S.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and field in err


@pytest.mark.e2e
def test_blocks_of_a_real_tiny_study(tmp_path, local_corpus, model_cache):
    """The tiny study's own result files give every block, and the README's marker is filled."""
    from helpers import run_cli
    from test_study import _study_args

    result = run_cli(*_study_args(tmp_path, local_corpus, model_cache, "--report=false"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    blocks = S.study_blocks(tmp_path / "checkpoints" / "tiny")
    assert "| claim |" in blocks["results"]
    assert "tiny-llama" in blocks["provenance"]
    doc = tmp_path / "README.md"
    doc.write_text(DOC)
    assert S.fill_files([doc], blocks) == {str(doc): ["results"]}
    assert Path(doc).read_text().count("| claim |") == 1


def test_pruned_perplexity_has_a_column_per_method(tmp_path):
    rows = [
        {"method": "dense", "label": "0%", "perplexity": 40.0},
        {"method": "magnitude", "label": "50%", "perplexity": 700.0},
        {"method": "wanda", "label": "50%", "perplexity": 65.5},
        {"method": "sparsegpt", "label": "2:4", "perplexity": 90.125},
    ]
    (tmp_path / "prune.json").write_text(json.dumps({"results": [], "perplexity": rows}))
    assert S.perplexity_markdown(tmp_path).splitlines() == [
        "| sparsity | magnitude | wanda | sparsegpt |",
        "|---|---:|---:|---:|",
        "| 0% (dense) | 40.00 | 40.00 | 40.00 |",
        "| 50% | 700.00 | 65.50 | – |",
        "| 2:4 | – | – | 90.12 |",
    ]
    assert S.perplexity_markdown(tmp_path / "nothing") is None


def test_report_command_writes_the_summary_and_fills_the_docs(study, tmp_path, capsys):  # noqa: F811
    from lit_prune.commands.report import main

    doc, tables = tmp_path / "results.md", tmp_path / "summary.md"
    doc.write_text(DOC.replace("results:", "perplexity:"))
    assert main([str(study), "--markdown_summary", str(tables), "--fill", str(doc)]) == 0
    out = capsys.readouterr().out
    assert f"{doc}: filled perplexity" in out and (study / "report" / "report.md").is_file()
    assert "| method | sparsity | perplexity |" in doc.read_text()
    assert tables.read_text().startswith("# Summary tables: synthetic")

"""Generated numbers for the docs: a study's summary tables as Markdown, and marked blocks filled in place.

`python -m lit_prune.study.report.summary checkpoints/smollm2 --markdown docs/results_tables.md` writes
every table of the study's report (the same `Table`s as report.md, from the same result files) into one
Markdown file. `--fill README.md docs/results.md` replaces the text between `<!-- NAME:begin -->` and
`<!-- NAME:end -->` in those files with the block NAME, so the docs are regenerated, never hand-copied.

Blocks of one study: every report table by its CSV name (`headline`, `perplexity`, `survival`, ...),
`results` (the headline's claims, ours and the verdicts, for the README) and `provenance` (model, grid,
seeds, corpus fingerprint, versions, time). With `--label L` they are named `L.headline`, ... so that
several studies (for example three disjoint seed sets) fill one page. `--stability DIR ...` adds
`stability`: each claim's verdict in every listed study, side by side. `--benchmarks benchmarks/results`
adds `benchmarks`: every `ours / baseline / ratio` row of the benchmark scripts' JSON files, and
`pruned_perplexity` from `benchmarks/prune.py --perplexity`. A marker whose block was not built this
time is left as it is.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from lit_prune.errors import LitPruneError, invalid
from lit_prune.files import write_text_atomic

DOC = __doc__ or ""
MARKER = re.compile(
    r"(?P<begin><!--\s*(?P<name>[\w.\-/]+):begin\s*-->)(?P<body>.*?)(?P<end><!--\s*(?P=name):end\s*-->)",
    re.DOTALL,
)
BEGIN = re.compile(r"<!--\s*([\w.\-/]+):begin\s*-->")
RESULTS_COLUMNS = ("claim", "paper", "ours", "verdict", "functional verdict")
"""The headline's columns in the README's `results` block (docs/results.md has the whole table)."""
TOKEN_KEYS = ("train_tokens", "eval_tokens", "calibration_tokens")
VERSIONS = ("lit_prune", "torch", "transformers", "sae-lens", "lightning", "datasets")
"""The versions a provenance block shows (study.json records them all)."""


# --- blocks of one study -------------------------------------------------------------------------
def study_tables(study_dir: str | Path) -> tuple[Any, list[Any]]:
    """(loaded study, its report's tables in report order): the report's own builders, so the docs
    show exactly what report.md shows."""
    from lit_prune.study.report.build import build_report
    from lit_prune.study.report.data import load_study
    from lit_prune.study.report.tables import Table

    data = load_study(study_dir)
    _, blocks, _ = build_report(data)
    return data, [b for b in blocks if isinstance(b, Table)]


def table_markdown(table: Any) -> str:
    """One table as a Markdown pipe table with its note (no title: the doc around it has one)."""
    if not table.rows:
        return f"_{table.title}: no finished data yet._"
    return table.markdown() + (f"\n\n_{table.note}_" if table.note else "")


def compact_markdown(table: Any, columns: tuple[str, ...]) -> str:
    """Only `columns` of a table (those it has), for a page that links the full table."""
    keep = [c for c in columns if c in table.columns]
    rows = [dict(zip(table.columns, r, strict=False)) for r in table.rows]
    narrow = replace(table, columns=keep, rows=[[r.get(c) for c in keep] for r in rows])
    return table_markdown(narrow)


def provenance_markdown(data: Any) -> str:
    """What the numbers depend on, as a two-column table: model, grid, seeds, corpus, versions, time."""
    study, st = data.study, data.settings
    model, corpus = study.get("model") or {}, study.get("corpus") or {}
    versions = study.get("versions") or {}
    wall = sum(float(r.get("seconds") or 0.0) for r in data.runs)
    grid = ", ".join(st.get("methods", [])) + " at " + ", ".join(f"{s:g}" for s in st.get("sparsities", []))
    rows = [
        ("model, hook", f"{model.get('model_name')}, residual stream after block {model.get('hook_layer')}"),
        ("LM dtype", str(model.get("lm_dtype", "float32"))),  # `auto` is recorded as what it chose
        ("grid", grid + (f"; N:M {', '.join(map(str, st['nm']))}" if st.get("nm") else "")),
        ("SAE seeds", ", ".join(map(str, data.seeds)) + f" (reference seed {data.reference_seed})"),
        ("reference SAE", str(st.get("reference_sae") or "the dense-model SAE of the reference seed")),
        ("corpus", f"{corpus.get('corpus')}, token fingerprint `{corpus.get('fingerprint')}`"),
        ("tokens (train / eval / calibration)", " / ".join(str(corpus.get(k)) for k in TOKEN_KEYS)),
        ("versions", ", ".join(f"{k} {versions[k]}" for k in VERSIONS if k in versions) or "–"),
        ("steps", f"{len(data.finished)} finished of {len(study.get('steps', {}))}"),
        ("step time", f"{data.step_seconds:.0f} s summed over the finished steps"),
        ("study command", f"{wall:.0f} s of wall time over {len(data.runs)} invocation(s)"),
    ]
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def study_blocks(study_dir: str | Path, label: str = "") -> dict[str, str]:
    """Block name -> Markdown for one study: every table by name, `results` and `provenance`."""
    data, tables = study_tables(study_dir)
    out = {t.name: table_markdown(t) for t in tables}
    head = next((t for t in tables if t.name == "headline"), None)
    if head is not None:
        out["results"] = compact_markdown(head, RESULTS_COLUMNS)
    out["provenance"] = provenance_markdown(data)
    return {f"{label}.{k}" if label else k: v for k, v in out.items()}


def all_tables_markdown(study_dir: str | Path) -> str:
    """Every table of one study as one Markdown document (title, table, note), in report order."""
    data, tables = study_tables(study_dir)
    out = [f"# Summary tables: {data.study.get('name', Path(study_dir).name)}", ""]
    out += ["Generated by `python -m lit_prune.study.report.summary` from the study's result files.", ""]
    for t in tables:
        out += [f"## {t.title}", "", table_markdown(t), ""]
    out += ["## Provenance", "", provenance_markdown(data), ""]
    return "\n".join(out)


# --- blocks over several studies or runs ---------------------------------------------------------
def stability_markdown(study_dirs: Iterable[str | Path]) -> str:
    """Each headline claim's verdict, its functional verdict and our numbers in every study, side by
    side: the same claims read off disjoint seed sets."""
    from lit_prune.study.report import analysis as A
    from lit_prune.study.report.claims import importance_over_studies_text

    columns: list[str] = []
    cells: dict[str, list[str]] = {}
    importance = []
    for k, directory in enumerate(study_dirs):
        data, tables = study_tables(directory)
        importance.append(A.importance_effects(data))
        columns.append("seeds " + ", ".join(map(str, data.seeds)))
        head = next((t for t in tables if t.name == "headline"), None)
        records = [dict(zip(head.columns, row, strict=False)) for row in head.rows] if head else []
        for record in records:
            claim = str(record.get("claim", "?"))
            functional = record.get("functional verdict")
            also = f"; functional: {functional}" if functional not in (None, "–", "context") else ""
            cells.setdefault(claim, [""] * k).append(
                f"**{record.get('verdict', '–')}**{also} ({record.get('ours', '–')})"
            )
        for claim in cells:
            cells[claim] += [""] * (k + 1 - len(cells[claim]))
    if not columns:
        raise invalid("stability", [], "one or more study directories")
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| claim | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {esc(c)} | " + " | ".join(esc(v or "–") for v in vs) + " |" for c, vs in cells.items()]
    pooled = importance_over_studies_text(A.importance_over_studies(importance))
    if pooled and len(columns) > 1:
        lines += [
            "",
            "Survival does not predict importance, the SAEs of every column together "
            "(mean of their ρ, t interval over them, never narrower than their feature noise):",
            "",
        ]
        lines += [f"- {line}" for line in pooled.splitlines()]
    return "\n".join(lines)


def benchmark_rows(results_dir: str | Path) -> list[dict[str, Any]]:
    """Every `compare()` row (name, ours, baseline, unit, ratio) in the benchmark JSON files, with the
    file's script name and CPU / GPU description."""
    rows: list[dict[str, Any]] = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise invalid("benchmarks", str(path), f"a readable benchmark JSON file ({err})") from None
        env = record.get("environment", {}) if isinstance(record, dict) else {}
        device = env.get("gpu") or f"CPU, {env.get('torch_threads', '?')} threads"
        rows += [{**row, "script": path.stem, "device": device} for row in _compare_rows(record)]
    return rows


def _compare_rows(value: Any) -> Iterable[dict[str, Any]]:
    """The dicts anywhere inside `value` that carry name, ours, baseline and ratio."""
    if isinstance(value, dict):
        if {"name", "ours", "baseline", "ratio"} <= value.keys():
            yield value
        else:
            for v in value.values():
                yield from _compare_rows(v)
    elif isinstance(value, list):
        for v in value:
            yield from _compare_rows(v)


def benchmarks_markdown(results_dir: str | Path) -> str:
    rows = benchmark_rows(results_dir)
    if not rows:
        raise invalid("benchmarks", str(results_dir), "a folder with benchmark JSON files (run `make bench`)")
    lines = ["| script | case | ours | baseline | ratio | device |", "|---|---|---:|---:|---:|---|"]
    for r in rows:
        unit = r.get("unit", "")
        lines.append(
            f"| {r['script']} | {r['name']} | {_num(r['ours'])} {unit} | {_num(r['baseline'])} {unit} | "
            f"{_num(r['ratio'])}x | {r['device']} |"
        )
    return "\n".join(lines)


def perplexity_markdown(results_dir: str | Path) -> str | None:
    """The pruned-perplexity table of `benchmarks/prune.py --perplexity` (prune.json's `perplexity`
    rows): one row per sparsity or N:M pattern, one column per method; None without such rows."""
    path = Path(results_dir) / "prune.json"
    rows = json.loads(path.read_text(encoding="utf-8")).get("perplexity") if path.is_file() else None
    return perplexity_rows_markdown(rows) if rows else None


def perplexity_rows_markdown(rows: list[dict[str, Any]]) -> str:
    """The pruned-perplexity table of rows {"method", "label", "perplexity"} (dense in every column)."""
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != "dense"))
    dense = next((r["perplexity"] for r in rows if r["method"] == "dense"), None)
    cell = {(r["label"], r["method"]): r["perplexity"] for r in rows}
    lines = ["| sparsity | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    if dense is not None:
        lines.append("| 0% (dense) | " + " | ".join(f"{dense:.2f}" for _ in methods) + " |")
    for label in dict.fromkeys(r["label"] for r in rows if r["method"] != "dense"):
        values = [cell.get((label, m)) for m in methods]
        lines.append(f"| {label} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in values) + " |")
    return "\n".join(lines)


def _num(v: Any) -> str:
    if not isinstance(v, (int, float)):
        return str(v)
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"


# --- filling marked blocks -----------------------------------------------------------------------
def fill_text(text: str, blocks: dict[str, str], where: str = "text") -> tuple[str, list[str]]:
    """`text` with every `<!-- NAME:begin -->...<!-- NAME:end -->` whose NAME is in `blocks` refilled;
    returns (new text, filled names). A begin marker without its end is an error (nothing is changed)."""
    closed = {m.group("name") for m in MARKER.finditer(text)}
    unclosed = [n for n in BEGIN.findall(text) if n not in closed]
    if unclosed:
        raise invalid(where, f"<!-- {unclosed[0]}:begin -->", f"a matching <!-- {unclosed[0]}:end --> marker")
    filled: list[str] = []

    def replace(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in blocks:
            return m.group(0)
        filled.append(name)
        return f"{m.group('begin')}\n{blocks[name].strip()}\n{m.group('end')}"

    return MARKER.sub(replace, text), filled


def fill_files(paths: Iterable[str | Path], blocks: dict[str, str]) -> dict[str, list[str]]:
    """Refill the marked blocks of each file in place (atomically; unchanged files are not rewritten)."""
    out: dict[str, list[str]] = {}
    for path in map(Path, paths):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise invalid("fill", str(path), f"a readable Markdown file ({err.strerror})") from None
        new, out[str(path)] = fill_text(text, blocks, f"fill={path}")
        if new != text:
            write_text_atomic(path, new)
    return out


# --- command line --------------------------------------------------------------------------------
def build_parser():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="python -m lit_prune.study.report.summary",
        description=DOC.split("\n\n")[0],
        epilog="Blocks: " + DOC.split("\n\n")[2].replace("\n", " "),
        exit_on_error=False,
    )
    parser.add_argument(
        "study_dir", nargs="?", help="A study directory with study.json, e.g. checkpoints/smollm2."
    )
    parser.add_argument("--markdown", help="Write every table of the study into this Markdown file.")
    parser.add_argument(
        "--fill", nargs="+", default=[], help="Markdown files whose marked blocks are refilled."
    )
    parser.add_argument(
        "--label", default="", help="Prefix of this study's block names (LABEL.headline, ...)."
    )
    parser.add_argument(
        "--stability", nargs="+", default=[], help="Study directories compared in the `stability` block."
    )
    parser.add_argument(
        "--benchmarks", help="A folder of benchmark JSON files (benchmarks/results) for `benchmarks`."
    )
    return parser


def run(argv: list[str]) -> list[str]:
    """Build the asked-for blocks, write --markdown, fill --fill; returns the lines to print."""
    from jsonargparse import ArgumentError

    try:
        args = build_parser().parse_args(argv)
    except ArgumentError as err:  # one line, as the other commands
        raise LitPruneError("arguments: " + " ".join(str(err).split())) from None
    if not (args.study_dir or args.stability or args.benchmarks):
        raise invalid("study_dir", None, "a study directory, --stability DIRS or --benchmarks DIR")
    blocks: dict[str, str] = {}
    lines: list[str] = []
    if args.study_dir:
        blocks.update(study_blocks(args.study_dir, args.label))
    if args.stability:
        blocks[f"{args.label}.stability" if args.label else "stability"] = stability_markdown(args.stability)
    if args.benchmarks:
        blocks["benchmarks"] = benchmarks_markdown(args.benchmarks)
        ppl = perplexity_markdown(args.benchmarks)
        if ppl is not None:
            blocks["pruned_perplexity"] = ppl
    if args.markdown:
        if not args.study_dir:
            raise invalid("markdown", args.markdown, "a study_dir to take the tables from")
        write_text_atomic(args.markdown, all_tables_markdown(args.study_dir))
        lines.append(f"wrote {args.markdown}")
    for path, names in fill_files(args.fill, blocks).items():
        lines.append(f"{path}: filled {', '.join(names) if names else 'nothing (no marker of these blocks)'}")
    if not (args.markdown or args.fill):
        lines.append("blocks: " + ", ".join(sorted(blocks)) + " (use --fill FILES or --markdown FILE)")
    return lines


def main(argv: list[str] | None = None) -> int:
    try:
        lines = run(sys.argv[1:] if argv is None else argv)
    except LitPruneError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

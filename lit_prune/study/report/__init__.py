"""The study report: `write_report(<study dir>)` renders <study dir>/report/ from the finished steps.

Modules: `data` (reading the result files), `analysis` (numbers), `claims` (the headline and its
verdicts), `tables` / `figures` (presentation), `render` (Markdown / HTML), `build` (assembly and the
atomic swap into place).
"""

from lit_prune.study.report.build import write_report

__all__ = ["write_report"]

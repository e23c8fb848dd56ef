"""Rendering the report's blocks as markdown (report.md) and as one self-contained HTML file.

The HTML comes from the Jinja2 template templates/report.html.j2 (CSS: templates/report.css),
autoescaped, so every piece of text from the study (contexts of the feature gallery, config
values) is HTML-escaped; tables are rendered by its one `table` macro (also `Table.html`). It
embeds every figure as a base64 PNG data URI and carries its CSS inline: no external resource,
no script; it opens offline.
"""

from __future__ import annotations

import base64
import functools
import re
from dataclasses import dataclass
from typing import Any

from lit_prune.study.report.tables import Table, fmt


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Pre:
    text: str
    lang: str = ""
    collapsed: str | None = None
    """HTML: shown folded under this summary line."""


@dataclass
class FigureRef:
    name: str
    """PNG file stem under figures/."""
    caption: str


@dataclass
class Gallery:
    record: dict[str, Any]


Block = Heading | Para | Bullets | Pre | Table | FigureRef | Gallery

VERDICTS = ("not reproduced", "reproduced", "partly", "not measured")
"""Values of the headline table's verdict column, each with its colour class in templates/report.css."""


def _visible(text: str) -> str:
    """Context text on one line: newlines and tabs shown as symbols."""
    return text.replace("\n", "⏎").replace("\t", "⇥")


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# --- markdown ---------------------------------------------------------------------------------
def markdown(title: str, blocks: list[Block]) -> str:
    out = [f"# {title}", ""]
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Pre):
            out += [f"```{b.lang}", b.text.replace("```", "`\u200b``"), "```", ""]
        elif isinstance(b, Table) and not b.rows:
            out += [f"**{b.title}**: no finished data yet.", ""]
        elif isinstance(b, Table):
            out += [f"**{b.title}** (tables/{b.name}.csv)", "", b.markdown(), ""]
            out += [f"_{b.note}_", ""] if b.note else []
        elif isinstance(b, FigureRef):
            out += [f"![{b.caption}](figures/{b.name}.png)", "", f"_{b.caption}_", ""]
        elif isinstance(b, Gallery):
            out += _gallery_md(b.record)
    return "\n".join(out)


def _gallery_md(record: dict[str, Any]) -> list[str]:
    out = []
    for f in record.get("features", []):
        out += [
            f"- feature {f['feature']}: **{f['status']}** (Pearson r {_num(f.get('pearson_r'))}, matched cosine "
            f"{_num(f.get('matched_cosine'))}, firing rate {_num(f.get('firing_rate'))})"
            + (f" ⚑ {f['note']}" if f.get("note") else ""),
            "",
            "```text",
        ]
        for model in ("dense", "pruned"):
            for c in f.get(model, []) or [
                {"activation": None, "left": "", "token": "(never fires)", "right": ""}
            ]:
                text = _visible(f"{c['left']}⟦{c['token']}⟧{c['right']}").replace("```", "`\u200b``")
                out.append(f"{model:<7}{_num(c.get('activation')):>10}  {text}")
        out += ["```", ""]
    return out


def _num(v: Any) -> str:
    return fmt(v)  # the tables' number format: one format across the report


# --- HTML -------------------------------------------------------------------------------------
def page(title: str, blocks: list[Block], images: dict[str, bytes]) -> str:
    """The whole report as one HTML document (templates/report.html.j2); images: figure name -> PNG."""
    return (
        _environment()
        .get_template("report.html.j2")
        .render(
            title=title,
            blocks=blocks,
            images={name: base64.b64encode(data).decode("ascii") for name, data in images.items()},
        )
    )


def table_html(table: Table) -> str:
    """One table as HTML, by the page's own macro (one renderer for the page and Table.html)."""
    template = _environment().get_template("report.html.j2")
    return str(template.module.table(table))  # pyright: ignore[reportAttributeAccessIssue] (a Jinja macro)


@functools.cache
def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("lit_prune.study.report", "templates"),
        autoescape=True,  # every text from the study (gallery contexts, config values) is escaped
        undefined=jinja2.ChainableUndefined,  # a gallery record without an optional key renders empty
        keep_trailing_newline=True,
    )
    given = lambda v: None if isinstance(v, jinja2.Undefined) else v  # noqa: E731
    env.filters.update(kind=lambda b: type(b).__name__, anchor=_anchor, num=lambda v: _num(given(v)))
    env.filters["visible"] = lambda text: _visible("" if given(text) is None else str(text))
    env.globals["verdicts"] = VERDICTS
    return env

"""Rendering the report's blocks as markdown (report.md) and as one self-contained HTML file.

The HTML embeds every figure as a base64 PNG data URI and carries its CSS inline: no
external resource, no script; it opens offline. Every piece of text from the study
(contexts of the feature gallery, config values) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from typing import Any, Union

from lit_prune.study.report.tables import Table


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


Block = Union[Heading, Para, Bullets, Pre, Table, FigureRef, Gallery]

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1200px;margin:0 auto;padding:1em 2em;
color:#1d1d1f;line-height:1.45}
h1{border-bottom:2px solid #ccc;padding-bottom:.2em}h2{margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}th,td{border:1px solid #ccc;padding:3px 7px;vertical-align:top}
th{background:#f0f0f3;position:sticky;top:0}tbody tr:nth-child(even){background:#fafafa}
td{font-variant-numeric:tabular-nums}.scroll{overflow-x:auto;max-width:100%}
.note{color:#555;font-size:13px}figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:13px}pre{background:#f6f8fa;padding:.8em;overflow-x:auto;font-size:12px}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;font-size:12px}
mark{background:#ffd54f;padding:0 1px;border-radius:2px}.survived{color:#1b7f3b;font-weight:600}
.lost{color:#b3261e;font-weight:600}.verdict-reproduced{background:#e3f4e6}.verdict-not-reproduced{background:#fbe4e2}
.verdict-partly{background:#fff4d6}.verdict-not-measured{background:#eee}nav ul{columns:2;font-size:14px}
"""


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
    if v is None or v != v:
        return "–"
    return f"{v:.3g}"


# --- HTML -------------------------------------------------------------------------------------
def page(title: str, blocks: list[Block], images: dict[str, bytes]) -> str:
    """The whole report as one HTML document; images: figure name -> PNG bytes."""
    toc = [b for b in blocks if isinstance(b, Heading) and b.level == 2]
    links = "".join(f'<li><a href="#{_anchor(h.text)}">{html.escape(h.text)}</a></li>' for h in toc)
    nav = f"<nav><ul>{links}</ul></nav>"
    body = [f"<h1>{html.escape(title)}</h1>", nav]
    for b in blocks:
        body.append(_block_html(b, images))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _block_html(b: Block, images: dict[str, bytes]) -> str:
    if isinstance(b, Heading):
        return f'<h{b.level} id="{_anchor(b.text)}">{html.escape(b.text)}</h{b.level}>'
    if isinstance(b, Para):
        return f"<p>{html.escape(b.text)}</p>"
    if isinstance(b, Bullets):
        return "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in b.items) + "</ul>"
    if isinstance(b, Pre):
        pre = f"<pre>{html.escape(b.text)}</pre>"
        return (
            f"<details><summary>{html.escape(b.collapsed)}</summary>{pre}</details>" if b.collapsed else pre
        )
    if isinstance(b, Table) and not b.rows:
        return f"<h3>{html.escape(b.title)}</h3><p>No finished data yet.</p>"
    if isinstance(b, Table):
        table = b.html()
        if b.name == "headline":  # colour the verdicts
            for verdict in ("not reproduced", "reproduced", "partly", "not measured"):
                table = table.replace(
                    f"<td>{verdict}</td>", f'<td class="verdict-{verdict.replace(" ", "-")}">{verdict}</td>'
                )
        note = f'<p class="note">{html.escape(b.note)}</p>' if b.note else ""
        return (
            f"<h3>{html.escape(b.title)}</h3>{table}{note}"
            f'<p class="note">CSV: tables/{html.escape(b.name)}.csv</p>'
        )
    if isinstance(b, FigureRef):
        data = base64.b64encode(images[b.name]).decode("ascii")
        return (
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b.caption, quote=True)}">'
            f"<figcaption>{html.escape(b.caption)} (figures/{html.escape(b.name)}.png)</figcaption></figure>"
        )
    if isinstance(b, Gallery):
        return _gallery_html(b.record)
    raise TypeError(f"unknown report block {type(b).__name__}")


def _context_html(c: dict[str, Any]) -> str:
    return (
        f'<span class="ctx">{html.escape(_visible(str(c.get("left", ""))))}'
        f"<mark>{html.escape(_visible(str(c.get('token', ''))))}</mark>"
        f"{html.escape(_visible(str(c.get('right', ''))))}</span>"
    )


def _gallery_html(record: dict[str, Any]) -> str:
    rows = []
    for f in record.get("features", []):
        status = str(f.get("status", ""))
        head = (
            f'<tr><th colspan="3">feature {html.escape(str(f.get("feature")))}: '
            f'<span class="{"survived" if status == "survived" else "lost"}">{html.escape(status)}</span> '
            f"(Pearson r {_num(f.get('pearson_r'))}, matched cosine {_num(f.get('matched_cosine'))}, "
            f"firing rate {_num(f.get('firing_rate'))})"
            + (f" ⚑ {html.escape(str(f['note']))}" if f.get("note") else "")
            + "</th></tr>"
        )
        rows.append(head)
        for model in ("dense", "pruned"):
            contexts = f.get(model) or []
            if not contexts:
                rows.append(f"<tr><td>{model}</td><td>–</td><td>(does not fire on these sequences)</td></tr>")
            for c in contexts:
                rows.append(
                    f"<tr><td>{model}</td><td>{_num(c.get('activation'))}</td><td>{_context_html(c)}</td></tr>"
                )
    return (
        '<div class="scroll"><table><thead><tr><th>model</th><th>activation</th><th>context (highlighted: the '
        "token where the feature fires)</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table></div>"
    )

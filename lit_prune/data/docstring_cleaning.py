"""Docstring cleaning for the `python-docs` corpus: keep prose only.

Doctests, code blocks, parameter tables, section headers and reST directives are dropped,
paragraphs are reflowed onto single lines (`clean_doc`, `clean_paragraphs`).
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap

# Section bodies that are citations, code or bare name lists: dropped whole.
_DROP_SECTIONS = frozenset(
    {
        "see also",
        "references",
        "examples",
        "example",
        "usage",
        "todo",
        "methods",
        "shape",
        "shapes",
        "inputs",
        "outputs",
    }
)
# Parameter-like sections: names and types dropped, each item's description kept as a paragraph.
_ITEM_SECTIONS = frozenset(
    {
        "parameters",
        "other parameters",
        "params",
        "args",
        "arguments",
        "keyword args",
        "keyword arguments",
        "kwargs",
        "returns",
        "return",
        "yields",
        "yield",
        "receives",
        "raises",
        "raise",
        "warns",
        "attributes",
    }
)
_PROSE_TITLES = frozenset({"note", "notes", "warning", "warnings"})
# Directives whose body is prose (kept without the directive line); all others are dropped.
_ADMONITIONS = frozenset(
    {
        "note",
        "warning",
        "tip",
        "hint",
        "important",
        "caution",
        "attention",
        "danger",
        "admonition",
    }
)

_UNDERLINE = "=-~^*#+`'\""
_RULE = re.compile(r"[-=~^*+#`'\"]{3,}(?: +[-=~^*+#]{3,})*")
_DIRECTIVE = re.compile(r"\.\.\s+([\w:-]+)::\s*(.*)")
_NAME_TYPE = re.compile(r"\**[A-Za-z_][\w.]*(?:\s*,\s*\**[A-Za-z_][\w.]*)*\s+:\s+\S.*")
_GOOGLE_ITEM = re.compile(r"\**[\w.]+(?:\s*\(.*?\))?:(?:\s+(\S.*))?")  # `name (type): description`
_HF_ITEM = re.compile(r"\**\w+ \(.*?\):(?:\s+(\S.*))?")  # the same, outside any section (HF style)
_TAG_LINE = re.compile(r"</?[A-Za-z][^>]*>")
_ROLE = re.compile(r":[\w.:+-]+:`~?([^`]+)`")  # :func:`~a.b` -> a.b
_LINK_TARGET = re.compile(r"\s*<[^<>]*>$")  # :ref:`Title <target>` -> Title
_FIELD = re.compile(r":(\w+)(?: [^:]*)?:(?:\s+(\S.*))?")  # Sphinx `:param x: description`
_SIGNATURE = re.compile(r"[\w.]+\(.*\)\s*(?:->.*)?")  # a one-line `name(args) -> type`
_BULLET = re.compile(r"(?:[-*+•]|\d+[.)]|#\.)\s")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _is_rule(line: str) -> bool:
    return bool(_RULE.fullmatch(line.strip()))


def is_header(lines: list[str], i: int) -> bool:
    """A title: a non-empty line directly underlined by one repeated character (numpydoc, reST)."""
    s = lines[i].strip()
    under = lines[i + 1].strip() if i + 1 < len(lines) else ""
    return (
        bool(s)
        and not _is_rule(s)
        and len(under) >= 3
        and under == under[0] * len(under)
        and under[0] in _UNDERLINE
    )


def _skip_indented(lines: list[str], i: int, indent: int) -> int:
    """Index of the first non-blank line at or after i indented no deeper than `indent`."""
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
        i += 1
    return i


def _skip_to_blank(lines: list[str], i: int) -> int:
    """Index of the first blank line at or after i (end of a doctest or table block)."""
    while i < len(lines) and lines[i].strip():
        i += 1
    return i


def _section_end(lines: list[str], i: int, indent: int) -> int:
    """Index of the next numpydoc/reST title at or after i indented no deeper than `indent`."""
    while i < len(lines) and not (is_header(lines, i) and _indent(lines[i]) <= indent):
        i += 1
    return i


def _dedent_to(lines: list[str], indent: int) -> list[str]:
    """Shift a block left so its least indented line sits at `indent` (ends any literal block)."""
    shift = min((_indent(ln) for ln in lines if ln.strip()), default=indent) - indent
    return [ln[shift:] if ln.strip() else "" for ln in lines] if shift > 0 else lines


def _item_descriptions(body: list[str], numpydoc: bool, indent: int) -> list[str]:
    """A parameter-like section without item names/types: one paragraph per item."""
    nonblank = [ln for ln in body if ln.strip()]
    top = min(map(_indent, nonblank), default=0)
    out: list[str] = []
    for line in body:
        if not line.strip() or _indent(line) > top:
            out.append(line)  # a description line
            continue
        item = _GOOGLE_ITEM.fullmatch(line.strip())
        out.append("")
        if item:
            out.append(" " * top + (item.group(1) or ""))
        elif not numpydoc:
            out.append(line)  # Google `Returns:` free text; numpydoc `name : type` is dropped
    return _strip_blocks(_dedent_to(out, indent))


def _strip_blocks(lines: list[str]) -> list[str]:
    """Line pass: drop doctests, fences, directives, tables, titles and name/type lines."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        line, s, ind = lines[i], lines[i].strip(), _indent(lines[i])
        google = s[:-1].rstrip(":").strip().lower() if s.endswith(":") else None
        directive = _DIRECTIVE.match(s)
        if s.startswith(">>>"):  # doctest prompt, its `...` lines and its output: up to a blank
            i = _skip_to_blank(lines, i)
        elif s.startswith(("```", "~~~")):  # fenced (markdown) code block
            end = next(
                (j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(s[:3])), len(lines)
            )
            i = end + 1
        elif s == ".." or s.startswith(".. "):  # directive, comment or target, with its body
            body_end = _skip_indented(lines, i + 1, ind)
            if directive and directive.group(1).lower() in _ADMONITIONS:
                out += [" " * ind + directive.group(2), ""] + _dedent_to(lines[i + 1 : body_end], ind)
            i = body_end
        elif s.startswith(("+-", "+=")) or (_is_rule(s) and " " in s):  # grid / simple table
            i = _skip_to_blank(lines, i)
        elif is_header(lines, i):  # numpydoc / reST section title and underline
            name, end = s.rstrip(":").lower(), _section_end(lines, i + 2, ind)
            if name in _ITEM_SECTIONS:
                out += _item_descriptions(lines[i + 2 : end], numpydoc=True, indent=ind)
            i = end if name in _DROP_SECTIONS | _ITEM_SECTIONS else i + 2
        elif google in _DROP_SECTIONS | _ITEM_SECTIONS:  # Google-style `Args:` block
            end = _skip_indented(lines, i + 1, ind)
            if google in _ITEM_SECTIONS:
                out += _item_descriptions(lines[i + 1 : end], numpydoc=False, indent=ind)
            i = end
        elif field := _FIELD.fullmatch(s):  # Sphinx field list: keep the description, drop `:type x:`
            if not field.group(1).endswith("type"):
                out += ["", " " * ind + (field.group(2) or "")]
            i += 1
        elif item := _HF_ITEM.fullmatch(s):  # `name (type): description` without an `Args:` title
            out += ["", " " * ind + (item.group(1) or "")]
            i += 1
        elif (
            _is_rule(s)
            or s.startswith(("|", "..."))
            or _NAME_TYPE.fullmatch(s)
            or _TAG_LINE.fullmatch(s)
            or google in _PROSE_TITLES
        ):
            i += 1  # stray rule, table row, `name : type` line, HTML tag, prose-section title
        else:
            out.append(line)
            i += 1
    return out


def _looks_like_code(block: str) -> bool:
    """True for a block that parses as Python (beyond a bare name) or is a grammar/shell line."""
    text = textwrap.dedent(block).strip()
    if "::=" in text or text.startswith(("$ ", ">>>", "In [")) or _SIGNATURE.fullmatch(text):
        return True
    if len(text) > 20_000:
        return False
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False  # English prose almost never parses as Python
    simple = (ast.Name, ast.Constant)
    return not all(isinstance(n, ast.Expr) and isinstance(n.value, simple) for n in tree.body)


def _reflow(block: list[str]) -> str:
    """Join a paragraph's lines with spaces; list items keep their own line."""
    parts: list[str] = []
    for line in block:
        s = line.strip()
        if parts and not _BULLET.match(s):
            parts[-1] += " " + s
        else:
            parts.append(s)
    return "\n".join(_ROLE.sub(_role_text, p) for p in parts)


def _role_text(match: re.Match[str]) -> str:
    text = match.group(1)
    return _LINK_TARGET.sub("", text) if "<" in text and not text.startswith("<") else text


def _is_prose(text: str) -> bool:
    """At least three words, and mostly letters (not tables, signatures or symbols)."""
    chars = [c for c in text if not c.isspace()]
    letters = sum(c.isalpha() for c in chars)
    return len(text.split()) >= 3 and letters >= 0.6 * len(chars)


def clean_paragraphs(doc: str) -> list[str]:
    """Prose paragraphs of a docstring or documentation text, each reflowed onto one line."""
    lines = _strip_blocks(inspect.cleandoc(doc).expandtabs().splitlines())
    blocks: list[list[str]] = [[]]
    for line in lines:
        if line.strip():
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    paragraphs: list[str] = []
    literal_indent: int | None = None  # set after a `::` paragraph: deeper blocks are code
    for block in filter(None, blocks):
        indent = _indent(block[0])
        if literal_indent is not None and indent > literal_indent:
            continue
        literal_indent = None
        if block[-1].rstrip().endswith("::"):
            literal_indent = indent
            last = block[-1].rstrip()[:-2]  # reST: "text::" -> "text:", "text ::" -> "text"
            block = block[:-1] + ([last + ":"] if last and not last.endswith(" ") else [last])
        text = "\n".join(block)
        if text.strip() and not _looks_like_code(text):
            para = _reflow([ln for ln in block if ln.strip()])
            if _is_prose(para):
                paragraphs.append(para)
    return paragraphs


def clean_doc(doc: str) -> str:
    """A cleaned document: its prose paragraphs separated by blank lines."""
    return "\n\n".join(clean_paragraphs(doc))

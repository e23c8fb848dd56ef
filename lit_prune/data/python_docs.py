"""The `python-docs` corpus: Python documentation turned into prose documents, offline.

Sources: the reference topics shipped with CPython (`pydoc_data.topics`) and the module,
class and function docstrings of the standard library and of installed packages. Docstrings
are read statically with `ast`: nothing documented is ever imported, so a module whose import
is slow, broken or has side effects costs nothing.

Cleaning keeps prose only: doctests, code blocks, parameter tables, section headers and reST
directives are dropped, paragraphs are reflowed onto single lines.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import os
import re
import sysconfig
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# Bump whenever a rule below changes the output: the cache file name carries it.
EXTRACTION_VERSION = "v1"

DEFAULT_PACKAGES: tuple[str, ...] = (
    "numpy", "scipy", "torch", "transformers", "datasets", "lightning", "sae_lens",
    "tokenizers", "huggingface_hub", "jsonargparse", "torchmetrics", "safetensors", "matplotlib",
    "pandas", "networkx",  # always installed (datasets and torch need them); good prose
)
STDLIB = "stdlib"
TOPICS = "pydoc_data"

# Section bodies that are citations, code or bare name lists: dropped whole.
_DROP_SECTIONS = frozenset({
    "see also", "references", "examples", "example", "usage", "todo", "methods", "shape",
    "shapes", "inputs", "outputs",
})
# Parameter-like sections: names and types dropped, each item's description kept as a paragraph.
_ITEM_SECTIONS = frozenset({
    "parameters", "other parameters", "params", "args", "arguments", "keyword args",
    "keyword arguments", "kwargs", "returns", "return", "yields", "yield", "receives", "raises",
    "raise", "warns", "attributes",
})
_PROSE_TITLES = frozenset({"note", "notes", "warning", "warnings"})
# Directives whose body is prose (kept without the directive line); all others are dropped.
_ADMONITIONS = frozenset({
    "note", "warning", "tip", "hint", "important", "caution", "attention", "danger", "admonition",
})
# Folders never read: tests, vendored copies, caches, nested environments.
_SKIP_DIRS = frozenset({
    "__pycache__", "test", "tests", "testing", "idle_test", "site-packages", "dist-packages",
    "_vendor", "vendor", "vendored", "third_party", "node_modules",
})

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


def _is_header(lines: list[str], i: int) -> bool:
    """A title: a non-empty line directly underlined by one repeated character (numpydoc, reST)."""
    s = lines[i].strip()
    under = lines[i + 1].strip() if i + 1 < len(lines) else ""
    return (bool(s) and not _is_rule(s) and len(under) >= 3
            and under == under[0] * len(under) and under[0] in _UNDERLINE)


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
    while i < len(lines) and not (_is_header(lines, i) and _indent(lines[i]) <= indent):
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
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(s[:3])),
                       len(lines))
            i = end + 1
        elif s == ".." or s.startswith(".. "):  # directive, comment or target, with its body
            body_end = _skip_indented(lines, i + 1, ind)
            if directive and directive.group(1).lower() in _ADMONITIONS:
                out += [" " * ind + directive.group(2), ""] + _dedent_to(lines[i + 1:body_end], ind)
            i = body_end
        elif s.startswith(("+-", "+=")) or (_is_rule(s) and " " in s):  # grid / simple table
            i = _skip_to_blank(lines, i)
        elif _is_header(lines, i):  # numpydoc / reST section title and underline
            name, end = s.rstrip(":").lower(), _section_end(lines, i + 2, ind)
            if name in _ITEM_SECTIONS:
                out += _item_descriptions(lines[i + 2:end], numpydoc=True, indent=ind)
            i = end if name in _DROP_SECTIONS | _ITEM_SECTIONS else i + 2
        elif google in _DROP_SECTIONS | _ITEM_SECTIONS:  # Google-style `Args:` block
            end = _skip_indented(lines, i + 1, ind)
            if google in _ITEM_SECTIONS:
                out += _item_descriptions(lines[i + 1:end], numpydoc=False, indent=ind)
            i = end
        elif _FIELD.fullmatch(s):  # Sphinx field list: keep the description, drop `:type x:`
            field = _FIELD.fullmatch(s)
            if not field.group(1).endswith("type"):
                out += ["", " " * ind + (field.group(2) or "")]
            i += 1
        elif _HF_ITEM.fullmatch(s):  # `name (type): description` without an `Args:` title
            out += ["", " " * ind + (_HF_ITEM.fullmatch(s).group(1) or "")]
            i += 1
        elif (_is_rule(s) or s.startswith(("|", "...")) or _NAME_TYPE.fullmatch(s)
              or _TAG_LINE.fullmatch(s) or google in _PROSE_TITLES):
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


@dataclass(frozen=True)
class DocRecord:
    """One cleaned document and where it came from."""

    package: str  #: package name, `stdlib` or `pydoc_data`
    path: str  #: posix path relative to the package's parent folder, or the topic name
    line: int  #: line of the definition (0 for a module docstring / topic section index)
    qualname: str  #: dotted name of the class or function, `<module>` or the topic section
    text: str

    @property
    def source(self) -> str:
        return f"{self.package}:{self.path}:{self.qualname}"

    @property
    def sort_key(self) -> tuple[str, str, int, str]:
        return (self.package, self.path, self.line, self.qualname)


_DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _walk_defs(node: ast.AST, prefix: str) -> Iterator[tuple[int, str, str]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, _DEFS):
            qualname = prefix + child.name
            doc = ast.get_docstring(child, clean=False)
            if doc:
                yield child.lineno, qualname, doc
            yield from _walk_defs(child, qualname + ".")
        elif isinstance(child, ast.stmt):  # defs under `if`/`try`/`with` blocks count too
            yield from _walk_defs(child, prefix)


def docstrings_of_file(path: Path) -> Iterator[tuple[int, str, str]]:
    """(line, qualname, raw docstring) of a source file, read with `ast` (never imported)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, RecursionError, MemoryError, OSError):
        return  # Python 2 files, templates, unreadable files
    doc = ast.get_docstring(tree, clean=False)
    if doc:
        yield 0, "<module>", doc
    yield from _walk_defs(tree, "")


def source_files(root: Path) -> list[Path]:
    """`.py` files under root (tests and vendored copies skipped), in a stable sorted order."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
        found += [Path(folder, f) for f in files if f.endswith(".py")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _hash_order(path: str) -> str:
    # A fixed pseudo-random file order, so a character cap samples the whole package evenly.
    return hashlib.sha256(path.encode()).hexdigest()


def package_docs(package: str, roots: list[Path], *, min_chars: int = 200,
                 max_chars: int | None = None, base: Path | None = None) -> list[DocRecord]:
    """Cleaned docstrings of one package, sorted, duplicates dropped (the first one is kept).

    With `max_chars`, files are read in a fixed hash order until the cleaned text reaches the
    cap, which also bounds the parse time. Paths are relative to `base` (default: the parent
    of each root, so they start with the package name).
    """
    files = [(p.relative_to(base or root.parent).as_posix(), p)
             for root in roots for p in source_files(root)]
    records: list[DocRecord] = []
    total = 0
    for rel, path in sorted(files, key=lambda f: _hash_order(f[0])):
        if max_chars is not None and total >= max_chars:
            break
        for line, qualname, raw in docstrings_of_file(path):
            text = clean_doc(raw)
            if len(text) >= min_chars:
                records.append(DocRecord(package, rel, line, qualname, text))
                total += len(text)
    return unique_sorted(records)


def unique_sorted(records: list[DocRecord]) -> list[DocRecord]:
    """Records sorted by (package, path, line, qualname); of equal texts the first is kept."""
    seen: set[str] = set()
    out = []
    for record in sorted(records, key=lambda r: r.sort_key):
        if record.text not in seen:
            seen.add(record.text)
            out.append(record)
    return out


def topic_docs(*, min_chars: int = 200) -> list[DocRecord]:
    """The reference topics of `pydoc_data`, one document per titled section."""
    from pydoc_data.topics import topics  # plain data module, part of CPython

    records: list[DocRecord] = []
    for name in sorted(topics):
        lines = topics[name].splitlines()
        starts = [0] + [i for i in range(1, len(lines)) if _is_header(lines, i)]
        for k, (a, b) in enumerate(zip(starts, starts[1:] + [len(lines)])):
            section = lines[a:b]
            title = section[0].strip() if _is_header(lines, a) else name
            text = clean_doc("\n".join(section))
            if len(text) >= min_chars:
                records.append(DocRecord(TOPICS, name, k, title, text))
    return records


def package_roots(name: str) -> list[Path] | None:
    """Source folders of an installed package (found without importing it), or None."""
    if name == STDLIB:
        return [Path(sysconfig.get_path("stdlib"))]
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return [Path(p) for p in locations if Path(p).is_dir()] or None

"""The `python-docs` corpus: Python documentation turned into prose documents, offline.

Sources: the reference topics shipped with CPython (`pydoc_data.topics`) and the module,
class and function docstrings of the standard library and of installed packages. Docstrings
are read statically with `ast`: nothing documented is ever imported, so a module whose import
is slow, broken or has side effects costs nothing.

Cleaning (`lit_prune.data.docstring_cleaning`) keeps prose only.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os
import sysconfig
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lit_prune.data.docstring_cleaning import clean_doc, is_header

# Bump whenever a rule here or in docstring_cleaning changes the output: the cache file name carries it.
EXTRACTION_VERSION = "v1"

DEFAULT_PACKAGES: tuple[str, ...] = (
    "numpy",
    "scipy",
    "torch",
    "transformers",
    "datasets",
    "lightning",
    "sae_lens",
    "tokenizers",
    "huggingface_hub",
    "jsonargparse",
    "torchmetrics",
    "safetensors",
    "matplotlib",
    "pandas",
    "networkx",  # always installed (datasets and torch need them); good prose
)
STDLIB = "stdlib"
TOPICS = "pydoc_data"

# Folders never read: tests, vendored copies, caches, nested environments.
_SKIP_DIRS = frozenset(
    {
        "__pycache__",
        "test",
        "tests",
        "testing",
        "idle_test",
        "site-packages",
        "dist-packages",
        "_vendor",
        "vendor",
        "vendored",
        "third_party",
        "node_modules",
    }
)


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


def package_docs(
    package: str,
    roots: list[Path],
    *,
    min_chars: int = 200,
    max_chars: int | None = None,
    base: Path | None = None,
) -> list[DocRecord]:
    """Cleaned docstrings of one package, sorted, duplicates dropped (the first one is kept).

    With `max_chars`, files are read in a fixed hash order until the cleaned text reaches the
    cap, which also bounds the parse time. Paths are relative to `base` (default: the parent
    of each root, so they start with the package name).
    """
    files = sorted(
        ((p.relative_to(base or root.parent).as_posix(), p) for root in roots for p in source_files(root)),
        key=lambda f: _hash_order(f[0]),
    )
    records: list[DocRecord] = []
    total = 0
    for file_records in _parsed_in_order(package, files, min_chars):
        if max_chars is not None and total >= max_chars:
            break
        records += file_records
        total += sum(len(r.text) for r in file_records)
    return unique_sorted(records)


_FILES_PER_TASK = 24


def _file_records(package: str, files: list[tuple[str, Path]], min_chars: int) -> list[list[DocRecord]]:
    """Per file: its cleaned docstrings of at least min_chars characters."""
    return [
        [
            DocRecord(package, rel, line, qualname, text)
            for line, qualname, raw in docstrings_of_file(path)
            if len(text := clean_doc(raw)) >= min_chars
        ]
        for rel, path in files
    ]


def _parsed_in_order(
    package: str, files: list[tuple[str, Path]], min_chars: int
) -> Iterator[list[DocRecord]]:
    """`_file_records` of every file, in order; parsed on all cores (ast.parse dominates the corpus
    build), a bounded window ahead of the consumer so that stopping early wastes little."""
    tasks = [files[i : i + _FILES_PER_TASK] for i in range(0, len(files), _FILES_PER_TASK)]
    workers = min(os.cpu_count() or 1, len(tasks))
    if workers <= 1:
        for task in tasks:
            yield from _file_records(package, task, min_chars)
        return
    with ProcessPoolExecutor(workers) as pool:
        pending: deque[Future] = deque()
        try:
            for task in tasks:
                pending.append(pool.submit(_file_records, package, task, min_chars))
                if len(pending) > 2 * workers:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:  # the consumer stopped early: drop what has not started
            pool.shutdown(cancel_futures=True)


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
        starts = [0] + [i for i in range(1, len(lines)) if is_header(lines, i)]
        for k, (a, b) in enumerate(zip(starts, starts[1:] + [len(lines)], strict=True)):
            section = lines[a:b]
            title = section[0].strip() if is_header(lines, a) else name
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

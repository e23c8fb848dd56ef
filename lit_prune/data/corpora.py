"""Text corpora for activation harvesting: where documents come from.

Sources (`load_documents`):
- `python-docs`: the embedded corpus (Python's documentation, see `python_docs`), built once
  offline and cached as JSONL;
- a local `.txt` / `.jsonl` / `.json` / `.parquet` file, a folder of them or a glob, read
  through `datasets`' packaged loaders (a `.txt` file gives one document per blank-line
  separated paragraph, so even a single big file splits into train/eval);
- `hf:org/name`: a hub dataset, streamed (needs internet; never used by the tests).

Which split a document joins is decided in `splits`.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import IO, Any

from lit_prune.data import python_docs
from lit_prune.errors import LitPruneError, described, invalid
from lit_prune.files import atomic_path

PYTHON_DOCS = "python-docs"
HUB_PREFIX = "hf:"
_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_HUB_NAME = re.compile(r"[\w.-]+(?:/[\w.-]+)?")
_SOURCES = "'python-docs', an existing .txt/.jsonl/.json/.parquet file, folder or glob, or 'hf:org/name'"


@dataclass(frozen=True)
class PythonDocsOptions:
    """What goes into the embedded corpus. Non-default options get their own cache file."""

    packages: tuple[str, ...] = python_docs.DEFAULT_PACKAGES
    """Installed packages whose docstrings are read; missing ones are skipped and recorded."""
    stdlib: bool = True
    """Read the standard library's docstrings."""
    topics: bool = True
    """Include the reference topics of `pydoc_data` (one document per section)."""
    min_chars: int = 200
    """Documents shorter than this after cleaning are dropped."""
    max_chars_per_package: int | None = None
    """Stop reading a package once its cleaned text reaches this many characters."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "packages", tuple(self.packages))  # YAML gives lists
        if self.min_chars < 0:
            raise invalid("min_chars", self.min_chars, "an integer >= 0")
        if self.max_chars_per_package is not None and self.max_chars_per_package <= 0:
            raise invalid("max_chars_per_package", self.max_chars_per_package, "a positive integer or None")

    def cache_name(self) -> str:
        """`python-docs-<version>[-<options hash>].jsonl`: new rules or options, new file."""
        name = f"python-docs-{python_docs.EXTRACTION_VERSION}"
        if self != PythonDocsOptions():
            name += "-" + _sha256(json.dumps(asdict(self), sort_keys=True))[:10]
        return name + ".jsonl"


# The options `load_documents("python-docs")` builds with (tests swap in a smaller one).
PYTHON_DOCS_OPTIONS = PythonDocsOptions()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _version(name: str) -> str:
    """Installed version of an import name ('unknown' without distribution metadata)."""
    try:  # fast path: the distribution is named like the import (`sae_lens` finds `sae-lens`)
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    dists = _distributions().get(name, [])
    return importlib.metadata.version(dists[0]) if dists else "unknown"


@functools.cache
def _distributions() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()  # slow (~1 s): scans every RECORD


def _versions(names: Iterable[str]) -> dict[str, str]:
    return {name: _version(name) for name in names}


def build_python_docs(
    options: PythonDocsOptions = PythonDocsOptions(),
) -> tuple[list[python_docs.DocRecord], dict[str, Any]]:
    """Extract, clean, sort and de-duplicate the embedded corpus; returns (records, provenance)."""
    start = time.perf_counter()
    records: list[python_docs.DocRecord] = []
    if options.topics:
        records += python_docs.topic_docs(min_chars=options.min_chars)
    names = ([python_docs.STDLIB] if options.stdlib else []) + list(options.packages)
    roots = {name: python_docs.package_roots(name) for name in names}
    for name, dirs in roots.items():
        if dirs:  # stdlib paths read `json/decoder.py`, package paths `numpy/linalg/_linalg.py`
            base = dirs[0] if name == python_docs.STDLIB else None
            records += python_docs.package_docs(
                name, dirs, min_chars=options.min_chars, max_chars=options.max_chars_per_package, base=base
            )
    unique = python_docs.unique_sorted(records)  # across packages: first in sorted order wins
    used = sorted(name for name, dirs in roots.items() if dirs and name != python_docs.STDLIB)
    meta = {
        "extraction_version": python_docs.EXTRACTION_VERSION,
        "options": asdict(options),
        "python": platform.python_version(),
        "packages": _versions(used),
        "missing_packages": sorted(name for name, dirs in roots.items() if not dirs),
        "documents": len(unique),
        "characters": sum(len(r.text) for r in unique),
        "documents_per_package": _count(unique, lambda r: 1),
        "characters_per_package": _count(unique, lambda r: len(r.text)),
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    return unique, meta


def _count(
    records: list[python_docs.DocRecord], size: Callable[[python_docs.DocRecord], int]
) -> dict[str, int]:
    out: dict[str, int] = {}
    for record in records:
        out[record.package] = out.get(record.package, 0) + size(record)
    return out


def _write_atomic(path: Path, write: Callable[[IO[str]], None]) -> None:
    """Write via a temp file in the same folder, then rename: readers never see half a file."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        write(f)


def python_docs_path(
    cache_dir: str | Path = "checkpoints/corpora", options: PythonDocsOptions | None = None
) -> Path:
    """The cached JSONL of the embedded corpus, built on first use (with a `.meta.json` sidecar).

    The sidecar records options, package versions, counts and the sha256 of the JSONL. A
    cache built under other package versions is still used (a stable corpus across resumed
    runs) but triggers a warning; delete the file to rebuild.
    """
    options = options or PYTHON_DOCS_OPTIONS
    path = Path(cache_dir) / options.cache_name()
    meta_path = path.with_suffix(".meta.json")
    if path.is_file():
        if meta_path.is_file():
            built = json.loads(meta_path.read_text(encoding="utf-8")).get("packages", {})
            if built != _versions(built):
                warnings.warn(
                    f"{path} was built with other package versions {built}; delete it to rebuild",
                    stacklevel=2,
                )
        return path
    records, meta = build_python_docs(options)
    lines = [json.dumps({"text": r.text, "source": r.source}, ensure_ascii=False) + "\n" for r in records]
    meta["sha256"] = hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()
    _write_atomic(path, lambda f: f.writelines(lines))
    _write_atomic(meta_path, lambda f: json.dump(meta, f, indent=2, sort_keys=True))
    return path


def _jsonl_texts(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def files_identity(source: str) -> list[list] | None:
    """[path, size, mtime_ns] of each file of a local corpus (None for python-docs and hub sources):
    part of every cache key built from its text, so that an edited file is read again."""
    if source == PYTHON_DOCS or source.startswith(HUB_PREFIX):
        return None
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in resolve_files(source)]


def resolve_files(source: str) -> list[Path]:
    """The readable corpus files a path, folder or glob names, sorted (hidden files skipped)."""
    path = Path(source).expanduser()
    if path.is_file():
        found = [path]
    elif path.is_dir():
        found = [
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
    elif any(c in source for c in "*?["):
        found = [Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True)]
        found = [p for p in found if p.is_file()]
    else:
        raise invalid("corpus", source, _SOURCES)
    # datasets cannot even open an empty json file, and empty files hold no documents anyway
    files = sorted(
        p for p in found if p.suffix.lower() in _BUILDERS and os.access(p, os.R_OK) and p.stat().st_size > 0
    )
    if not files:
        raise invalid(
            "corpus", source, f"a file, folder or glob with readable, non-empty {'/'.join(_BUILDERS)} files"
        )
    return files


def _texts(rows: Iterable[Any], text_field: str, source: str) -> Iterator[str]:
    """The text column of a `datasets` stream of mappings; checks the field on the first row, eagerly."""
    rows = iter(rows)
    first = next(rows, None)
    if first is not None and text_field not in first:
        raise invalid("text_field", text_field, f"a column of {source} (columns: {sorted(first)})")

    def gen() -> Iterator[str]:
        for row in chain([first] if first is not None else [], rows):
            text = row[text_field]
            if text is not None and not isinstance(text, str):
                kind = type(text).__name__
                raise invalid("text_field", text_field, f"a column of strings (got {kind})")
            yield text or ""

    return gen()


def _local_texts(files: list[Path], text_field: str, streaming: bool, source: str) -> Iterator[str]:
    import datasets  # slow import, only needed for file and hub sources

    streams = []
    for builder in ("text", "json", "parquet"):
        group = [str(f) for f in files if _BUILDERS[f.suffix.lower()] == builder]
        if group:
            kwargs: dict[str, Any] = {"sample_by": "paragraph"} if builder == "text" else {}
            try:
                with _hub_off(datasets):
                    ds = datasets.load_dataset(
                        builder, data_files=group, split="train", streaming=streaming, **kwargs
                    )
                # The text loader always names its column `text`.
                streams.append(_texts(ds, "text" if builder == "text" else text_field, source))
            except LitPruneError:
                raise
            except Exception as err:  # malformed JSON, not parquet, ...: pyarrow raises many types
                raise _unreadable(source, err) from None
    return chain.from_iterable(streams)


@contextlib.contextmanager
def _hub_off(datasets) -> Iterator[None]:
    """Local files need no hub, but `load_dataset("json", data_files=...)` still sends a download-count
    request for its packaged loader unless the library is offline: switch it off for this call only
    (a later `hf:` corpus in the same process still reaches the hub)."""
    config = datasets.config
    saved = config.HF_HUB_OFFLINE, config.HF_UPDATE_DOWNLOAD_COUNTS
    config.HF_HUB_OFFLINE, config.HF_UPDATE_DOWNLOAD_COUNTS = True, False
    try:
        yield
    finally:
        config.HF_HUB_OFFLINE, config.HF_UPDATE_DOWNLOAD_COUNTS = saved


def load_documents(
    source: str,
    *,
    text_field: str = "text",
    cache_dir: str | Path = "checkpoints/corpora",
    hub_config: str | None = None,
    hub_split: str = "train",
    streaming: bool = True,
) -> Iterator[str]:
    """Documents of a corpus as stripped, non-empty strings, in a fixed order.

    `source` is `python-docs`, a local file / folder / glob, or `hf:org/name` (loaded with
    `datasets.load_dataset(name, hub_config, split=hub_split, streaming=streaming)`). Local
    files are read grouped by format (text, JSON, parquet), each group in sorted path order;
    `.txt` files give one document per blank-line separated paragraph, in a column always
    called `text`. Bad sources, empty folders and missing text fields raise `LitPruneError`
    at call time; a corpus with no non-empty document raises when the iterator is exhausted.
    """
    if source == PYTHON_DOCS:
        texts: Iterable[str] = _jsonl_texts(python_docs_path(cache_dir))
    elif source.startswith(HUB_PREFIX):
        name = source[len(HUB_PREFIX) :]
        if not _HUB_NAME.fullmatch(name):
            raise invalid("corpus", source, "'hf:org/name' with a hub dataset name")
        import datasets

        try:
            ds = datasets.load_dataset(name, hub_config, split=hub_split, streaming=streaming)
        except Exception as err:  # offline, unknown name, bad config: datasets raises many types
            raise _unreadable(source, err) from None
        texts = _texts(ds, text_field, source)
    else:
        texts = _local_texts(resolve_files(source), text_field, streaming, source)
    return require_documents((t.strip() for t in texts), source)


def _unreadable(source: str, err: Exception) -> LitPruneError:
    return invalid("corpus", source, f"a readable corpus ({described(err)})")


def require_documents(documents: Iterable[str], source: str) -> Iterator[str]:
    """Yield the non-empty documents; raise once exhausted if there were none, or one line if a
    file turns out unreadable while streaming (malformed JSON, not parquet, ...)."""
    count = 0
    try:
        for text in documents:
            if text and text.strip():
                count += 1
                yield text
    except LitPruneError:
        raise
    except Exception as err:
        raise _unreadable(source, err) from None
    if count == 0:
        raise invalid("corpus", source, "a corpus with at least one non-empty document")

"""Corpus layer: docstring cleaning, static extraction, cache, local/hub sources, hash splits."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest

from lit_prune.data import corpora, python_docs
from lit_prune.data.corpora import PythonDocsOptions, load_documents, python_docs_path, require_documents
from lit_prune.data.docstring_cleaning import clean_paragraphs
from lit_prune.data.python_docs import docstrings_of_file, package_docs
from lit_prune.data.splits import SPLITS, documents_of_split, split_of, unit_hash, validate_fractions
from lit_prune.errors import LitPruneError


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path_factory, monkeypatch):
    """Keep `datasets`' cache (and its lock files) out of the user's home folder."""
    import datasets

    cache = tmp_path_factory.mktemp("hf-cache")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)


SYNTHETIC = [f"Synthetic document number {i} about topic {i % 37}." for i in range(10_000)]


# --- splits and fingerprints -------------------------------------------------------------


def test_unit_hash_is_salted_sha256_of_text():
    digest = hashlib.sha256(b"lit_prune\0hello").digest()
    assert unit_hash("hello") == int.from_bytes(digest[:8], "big") / 2**64
    other = unit_hash("hello", "other")
    assert 0 <= other < 1 and other != unit_hash("hello")


def test_splits_deterministic_disjoint_cover_and_sized():
    first = [split_of(t) for t in SYNTHETIC]
    assert first == [split_of(t) for t in SYNTHETIC]
    parts = {s: list(documents_of_split(SYNTHETIC, s)) for s in SPLITS}
    assert sum(map(len, parts.values())) == len(SYNTHETIC)
    assert sorted(sum(parts.values(), [])) == sorted(SYNTHETIC)  # disjoint and covering
    for split, docs in parts.items():
        assert all(split_of(t) == split for t in docs)
    share = {s: len(d) / len(SYNTHETIC) for s, d in parts.items()}
    assert abs(share["eval"] - 0.03) < 0.01 and abs(share["calibration"] - 0.01) < 0.005
    # Key order of the fractions does not matter; a different salt reshuffles.
    assert first == [split_of(t, {"calibration": 0.01, "eval": 0.03}) for t in SYNTHETIC]
    assert first != [split_of(t, salt="another") for t in SYNTHETIC]
    big = [split_of(t, {"eval": 0.5, "calibration": 0.25}) for t in SYNTHETIC[:4000]]
    assert abs(big.count("eval") / 4000 - 0.5) < 0.03
    assert abs(big.count("calibration") / 4000 - 0.25) < 0.03


@pytest.mark.parametrize(
    "fractions, field",
    [
        ({"eval": 1.0}, "fractions.eval"),
        ({"eval": -0.1}, "fractions.eval"),
        ({"eval": 0.6, "calibration": 0.5}, "fractions"),
        ({"test": 0.1}, "fractions"),
        ({"eval": "0.1"}, "fractions.eval"),
    ],
)
def test_bad_fractions_name_the_field(fractions, field):
    with pytest.raises(LitPruneError, match=rf"^{field}="):
        validate_fractions(fractions)
    assert validate_fractions({}) == {"eval": 0.0, "calibration": 0.0}


# --- docstring cleaning ------------------------------------------------------------------

NUMPYDOC = """Add two arrays element-wise.

    This function adds ``a`` and ``b`` and returns a new array; the inputs are
    never modified.

    >>> add(1, 2)
    3
    >>> for x in range(2):
    ...     add(x, x)
    0
    2

    The shapes must broadcast, for example::

        add(np.ones(3), np.ones((2, 3)))

    Parameters
    ----------
    a : array_like
        The first addend.
    b : array_like, optional
        The second addend.

    Returns
    -------
    out : ndarray
        The element-wise sum.

    Notes
    -----
    The sum is computed in the dtype given by :func:`numpy.result_type` of the inputs.

    .. versionadded:: 1.2.0

    See Also
    --------
    subtract : The inverse operation.

    Examples
    --------
    Adding lists works too.

    >>> add([1, 2], [3, 4])
    array([4, 6])
    """

GOOGLE = """Scale a tensor by a factor.

    The result shares no memory with the input, so it is safe to modify
    in place afterwards.

    Args:
        x (`torch.Tensor`): The input tensor of any shape.
        factor (float, optional): How much to scale by. Defaults to one
            when not given.

    Returns:
        A new tensor holding the scaled values.

    Example:
        ```python
        scale(torch.ones(2), 3.0)
        ```

    .. note::
        Integer tensors are promoted to floating point before scaling.
    """


def test_clean_numpydoc_keeps_exactly_the_prose():
    assert clean_paragraphs(NUMPYDOC) == [
        "Add two arrays element-wise.",
        "This function adds ``a`` and ``b`` and returns a new array; the inputs are never modified.",
        "The shapes must broadcast, for example:",
        "The first addend.",
        "The second addend.",
        "The element-wise sum.",
        "The sum is computed in the dtype given by numpy.result_type of the inputs.",
    ]


def test_clean_google_and_hf_styles():
    assert clean_paragraphs(GOOGLE) == [
        "Scale a tensor by a factor.",
        "The result shares no memory with the input, so it is safe to modify in place afterwards.",
        "The input tensor of any shape.",
        "How much to scale by. Defaults to one when not given.",
        "A new tensor holding the scaled values.",
        "Integer tensors are promoted to floating point before scaling.",
    ]
    hf = textwrap.dedent("""\
        Configuration of a :ref:`tiny model <tiny-ref>` for :math:`x < 2`.

        hidden_size (`int`, *optional*, defaults to 768):
            Dimension of the hidden layers.
        :param eps: Added to the variance for
            numerical stability.
        :type eps: float

        | a | table |
        +---+---+

        foo(x, y) -> int
        """)
    assert clean_paragraphs(hf) == [
        "Configuration of a tiny model for x < 2.",
        "Dimension of the hidden layers.",
        "Added to the variance for numerical stability.",
    ]


# --- static extraction -------------------------------------------------------------------

LONG = "This sentence pads the docstring so that it passes the minimum length rule. " * 3


def _write_package(root: Path, name: str, order: list[str]) -> None:
    """A package whose import raises; files written in the given order."""
    files = {
        "__init__.py": f'"""Package {name}. {LONG}"""\nraise RuntimeError("imported!")\n',
        "sub/__init__.py": "",
        "sub/mod.py": textwrap.dedent(f'''\
            """Module docstring. {LONG}"""
            import does_not_exist_anywhere
            class Widget:
                """A widget. {LONG}"""
                def spin(self):
                    """Spin it. {LONG}"""
                    def inner():
                        """Inner helper. {LONG}"""
            if True:
                async def fetch():
                    """Fetch it. {LONG}"""
            def short():
                """Too short."""
            '''),
        "sub/copy.py": f'def twin():\n    """A widget. {LONG}"""\n',  # duplicate text
        "tests/test_x.py": f'"""Test module, skipped. {LONG}"""\n',
        "broken.py": f'"""Not Python 3. {LONG}"""\nprint "hello"\n',
    }
    for rel in order:
        path = root / name / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(files[rel])


FILE_ORDER = ["__init__.py", "sub/__init__.py", "sub/mod.py", "sub/copy.py", "tests/test_x.py", "broken.py"]


def test_ast_extraction_finds_docstrings_without_importing(tmp_path):
    _write_package(tmp_path, "boompkg", FILE_ORDER)
    found = list(docstrings_of_file(tmp_path / "boompkg/sub/mod.py"))
    assert [(line, name) for line, name, _ in found] == [
        (0, "<module>"),
        (3, "Widget"),
        (5, "Widget.spin"),
        (7, "Widget.spin.inner"),
        (10, "fetch"),
        (12, "short"),
    ]
    assert list(docstrings_of_file(tmp_path / "boompkg/broken.py")) == []
    records = package_docs("boompkg", [tmp_path / "boompkg"])
    assert [r.source for r in records] == [
        "boompkg:boompkg/__init__.py:<module>",
        "boompkg:boompkg/sub/copy.py:twin",
        "boompkg:boompkg/sub/mod.py:<module>",
        "boompkg:boompkg/sub/mod.py:Widget.spin",
        "boompkg:boompkg/sub/mod.py:Widget.spin.inner",
        "boompkg:boompkg/sub/mod.py:fetch",
    ]
    assert "boompkg" not in sys.modules


def test_order_independent_of_file_creation_and_cross_package_dedup(tmp_path, monkeypatch):
    _write_package(tmp_path / "a", "pkga", FILE_ORDER)
    _write_package(tmp_path / "b", "pkgb", FILE_ORDER[::-1])
    strip = [
        (r.path.split("/", 1)[1], r.qualname, r.text.replace("pkgb", "pkga"))
        for r in package_docs("pkgb", [tmp_path / "b/pkgb"])
    ]
    assert strip == [
        (r.path.split("/", 1)[1], r.qualname, r.text) for r in package_docs("pkga", [tmp_path / "a/pkga"])
    ]
    monkeypatch.syspath_prepend(str(tmp_path / "a"))
    monkeypatch.syspath_prepend(str(tmp_path / "b"))
    options = PythonDocsOptions(packages=("pkgb", "pkga", "no_such_pkg_xyz"), stdlib=False, topics=False)
    records, meta = corpora.build_python_docs(options)
    assert meta["missing_packages"] == ["no_such_pkg_xyz"]
    assert meta["documents_per_package"] == {"pkga": 6, "pkgb": 1}  # only `Package pkgb` is new
    assert [r.package for r in records] == ["pkga"] * 6 + ["pkgb"]
    assert len({r.text for r in records}) == len(records)


# --- embedded corpus and its cache ---------------------------------------------------------


def test_cache_round_trip(tmp_path, monkeypatch):
    _write_package(tmp_path / "src", "pkga", FILE_ORDER)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    options = PythonDocsOptions(packages=("pkga",), stdlib=False, topics=False)
    monkeypatch.setattr(corpora, "PYTHON_DOCS_OPTIONS", options)
    path = python_docs_path(tmp_path / "cache")
    assert path.name.startswith(f"python-docs-{python_docs.EXTRACTION_VERSION}-")
    meta = json.loads(path.with_suffix(".meta.json").read_text())
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["documents"] == 6 and meta["packages"] == {"pkga": "unknown"}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["source"] == "pkga:pkga/__init__.py:<module>"

    def no_rebuild(_options):
        raise AssertionError("the cache should have been read")

    monkeypatch.setattr(corpora, "build_python_docs", no_rebuild)
    first = list(load_documents("python-docs", cache_dir=tmp_path / "cache"))
    second = list(load_documents("python-docs", cache_dir=tmp_path / "cache"))
    assert first == second == [r["text"] for r in rows]
    assert not list((tmp_path / "cache").glob(".*.tmp"))  # atomic write left no temp file


@pytest.mark.e2e
def test_embedded_corpus_restricted_build(tmp_path):
    # The full build (2-3 min on 2 shared cores) is too slow for a test: topics, capped stdlib.
    options = PythonDocsOptions(packages=("json",), max_chars_per_package=150_000)
    path = python_docs_path(tmp_path, options)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    texts = [r["text"] for r in rows]
    packages = {r["source"].split(":")[0] for r in rows}
    assert packages == {"pydoc_data", "stdlib", "json"}
    assert len(set(texts)) == len(texts) and all(len(t) >= 200 for t in texts)
    lines = [line.lstrip() for t in texts for line in t.splitlines()]
    assert not any(line.startswith((">>>", "..")) for line in lines)
    keys = [tuple(r["source"].split(":", 2)[:2]) for r in rows]
    assert keys == sorted(keys)
    # The `for` section also appears in the `compound` topic, which sorts first and is kept.
    loops = [r["source"] for r in rows if r["text"].startswith('The "for" statement is used to')]
    assert loops == ['pydoc_data:compound:The "for" statement']
    loop = texts[[r["source"] for r in rows].index(loops[0])]
    assert "for_stmt ::=" not in loop and "print(i)" not in loop
    meta = json.loads(path.with_suffix(".meta.json").read_text())
    assert meta["documents"] == sum(meta["documents_per_package"].values()) == len(rows)
    again = python_docs_path(tmp_path / "again", options)  # a rebuild is byte-identical
    assert again.read_bytes() == path.read_bytes()


def test_python_docs_options_validate_and_name_the_cache():
    assert PythonDocsOptions().cache_name() == f"python-docs-{python_docs.EXTRACTION_VERSION}.jsonl"
    listed = PythonDocsOptions(packages=["numpy"])  # as a YAML config would give it
    assert listed == PythonDocsOptions(packages=("numpy",))
    assert listed.cache_name() != PythonDocsOptions().cache_name()
    with pytest.raises(LitPruneError, match=r"^max_chars_per_package=0 is invalid"):
        PythonDocsOptions(max_chars_per_package=0)


# --- local files and the hub -------------------------------------------------------------


def test_local_txt_jsonl_parquet_through_datasets(tmp_path):
    import datasets

    (tmp_path / "a.txt").write_text("First paragraph\nspans two lines.\n\nSecond paragraph.\n")
    (tmp_path / "b.jsonl").write_text(
        '{"body": "From JSON lines."}\n{"body": "  "}\n{"body": "Another row."}\n'
    )
    datasets.Dataset.from_dict({"body": ["From parquet.", "Parquet two."]}).to_parquet(
        str(tmp_path / "c.parquet")
    )
    assert list(load_documents(str(tmp_path / "a.txt"))) == [
        "First paragraph\nspans two lines.",
        "Second paragraph.",
    ]
    assert list(load_documents(str(tmp_path / "b.jsonl"), text_field="body")) == [
        "From JSON lines.",
        "Another row.",
    ]
    assert list(load_documents(str(tmp_path / "c.parquet"), text_field="body", streaming=False)) == [
        "From parquet.",
        "Parquet two.",
    ]
    assert list(load_documents(str(tmp_path / "*.parquet"), text_field="body")) == [
        "From parquet.",
        "Parquet two.",
    ]
    everything = list(load_documents(str(tmp_path), text_field="body"))
    assert everything == [
        "First paragraph\nspans two lines.",
        "Second paragraph.",
        "From JSON lines.",
        "Another row.",
        "From parquet.",
        "Parquet two.",
    ]


def test_hub_source_is_parsed_and_streamed(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return iter([{"content": "Hub document one."}, {"content": ""}, {"content": "Two."}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    docs = list(
        load_documents("hf:org/corpus-name", text_field="content", hub_config="en", hub_split="validation")
    )
    assert docs == ["Hub document one.", "Two."]
    assert calls == [("org/corpus-name", "en", {"split": "validation", "streaming": True})]
    with pytest.raises(LitPruneError, match=r"^corpus='hf:'"):
        load_documents("hf:")


def test_errors_name_the_field(tmp_path):
    expected = r"^corpus='no-such-corpus' is invalid: expected 'python-docs', an existing"
    with pytest.raises(LitPruneError, match=expected):
        load_documents("no-such-corpus")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.csv").write_text("a,b\n")
    with pytest.raises(LitPruneError, match=r"^corpus=.*empty'.*readable"):
        load_documents(str(tmp_path / "empty"))
    (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(LitPruneError, match=r"^text_field='text' is invalid.*columns: \['body'\]"):
        load_documents(str(tmp_path / "d.jsonl"))
    (tmp_path / "blank.jsonl").write_text('{"text": "  "}\n{"text": ""}\n')
    docs = load_documents(str(tmp_path / "blank.jsonl"))  # raises once exhausted
    with pytest.raises(LitPruneError, match=r"^corpus=.*at least one non-empty document"):
        list(docs)
    with pytest.raises(LitPruneError, match=r"^corpus='x'"):
        list(require_documents(["", " \n"], "x"))
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\nnot json\n')
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not a parquet file")
    for name in ("broken.jsonl", "broken.parquet"):
        with pytest.raises(
            LitPruneError, match=rf"^corpus='.*{name}' is invalid: expected a readable corpus \(Arrow"
        ):
            list(load_documents(str(tmp_path / name)))

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/name' on the Hub (LocalEntryNotFoundError)")

    import datasets

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets, "load_dataset", offline)
        with pytest.raises(
            LitPruneError, match=r"^corpus='hf:org/name' is invalid: .*ConnectionError: Couldn't reach"
        ):
            load_documents("hf:org/name")


def test_token_cache_key_follows_an_edited_local_corpus(tmp_path):
    from lit_prune.lit.datamodule import TokenDataModule

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"text": "one"}\n')
    dm = lambda source: TokenDataModule(model_name="tiny-llama", corpus=source, cache_dir=str(tmp_path))  # noqa: E731
    before = dm(str(corpus))._cache_key()
    assert dm(str(corpus))._cache_key() == before
    corpus.write_text('{"text": "two"}\n')  # the same size: the modification time tells
    os.utime(corpus, ns=(corpus.stat().st_atime_ns, corpus.stat().st_mtime_ns + 1_000_000_000))
    assert dm(str(corpus))._cache_key() != before
    assert dm("python-docs")._cache_key() == dm("python-docs")._cache_key()  # no files to stat


def test_a_cache_dir_that_cannot_be_a_directory_is_one_line_error(tmp_path, local_corpus, model_cache):
    from lit_prune.lit.datamodule import TokenDataModule

    (tmp_path / "file").write_text("")
    dm = TokenDataModule(
        model_name="tiny-llama",
        corpus=str(local_corpus),
        cache_dir=str(tmp_path / "file" / "cache"),
        model_cache_dir=str(model_cache),
    )
    with pytest.raises(
        LitPruneError,
        match=r"^data.cache_dir='.*/file/cache' is invalid: expected a directory this "
        r"user can create and write into \(.*: Not a directory\)$",
    ):
        dm.prepare_data()

"""Shared fixtures: tiny random Llama / Gemma 2 / Gemma 3 models saved with save_pretrained."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

import torch  # noqa: E402

# Tiny-model forwards are latency-bound: a second intra-op thread only adds synchronisation.
torch.set_num_threads(1)

from lit_prune.models.tiny import TINY_ARCHS, build_tiny  # noqa: E402


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """A model cache dir shared by the session (tiny models are built into it once)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session", params=sorted(TINY_ARCHS))
def tiny_dir(request, tmp_path_factory) -> Path:
    """A local model directory (config.json + safetensors + tokenizer) for each tiny architecture."""
    path = tmp_path_factory.mktemp(request.param)
    build_tiny(request.param, path)
    return path


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """Corpus and token caches shared by the session (the embedded corpus is built once)."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def local_corpus(tmp_path_factory) -> Path:
    """A small local jsonl corpus (Python's topic docs): fast to tokenize, no embedded build needed."""
    import json
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "topics.jsonl"
    with path.open("w") as out:
        for key in sorted(topics):
            for i, para in enumerate(topics[key].split("\n\n")):
                if len(para) > 200:
                    out.write(json.dumps({"text": para, "id": f"{key}-{i}"}) + "\n")
    return path


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` run only where torch sees a CUDA device (skipped, with the reason, elsewhere)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: torch sees no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

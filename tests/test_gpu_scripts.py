"""The helpers for an offline GPU machine: the bundle's dependency walk and the random-weight model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import ROOT

from lit_prune.models.registry import load_model

sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_bundle import dependencies, normalise  # noqa: E402


def test_dependency_walk_follows_extras_and_leaves_out_what_is_there():
    packed = {normalise(name) for name in dependencies("lit_prune", "3.12", present=set())}
    assert {"sae-lens", "transformer-lens", "lightning", "jsonargparse", "datasets"} <= packed
    assert "typeshed-client" in packed  # only through jsonargparse's `signatures` extra
    assert not {n for n in packed if n == "torch" or n.startswith("nvidia-")}  # the GPU machine's own build
    without = {normalise(name) for name in dependencies("lit_prune", "3.12", present={"sae-lens"})}
    assert "sae-lens" not in without and "transformer-lens" not in without  # nor what only sae-lens needed
    assert "jsonargparse" in without


@pytest.mark.e2e
def test_random_model_has_the_source_shapes_and_new_weights(tiny_dir, tmp_path):
    target = tmp_path / "random"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "random_model.py"),
            str(tiny_dir),
            str(target),
            "--seed",
            "1",
        ],
        check=True,
        capture_output=True,
    )
    source, random = load_model(str(tiny_dir)), load_model(str(target))
    config = lambda m: {k: v for k, v in m.config.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert type(random) is type(source) and config(random) == config(source)
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(random) == shapes(source)
    weight = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(random.state_dict()[weight], source.state_dict()[weight])
    assert (target / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()

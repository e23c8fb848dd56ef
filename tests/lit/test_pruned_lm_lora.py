"""LoRA recovery (PrunedLMModule mode="lora", `lit_prune.pruning.lora`): the adapters' update is masked,
merged and re-masked, so every pruned weight is exactly 0 after a merge, in the checkpoint and in the
export; the merge keeps the model's function; bad LoRA options are one-line errors."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_prune.commands.prune import MASKS_FILE
from lit_prune.errors import LitPruneError
from lit_prune.lit.datamodule import TokenDataModule
from lit_prune.lit.pruned_lm_module import PrunedLMModule
from lit_prune.models.tiny import build_tiny
from lit_prune.pruning import apply_masks, lora, magnitude_masks, prunable_linears, save_masks


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny Llama, magnitude-pruned to 50% per matrix, saved as prune writes it (model + masks)."""
    path = tmp_path_factory.mktemp("lora") / "magnitude-0.5"
    build_tiny("tiny-llama", path)
    model = AutoModelForCausalLM.from_pretrained(path)
    masks = magnitude_masks(model, 0.5)
    apply_masks(model, masks)
    model.save_pretrained(path)
    save_masks(masks, path / MASKS_FILE)
    return path, masks


def _zero_where_pruned(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    for name, keep in masks.items():
        assert not bool(weights[name][~keep].any()), name


def test_merge_keeps_the_function_and_pruned_weights_exactly_zero(pruned):
    path, masks = pruned
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    torch.manual_seed(0)
    adapters = lora.make_adapters(model, masks, rank=4, alpha=8.0)
    for adapter in adapters.values():
        assert isinstance(adapter, lora.LoRAAdapter)
        torch.nn.init.normal_(adapter.B, std=0.5)  # a trained adapter: its dense B A prunes nothing
    handles = lora.attach(model, adapters, masks)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    expected = lora.merged_weights(model, adapters, masks)
    lora.merge(model, adapters, masks)
    weights = {n: lin.weight for n, lin in prunable_linears(model).items()}
    _zero_where_pruned(weights, masks)
    for name, w in expected.items():
        torch.testing.assert_close(weights[name], w)
        assert not torch.equal(w, prunable_linears(AutoModelForCausalLM.from_pretrained(path))[name].weight)
    with torch.no_grad():  # B = 0 after the merge: the hooks add nothing, the merged weights do it all
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)
    for h in handles:
        h.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-4)


@pytest.mark.e2e
def test_lora_recovery_trains_only_adapters_and_keeps_masks_exact(
    pruned, tmp_path, local_corpus, model_cache
):
    path, masks = pruned
    L.seed_everything(0, verbose=False)
    module = PrunedLMModule(
        str(path), lr=1e-2, warmup_steps=0, mode="lora", lora_rank=4, export_dir=str(tmp_path / "export")
    )
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("adapters.") for n in trainable)
    dm = TokenDataModule(
        str(path),
        corpus=str(local_corpus),
        seq_len=32,
        batch_size=4,
        train_tokens=1024,
        eval_tokens=256,
        cache_dir=str(tmp_path / "cache"),
        model_cache_dir=str(model_cache),
    )
    trainer = L.Trainer(
        max_epochs=1,  # 8 steps, validated at the end
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    before = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/perplexity"]
    trainer.fit(module, datamodule=dm)
    trained = module.last_val["perplexity"]
    assert trained < 0.99 * before  # the adapters learned something
    merged = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/perplexity"]
    assert merged == pytest.approx(trained, rel=1e-4)  # merged at fit end: the same model, now in W

    ckpt = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)  # type: ignore[union-attr]
    state = ckpt["state_dict"]
    _zero_where_pruned({n: state[f"lm.{n}.weight"] for n in masks}, masks)
    assert all(not state[k].any() for k in state if k.endswith(".B"))  # merged: the adapters add nothing

    export = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    weights = {n: lin.weight for n, lin in prunable_linears(export).items()}
    _zero_where_pruned(weights, masks)
    name = next(iter(masks))
    assert not torch.equal(
        weights[name], AutoModelForCausalLM.from_pretrained(path).get_submodule(name).weight
    )
    torch.testing.assert_close(weights[name], state[f"lm.{name}.weight"])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mode": "qlora"}, "model.mode"),
        ({"lora_rank": 0}, "model.lora_rank"),
        ({"lora_alpha": float("nan")}, "model.lora_alpha"),
    ],
)
def test_bad_lora_options_are_one_line_errors(pruned, kwargs, field):
    with pytest.raises(LitPruneError, match=f"^{field}=.* is invalid"):
        PrunedLMModule(str(pruned[0]), **kwargs)


def test_apply_masks_takes_a_dense_model_and_its_masks(pruned, tmp_path):
    build_tiny("tiny-llama", tmp_path / "dense")
    module = PrunedLMModule(str(tmp_path / "dense"), masks_path=str(pruned[0] / MASKS_FILE), apply_masks=True)
    assert module.realised_sparsity() == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(LitPruneError, match="^model.masks_path=None is invalid"):
        PrunedLMModule(str(tmp_path / "dense"), apply_masks=True)

"""Shared activations: one forward per (weights, dtype, block, tokens); in-place weight edits invalidate."""

import copy

import torch

from lit_prune.analysis.evaluate import harvest
from lit_prune.models import activation_cache
from lit_prune.models.activation_cache import sharing_activations, weights_digest
from lit_prune.models.tiny import TINY_ARCHS


def _model_and_ids():
    torch.manual_seed(0)
    lm = TINY_ARCHS["tiny-llama"]().eval().requires_grad_(False)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    return lm, ids


def test_second_harvest_is_a_hit_and_equals_recomputation():
    lm, ids = _model_and_ids()
    fresh = harvest(lm, ids, 1)  # outside the context: nothing kept
    with sharing_activations() as cache:
        first = harvest(lm, ids, 1)
        second = harvest(lm, ids, 1)
        assert (cache.hits, cache.misses) == (1, 1) and second is first
        torch.testing.assert_close(first, fresh, rtol=0, atol=0)
        harvest(lm, ids, 2)  # another block is another entry
        harvest(lm, ids[:1], 1)  # other tokens too
        assert cache.misses == 3
        harvest(copy.deepcopy(lm), ids, 1)  # a separate copy with the same values hits
        assert cache.hits == 2


def test_in_place_weight_changes_invalidate_the_remembered_digest():
    lm, ids = _model_and_ids()
    layer0 = lm.model.layers[0].mlp.down_proj.weight
    before = weights_digest(lm)
    assert weights_digest(lm) == before  # remembered: no change, same digest
    with sharing_activations() as cache:
        dense = harvest(lm, ids, 1)
        with torch.no_grad():
            layer0.masked_fill_(layer0.abs() < layer0.abs().median(), 0)  # prune in place: _version bumps
        pruned = harvest(lm, ids, 1)
        assert cache.misses == 2 and not torch.equal(dense, pruned)
        assert weights_digest(lm) != before
        layer0.data = torch.zeros_like(layer0)  # new storage: invalidates too
        zeroed = harvest(lm, ids, 1)
        assert cache.misses == 3 and not torch.equal(zeroed, pruned)


def test_transfer_metrics_of_one_sae_on_one_lm_are_measured_once():
    """The study's pruned conditions all measure the reference on the dense LM: a hit after the
    first; another SAE (other weights, or same weights with another k) is measured anew."""
    from types import SimpleNamespace

    from lit_prune.lit.transfer_callback import TransferabilityCallback
    from lit_prune.sae.build import SAESettings, build_training_sae

    lm, ids = _model_and_ids()
    trainer = SimpleNamespace(datamodule=SimpleNamespace(eval_ids=ids))
    module = SimpleNamespace(hparams=SimpleNamespace(hook_layer=1))
    callback = TransferabilityCallback("unused", batch_size=1)
    sae = build_training_sae(SAESettings(expansion=2, k=4), lm.config.hidden_size, seed=0)
    fresh = callback._evaluate(trainer, module, lm, sae, ce=2)
    with sharing_activations() as cache:
        first = callback._evaluate(trainer, module, lm, sae, ce=2)
        misses = cache.misses
        assert callback._evaluate(trainer, module, copy.deepcopy(lm), sae, ce=2) == first == fresh
        assert cache.misses == misses
        other_k = build_training_sae(SAESettings(expansion=2, k=3), lm.config.hidden_size, seed=0)
        other_k.load_state_dict(sae.state_dict())
        assert callback._evaluate(trainer, module, lm, other_k, ce=2)["l0"] != first["l0"]
        assert callback._evaluate(trainer, module, lm, sae, ce=1) != first  # fewer CE rows: another entry


def test_chunked_weight_statistics_equal_whole_float64_sums(monkeypatch):
    """Off CPU fp32 (here: bf16) the sums of squares go through bounded float64 chunks."""
    monkeypatch.setattr(activation_cache, "_STATS_CHUNK", 7)
    p = torch.randn(5, 9, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    whole = p.double().reshape(-1)
    stats = activation_cache._compute_stats(p)
    torch.testing.assert_close(stats, torch.stack([whole.sum(), whole.pow(2).sum()]), rtol=1e-15, atol=0)
    empty = activation_cache._compute_stats(torch.empty(0, 3, dtype=torch.bfloat16))
    assert torch.equal(empty, torch.zeros(2, dtype=torch.float64))

"""Shared activations: one forward per (weights, dtype, block, tokens); in-place weight edits invalidate."""

import copy

import torch

from lit_prune.analysis.evaluate import harvest
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

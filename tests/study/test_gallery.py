"""The gallery's choice of features: distinct decoder directions, separator-only features marked."""

import torch

from lit_prune.study.gallery import pick_distinct, separator_fraction


def test_pick_distinct_drops_near_duplicate_decoders_and_extra_separator_features():
    decoder = torch.tensor(
        [[1.0, 0.0, 0.0], [0.99, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.6, 0.8]]
    )
    # 1 duplicates 0 (cosine 0.995); 3 is a second separator feature; 4 has cosine 0.8 with 3: distinct
    separator = {0: True, 1: False, 2: False, 3: True, 4: False}
    assert pick_distinct([0, 1, 2, 3, 4], decoder, separator, n=4) == [0, 2, 4]
    assert pick_distinct([0, 1, 2, 3, 4], decoder, separator, n=2) == [0, 2]
    assert pick_distinct([1, 0], decoder, {}, n=2, threshold=0.999) == [1, 0]


def test_separator_fraction_counts_firing_positions_on_special_tokens():
    ids = torch.tensor([[5, 2, 7, 2], [5, 8, 2, 9]])  # 2 is the end-of-document token; position 0 unused
    acts = torch.zeros(6, 2)  # positions >= 1: tokens 2, 7, 2, 8, 2, 9
    acts[[0, 2, 4], 0] = 1.0  # feature 0 fires on every 2
    acts[[0, 1], 1] = 1.0  # feature 1: one of its two positions is a 2
    assert separator_fraction(acts, ids, [2]).tolist() == [1.0, 0.5]

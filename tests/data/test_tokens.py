"""Token packing and the seeded document shuffle, on hand-computed examples (no model needed)."""

from __future__ import annotations

import random

import pytest
import torch

from lit_prune.data.tokens import pack_documents, shuffled

EOS, BOS = 0, 1


class LetterTokenizer:
    """One token per letter, a=2, b=3, ...; EOS 0 and BOS 1."""

    eos_token_id = EOS
    bos_token_id = BOS

    def __call__(self, docs: list[str], add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
        assert not add_special_tokens
        return {"input_ids": [[ord(c) - ord("a") + 2 for c in doc] for doc in docs]}


DOCS = ["ab", "cde", "fg"]  # the stream: a b EOS c d e EOS f g EOS = 2 3 0 4 5 6 0 7 8 0 (10 tokens)


@pytest.mark.parametrize("chunk_docs", [1, 2, 256])  # the remainder carries across tokenizer chunks
def test_documents_are_joined_with_eos_cut_into_windows_and_the_remainder_dropped(chunk_docs):
    packed = pack_documents(DOCS, LetterTokenizer(), seq_len=3, max_sequences=10, chunk_docs=chunk_docs)
    assert packed.dtype == torch.long
    assert packed.tolist() == [[2, 3, 0], [4, 5, 6], [0, 7, 8]]  # the last EOS (1 token) is dropped


def test_prepend_bos_starts_each_window_with_bos_and_takes_seq_len_minus_one_tokens():
    packed = pack_documents(DOCS, LetterTokenizer(), seq_len=4, max_sequences=10, prepend_bos=True)
    assert packed.tolist() == [[BOS, 2, 3, 0], [BOS, 4, 5, 6], [BOS, 0, 7, 8]]


def test_packing_stops_reading_once_max_sequences_are_full():
    def docs():
        yield from DOCS[:2]
        raise AssertionError("read a document after the windows were full")

    packed = pack_documents(docs(), LetterTokenizer(), seq_len=3, max_sequences=2, chunk_docs=1)
    assert packed.tolist() == [[2, 3, 0], [4, 5, 6]]


def test_too_few_tokens_give_no_window_of_the_right_shape():
    assert pack_documents(["a"], LetterTokenizer(), seq_len=3, max_sequences=4).shape == (0, 3)


def test_shuffle_is_a_full_shuffle_when_the_corpus_fits_the_buffer():
    items = [str(i) for i in range(20)]
    expected = list(items)
    random.Random(7).shuffle(expected)
    assert list(shuffled(items, seed=7)) == expected


def test_shuffle_order_is_pinned_for_streams_longer_than_the_buffer():
    """Cached token files and studies are keyed on settings that include the seed, not this order:
    the order must not change (or the token cache key must)."""
    out = [int(item) for item in shuffled([str(i) for i in range(10)], seed=0, buffer_size=4)]
    assert out == [3, 4, 0, 2, 5, 8, 6, 9, 1, 7]

"""Documents -> packed, fixed-length token sequences, per split.

Documents are tokenized in chunks, joined with EOS and cut into `seq_len`
windows (no padding, so only position 0 of each window is excluded from SAE
inputs). The train stream is shuffled with a seeded buffer; eval and
calibration keep corpus order so every condition sees identical tokens.

Both are kept rather than taken from a library: `datasets`' IterableDataset.shuffle is
the same buffer shuffle on numpy's RNG, so every cached token file and study (keyed on the token
fingerprint) would change; `datasets`' batched map drops the remainder of each batch unless the whole
corpus is tokenized at once; sae-lens' concat_and_batch_sequences puts no separator at a window's start
and concatenates tensors per document. Here the stream carries its remainder across chunks and stops
reading documents once `max_sequences` windows are full.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Iterator
from typing import cast

import torch
from transformers import PreTrainedTokenizerBase


def shuffled(items: Iterable[str], seed: int, buffer_size: int = 10_000) -> Iterator[str]:
    """Seeded buffer shuffle: works on endless streams, a full shuffle when the corpus fits the buffer."""
    # kept: datasets' IterableDataset.shuffle does this on numpy's RNG, reordering every cached token file
    rng = random.Random(seed)
    buffer: list[str] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def pack_documents(
    docs: Iterable[str],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    max_sequences: int,
    prepend_bos: bool = False,
    chunk_docs: int = 256,
) -> torch.Tensor:
    """Up to `max_sequences` windows: LongTensor [n, seq_len]. Fewer if the documents run out."""
    # kept: datasets' batched map drops each batch's remainder (or tokenizes all first); this streams, stops early
    eos, bos = cast("int | None", tokenizer.eos_token_id), cast(int, tokenizer.bos_token_id)
    body = seq_len - 1 if prepend_bos else seq_len
    stream: list[int] = []
    rows: list[list[int]] = []

    def drain() -> None:
        while len(stream) >= body and len(rows) < max_sequences:
            window = stream[:body]
            del stream[:body]
            rows.append([bos, *window] if prepend_bos else window)

    chunk: list[str] = []
    for doc in docs:
        chunk.append(doc)
        if len(chunk) == chunk_docs:
            _extend(stream, tokenizer, chunk, eos)
            chunk = []
            drain()
            if len(rows) >= max_sequences:
                break
    if chunk and len(rows) < max_sequences:
        _extend(stream, tokenizer, chunk, eos)
        drain()
    return torch.tensor(rows, dtype=torch.long).reshape(-1, seq_len)


def _extend(stream: list[int], tokenizer: PreTrainedTokenizerBase, docs: list[str], eos: int | None) -> None:
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)


def tokens_fingerprint(*tensors: torch.Tensor) -> str:
    """sha256 (16 hex) over the exact token ids: identifies the data a run used."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]

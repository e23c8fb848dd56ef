"""Tiny random Llama / Gemma 2 / Gemma 3 models, built locally for tests and smoke runs.

Each is saved with `save_pretrained` (model + a small BPE tokenizer trained on
Python's own documentation), so it loads through the same path as a real
model directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

VOCAB = 512
_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
_GEMMA: dict[str, Any] = dict(head_dim=16, sliding_window=16, query_pre_attn_scalar=16)


def _llama(**config: Any) -> PreTrainedModel:
    return LlamaForCausalLM(LlamaConfig(**{**_COMMON, "tie_word_embeddings": True, **config}))


def _gemma2(**config: Any) -> PreTrainedModel:
    return Gemma2ForCausalLM(Gemma2Config(**{**_COMMON, **_GEMMA, **config}))


def _gemma3(**config: Any) -> PreTrainedModel:
    # Gemma3TextConfig reads sliding_window_pattern from its **kwargs (not a named parameter)
    return Gemma3ForCausalLM(Gemma3TextConfig(**{**_COMMON, **_GEMMA, "sliding_window_pattern": 2, **config}))


TINY_ARCHS = {"tiny-llama": _llama, "tiny-gemma2": _gemma2, "tiny-gemma3": _gemma3}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (512 tokens) trained on a fixed slice of `pydoc_data` text: deterministic, offline."""
    from pydoc_data.topics import topics

    text = [topics[key] for key in sorted(topics)][:60]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<bos>", "<eos>"]
    tok.train_from_iterator(
        text,
        trainers.BpeTrainer(
            vocab_size=VOCAB,
            special_tokens=special,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<bos>", eos_token="<eos>", pad_token="<eos>"
    )


def tiny_model(name: str, seed: int = 0, **config: Any) -> PreTrainedModel:
    """Tiny model `name` in eval mode, randomly initialised with `seed`; `config` overrides fields of
    its config (vocab_size, num_hidden_layers, sliding_window, ...)."""
    torch.manual_seed(seed)
    return TINY_ARCHS[name](**config).eval()


def build_tiny(name: str, path: str | Path, seed: int = 0) -> None:
    """Write tiny model `name` (random init with `seed`) and its tokenizer to `path`."""
    tiny_model(name, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)

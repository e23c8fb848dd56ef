"""Save a causal LM with the architecture and tokenizer of a local Hugging Face folder and random weights.

For timings on a machine that the real weights cannot reach (an offline GPU machine that takes a
small bundle; SmolLM2's GGUF alone is 93 MB): the same shapes run the same kernels, so speeds and
speed ratios hold. What depends on the weights (perplexity, masks, SAE metrics) means nothing here.

Run from the repository root:
    python benchmarks/random_model.py SOURCE TARGET [--seed 0]
SOURCE needs config.json and the tokenizer files (benchmarks/gpu_bundle.py copies them from the
converted SmolLM2); TARGET gets those plus model.safetensors, loadable as `--model TARGET`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path, help="folder with config.json and tokenizer files")
    p.add_argument("target", type=Path, help="folder to write (created)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = p.parse_args()
    if not (args.source / "config.json").is_file():
        raise SystemExit(
            f"source={str(args.source)!r}: no config.json there; expected a Hugging Face model folder"
        )
    torch.manual_seed(args.seed)
    config = AutoConfig.from_pretrained(args.source)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # the config's own initialiser
    model.save_pretrained(args.target)
    for name in TOKENIZER_FILES:
        if (args.source / name).is_file():
            shutil.copy2(args.source / name, args.target / name)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.target}: {type(model).__name__}, {params / 1e6:.1f}M random parameters (seed {args.seed})")


if __name__ == "__main__":
    main()

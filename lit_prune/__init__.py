"""lit_prune: pruning language models and measuring what happens to their SAE features."""

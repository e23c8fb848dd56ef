"""The options of `python -m lit_prune prune` and their parser, in a module of their own: jsonargparse
resolves a class's annotations in its module, imports under TYPE_CHECKING included, and the command's
module names torch and transformers there; `prune --help` imports neither.

Output directory layout: the pruned model + tokenizer (`save_pretrained`, loadable
with `AutoModelForCausalLM.from_pretrained`, pruned weights exactly 0),
`masks.safetensors` (`save_masks`, True = keep) and `prune_report.json`.
Everything is validated before any expensive work, written into a temp dir beside
the output and renamed into place only when complete; an existing output is
replaced only with `--overwrite`, and only after the new one is complete.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class PruneOptions:
    """Prune a causal LM (magnitude, Wanda or SparseGPT, optionally N:M); save it, its masks and a report.

    Args:
        output: Output directory (required): gets the pruned model + tokenizer, masks.safetensors and
            prune_report.json.
        model: Registry name (smollm2-135m, tiny-llama, tiny-gemma2, tiny-gemma3), a local model directory
            or a hub id org/name.
        method: Pruning method: magnitude, wanda or sparsegpt.
        sparsity: Fraction of weights pruned in every matrix (Wanda: in every output row), in [0, 1). May be
            omitted with --nm, which implies N/M.
        nm: Semi-structured pattern N:M such as 2:4 (N of every M consecutive inputs of each row pruned);
            fixes the sparsity to N/M.
        group: Magnitude grouping: matrix (default), row or global. Wanda always prunes per output row,
            SparseGPT exactly floor(numel * s) per matrix.
        calibration_file: Wanda / SparseGPT calibration data instead of the corpus: a text file (tokenized
            and packed into windows) or token ids in .npy / .pt, 2-D [n, seq] or 1-D (cut into windows).
            Capped at calibration_sequences x calibration_seq_len.
        calibration_sequences: Number of calibration sequences (Wanda, SparseGPT).
        calibration_seq_len: Tokens per calibration sequence (an explicit cap, never the model's maximum).
        corpus: Corpus for the calibration sample (when no file is given) and for the eval perplexity:
            python-docs, a local .txt/.jsonl/.parquet file, folder or glob, or hf:org/name.
        seed: Seed of the calibration sample drawn from the corpus.
        eval_sequences: Sequences from the eval split on which perplexity is measured before and after
            pruning.
        eval_seq_len: Tokens per eval sequence (perplexity is over the eval_seq_len - 1 next-token
            predictions of each).
        batch_size: Sequences per forward pass (calibration and perplexity).
        overwrite: Replace an existing output (only once the new one is complete).
        progress: Show progress bars for Wanda and perplexity.
        model_cache_dir: Where converted / built models are cached.
        cache_dir: Where corpora and tokenized splits are cached.
        dampening: SparseGPT: lambda added to the Hessian's diagonal as a fraction of its mean (raised
            tenfold, with a warning, while the Hessian is not positive definite).
        column_block: SparseGPT: columns per block of lazy OBS updates (a multiple of M with --nm).
        device: Where the model runs (calibration, pruning, perplexity): auto (cuda when torch sees a
            GPU, else cpu), cpu, cuda or cuda:N. The model is saved in float32 either way.
    """

    output: str
    model: str = "smollm2-135m"
    method: str = "wanda"
    sparsity: float | None = None
    nm: str | None = None
    group: str | None = None
    calibration_file: str | None = None
    calibration_sequences: int = 32
    calibration_seq_len: int = 256
    corpus: str = "python-docs"
    seed: int = 0
    eval_sequences: int = 64
    eval_seq_len: int = 128
    batch_size: int = 8
    overwrite: bool = False
    progress: bool = True
    model_cache_dir: str = "checkpoints/models"
    cache_dir: str = "checkpoints"
    dampening: float = 0.01
    column_block: int = 128
    device: str = "auto"


def build_parser():
    """The jsonargparse parser; every option's help comes from the PruneOptions docstring."""
    from jsonargparse import ActionYesNo, ArgumentParser

    parser = ArgumentParser(
        prog="python -m lit_prune prune",
        description=(__doc__ or "").split("\n\n")[1].replace("\n", " "),
        exit_on_error=False,
        allow_abbrev=False,
    )
    parser.add_class_arguments(PruneOptions, None, skip={"overwrite", "progress"})
    parser.add_argument(
        "--overwrite",
        action=ActionYesNo,
        default=False,
        help="Replace an existing output (only once the new one is complete).",
    )
    parser.add_argument(
        "--progress", action=ActionYesNo, default=True, help="Show progress bars for Wanda and perplexity."
    )
    return parser


def parse_options(argv: list[str]) -> PruneOptions:
    """argv (after `prune`) -> PruneOptions; parser errors become one-line LitPruneErrors."""
    from lit_prune.cli_manners import parse_one_line

    values = parse_one_line(build_parser(), argv, "prune").as_dict()
    return PruneOptions(**{f.name: values[f.name] for f in fields(PruneOptions) if f.name in values})

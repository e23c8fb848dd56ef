"""Pruning benchmark on the embedded model (METHODS §1, §5).

1. Wanda mask selection at 50%: our `wanda_mask` (kthvalue + counted ties) against the naive
   `wanda_mask_reference` (full stable sort per row), each inside the same sequential
   calibration (`wanda_masks`) on a freshly loaded model. Reports the time spent in the mask
   function (scores + selection) and in the whole pruning, and checks the masks are identical.
2. Perplexity on the TokenDataModule's eval split (seq_len 128, same tokens for every
   condition): dense; magnitude and Wanda at 10..60%; 2:4 for both. Each condition starts
   from a freshly loaded model.

Run from the repository root:  python benchmarks/prune.py [--quick] [--eval_sequences 64]
Writes benchmarks/results/prune.json (prune_quick.json with --quick) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import lit_prune.pruning.wanda as wanda_module  # noqa: E402
from lit_prune.analysis.perplexity import perplexity  # noqa: E402
from lit_prune.data.tokens import tokens_fingerprint  # noqa: E402
from lit_prune.lit.datamodule import TokenDataModule  # noqa: E402
from lit_prune.models.registry import load_model  # noqa: E402
from lit_prune.pruning import prune_model, sparsity_report, wanda_mask, wanda_mask_reference, wanda_masks  # noqa: E402
from lit_prune.sae.io import versions  # noqa: E402

SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
EVAL_SEQ_LEN = 128


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; `--quick` shrinks the defaults of everything not given explicitly."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="registry name, local dir or hub id")
    p.add_argument("--corpus", default="python-docs", help="corpus of the eval split and calibration sample")
    p.add_argument("--eval_sequences", type=int, help="eval sequences of 128 tokens (default 64; quick 8)")
    p.add_argument("--calibration_sequences", type=int, help="calibration sequences (default 32; quick 8)")
    p.add_argument("--calibration_seq_len", type=int, help="tokens per calibration sequence (default 256; quick 128)")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="small subset: dense, magnitude 50%%, Wanda 50%%")
    p.add_argument("--skip_selection", action="store_true", help="skip part 1 (mask-selection timing)")
    p.add_argument("--output", type=Path, help="JSON path (default benchmarks/results/prune[_quick].json)")
    p.add_argument("--model_cache_dir", default="checkpoints/models")
    p.add_argument("--cache_dir", default="checkpoints")
    args = p.parse_args(argv)
    quick = {"eval_sequences": 8, "calibration_sequences": 8, "calibration_seq_len": 128}
    full = {"eval_sequences": 64, "calibration_sequences": 32, "calibration_seq_len": 256}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    name = "prune_quick.json" if args.quick else "prune.json"
    args.output = args.output or ROOT / "benchmarks" / "results" / name
    return args


def load_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(eval ids [n, 128], calibration ids [n_cal, len], provenance): the same splits `prune` uses."""
    dm = TokenDataModule(model_name=args.model, corpus=args.corpus, seq_len=EVAL_SEQ_LEN, train_tokens=EVAL_SEQ_LEN,
                         eval_tokens=args.eval_sequences * EVAL_SEQ_LEN, batch_size=args.batch_size,
                         calibration_sequences=args.calibration_sequences,
                         calibration_seq_len=args.calibration_seq_len, seed=args.seed,
                         cache_dir=args.cache_dir, model_cache_dir=args.model_cache_dir)
    dm.prepare_data()
    dm.setup()
    return dm.eval_ids[: args.eval_sequences], dm.calibration_ids, dm.provenance


@contextmanager
def timed_selection(select: Callable) -> Iterator[dict]:
    """Route Wanda's per-Linear mask function through `select`, accumulating its wall time."""
    timer = {"seconds": 0.0, "calls": 0}
    original = wanda_module.wanda_mask

    def timed(weight: torch.Tensor, sq: torch.Tensor, sparsity: float) -> torch.Tensor:
        start = time.perf_counter()
        mask = select(weight, sq, sparsity)
        timer["seconds"] += time.perf_counter() - start
        timer["calls"] += 1
        return mask

    wanda_module.wanda_mask = timed  # `wanda_masks` looks the name up at call time
    try:
        yield timer
    finally:
        wanda_module.wanda_mask = original


def selection_benchmark(args: argparse.Namespace, calibration: torch.Tensor, sparsity: float = 0.5) -> dict:
    """Part 1: sequential Wanda with our selection vs the full-sort reference, on fresh models."""
    runs, masks = {}, {}
    for name, select in (("ours", wanda_mask), ("baseline", wanda_mask_reference)):
        model = load_model(args.model, cache_dir=args.model_cache_dir)
        with timed_selection(select) as timer:
            start = time.perf_counter()
            masks[name] = wanda_masks(model, calibration, sparsity, None, args.batch_size,
                                      args.calibration_seq_len, progress=True)
            total = time.perf_counter() - start
        runs[name] = {"selection_seconds": timer["seconds"], "mask_calls": timer["calls"], "prune_seconds": total}
        del model
    differing = [k for k in masks["ours"] if not torch.equal(masks["ours"][k], masks["baseline"][k])]
    ours, base = runs["ours"], runs["baseline"]
    return {
        "sparsity": sparsity, "ours": ours, "baseline": base, "masks_identical": not differing,
        "differing_matrices": differing,
        "selection_ratio": base["selection_seconds"] / ours["selection_seconds"],
        "prune_ratio": base["prune_seconds"] / ours["prune_seconds"],
    }


def conditions(quick: bool) -> list[dict]:
    """Pruning conditions of the perplexity table, dense first."""
    if quick:
        pairs = [("wanda", 0.5, None), ("magnitude", 0.5, None)]
    else:
        pairs = [(m, s, None) for m in ("magnitude", "wanda") for s in SPARSITIES]
        pairs += [(m, None, (2, 4)) for m in ("magnitude", "wanda")]
    return [{"method": "dense", "sparsity": 0.0, "nm": None}] + [
        {"method": m, "sparsity": s, "nm": nm} for m, s, nm in pairs]


def run_condition(args: argparse.Namespace, cond: dict, eval_ids: torch.Tensor, calibration: torch.Tensor) -> dict:
    """One row: a fresh model, pruned (unless dense), and its eval perplexity."""
    model = load_model(args.model, cache_dir=args.model_cache_dir)
    start, realised = time.perf_counter(), 0.0
    if cond["method"] != "dense":
        masks = prune_model(model, cond["method"], cond["sparsity"], cond["nm"],
                            calibration_ids=calibration if cond["method"] == "wanda" else None,
                            batch_size=args.batch_size, max_seq_len=args.calibration_seq_len, progress=True)
        rows = sparsity_report(model, masks)
        realised = sum(r["pruned"] for r in rows) / sum(r["numel"] for r in rows)
    prune_seconds = time.perf_counter() - start
    start = time.perf_counter()
    ppl = perplexity(model, eval_ids, args.batch_size, progress=True)
    label = f"{cond['nm'][0]}:{cond['nm'][1]}" if cond["nm"] else f"{cond['sparsity']:.0%}"
    return {**cond, "label": label, "realised_sparsity": realised, "perplexity": ppl,
            "prune_seconds": prune_seconds, "eval_seconds": time.perf_counter() - start}


def markdown_table(rows: list[dict]) -> str:
    """Rows -> `| sparsity | magnitude | wanda |` (dense in both columns)."""
    labels = list(dict.fromkeys(r["label"] for r in rows if r["method"] != "dense"))
    cell = {(r["label"], r["method"]): r["perplexity"] for r in rows}
    dense = next(r["perplexity"] for r in rows if r["method"] == "dense")
    lines = ["| sparsity | magnitude | wanda |", "|---|---:|---:|", f"| 0% (dense) | {dense:.2f} | {dense:.2f} |"]
    for label in labels:
        values = [cell.get((label, m)) for m in ("magnitude", "wanda")]
        lines.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in values) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    eval_ids, calibration, provenance = load_data(args)
    result: dict = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "eval": {"sequences": int(eval_ids.shape[0]), "seq_len": EVAL_SEQ_LEN, "tokens": int(eval_ids.numel()),
                 "fingerprint": tokens_fingerprint(eval_ids)},
        "calibration": {"shape": list(calibration.shape), "fingerprint": tokens_fingerprint(calibration)},
        "corpus": provenance, "torch_threads": torch.get_num_threads(), "versions": versions(),
    }
    if not args.skip_selection:
        sel = selection_benchmark(args, calibration)
        result["wanda_mask_selection"] = sel
        print(f"wanda_mask_selection: ours {sel['ours']['selection_seconds']:.3f} s, baseline "
              f"{sel['baseline']['selection_seconds']:.3f} s, ratio {sel['selection_ratio']:.2f}")
        print(f"wanda_prune_total: ours {sel['ours']['prune_seconds']:.3f} s, baseline "
              f"{sel['baseline']['prune_seconds']:.3f} s, ratio {sel['prune_ratio']:.2f}")
        print(f"wanda_masks_identical: {sel['masks_identical']}")
    rows = [run_condition(args, cond, eval_ids, calibration) for cond in conditions(args.quick)]
    result["perplexity"] = rows
    result["seconds_total"] = time.perf_counter() - start
    print(f"\nperplexity on {result['eval']['tokens']} eval tokens ({args.corpus}, fingerprint "
          f"{result['eval']['fingerprint']}); Wanda calibration "
          f"{args.calibration_sequences} x {args.calibration_seq_len}")
    print(markdown_table(rows))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.output}")
    return 0 if result.get("wanda_mask_selection", {}).get("masks_identical", True) else 1


if __name__ == "__main__":
    sys.exit(main())

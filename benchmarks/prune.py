"""Pruning benchmark on the embedded model (docs/methods.md §1, §5).

Default (about 1-2 minutes on 2 idle cores):
1. Wanda mask selection at 50%: one sequential calibration (`wanda_masks` on 8 x 256 tokens of
   the prune command's calibration split) records every (weight, input norms) pair its mask
   function sees (210 Linears); our `wanda_mask` (numpy: np.partition k-th value, surplus ties
   dropped) and the naive `wanda_mask_reference` (full stable sort per row) are then timed side
   by side on exactly those inputs, and every mask must be identical.
2. Magnitude mask selection at 50% (per matrix): our `magnitude_masks` against a naive stable
   argsort of each flattened matrix, on the dense model; masks must be identical.
On a GPU both of ours are stable sorts too (`select_lowest_sorted`): expect ratios near 1 there.

Flags for bigger runs:
  --prune_total   also time the whole sequential Wanda twice (ours / reference selection inside),
                  each on a freshly loaded model (~2 x 50 s).
  --perplexity    the perplexity table on the eval split (seq_len 128, same tokens for every
                  condition): dense; each of --methods (default magnitude, Wanda) at each of
                  --sparsities (default 10..60%) and 2:4 (~20 minutes for the defaults).
  --quick         a small table instead (dense, magnitude 50%, Wanda 50%; smaller calibration).

The model runs on --device (default cuda when torch sees a GPU, else cpu).

Run from the repository root:  python benchmarks/prune.py [--prune_total] [--perplexity [--quick]]
Prints `name: ours X s, baseline Y s, ratio Z` lines and writes benchmarks/results/prune.json
(prune_quick.json with --quick). Exit status 1 if any mask differs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from common import (
    RESULTS,
    add_common_args,
    add_device_arg,
    apply_threads,
    clock,
    compare,
    median,
    token_splits,
    write_result,
)

import lit_prune.pruning.wanda as wanda_module
from lit_prune.analysis.perplexity import perplexity
from lit_prune.data.tokens import tokens_fingerprint
from lit_prune.models.registry import load_model
from lit_prune.pruning import (
    count_pruned,
    magnitude_masks,
    prunable_linears,
    prune_model,
    sparsity_report,
    wanda_mask,
    wanda_mask_reference,
    wanda_masks,
)
from lit_prune.study.report.summary import perplexity_rows_markdown

SPARSITIES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
EVAL_SEQ_LEN = 128


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags; `--quick` shrinks the defaults of everything not given explicitly."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="registry name, local dir or hub id")
    p.add_argument("--corpus", default="python-docs", help="corpus of the eval split and calibration sample")
    p.add_argument("--sparsity", type=float, default=0.5, help="sparsity of the selection benchmarks")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over all matrices per path (median)")
    p.add_argument("--eval_sequences", type=int, help="eval sequences of 128 tokens (default 64; quick 8)")
    p.add_argument(
        "--calibration_sequences",
        type=int,
        help="calibration sequences (default 8; 32 with --perplexity, as the prune command; quick 8)",
    )
    p.add_argument(
        "--calibration_seq_len", type=int, help="tokens per calibration sequence (default 256; quick 128)"
    )
    p.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    p.add_argument("--prune_total", action="store_true", help="also time two whole sequential Wanda runs")
    p.add_argument("--perplexity", action="store_true", help="also compute the perplexity table (~20 min)")
    p.add_argument(
        "--quick", action="store_true", help="small perplexity table: dense, magnitude 50%%, Wanda 50%%"
    )
    p.add_argument("--skip_selection", action="store_true", help="skip the mask-selection benchmarks")
    p.add_argument(
        "--methods",
        default="magnitude,wanda",
        help="comma-separated methods of the perplexity table (magnitude, wanda, sparsegpt)",
    )
    p.add_argument(
        "--sparsities",
        default=",".join(f"{s:g}" for s in SPARSITIES),
        help="comma-separated unstructured sparsities of the perplexity table (2:4 is always added)",
    )
    add_common_args(p, "prune")
    add_device_arg(p)
    args = p.parse_args(argv)
    quick = {"eval_sequences": 8, "calibration_sequences": 8, "calibration_seq_len": 128}
    full = {"eval_sequences": 64, "calibration_sequences": 32, "calibration_seq_len": 256}
    fast = {**full, "calibration_sequences": 8}  # selection only: real masks, a quarter of the forwards
    args.perplexity = args.perplexity or args.quick
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - {"magnitude", "wanda", "sparsegpt"})
    if unknown:
        p.error(f"--methods: {','.join(unknown)} is not a method; use magnitude, wanda or sparsegpt")
    try:
        args.sparsities = [float(v) for v in args.sparsities.split(",") if v]
    except ValueError:
        p.error(f"--sparsities: {args.sparsities!r} is not a comma-separated list of numbers in [0, 1)")
    if not args.sparsities or not all(0.0 < v < 1.0 for v in args.sparsities):
        p.error(f"--sparsities: {args.sparsities} must be numbers in (0, 1)")
    for key, value in (quick if args.quick else full if args.perplexity else fast).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick and args.output == RESULTS / "prune.json":
        args.output = RESULTS / "prune_quick.json"
    return args


def load_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(eval ids [n, 128], calibration ids [n_cal, len], provenance): the same splits `prune` uses."""
    dm = token_splits(
        args.model,
        args.corpus,
        args.seed,
        seq_len=EVAL_SEQ_LEN,
        train_tokens=EVAL_SEQ_LEN,
        eval_tokens=args.eval_sequences * EVAL_SEQ_LEN,
        batch_size=args.batch_size,
        calibration_sequences=args.calibration_sequences,
        calibration_seq_len=args.calibration_seq_len,
        cache_dir=args.cache_dir,
        model_cache_dir=args.model_cache_dir,
    )
    return dm.eval_ids[: args.eval_sequences], dm.calibration_ids, dm.provenance


@contextmanager
def routed_selection(select: Callable, device: str, record_inputs: bool = True) -> Iterator[dict]:
    """Route Wanda's per-Linear mask function through `select`, timing it (and recording its inputs)."""
    record: dict = {"seconds": 0.0, "calls": []}
    original = wanda_module.wanda_mask

    def timed(weight: torch.Tensor, sq: torch.Tensor, sparsity: float) -> torch.Tensor:
        if record_inputs:  # the weights are still dense here: apply_masks runs after the block
            record["calls"].append((weight.detach().clone(), sq.detach().clone()))
        start = clock(device)
        mask = select(weight, sq, sparsity)
        record["seconds"] += clock(device) - start
        return mask

    wanda_module.wanda_mask = timed  # `wanda_masks` looks the name up at call time
    try:
        yield record
    finally:
        wanda_module.wanda_mask = original


def time_selection(
    select: Callable, calls: list, repeats: int, device: str
) -> tuple[list[float], list[torch.Tensor]]:
    """Seconds per pass of select over every recorded (weight, sq) call, and the last pass's masks."""
    seconds, masks = [], []
    for _ in range(repeats):
        start = clock(device)
        masks = [select(*call) for call in calls]
        seconds.append(clock(device) - start)
    return seconds, masks


def wanda_selection(args: argparse.Namespace, model: torch.nn.Module, calibration: torch.Tensor) -> dict:
    """Part 1: one sequential Wanda run records the inputs; both selections are timed on them."""
    start = clock(args.device)
    with routed_selection(wanda_mask, args.device) as record:
        pipeline_masks = wanda_masks(
            model, calibration, args.sparsity, None, args.batch_size, args.calibration_seq_len, progress=False
        )
    prune_seconds = clock(args.device) - start
    calls = [(w, sq, args.sparsity) for w, sq in record["calls"]]
    ours_s, base_s = [], []
    for _ in range(args.repeats):  # interleaved, so load changes hit both paths alike
        ours_s += time_selection(wanda_mask, calls, 1, args.device)[0]
        base_s += time_selection(wanda_mask_reference, calls, 1, args.device)[0]
    ours_masks = time_selection(wanda_mask, calls, 1, args.device)[1]
    base_masks = time_selection(wanda_mask_reference, calls, 1, args.device)[1]
    names = list(pipeline_masks)
    differing = [
        n
        for n, a, b, p in zip(names, ours_masks, base_masks, pipeline_masks.values(), strict=False)
        if not (torch.equal(a, b) and torch.equal(a, p))
    ]
    row = compare(
        "wanda_mask_selection",
        median(ours_s),
        median(base_s),
        "s",
        matrices=len(calls),
        ours_seconds=ours_s,
        baseline_seconds=base_s,
        masks_identical=not differing,
        differing_matrices=differing,
        sequential_prune_seconds=prune_seconds,
        selection_seconds_inside_prune=record["seconds"],
        sparsity=args.sparsity,
    )
    print(f"wanda_masks_identical: {not differing} ({len(calls)} matrices)")
    return row


def magnitude_reference(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Naive per-matrix magnitude keep-mask: full stable argsort of the flattened |W|."""
    scores = weight.detach().abs().float().reshape(-1)
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[torch.argsort(scores, stable=True)[: count_pruned(scores.numel(), sparsity)]] = False
    return keep.view(weight.shape)


def magnitude_selection(args: argparse.Namespace, model: torch.nn.Module) -> dict:
    """Part 2: per-matrix magnitude masks of the dense model, ours vs the full sort."""
    linears = prunable_linears(model)
    ours_s, base_s = [], []
    for _ in range(args.repeats):
        start = clock(args.device)
        ours = magnitude_masks(model, args.sparsity, "matrix")
        ours_s.append(clock(args.device) - start)
        start = clock(args.device)
        base = {n: magnitude_reference(lin.weight, args.sparsity) for n, lin in linears.items()}
        base_s.append(clock(args.device) - start)
    differing = [n for n in base if not torch.equal(ours[n], base[n])]
    row = compare(
        "magnitude_mask_selection",
        median(ours_s),
        median(base_s),
        "s",
        matrices=len(base),
        ours_seconds=ours_s,
        baseline_seconds=base_s,
        masks_identical=not differing,
        differing_matrices=differing,
        sparsity=args.sparsity,
    )
    print(f"magnitude_masks_identical: {not differing} ({len(base)} matrices)")
    return row


def prune_total(args: argparse.Namespace, calibration: torch.Tensor) -> dict:
    """Whole sequential Wanda with our selection vs the full-sort reference, on fresh models."""
    runs, masks = {}, {}
    for name, select in (("ours", wanda_mask), ("baseline", wanda_mask_reference)):
        model = load_model(args.model, cache_dir=args.model_cache_dir).to(args.device)
        model(calibration[:1, : args.calibration_seq_len].to(args.device))  # untimed: device start-up costs
        with routed_selection(select, args.device, record_inputs=False):
            start = clock(args.device)
            masks[name] = wanda_masks(
                model,
                calibration,
                args.sparsity,
                None,
                args.batch_size,
                args.calibration_seq_len,
                progress=False,
            )
            runs[name] = clock(args.device) - start
        del model
    same = all(torch.equal(masks["ours"][k], masks["baseline"][k]) for k in masks["ours"])
    return compare("wanda_prune_total", runs["ours"], runs["baseline"], "s", masks_identical=same)


def conditions(quick: bool, methods: list[str], sparsities: list[float]) -> list[dict]:
    """Pruning conditions of the perplexity table, dense first."""
    if quick:
        pairs = [("wanda", 0.5, None), ("magnitude", 0.5, None)]
    else:
        pairs = [(m, s, None) for m in methods for s in sparsities]
        pairs += [(m, None, (2, 4)) for m in methods]
    return [{"method": "dense", "sparsity": 0.0, "nm": None}] + [
        {"method": m, "sparsity": s, "nm": nm} for m, s, nm in pairs
    ]


def run_condition(
    args: argparse.Namespace, cond: dict, eval_ids: torch.Tensor, calibration: torch.Tensor
) -> dict:
    """One row: a fresh model, pruned (unless dense), and its eval perplexity."""
    model = load_model(args.model, cache_dir=args.model_cache_dir).to(args.device)
    start, realised = clock(args.device), 0.0
    if cond["method"] != "dense":
        masks = prune_model(
            model,
            cond["method"],
            cond["sparsity"],
            cond["nm"],
            calibration_ids=calibration if cond["method"] != "magnitude" else None,
            batch_size=args.batch_size,
            max_seq_len=args.calibration_seq_len,
            progress=True,
        )
        rows = sparsity_report(model, masks)
        realised = sum(r["pruned"] for r in rows) / sum(r["numel"] for r in rows)
    prune_seconds = clock(args.device) - start
    start = clock(args.device)
    ppl = perplexity(model, eval_ids, args.batch_size, progress=True)
    label = f"{cond['nm'][0]}:{cond['nm'][1]}" if cond["nm"] else f"{cond['sparsity']:.0%}"
    return {
        **cond,
        "label": label,
        "realised_sparsity": realised,
        "perplexity": ppl,
        "prune_seconds": prune_seconds,
        "eval_seconds": clock(args.device) - start,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    apply_threads(args)
    start = time.perf_counter()
    eval_ids, calibration, provenance = load_data(args)
    result: dict = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "calibration": {"shape": list(calibration.shape), "fingerprint": tokens_fingerprint(calibration)},
        "corpus": provenance,
    }
    identical = True
    if not args.skip_selection:
        model = load_model(args.model, cache_dir=args.model_cache_dir).to(args.device)
        result["magnitude_mask_selection"] = magnitude_selection(args, model)  # dense model first
        result["wanda_mask_selection"] = wanda_selection(args, model, calibration)  # prunes `model`
        del model
        identical = all(
            result[k]["masks_identical"] for k in ("magnitude_mask_selection", "wanda_mask_selection")
        )
    if args.prune_total:
        result["wanda_prune_total"] = total = prune_total(args, calibration)
        identical = identical and total["masks_identical"]
    if args.perplexity:
        result["eval"] = {
            "sequences": int(eval_ids.shape[0]),
            "seq_len": EVAL_SEQ_LEN,
            "tokens": int(eval_ids.numel()),
            "fingerprint": tokens_fingerprint(eval_ids),
        }
        rows = [
            run_condition(args, cond, eval_ids, calibration)
            for cond in conditions(args.quick, args.methods, args.sparsities)
        ]
        result["perplexity"] = rows
        print(
            f"\nperplexity on {result['eval']['tokens']} eval tokens ({args.corpus}, fingerprint "
            f"{result['eval']['fingerprint']}); Wanda / SparseGPT calibration "
            f"{args.calibration_sequences} x {args.calibration_seq_len}"
        )
        print(perplexity_rows_markdown(rows))
    write_result(args.output, result, start)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())

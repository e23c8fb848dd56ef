"""Activation-harvesting benchmark on the embedded model: several SAEs reading one hooked block.

1. harvest_3_saes: features of N SAEs (random TopK, seeds 0..N-1) on the same eval tokens.
   Baseline, the naive per-SAE pipeline: for every SAE and batch a full forward
   `lm(ids, output_hidden_states=True)` (all 30 blocks and the LM head), `hidden_states[layer+1]`
   at positions >= 1, then `sae.encode`. Ours: `lit_prune.analysis.evaluate.harvest` (stops after
   the hooked block) inside `sharing_activations()`, so one forward per batch feeds every SAE.
   Same loop order (SAE outer, batch inner); the features of both paths must be allclose.
2. harvest_bf16: our harvest with a bfloat16 LM forward against float32 (tokens/s); and what
   bf16 does to the SAE metrics (`evaluate_sae`: FVU, L0, cos, and spliced CE / KL on the first
   --ce_sequences sequences) for a trained SAE (default checkpoints/smollm2/version_0/sae if it
   exists, else the seed-0 random SAE), plus the cosine between the fp32- and bf16-path
   reconstructions and activations token by token.
3. spliced_ce_resume: the three spliced forwards of spliced CE (clean, SAE reconstruction spliced
   in, zero-ablated) per batch of the first --sequences sequences, seed-0 SAE. Baseline: three full
   forwards with the splice hooked into block --layer. Ours: block --layer's output captured once
   (later blocks never run), then three forwards that resume after it (`resume_after`: the first
   layer+1 blocks are skipped). The logits must be bit-identical.

Everything runs on --device (default cuda when torch sees a GPU, else cpu).

Run from the repository root:  python benchmarks/harvest.py [--sequences 16] [--saes 3]
Bigger runs: --sequences 64 --metric_sequences 128 --ce_sequences 32.
Prints `name: ours X, baseline Y, ratio Z` lines and writes benchmarks/results/harvest.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from common import (
    ROOT,
    add_common_args,
    add_device_arg,
    apply_threads,
    clock,
    compare,
    median,
    timed,
    token_splits,
    write_result,
)

from lit_prune.analysis.evaluate import evaluate_sae, harvest, sae_codec
from lit_prune.analysis.metrics import spliced_forward
from lit_prune.models.activation_cache import sharing_activations
from lit_prune.models.hooks import capture_resid_post, valid_positions
from lit_prune.models.registry import load_model
from lit_prune.sae.build import SAESettings, build_training_sae
from lit_prune.sae.io import load_sae

SEQ_LEN = 128
TRAINED_SAE = ROOT / "checkpoints" / "smollm2" / "version_0" / "sae"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="registry name, local dir or hub id")
    p.add_argument("--corpus", default="python-docs")
    p.add_argument("--layer", type=int, default=6, help="hooked block")
    p.add_argument("--saes", type=int, default=3, help="SAEs sharing the hook (seeds 0..saes-1)")
    p.add_argument("--sequences", type=int, default=16, help="eval sequences of 128 tokens for part 1")
    p.add_argument("--batch_size", type=int, default=8, help="sequences per LM forward")
    p.add_argument("--metric_sequences", type=int, default=32, help="eval sequences for the bf16 metrics")
    p.add_argument("--ce_sequences", type=int, default=8, help="of those, sequences with spliced CE / KL")
    p.add_argument(
        "--trained_sae",
        type=Path,
        default=TRAINED_SAE,
        help="SAE for the bf16 metric comparison (random seed-0 SAE if missing)",
    )
    add_common_args(p, "harvest")
    add_device_arg(p)
    return p.parse_args(argv)


@torch.inference_mode()
def naive_features(
    lm: torch.nn.Module, saes: list, batches: list[torch.Tensor], layer: int
) -> list[torch.Tensor]:
    """Per SAE: full forward of every batch, hidden_states[layer + 1][:, 1:], encode -> [n, d_sae]."""
    out = []
    for sae in saes:
        feats = []
        for ids in batches:
            hidden = lm(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[layer + 1]
            feats.append(sae.encode(hidden[:, 1:].reshape(-1, hidden.shape[-1]).float()))
        out.append(torch.cat(feats))
    return out


@torch.inference_mode()
def shared_features(
    lm: torch.nn.Module, saes: list, batches: list[torch.Tensor], layer: int
) -> list[torch.Tensor]:
    """Per SAE: `harvest` (stop after the block; shared across SAEs), encode -> [n, d_sae]."""
    with sharing_activations():
        return [torch.cat([sae.encode(harvest(lm, ids, layer)) for ids in batches]) for sae in saes]


def part_sharing(
    args: argparse.Namespace, lm: torch.nn.Module, batches: list[torch.Tensor], saes: list
) -> dict:
    # warm-up (allocator, kernels), untimed; not of the shared path, so that ours pays its first
    # weights digest (~1 s, remembered afterwards) inside the timing
    naive_features(lm, saes[:1], batches[:1], args.layer)
    start = clock(args.device)
    base = naive_features(lm, saes, batches, args.layer)
    base_s = clock(args.device) - start
    start = clock(args.device)
    ours = shared_features(lm, saes, batches, args.layer)
    ours_s = clock(args.device) - start
    for a, b in zip(ours, base, strict=True):
        torch.testing.assert_close(a, b)  # fp32 tolerances; the hooked output is the same tensor math
    max_diff = max(float((a - b).abs().max()) for a, b in zip(ours, base, strict=True))
    tokens = sum(int(ids[:, 1:].numel()) for ids in batches)
    print(
        f"harvest_features_allclose: True (max abs difference {max_diff:.3g}, "
        f"{len(saes)} SAEs x {tokens} tokens)"
    )
    return compare(
        f"harvest_{len(saes)}_saes",
        ours_s,
        base_s,
        "s",
        tokens=tokens,
        saes=len(saes),
        ours_tokens_per_s=len(saes) * tokens / ours_s,
        baseline_tokens_per_s=len(saes) * tokens / base_s,
        features_allclose=True,
        max_abs_feature_difference=max_diff,
    )


@torch.inference_mode()
def time_harvest(lm: torch.nn.Module, batches: list[torch.Tensor], layer: int, device: str) -> float:
    harvest(lm, batches[0], layer)  # warm-up
    start = clock(device)
    for ids in batches:
        harvest(lm, ids, layer)
    return clock(device) - start


@torch.inference_mode()
def reconstruction_agreement(lm32, lm16, codec, batches: list[torch.Tensor], layer: int) -> dict:
    """Token-wise cosine between the fp32 and bf16 paths: activations and SAE reconstructions,
    relative activation error, and the overlap of the active latent sets."""
    cos_x, cos_r, rel, overlap = [], [], [], []
    for ids in batches:
        x32, x16 = harvest(lm32, ids, layer), harvest(lm16, ids, layer)
        (f32, r32), (f16, r16) = codec(x32), codec(x16)
        cos_x.append(torch.nn.functional.cosine_similarity(x32, x16, dim=-1))
        cos_r.append(torch.nn.functional.cosine_similarity(r32, r16, dim=-1))
        rel.append((x16 - x32).norm(dim=-1) / x32.norm(dim=-1))
        a, b = f32 > 0, f16 > 0
        overlap.append((a & b).sum(-1) / (a | b).sum(-1).clamp(min=1))
    cat = {
        k: torch.cat(v).double()
        for k, v in {
            "activation_cosine": cos_x,
            "reconstruction_cosine": cos_r,
            "activation_relative_error": rel,
            "active_set_jaccard": overlap,
        }.items()
    }
    out = {}
    for k, v in cat.items():
        out[f"{k}_mean"], out[f"{k}_min" if "error" not in k else f"{k}_max"] = (
            float(v.mean()),
            float(v.min() if "error" not in k else v.max()),
        )
    return out


def part_bf16(args: argparse.Namespace, lm32: torch.nn.Module, eval_ids: torch.Tensor, saes: list) -> dict:
    lm16 = load_model(args.model, dtype="bfloat16", cache_dir=args.model_cache_dir).to(args.device)
    batches = list(eval_ids[: args.sequences].split(args.batch_size))
    tokens = sum(int(ids[:, 1:].numel()) for ids in batches)
    t32, t16 = (time_harvest(lm, batches, args.layer, args.device) for lm in (lm32, lm16))
    speed = compare(
        "harvest_bf16_vs_fp32",
        tokens / t16,
        tokens / t32,
        "tok/s",
        higher_is_better=True,
        fmt=".0f",
        tokens=tokens,
        note="ours = bfloat16 LM forward, baseline = float32; both stop after the block",
    )
    if args.trained_sae.is_dir():
        sae, meta = load_sae(args.trained_sae, device=args.device)
        codec, label = (
            sae_codec(sae),
            str(
                args.trained_sae.relative_to(ROOT)
                if args.trained_sae.is_relative_to(ROOT)
                else args.trained_sae
            ),
        )
        if meta.get("hook_layer", args.layer) != args.layer:
            print(f"warning: {label} was trained at block {meta['hook_layer']}, not {args.layer}")
    else:
        sae, codec, label = saes[0], sae_codec(saes[0]), "random TopK SAE, seed 0 (no trained SAE found)"
    metric_ids = eval_ids[: args.metric_sequences]
    d_sae = sae.cfg.d_sae
    metrics = {}
    with sharing_activations():  # the agreement pass re-reads the activations evaluate_sae harvested
        for name, lm in (("float32", lm32), ("bfloat16", lm16)):
            metrics[name] = evaluate_sae(
                lm, args.layer, codec, metric_ids, d_sae, args.batch_size, args.ce_sequences
            )
        agree = reconstruction_agreement(
            lm32, lm16, codec, list(metric_ids.split(args.batch_size)), args.layer
        )
    diff = {k: metrics["bfloat16"][k] - metrics["float32"][k] for k in metrics["float32"]}
    shown = [k for k in ("fvu", "l0", "cos", "ce_recovered", "kl_score", "delta_lm_loss") if k in diff]
    print(
        f"bf16_metrics ({label}, {metric_ids.shape[0]} x {SEQ_LEN} tokens, "
        f"CE on {args.ce_sequences} sequences): "
        + ", ".join(f"{k} {metrics['float32'][k]:.4f} -> {metrics['bfloat16'][k]:.4f}" for k in shown)
    )
    print("bf16_agreement: " + ", ".join(f"{k} {v:.4f}" for k, v in agree.items()))
    return {
        "speed": speed,
        "sae": label,
        "metric_tokens": int(metric_ids[:, 1:].numel()),
        "metrics": metrics,
        "bf16_minus_fp32": diff,
        "agreement": agree,
    }


@torch.inference_mode()
def spliced_logits(lm: torch.nn.Module, batches: list[torch.Tensor], layer: int, codec, resume: bool) -> list:
    """Per batch: clean, SAE-spliced and zero-ablated logits, with or without resuming after `layer`."""
    out = []
    for ids in batches:
        mask = torch.ones_like(ids)
        valid = valid_positions(mask)
        resid = capture_resid_post(lm, ids, layer, mask) if resume else None
        out.append(
            [
                spliced_forward(lm, ids, mask, layer, valid, replace, resid)
                for replace in (None, lambda x: codec(x.float())[1], torch.zeros_like)
            ]
        )
    return out


def part_resume(args: argparse.Namespace, lm: torch.nn.Module, eval_ids: torch.Tensor, sae) -> dict:
    batches = list(eval_ids[: args.sequences].split(args.batch_size))
    codec = sae_codec(sae)
    run = lambda resume: spliced_logits(lm, batches, args.layer, codec, resume)  # noqa: E731
    base, ours = run(False), run(True)  # also the warm-up
    identical = all(
        torch.equal(a, b) for x, y in zip(ours, base, strict=True) for a, b in zip(x, y, strict=True)
    )
    print(f"spliced_ce_resume_bit_identical: {identical}")
    times = {"baseline": [], "ours": []}
    for _ in range(3):  # interleaved, so that a slow spell of the machine hits both paths alike
        for name, resume in (("baseline", False), ("ours", True)):
            times[name] += timed(lambda resume=resume: run(resume), 1, 0, args.device)
    tokens = sum(int(ids.numel()) for ids in batches)
    return compare(
        "spliced_ce_resume",
        median(times["ours"]),
        median(times["baseline"]),
        "s",
        tokens=tokens,
        forwards_per_batch=3,
        runs=times,
        logits_bit_identical=identical,
        note=f"median of 3 interleaved runs; ours resumes after block {args.layer}",
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    apply_threads(args)
    start = time.perf_counter()
    n_eval = max(args.sequences, args.metric_sequences)
    dm = token_splits(
        args.model,
        args.corpus,
        seq_len=SEQ_LEN,
        train_tokens=SEQ_LEN,
        eval_tokens=n_eval * SEQ_LEN,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
        model_cache_dir=args.model_cache_dir,
    )
    eval_ids = dm.eval_ids[:n_eval].to(args.device)
    lm = load_model(args.model, cache_dir=args.model_cache_dir).to(args.device)
    saes = [
        build_training_sae(SAESettings(), lm.config.hidden_size, seed).eval().to(args.device)
        for seed in range(args.saes)
    ]
    batches = list(eval_ids[: args.sequences].split(args.batch_size))
    result = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "corpus": dm.provenance,
        "sharing": part_sharing(args, lm, batches, saes),
        "bf16": part_bf16(args, lm, eval_ids, saes),
        "resume": part_resume(args, lm, eval_ids, saes[0]),
    }
    write_result(args.output, result, start)
    return 0 if result["resume"]["logits_bit_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())

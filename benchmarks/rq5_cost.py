"""What RQ5's exact ablation costs on the embedded model, to size the study's `study.ablation`.

Harvests block --layer of --sequences eval sequences (128 tokens each), takes the SAE (--sae: a
saved one, e.g. a study's dense/seed0/sae; default: a freshly initialised TopK SAE of --expansion x
576 latents, which fires k latents per token like a trained one but on other tokens), measures the
firing rates, selects the study's top / random / rare groups (`select_features`) at the full size
(--n, default 64 each) and counts the (sequence, feature) pairs where a selected feature fires: one
ablated forward (of the layers after --layer) each, which is what exact ablation costs. Then it times
`ablate_features` on the first --timed features of every group (once per --batch value) and
extrapolates: seconds per ablated pair x the full groups' pairs, plus one clean pass. Gradient
attribution for every feature is timed once.

Run from the repository root:
  python benchmarks/rq5_cost.py --threads 2                      # 64/64/64 on 32 x 128 tokens
  python benchmarks/rq5_cost.py --sequences 64 --batch 8 32      # 8k tokens, two batch sizes
"""

from __future__ import annotations

import argparse
import time

import torch
from common import add_common_args, apply_threads, environment, token_splits, write_json

from lit_prune.analysis.ablation import (
    GROUPS,
    ablate_features,
    firing_rates,
    gradient_attribution,
    sae_parts,
    select_features,
)
from lit_prune.analysis.evaluate import harvest
from lit_prune.models.registry import load_model
from lit_prune.sae.buffer import fit_norm_scale
from lit_prune.sae.build import SAESettings, build_training_sae
from lit_prune.sae.io import load_sae


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> dict[str, float]:
    wall, cpu = _clock()
    return {"wall_s": round(wall - start[0], 2), "cpu_s": round(cpu - start[1], 2)}


def _sae(args: argparse.Namespace, lm: torch.nn.Module, ids: torch.Tensor):
    """(SAEParts, description): the saved SAE, or a fresh TopK SAE on norm-scaled inputs."""
    if args.sae:
        sae, _ = load_sae(args.sae)
        return sae_parts(sae.eval().requires_grad_(False)), f"saved SAE {args.sae}"
    x = harvest(lm, ids[:8], args.layer)
    scale = fit_norm_scale(x)
    sae = build_training_sae(SAESettings(expansion=args.expansion), x.shape[-1], seed=0)
    with torch.no_grad():
        sae.b_dec.copy_((x * scale).mean(0))
    return sae_parts(sae.eval().requires_grad_(False), scale), f"fresh TopK SAE, {args.expansion}x"


def _pairs(
    rate_groups: dict[str, torch.Tensor], fires_in: torch.Tensor, cap: int | None = None
) -> dict[str, int]:
    """(sequence, feature) pairs ablated per group: where its features fire ([n_seq, d_sae] bool),
    at most `cap` sequences per feature (study.ablation.max_sequences)."""
    counts = {g: fires_in[:, f].sum(0) for g, f in rate_groups.items()}
    return {g: int(c.clamp(max=cap).sum() if cap is not None else c.sum()) for g, c in counts.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, "rq5_cost")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--sequences", type=int, default=32, help="eval sequences of 128 tokens")
    p.add_argument("--n", type=int, default=64, help="features per group (top, random, rare)")
    p.add_argument("--timed", type=int, default=8, help="features per group actually ablated and timed")
    p.add_argument("--batch", type=int, nargs="+", default=[8], help="ablate_features batch sizes to time")
    p.add_argument("--expansion", type=int, default=4)
    p.add_argument("--sae", help="a saved SAE directory (default: a fresh TopK SAE)")
    p.add_argument("--caps", type=int, nargs="*", default=[2, 4, 8], help="max_sequences values to count")
    args = p.parse_args()
    apply_threads(args)
    lm = load_model("smollm2-135m", cache_dir=args.model_cache_dir).eval()
    dm = token_splits("smollm2-135m", cache_dir=args.cache_dir, seq_len=128)
    ids = dm.eval_ids[: args.sequences]
    parts, what = _sae(args, lm, ids)
    result: dict = {"sae": what, "sequences": int(ids.shape[0]), "tokens": int(ids.numel()), "n": args.n}
    start = _clock()
    rate = firing_rates(lm, args.layer, ids, parts, 8)
    result["firing_rates"] = _since(start)
    full = select_features(rate, args.n, args.n, args.n)
    with torch.no_grad():  # which sequences each feature fires in (positions >= 1)
        fires_in = torch.stack(
            [(parts.encode(harvest(lm, ids[i : i + 1], args.layer)) > 0).any(0) for i in range(ids.shape[0])]
        )
    result["pairs_full"] = _pairs(full, fires_in)
    result["pairs_capped"] = {str(c): _pairs(full, fires_in, c) for c in args.caps}
    timed = {g: full[g][: args.timed] for g in GROUPS}
    result["pairs_timed"] = _pairs(timed, fires_in)
    features = torch.cat([timed[g] for g in GROUPS])
    n_timed, n_full = sum(result["pairs_timed"].values()), sum(result["pairs_full"].values())
    result["ablation"] = {}
    for batch in args.batch:
        start = _clock()
        ablate_features(lm, args.layer, ids, parts, features, batch_size=batch)
        spent = _since(start)
        per_pair = spent["wall_s"] / max(n_timed, 1)
        spent["extrapolated_full_wall_s"] = round(per_pair * n_full, 1)
        spent["extrapolated_capped_wall_s"] = {
            c: round(per_pair * sum(n.values()), 1) for c, n in result["pairs_capped"].items()
        }
        result["ablation"][f"batch{batch}"] = spent
        print(
            f"batch {batch}: {len(features)} features, {n_timed} ablated (sequence, feature) pairs in "
            f"{spent['wall_s']} s wall ({spent['cpu_s']} s CPU); full {args.n}/{args.n}/{args.n}: {n_full} "
            f"pairs -> about {spent['extrapolated_full_wall_s']} s; with max_sequences "
            + ", ".join(f"{c}: {t} s" for c, t in spent["extrapolated_capped_wall_s"].items())
        )
    start = _clock()
    gradient_attribution(lm, args.layer, ids, parts, 8)
    result["attribution"] = _since(start)
    result["environment"] = environment()
    print(
        f"{what}; {result['tokens']} tokens; firing rates {result['firing_rates']['wall_s']} s; attribution "
        f"{result['attribution']['wall_s']} s; pairs per group (full): {result['pairs_full']}"
    )
    write_json(args.output, result)


if __name__ == "__main__":
    main()

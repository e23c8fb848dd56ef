"""TopK SAE training-step benchmark: lit_prune's sparse step against sae-lens' training_forward_pass.

Each condition times forward + backward + Adam step on both paths, side by side in one process, from
the same initial weights and the same random batches (activations scaled like the real ones:
E||x||^2 = d_in). Conditions: widths 4608 and 16384 at d_in 576, k 32, batch 4096, with no dead latents
and with ~10% dead (the auxiliary loss path).

Run from the repository root:  python benchmarks/sae_step.py [--steps 3] [--threads 2]
Prints `sae_step_<width>[_dead]: ours X tok/s, baseline Y tok/s, ratio Z` and writes
benchmarks/results/sae_step.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import RESULTS, add_device_arg, clock, write_result
from sae_lens.saes.sae import TrainStepInput

from lit_prune.sae.build import SAESettings, build_training_sae
from lit_prune.sae.fast import fast_topk_training_forward


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d_in", type=int, default=576, help="activation width (SmolLM2-135M: 576)")
    p.add_argument("--widths", type=int, nargs="+", default=[4608, 16384], help="SAE widths d_sae")
    p.add_argument("--k", type=int, default=32, help="active latents per token")
    p.add_argument("--batch", type=int, default=4096, help="tokens per step")
    p.add_argument(
        "--dead_fraction", type=float, default=0.1, help="share of latents marked dead in *_dead runs"
    )
    p.add_argument(
        "--steps", type=int, default=3, help="timed steps per path and condition (after 1 warm-up)"
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    add_device_arg(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=RESULTS / "sae_step.json")
    return p.parse_args(argv)


def batches(args: argparse.Namespace, count: int) -> list[torch.Tensor]:
    """Random activations [batch, d_in] with a shared offset, rescaled so that E||x||^2 = d_in."""
    gen = torch.Generator().manual_seed(args.seed)
    offset = torch.randn(args.d_in, generator=gen)
    out = []
    for _ in range(count):
        x = torch.randn(args.batch, args.d_in, generator=gen) + offset
        out.append((x * (args.d_in / x.pow(2).sum(-1).mean()).sqrt()).to(args.device))
    return out


def time_path(
    sae: torch.nn.Module, step: Callable[[torch.Tensor], torch.Tensor], xs: list[torch.Tensor], device: str
) -> list[float]:
    """Seconds per optimizer step (forward + backward + Adam) for xs[1:]; xs[0] warms up."""
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4)
    times = []
    for i, x in enumerate(xs):
        start = clock(device)
        opt.zero_grad()
        step(x).backward()
        opt.step()
        seconds = clock(device) - start
        if i:
            times.append(seconds)
    return times


def run_condition(args: argparse.Namespace, width: int, dead_fraction: float) -> dict:
    sae = build_training_sae(SAESettings(d_sae=width, k=args.k), args.d_in, seed=args.seed).to(args.device)
    gen = torch.Generator().manual_seed(args.seed + 1)
    dead = torch.zeros(width, dtype=torch.bool)
    dead[torch.randperm(width, generator=gen)[: round(dead_fraction * width)]] = True
    dead = dead.to(args.device)
    xs = batches(args, args.steps + 1)
    baseline_sae = copy.deepcopy(sae)

    def ours(x: torch.Tensor) -> torch.Tensor:
        return fast_topk_training_forward(sae, x, dead).loss

    def baseline(x: torch.Tensor) -> torch.Tensor:
        return baseline_sae.training_forward_pass(
            TrainStepInput(
                sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
            )
        ).loss

    ours_s = time_path(sae, ours, xs, args.device)
    base_s = time_path(baseline_sae, baseline, xs, args.device)
    ours_tps, base_tps = args.batch / statistics.median(ours_s), args.batch / statistics.median(base_s)
    max_diff = max(
        float((getattr(sae, n) - getattr(baseline_sae, n)).detach().abs().max()) for n in ("W_enc", "W_dec")
    )
    return {
        "width": width,
        "dead_fraction": dead_fraction,
        "dead": int(dead.sum()),
        "ours_seconds": ours_s,
        "baseline_seconds": base_s,
        "ours_tokens_per_s": ours_tps,
        "baseline_tokens_per_s": base_tps,
        "ratio": ours_tps / base_tps,
        "max_abs_weight_difference_after_steps": max_diff,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for width in args.widths:
        for dead_fraction in (0.0, args.dead_fraction):
            row = run_condition(args, width, dead_fraction)
            row["name"] = f"sae_step_{width}" + ("_dead" if dead_fraction else "")
            rows.append(row)
            print(
                f"{row['name']}: ours {row['ours_tokens_per_s']:.0f} tok/s, baseline "
                f"{row['baseline_tokens_per_s']:.0f} tok/s, ratio {row['ratio']:.2f}",
                flush=True,
            )
    result = {
        "d_in": args.d_in,
        "k": args.k,
        "batch": args.batch,
        "steps": args.steps,
        "device": args.device,
        "results": rows,
    }
    write_result(args.output, result, start)


if __name__ == "__main__":
    main()

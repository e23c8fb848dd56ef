"""Two small fast paths of the study's inner loops, each against its simple form in the same run.

1. Spliced-CE math: `next_token_ce` / `next_token_kl` (positions in chunks of 128, so the
   [positions, vocab] temporaries stay cache-sized) against the one-pass formulas over the whole
   [batch, seq, vocab] logits (cross_entropy on the transposed logits; two log_softmax), on the
   shape of one spliced-CE batch of the default study: 8 x 128 positions x SmolLM2's 49,152-token
   vocabulary. The values must agree (max abs difference printed).
2. Activation buffer: `ActivationBuffer` (preallocated; a pop fills its holes from the tail)
   against a buffer that copies every remaining row on each pop (randperm, then index the rest),
   on the default study's pattern: batches of 32 x 127 rows added, SAE batches of 1,024 popped
   while 8,192 are held, d_model 576. Every row must come out exactly once in both.
Both parts run on --device (default cuda when torch sees a GPU, else cpu).

Run from the repository root:  python benchmarks/study_parts.py   (about 30 s)
Prints `name: ours X s, baseline Y s, ratio Z` lines; writes benchmarks/results/study_parts.json.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import add_common_args, add_device_arg, apply_threads, compare, median, timed, write_result

from lit_prune.analysis.metrics import next_token_ce, next_token_kl
from lit_prune.sae.buffer import ActivationBuffer


def one_pass_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")


def one_pass_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    logp, logq = F.log_softmax(p[:, :-1].float(), dim=-1), F.log_softmax(q[:, :-1].float(), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


class CopyingBuffer:
    """The simple buffer: concatenate on add, and on pop keep the rest by indexing (a full copy)."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity, self.rows = capacity, None
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return 0 if self.rows is None else self.rows.shape[0]

    def add(self, acts: torch.Tensor) -> None:
        self.rows = acts if self.rows is None else torch.cat([self.rows, acts])

    def full(self) -> bool:
        return len(self) >= self.capacity

    def pop(self, batch_size: int) -> torch.Tensor:
        order = torch.randperm(len(self), generator=self.generator)
        batch, self.rows = self.rows[order[:batch_size]], self.rows[order[batch_size:]]
        return batch


def drain(buffer, batches: list[torch.Tensor], sae_batch: int) -> torch.Tensor:
    """The training loop's use of a buffer; returns the first column of every popped row."""
    seen = []
    for acts in batches:
        buffer.add(acts)
        while buffer.full():
            seen.append(buffer.pop(sae_batch)[:, 0])
    while len(buffer):
        seen.append(buffer.pop(sae_batch)[:, 0])
    return torch.cat(seen)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(p, "study_parts")
    add_device_arg(p)
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each path (medians compared)")
    args = p.parse_args()
    apply_threads(args)
    start, rows = time.perf_counter(), []

    g = torch.Generator().manual_seed(0)
    batch, seq, vocab = 8, 128, 49152
    p_logits = torch.randn(batch, seq, vocab, generator=g) * 3
    q_logits = (p_logits + torch.randn(batch, seq, vocab, generator=g)).to(args.device)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(args.device)
    p_logits, dev = p_logits.to(args.device), args.device
    ce_diff = (next_token_ce(p_logits, ids) - one_pass_ce(p_logits, ids)).abs().max().item()
    kl_diff = (next_token_kl(p_logits, q_logits) - one_pass_kl(p_logits, q_logits)).abs().max().item()
    rows.append(
        compare(
            "spliced_ce_8x128x49152",
            median(timed(lambda: next_token_ce(p_logits, ids), args.repeats, 1, dev)),
            median(timed(lambda: one_pass_ce(p_logits, ids), args.repeats, 1, dev)),
            max_abs_difference=ce_diff,
            device=dev,
        )
    )
    rows.append(
        compare(
            "spliced_kl_8x128x49152",
            median(timed(lambda: next_token_kl(p_logits, q_logits), args.repeats, 1, dev)),
            median(timed(lambda: one_pass_kl(p_logits, q_logits), args.repeats, 1, dev)),
            max_abs_difference=kl_diff,
            device=dev,
        )
    )
    print(f"spliced_ce_kl_max_abs_difference: ce {ce_diff:.2e}, kl {kl_diff:.2e}")

    sae_batch, capacity, d_model = 1024, 8192, 576
    batches = [
        torch.cat(
            [
                torch.arange(i * 4064, (i + 1) * 4064).float().unsqueeze(1),
                torch.randn(4064, d_model - 1, generator=g),
            ],
            1,
        ).to(dev)
        for i in range(32)
    ]
    everything = torch.arange(32 * 4064).float()
    ours = drain(ActivationBuffer(capacity, 0), batches, sae_batch).cpu()
    base = drain(CopyingBuffer(capacity, 0), batches, sae_batch).cpu()
    once = bool(torch.equal(ours.sort().values, everything) and torch.equal(base.sort().values, everything))
    buffer_runs = {
        name: timed(lambda kind=kind: drain(kind(capacity, 0), batches, sae_batch), args.repeats, 0, dev)
        for name, kind in (("ours", ActivationBuffer), ("baseline", CopyingBuffer))
    }
    rows.append(
        compare(
            "activation_buffer_130k_rows",
            median(buffer_runs["ours"]),
            median(buffer_runs["baseline"]),
            every_row_once=once,
            device=dev,
        )
    )
    print(f"activation_buffer_every_row_once: {once}")
    write_result(args.output, {"rows": rows}, start)
    if not once or ce_diff > 1e-3 or kl_diff > 1e-3:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

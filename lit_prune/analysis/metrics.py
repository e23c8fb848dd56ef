"""SAE quality metrics (docs/methods.md §3), streamed over the eval split in fp32.

Reconstruction: L0, MSE, cosine, L2 ratio ||x_hat|| / ||x||, FVU = sum||x - x_hat||^2 / sum||x - mean(x)||^2,
firing rates (dead / dense fractions). Spliced CE: the model is re-run with
x_hat (or zeros) in place of x at positions >= 1 of the hooked block;
CE recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean),
KL(p_clean || p_sae) per token and KL score = 1 - KL_sae / KL_zero.
States are torchmetrics sums, so values sync across DDP processes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from lit_prune.models.hooks import resume_after, splice_resid_post

Reconstruct = Callable[[torch.Tensor], torch.Tensor]
_Num = TypeVar("_Num", float, torch.Tensor)  # the metrics below take floats or 0-dim tensors alike


def fvu(sse: torch.Tensor, sum_sq: torch.Tensor, sum_x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained from streamed sums (sum_x: [d_model])."""
    total_variance = sum_sq - (sum_x * sum_x).sum() / n
    return _ratio(sse, total_variance)


def _ratio(num: _Num, den: _Num) -> _Num:
    """num / den for floats or tensors; NaN ("undefined", never +-inf) where den is 0."""
    if isinstance(den, torch.Tensor):
        return torch.where(den != 0, num / den, torch.full_like(den, float("nan")))
    return num / den if den != 0 else float("nan")


def ce_recovered(ce_clean: _Num, ce_sae: _Num, ce_zero: _Num) -> _Num:
    """NaN when zero-ablating the hook costs nothing (CE_zero = CE_clean): nothing to recover."""
    return _ratio(ce_zero - ce_sae, ce_zero - ce_clean)


def kl_score(kl_sae: _Num, kl_zero: _Num) -> _Num:
    """NaN when the zero-ablated model's KL is 0."""
    return 1.0 - _ratio(kl_sae, kl_zero)


class ReconstructionMetrics(Metric):
    """L0, MSE, cosine, FVU and per-latent firing counts over tokens x: [n, d_model]."""

    full_state_update = False
    n: torch.Tensor  # the states add_state registers (annotations for type checkers)
    sse: torch.Tensor
    sum_sq: torch.Tensor
    l0: torch.Tensor
    cos: torch.Tensor
    l2_ratio: torch.Tensor
    sum_x: torch.Tensor
    fires: torch.Tensor
    max_act: torch.Tensor

    def __init__(self, d_model: int, d_sae: int) -> None:
        super().__init__()
        for name in ("n", "sse", "sum_sq", "l0", "cos", "l2_ratio"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_x", torch.zeros(d_model, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("fires", torch.zeros(d_sae, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("max_act", torch.zeros(d_sae, dtype=torch.float64), dist_reduce_fx="max")

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, feats: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        active = feats > 0  # comparison and max are exact in feats' own dtype: no [n, d_sae] float64 copy
        self.n += x.shape[0]
        self.sse += ((x - x_hat) ** 2).sum()
        self.sum_sq += (x * x).sum()
        self.sum_x += x.sum(0)
        self.l0 += active.sum()
        self.cos += F.cosine_similarity(x, x_hat, dim=-1).sum()
        self.l2_ratio += (x_hat.norm(dim=-1) / x.norm(dim=-1)).sum()  # SAEBench's l2_ratio
        self.fires += active.sum(0)
        self.max_act = torch.maximum(self.max_act, feats.amax(0).double())

    def compute(self) -> dict[str, torch.Tensor]:
        rate = self.fires / self.n
        return {
            "fvu": fvu(self.sse, self.sum_sq, self.sum_x, self.n),
            "mse": self.sse / (self.n * self.sum_x.numel()),
            "cos": self.cos / self.n,
            "l2_ratio": self.l2_ratio / self.n,
            "l0": self.l0 / self.n,
            "dead_fraction": (rate == 0).double().mean(),
            "dense_fraction": (rate > 0.1).double().mean(),
            "tokens": self.n.clone(),
        }

    def firing_rates(self) -> torch.Tensor:
        """p_i = fraction of tokens on which latent i fires: [d_sae] (synced across processes)."""
        return self.fires / self.n


# Positions per chunk in the CE / KL below: the [positions, vocab] temporaries stay cache-sized,
# ~3x faster than one pass over [8, 128, 49152] logits on 2 CPU cores (benchmarks/study_parts.py);
# tests/test_metrics.py checks them against the one-pass formulas.
_POSITIONS_PER_CHUNK = 128


def _position_chunks(*tensors: torch.Tensor):
    """Aligned chunks of [batch, positions, ...] tensors, batch by batch."""
    for b in range(tensors[0].shape[0]):
        yield from zip(*(t[b].split(_POSITIONS_PER_CHUNK) for t in tensors), strict=False)


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """CE of predicting ids[:, t+1] from position t: [batch, seq - 1], fp32."""
    out = []
    for pred, target in _position_chunks(logits[:, :-1], ids[:, 1:]):
        pred = pred.float()
        out.append(torch.logsumexp(pred, -1) - pred.gather(-1, target[:, None]).squeeze(-1))
    return torch.cat(out).view(logits.shape[0], -1)


def next_token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position t < seq - 1: [batch, seq - 1], fp32."""
    out = []
    for p, q in _position_chunks(logits_p[:, :-1], logits_q[:, :-1]):
        logp, logq = F.log_softmax(p.float(), dim=-1), F.log_softmax(q.float(), dim=-1)
        out.append((logp.exp() * (logp - logq)).sum(-1))
    return torch.cat(out).view(logits_p.shape[0], -1)


def loss_positions(valid: torch.Tensor) -> torch.Tensor:
    """Predictions that count: made at a valid position t >= 1 for a real token t+1: [batch, seq - 1]."""
    return valid[:, :-1] & valid[:, 1:]


@torch.no_grad()
def spliced_forward(
    model: nn.Module,
    ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layer: int,
    valid: torch.Tensor,
    replace: Reconstruct | None,
    resid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits with `replace(x[valid])` ([n, d_model] -> [n, d_model]) spliced in at block `layer`.

    `replace=None` gives the clean logits. With `resid`, block `layer`'s resid_post for these ids
    (`capture_resid_post`), the blocks up to `layer` are not run again: the same logits, cheaper.
    """
    if resid is None:
        if replace is None:
            return model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits
        with splice_resid_post(model, layer, lambda x: _splice(x, valid, replace)):
            return model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits
    with resume_after(model, layer, resid if replace is None else _splice(resid, valid, replace)):
        return model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits


def _splice(x: torch.Tensor, valid: torch.Tensor, replace: Reconstruct) -> torch.Tensor:
    x_new = x.clone()  # position 0 and padding keep their clean values
    x_new[valid] = replace(x[valid]).to(x.dtype)
    return x_new


class SplicedCEMetrics(Metric):
    """Token sums of CE (clean / SAE / zero-ablated) and KL(clean || SAE), KL(clean || zero)."""

    full_state_update = False
    _NAMES = ("n", "ce_clean", "ce_sae", "ce_zero", "kl_sae", "kl_zero")
    n: torch.Tensor  # the states add_state registers (annotations for type checkers)
    ce_clean: torch.Tensor
    ce_sae: torch.Tensor
    ce_zero: torch.Tensor
    kl_sae: torch.Tensor
    kl_zero: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        for name in self._NAMES:
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        clean: torch.Tensor,
        sae: torch.Tensor,
        zero: torch.Tensor,
    ) -> None:
        """Logits [batch, seq, vocab] of the three runs; positions from `loss_positions`."""
        take = lambda t: t[positions].double().sum()  # noqa: E731
        self.n += positions.sum()
        self.ce_clean += take(next_token_ce(clean, ids))
        self.ce_sae += take(next_token_ce(sae, ids))
        self.ce_zero += take(next_token_ce(zero, ids))
        self.kl_sae += take(next_token_kl(clean, sae))
        self.kl_zero += take(next_token_kl(clean, zero))

    def compute(self) -> dict[str, torch.Tensor]:
        mean = {name: getattr(self, name) / self.n for name in self._NAMES[1:]}
        return {
            **mean,
            "ce_recovered": ce_recovered(mean["ce_clean"], mean["ce_sae"], mean["ce_zero"]),
            "delta_lm_loss": mean["ce_sae"] - mean["ce_clean"],
            "kl_score": kl_score(mean["kl_sae"], mean["kl_zero"]),
            "ce_tokens": self.n.clone(),
        }

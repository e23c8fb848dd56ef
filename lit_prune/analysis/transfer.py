"""SAE transferability (RQ3, docs/methods.md §4) and the paired dense / pruned passes RQ2 needs.

- `transfer_metrics`: every SAE metric of one SAE on one LM over fixed eval tokens, plus the
  per-latent firing rates, computed locally (no DDP sync: callers run it on one rank).
- Viability: an SAE is viable on M(m, s) iff CE recovered >= 0.9 x its dense value and
  FVU <= 2 x its dense FVU; `largest_viable_sparsity` reads a method's verdicts.
- `wanda_prune_sae`: the SAE-side baseline of arXiv 2507.15977 (prune the dense SAE itself).
- `paired_features`: one reference SAE on the dense and on the current LM over the same
  tokens, streamed into a `PearsonAccumulator` (functional survival) with firing rates.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import torch
from torch import nn
from torchmetrics import Metric

from lit_prune.analysis.evaluate import Codec, SAEEvaluator, harvest
from lit_prune.analysis.survival import PearsonAccumulator
from lit_prune.errors import invalid
from lit_prune.pruning.masks import check_sparsity
from lit_prune.pruning.wanda import wanda_mask

if TYPE_CHECKING:  # annotations only: importing sae_lens costs seconds
    from sae_lens.saes.sae import SAE
    from transformers import PreTrainedModel


def l0_ratio(l0: float, l0_dense: float) -> float:
    """L0 on M(m, s) over L0 on M(0) (1.0 = same sparsity of codes); NaN if the dense L0 is 0."""
    return float(l0) / float(l0_dense) if l0_dense else float("nan")


def is_viable(
    metrics: dict[str, float],
    dense_metrics: dict[str, float],
    ce_factor: float = 0.9,
    fvu_factor: float = 2.0,
) -> bool:
    """CE recovered >= ce_factor x dense CE recovered and FVU <= fvu_factor x dense FVU.

    Both dicts need "ce_recovered" and "fvu" (as `evaluate_sae` returns them). A NaN anywhere
    makes the SAE not viable: an unmeasured condition is never counted as a success.
    """
    values = [metrics["ce_recovered"], metrics["fvu"], dense_metrics["ce_recovered"], dense_metrics["fvu"]]
    if any(math.isnan(float(v)) for v in values):
        return False
    return (
        metrics["ce_recovered"] >= ce_factor * dense_metrics["ce_recovered"]
        and metrics["fvu"] <= fvu_factor * dense_metrics["fvu"]
    )


def largest_viable_sparsity(per_sparsity: dict[float, bool]) -> float | None:
    """Largest s such that the SAE is viable at every measured s' <= s ("viable up to s").

    A non-viable level stops the scan even if a higher one happens to be viable again, so a
    noisy recovery never extends the range. None if no level is given or the lowest fails.
    """
    best = None
    for s in sorted(per_sparsity):
        if not per_sparsity[s]:
            break
        best = float(s)
    return best


_M = TypeVar("_M", bound=nn.Module)


def _local(evaluator: _M) -> _M:
    """Turn off torchmetrics' DDP sync: these evaluations run on one rank only, and a sync
    there would wait forever for the other ranks."""
    for metric in evaluator.modules():
        if isinstance(metric, Metric):
            metric.sync_on_compute = False
            metric._to_sync = False  # the flag compute() actually reads, copied at init
    return evaluator


@torch.no_grad()
def transfer_metrics(
    lm: PreTrainedModel,
    layer: int,
    codec: Codec,
    eval_ids: torch.Tensor,
    d_sae: int,
    batch_size: int = 32,
    ce_sequences: int = 128,
) -> tuple[dict[str, float], torch.Tensor]:
    """`evaluate_sae` plus firing rates: (metrics dict, p [d_sae] float64) over eval_ids [n, seq].

    Spliced CE / KL use the first `ce_sequences` rows, reconstruction metrics every row; CE
    recovered and KL score are against this `lm`'s own clean and zero-ablated CE. Adds
    alive_fraction = 1 - dead_fraction.
    """
    device = next(lm.parameters()).device
    evaluator = _local(SAEEvaluator(lm.config.hidden_size, d_sae)).to(device)
    for start in range(0, eval_ids.shape[0], batch_size):
        evaluator.update(
            lm, layer, eval_ids[start : start + batch_size].to(device), codec, ce_sequences - start
        )
    metrics = evaluator.compute()
    metrics["alive_fraction"] = 1.0 - metrics["dead_fraction"]
    return metrics, evaluator.recon.firing_rates().cpu()


@torch.no_grad()
def sae_input_sq_norm(sae: SAE[Any], x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Mean square of what W_enc reads, per input dim: [d_in], from raw activations x: [n, d_in].

    The encoder input is `sae.process_sae_in(x * scale)`: x - b_dec when apply_b_dec_to_input,
    after any run-time normalisation. Means of squares rank like Wanda's ||X_j||_2.
    """
    return sae.process_sae_in(x.float() * scale).double().pow(2).mean(0).float()


@torch.no_grad()
def sae_feature_sq_norm(sae: SAE[Any], x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Mean square of what W_dec reads (the feature activations), per latent: [d_sae]."""
    return sae.encode(x.float() * scale).double().pow(2).mean(0).float()


@torch.no_grad()
def wanda_prune_sae(
    sae: SAE[Any], input_sq_norm: torch.Tensor, sparsity: float, feature_sq_norm: torch.Tensor | None = None
) -> SAE[Any]:
    """A Wanda-pruned copy of an sae-lens SAE (the baseline of arXiv 2507.15977); `sae` is untouched.

    Encoder (always): W_enc [d_in, d_sae] acts as a Linear with weight W_enc^T [d_sae, d_in]
    on the SAE's encoder inputs, so per feature (row of W_enc^T) the floor(d_in * s) inputs
    with the lowest |W_enc^T_ij| * ||x_j|| are zeroed; input_sq_norm [d_in] is the mean (or
    sum) of squares of those inputs (`sae_input_sq_norm`). Per-feature rescalings of the
    pre-activation (TopK's decoder-norm rescale) scale a whole row and leave the mask unchanged.
    Decoder: dense by default, because its rows are the feature directions that RQ2 matches
    and that write back into the residual stream. With `feature_sq_norm` [d_sae] it is pruned
    the same way as a Linear with weight W_dec^T [d_in, d_sae] on the feature activations
    (floor(d_sae * s) per output dimension; `sae_feature_sq_norm`). Biases and thresholds stay as they are.
    """
    sparsity = check_sparsity(sparsity, "sae_prune_level")
    pruned = copy.deepcopy(sae)
    if sparsity == 0:
        return pruned
    keep_enc = wanda_mask(pruned.W_enc.T, input_sq_norm.to(pruned.W_enc.device), sparsity)  # [d_sae, d_in]
    pruned.W_enc.mul_(keep_enc.T.to(pruned.W_enc.dtype))
    if feature_sq_norm is not None:
        if tuple(feature_sq_norm.shape) != (pruned.W_dec.shape[0],):
            raise invalid(
                "feature_sq_norm.shape", tuple(feature_sq_norm.shape), f"({pruned.W_dec.shape[0]},) = d_sae"
            )
        keep_dec = wanda_mask(
            pruned.W_dec.T, feature_sq_norm.to(pruned.W_dec.device), sparsity
        )  # [d_in, d_sae]
        pruned.W_dec.mul_(keep_dec.T.to(pruned.W_dec.dtype))
    return pruned


class PairedPass(NamedTuple):
    acc: PearsonAccumulator
    """Per-feature Pearson of f on the dense (a) vs the current (b) LM, token by token."""
    rate_dense: torch.Tensor
    """[d_sae] float64 firing rate on the dense LM."""
    rate_current: torch.Tensor
    """[d_sae] float64 firing rate on the current LM."""
    tokens: int


@torch.no_grad()
def paired_features(
    dense_lm: nn.Module,
    lm: nn.Module,
    layer: int,
    encode: Callable[[torch.Tensor], torch.Tensor],
    eval_ids: torch.Tensor,
    batch_size: int = 32,
) -> PairedPass:
    """Run one SAE (`encode`: raw [n, d_model] -> [n, d_sae]) on both LMs over eval_ids [n, seq].

    Both LMs see the same batches, so row t of the two feature streams is the same token
    (positions >= 1). Only blocks up to `layer` run.
    """
    acc = PearsonAccumulator()
    fired_b = None
    for start in range(0, eval_ids.shape[0], batch_size):
        ids = eval_ids[start : start + batch_size]
        f_a = encode(harvest(dense_lm, ids.to(next(dense_lm.parameters()).device), layer))
        f_b = encode(harvest(lm, ids.to(next(lm.parameters()).device), layer).to(f_a.device))
        acc.update(f_a, f_b)
        fired = (f_b > 0).sum(0)
        fired_b = fired if fired_b is None else fired_b + fired
    if acc.n == 0:
        raise invalid("eval_ids", tuple(eval_ids.shape), "at least one sequence of at least 2 tokens")
    assert acc.fired_a is not None and fired_b is not None  # set by the first batch
    return PairedPass(acc, acc.fired_a.cpu().double() / acc.n, fired_b.cpu().double() / acc.n, acc.n)

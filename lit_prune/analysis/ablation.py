"""RQ5 causal relevance of SAE features: exact ablation with the error term kept, gradient attribution.

Definitions (docs/methods.md §4, RQ5). `f(x)`: SAE features of the raw activation x; `dec`: the SAE decoder
in raw space (input scale and any decoder-norm rescaling included).
- Ablating feature i keeps the SAE error term: at every valid position s (>= 1, not padding) where
  f_i(x_s) > 0, x'_s = x_s - (dec(f) - dec(f with f_i = 0)) = x_s - f_i(x_s) W_dec,i; every other
  position is left bit-for-bit untouched. All firing positions of a sequence are ablated at once.
- Counted predictions: the prediction made at position t (of token t+1) is a *loss position* if
  `loss_positions` keeps it. n_i = number of loss positions t with f_i(x_t) > 0.
- scope "firing" (docs/methods.md's "mean over tokens where i fires"): I_i = (1/n_i) sum over firing loss
  positions t of CE'_t - CE_t. CE'_t includes the effect of ablating earlier firing positions.
- scope "all": I_i = (1/n_i) sum over ALL loss positions t of CE'_t - CE_t: the total downstream CE
  increase per firing token, later non-firing positions included (positions before the first firing
  one are causally unaffected and count as exactly 0).
- KL likewise, with KL(p_clean || p_ablated) per position. n_i = 0 gives exactly 0.
- Attribution: A_i = (1/n_i) sum over valid firing positions s of -f_i(x_s) d_i . dL/dx_s, with
  d_i = dec(e_i) - dec(0) and L = sum of CE over the loss positions. Ablation adds -f_i d_i at each
  firing s, so to first order A_i = the scope "all" CE effect; positive means ablating raises the loss.
  KL has no first-order term (it is minimal at the clean run): attribution estimates CE only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from lit_prune.analysis.metrics import loss_positions, next_token_ce, next_token_kl
from lit_prune.analysis.stats import benjamini_hochberg, mann_whitney, spearman
from lit_prune.errors import invalid
from lit_prune.models.hooks import capture_resid_post, resume_after, splice_resid_post, valid_positions

if TYPE_CHECKING:  # annotations only: importing sae_lens costs seconds
    from sae_lens.saes.sae import SAE

SCOPES = ("firing", "all")
GROUPS = ("top", "random", "rare")


@dataclass(frozen=True)
class SAEParts:
    """An SAE in raw activation space. Calling it gives (features, x_hat) like `evaluate.Codec`."""

    encode: Callable[[Tensor], Tensor]
    """x: [n, d_model] raw -> features [n, d_sae]."""
    decode: Callable[[Tensor], Tensor]
    """features [n, d_sae] -> x_hat: [n, d_model] raw."""

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.encode(x)
        return feats, self.decode(feats)


def sae_parts(sae: SAE[Any], scale: float = 1.0) -> SAEParts:
    """Parts of an sae-lens SAE trained on inputs scaled by `scale` (same maps as `sae_codec`)."""
    dtype = sae.W_dec.dtype
    return SAEParts(lambda x: sae.encode(x.to(dtype) * scale), lambda f: sae.decode(f) / scale)


def feature_delta(parts: SAEParts, feats: Tensor, features: Tensor) -> Tensor:
    """What ablating feature features[r] removes from row r: dec(f) - dec(f with that f_i = 0).

    feats: [r, d_sae]; features: [r] -> [r, d_model], exactly 0 in rows where the feature is 0.
    """
    rows = torch.arange(feats.shape[0], device=feats.device)
    ablated = feats.clone()
    ablated[rows, features] = 0
    delta = parts.decode(feats) - parts.decode(ablated)
    return torch.where((feats[rows, features] > 0)[:, None], delta, torch.zeros_like(delta))


@torch.no_grad()
def _encode(
    lm: nn.Module, layer: int, ids: Tensor, mask: Tensor, parts: SAEParts
) -> tuple[Tensor, Tensor, Tensor]:
    """Features [b, seq, d_sae] (0 at invalid positions), the valid mask [b, seq] and block `layer`'s
    resid_post [b, seq, d_model]."""
    valid = valid_positions(mask)
    x = capture_resid_post(lm, ids, layer, mask)
    encoded = parts.encode(x[valid].float())
    feats = encoded.new_zeros(*ids.shape, encoded.shape[-1])
    feats[valid] = encoded
    return feats, valid, x


def _logits(
    lm: nn.Module,
    ids: Tensor,
    mask: Tensor,
    layer: int,
    delta: Tensor | None = None,
    resid: Tensor | None = None,
) -> Tensor:
    """Logits [b, seq, vocab]; with `delta` ([b, seq, d_model]) block `layer` outputs x - delta.

    With `resid`, block `layer`'s output x for these ids, the forward resumes after that block."""
    if resid is not None:
        with resume_after(lm, layer, resid if delta is None else resid - delta.to(resid.dtype)):
            return lm(input_ids=ids, attention_mask=mask, use_cache=False).logits
    if delta is None:
        return lm(input_ids=ids, attention_mask=mask, use_cache=False).logits
    with splice_resid_post(lm, layer, lambda x: x - delta.to(x.dtype)):
        return lm(input_ids=ids, attention_mask=mask, use_cache=False).logits


def _row_effects(
    ids: Tensor, valid: Tensor, fires: Tensor, clean: Tensor, ablated: Tensor
) -> dict[str, Tensor]:
    """Per-row sums [b] of the CE increase / KL for both scopes, and n firing loss positions [b]."""
    pos = loss_positions(valid)
    firing = fires[:, :-1] & pos
    after = (fires.cumsum(1) > 0)[:, :-1] & pos  # causally downstream of the first ablated position
    ce = (next_token_ce(ablated, ids) - next_token_ce(clean, ids)).double()
    kl = next_token_kl(clean, ablated).double()
    total = lambda v, m: torch.where(m, v, torch.zeros_like(v)).sum(1)  # noqa: E731
    return {
        "ce_firing": total(ce, firing),
        "kl_firing": total(kl, firing),
        "ce_all": total(ce, after),
        "kl_all": total(kl, after),
        "n_tokens": firing.sum(1),
    }


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise invalid("scope", scope, " or ".join(SCOPES))


@torch.no_grad()
def ablated_logits(
    lm: nn.Module,
    layer: int,
    ids: Tensor,
    parts: SAEParts,
    feature: int,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Logits [b, seq, vocab] with feature `feature` ablated (error term kept) at block `layer`."""
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    feats, valid, _ = _encode(lm, layer, ids, mask, parts)
    index = torch.full(ids.shape, feature, dtype=torch.long, device=ids.device)
    delta = feature_delta(parts, feats.flatten(0, 1), index.flatten()).view(*ids.shape, -1)
    return _logits(lm, ids, mask, layer, torch.where(valid[..., None], delta, torch.zeros_like(delta)))


@torch.no_grad()
def ablate_feature_effect(
    lm: nn.Module,
    layer: int,
    ids: Tensor,
    parts: SAEParts,
    feature: int,
    scope: str = "firing",
    attention_mask: Tensor | None = None,
) -> dict[str, float]:
    """Exact effect of ablating one feature on ids: [b, seq] -> {"ce", "kl", "n_tokens"} (module doc).

    The reference one-at-a-time path: only sequences where the feature fires are re-run.
    """
    _check_scope(scope)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    feats, valid, _ = _encode(lm, layer, ids, mask, parts)
    fires = (feats[..., feature] > 0) & valid
    rows = fires.any(1)
    if not rows.any():
        return {"ce": 0.0, "kl": 0.0, "n_tokens": 0}
    ids, mask = ids[rows], mask[rows]
    clean = _logits(lm, ids, mask, layer)
    ablated = ablated_logits(lm, layer, ids, parts, feature, mask)
    sums = {k: v.sum() for k, v in _row_effects(ids, valid[rows], fires[rows], clean, ablated).items()}
    n = int(sums["n_tokens"])
    return {
        "ce": float(sums[f"ce_{scope}"]) / max(n, 1),
        "kl": float(sums[f"kl_{scope}"]) / max(n, 1),
        "n_tokens": n,
    }


@torch.no_grad()
def ablate_features(
    lm: nn.Module,
    layer: int,
    ids: Tensor,
    parts: SAEParts,
    features: Tensor,
    batch_size: int = 8,
    attention_mask: Tensor | None = None,
    max_sequences: int | None = None,
) -> dict[str, Tensor]:
    """Exact effects of ablating each of `features` [m], both scopes, batched over (sequence, feature).

    Each forward runs up to `batch_size` copies of sequences, each copy with a different feature
    ablated; only (sequence, feature) pairs where the feature fires are run. max_sequences: each
    feature is ablated in at most this many sequences (the first ones, in the order of ids, where it
    fires): one ablated forward costs the same for a feature that fires once as for one that fires
    on every token, so a cap bounds the cost of the frequent features, which have hundreds of firing
    tokens in a few sequences, without touching the rare ones. None: every sequence.
    Returns ce_firing, kl_firing, ce_all, kl_all (float64 [m], nats per firing token), n_tokens [m]
    and n_sequences [m] (sequences ablated).
    """
    mask_all = torch.ones_like(ids) if attention_mask is None else attention_mask
    features = features.to(ids.device).long()
    keys = ("ce_firing", "kl_firing", "ce_all", "kl_all", "n_tokens")
    sums = {k: torch.zeros(len(features), dtype=torch.float64, device=ids.device) for k in keys}
    taken = torch.zeros(len(features), dtype=torch.long, device=ids.device)  # sequences ablated so far
    for start in range(0, ids.shape[0], batch_size):
        chunk, mask = ids[start : start + batch_size], mask_all[start : start + batch_size]
        feats, valid, x = _encode(lm, layer, chunk, mask, parts)
        fires = (feats[..., features] > 0) & valid[..., None]  # [c, seq, m]
        clean = _logits(lm, chunk, mask, layer, resid=x)  # every forward resumes after block `layer`
        pairs = fires.any(1).nonzero()  # [(row, feature slot)], by row
        if max_sequences is not None:
            pairs = _first_per_feature(pairs, taken, max_sequences)
        taken += torch.bincount(pairs[:, 1], minlength=len(features))
        for p in range(0, pairs.shape[0], batch_size):
            row, slot = pairs[p : p + batch_size].unbind(1)
            seq = chunk.shape[1]
            delta = feature_delta(parts, feats[row].flatten(0, 1), features[slot].repeat_interleave(seq))
            delta = torch.where(valid[row][..., None], delta.view(len(row), seq, -1), 0.0)
            ablated = _logits(lm, chunk[row], mask[row], layer, delta, resid=x[row])
            effects = _row_effects(chunk[row], valid[row], fires[row, :, slot], clean[row], ablated)
            for k in keys:
                sums[k].index_add_(0, slot, effects[k].double())
    n = sums["n_tokens"].clamp(min=1)
    out = {k: sums[k] / n for k in keys[:-1]}
    out["n_tokens"] = sums["n_tokens"].long()
    out["n_sequences"] = taken
    return out


def _first_per_feature(pairs: Tensor, taken: Tensor, cap: int) -> Tensor:
    """The (row, slot) pairs, in row order, that keep each slot's sequence count (taken) <= cap."""
    slots = pairs[:, 1]
    order = torch.argsort(slots, stable=True)  # rows stay in order within a slot
    sorted_slots = slots[order]
    first = torch.searchsorted(sorted_slots, sorted_slots, right=False)
    rank = torch.empty_like(slots)
    rank[order] = torch.arange(len(slots), device=slots.device) - first  # 0 for a slot's first row here
    return pairs[rank + taken[slots] < cap]


@torch.no_grad()
def firing_rates(lm: nn.Module, layer: int, ids: Tensor, parts: SAEParts, batch_size: int = 8) -> Tensor:
    """p_i = fraction of valid positions (>= 1) of ids: [b, seq] where f_i > 0: [d_sae] float64."""
    fires, n = None, 0
    for start in range(0, ids.shape[0], batch_size):
        chunk = ids[start : start + batch_size]
        feats, valid, _ = _encode(lm, layer, chunk, torch.ones_like(chunk), parts)
        count = (feats[valid] > 0).sum(0).double()
        fires = count if fires is None else fires + count
        n += int(valid.sum())
    assert fires is not None, "ids has no rows"
    return fires / max(n, 1)


def select_features(
    firing_rate: Tensor, n_top: int = 64, n_random: int = 64, n_rare: int = 64, seed: int = 0
) -> dict[str, Tensor]:
    """Disjoint groups of alive features (rate > 0) from firing_rate: [d_sae].

    top: highest rates (descending); rare: lowest nonzero rates (ascending), among features not in
    top; random: a seeded uniform draw among the remaining alive features (sorted). Ties break by
    feature index. Groups shrink when fewer alive features are left. Dead features never appear.
    """
    rate = firing_rate.detach().cpu().double()
    alive = torch.nonzero(rate > 0).flatten()
    by_rate = alive[torch.sort(rate[alive], stable=True).indices]  # ascending, ties by index
    desc = alive[torch.sort(-rate[alive], stable=True).indices]
    top = desc[:n_top]
    left = by_rate[~torch.isin(by_rate, top)]
    rare = left[:n_rare]
    pool = left[n_rare:]
    draw = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n_random]
    return {"top": top, "random": pool[draw].sort().values, "rare": rare}


def decoder_directions(parts: SAEParts, d_sae: int, like: Tensor, chunk: int = 1024) -> Tensor:
    """d_i = dec(e_i) - dec(0) for every feature: [d_sae, d_model] (raw space, exact for linear decoders)."""
    zero = parts.decode(like.new_zeros(1, d_sae))
    # one chunk of the identity at a time: a whole [d_sae, d_sae] eye is 1 GiB at 16,384 latents
    basis = lambda s: nn.functional.one_hot(  # noqa: E731
        torch.arange(s, min(s + chunk, d_sae), device=like.device), d_sae
    )
    rows = [parts.decode(basis(s).to(like.dtype)) - zero for s in range(0, d_sae, chunk)]
    return torch.cat(rows)


def gradient_attribution(
    lm: nn.Module,
    layer: int,
    ids: Tensor,
    parts: SAEParts,
    batch_size: int = 8,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """A_i (module doc) for every feature from one backward pass per batch of ids: [b, seq] -> [d_sae].

    Only the block-`layer` activation requires grad; the LM stays frozen. Never-firing features give 0.
    """
    mask_all = torch.ones_like(ids) if attention_mask is None else attention_mask
    sums = counts = directions = None
    with torch.inference_mode(False), torch.enable_grad():  # callers may sit in Lightning's inference mode
        for start in range(0, ids.shape[0], batch_size):
            chunk, mask = (
                ids[start : start + batch_size].clone(),
                mask_all[start : start + batch_size].clone(),
            )
            grad, x, valid = _activation_grad(lm, layer, chunk, mask)
            with torch.no_grad():
                feats = parts.encode(x[valid].float())
                if directions is None:
                    directions = decoder_directions(parts, feats.shape[1], feats)
                    sums = torch.zeros(feats.shape[1], dtype=torch.float64, device=feats.device)
                    counts = torch.zeros_like(sums)
                assert sums is not None and counts is not None  # set with directions
                proj = grad[valid].to(feats.dtype) @ directions.T  # [n, d_sae]: d_i . dL/dx
                sums -= (feats * proj).sum(0).double()
                counted = torch.cat([loss_positions(valid), valid.new_zeros(len(chunk), 1)], 1)[valid]
                counts += ((feats > 0) & counted[:, None]).sum(0).double()
    assert sums is not None and counts is not None, "ids has no rows"
    return sums / counts.clamp(min=1)


def _activation_grad(lm: nn.Module, layer: int, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dx [b, seq, d_model], x [b, seq, d_model], valid [b, seq]); L = summed CE at loss positions."""
    leaf: list[Tensor] = []

    def capture(x: Tensor) -> Tensor:
        leaf.append(x.detach().requires_grad_(True))
        return leaf[0]

    with splice_resid_post(lm, layer, capture):
        logits = lm(input_ids=ids, attention_mask=mask, use_cache=False).logits
    valid = valid_positions(mask)
    loss = next_token_ce(logits, ids)[loss_positions(valid)].sum()
    (grad,) = torch.autograd.grad(loss, leaf[0])
    return grad, leaf[0].detach(), valid


def feature_importance(
    lm: nn.Module,
    layer: int,
    ids: Tensor,
    parts: SAEParts,
    n_top: int = 64,
    n_random: int = 64,
    n_rare: int = 64,
    seed: int = 0,
    batch_size: int = 8,
    max_sequences: int | None = None,
) -> dict[str, Tensor]:
    """RQ5 per-feature arrays on ids [n, seq]: firing rates, the top / random / rare groups, their
    exact ablation effects (exact_<kind>_<scope>; at most max_sequences sequences per feature, see
    `ablate_features`) and the gradient attribution of every feature."""
    rate = firing_rates(lm, layer, ids, parts, batch_size)
    groups = select_features(rate, n_top, n_random, n_rare, seed)
    features = torch.cat([groups[g] for g in GROUPS])
    group = torch.cat([torch.full((len(groups[g]),), i) for i, g in enumerate(GROUPS)])
    exact = ablate_features(lm, layer, ids, parts, features, batch_size, max_sequences=max_sequences)
    attribution = gradient_attribution(lm, layer, ids, parts, batch_size)
    return {
        "features": features,
        "group": group,
        "firing_rate": rate.cpu(),
        "attribution": attribution.cpu(),
        "eval_tokens": torch.tensor(int(ids[:, 1:].numel())),
        **{f"exact_{k}": v.cpu() for k, v in exact.items()},
    }


def importance_vs_survival(importance, cosine, survived_mask) -> dict[str, float]:
    """Does geometric survival predict importance? importance, cosine, survived_mask: [n].

    Spearman(I, c) and a two-sided Mann-Whitney test of I between survived and lost features.
    """
    imp = np.asarray(importance.detach().cpu() if hasattr(importance, "detach") else importance, dtype=float)
    kept = np.asarray(
        survived_mask.detach().cpu() if hasattr(survived_mask, "detach") else survived_mask, dtype=bool
    )
    rho, rho_p = spearman(imp, cosine)
    u, u_p = mann_whitney(imp[kept], imp[~kept])
    mean = lambda v: float(np.nanmean(v)) if v.size else float("nan")  # noqa: E731
    return {
        "spearman_rho": rho,
        "spearman_p": rho_p,
        "mannwhitney_u": u,
        "mannwhitney_p": u_p,
        "n": int(imp.size),
        "n_survived": int(kept.sum()),
        "n_lost": int((~kept).sum()),
        "importance_survived_mean": mean(imp[kept]),
        "importance_lost_mean": mean(imp[~kept]),
    }


def bh_correct(results: list[dict[str, float]]) -> list[dict[str, float]]:
    """Adds spearman_p_bh and mannwhitney_p_bh: Benjamini-Hochberg across the conditions' results."""
    adjusted = {
        f"{k}_bh": benjamini_hochberg([r[k] for r in results]) for k in ("spearman_p", "mannwhitney_p")
    }
    return [{**r, **{k: float(v[i]) for k, v in adjusted.items()}} for i, r in enumerate(results)]

"""Seed stability (RQ1) and feature survival under pruning (RQ2), docs/methods.md §4.

Geometric survival matches decoder rows (see `matching`); functional survival
correlates one SAE's activations on the dense and the pruned model over the same tokens.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from lit_prune.analysis.matching import MatchResult, match_features, shared_fraction
from lit_prune.errors import invalid

TAUS = (0.5, 0.7, 0.9)


def _mean_cosine(cosine: torch.Tensor, alive: torch.Tensor | None) -> float:
    c = cosine if alive is None else cosine[alive]
    c = c[~torch.isnan(c)]
    return float(c.double().mean()) if c.numel() else float("nan")


def _b_side_cosine(m: MatchResult, n_b: int) -> torch.Tensor:
    """Matched cosine seen from the b side: [n_b], NaN where no a-row chose it."""
    out = torch.full((n_b,), float("nan"))
    ok = m.partner >= 0
    out[m.partner[ok]] = m.cosine[ok]
    return out


def seed_stability(
    decoders: list[torch.Tensor],
    taus: tuple[float, ...] = TAUS,
    alive: list[torch.Tensor] | None = None,
    stability_tau: float = 0.7,
    method: str = "auto",
    candidates: int = 8,
) -> dict:
    """RQ1: how reproducible are SAE features across training seeds?

    decoders: one [n_i, d] decoder per seed. alive: optional bool [n_i] per SAE; the
    shared fractions and mean cosine of pair (i, j) are over the alive features of i.
    Returns {"pairs": [{"i", "j", "shared": {tau: S}, "mmcs_ij", "mmcs_ji",
    "mean_cosine"}, ...] for i < j, "stability": [[n_i] float32 per SAE]} where
    stability = fraction of the pairs containing that SAE in which the feature is
    shared at `stability_tau` (NaN / unmatched counts as not shared).
    """
    if len(decoders) < 2:
        raise invalid("len(decoders)", len(decoders), "at least 2 SAEs (seeds)")
    if alive is not None and len(alive) != len(decoders):
        raise invalid("len(alive)", len(alive), f"{len(decoders)} masks, one per decoder")
    masks = [None] * len(decoders)
    if alive is not None:
        masks = [torch.as_tensor(m, dtype=torch.bool) for m in alive]
    hits = [torch.zeros(d.shape[0]) for d in decoders]
    pairs = []
    for i in range(len(decoders)):
        for j in range(i + 1, len(decoders)):
            m = match_features(decoders[i], decoders[j], method, candidates)
            assert m.best_a is not None and m.best_b is not None  # match_features fills both
            pairs.append(
                {
                    "i": i,
                    "j": j,
                    "shared": shared_fraction(m.cosine, taus, masks[i]),
                    "mmcs_ij": float(m.best_a.mean()),
                    "mmcs_ji": float(m.best_b.mean()),
                    "mean_cosine": _mean_cosine(m.cosine, masks[i]),
                }
            )
            hits[i] += (m.cosine.double() >= stability_tau).float()  # exact, as shared_fraction
            hits[j] += (_b_side_cosine(m, decoders[j].shape[0]).double() >= stability_tau).float()
    n_pairs = len(decoders) - 1  # every SAE takes part in one pair with each other SAE
    return {"pairs": pairs, "stability": [h / n_pairs for h in hits]}


def geometric_survival(
    dec_dense: torch.Tensor,
    dec_pruned: torch.Tensor,
    alive_dense: torch.Tensor | None,
    taus: tuple[float, ...] = TAUS,
    method: str = "auto",
    candidates: int = 8,
) -> dict:
    """RQ2(a): match the dense-model SAE [n, d] to the pruned-model SAE [n', d].

    Returns {"S": {tau: fraction of alive dense features with c_i >= tau},
    "cosine": [n] matched cosine (NaN = unmatched), "partner": [n] int64,
    "mean_cosine" (alive), "mmcs_dense_to_pruned", "mmcs_pruned_to_dense"}.
    """
    alive = None if alive_dense is None else torch.as_tensor(alive_dense, dtype=torch.bool)
    m = match_features(dec_dense, dec_pruned, method, candidates)
    assert m.best_a is not None and m.best_b is not None  # match_features fills both
    return {
        "S": shared_fraction(m.cosine, taus, alive),
        "cosine": m.cosine,
        "partner": m.partner,
        "mean_cosine": _mean_cosine(m.cosine, alive),
        "mmcs_dense_to_pruned": float(m.best_a.mean()),
        "mmcs_pruned_to_dense": float(m.best_b.mean()),
    }


def normalised_survival(S: float, S_seed: float) -> float:
    """S~ = S / S_seed (survival relative to the cross-seed noise ceiling); NaN if
    the ceiling is 0 or NaN."""
    if not S_seed or math.isnan(S_seed):
        return float("nan")
    return float(S) / float(S_seed)


class PearsonAccumulator:
    """Per-feature Pearson r between two activation streams, one chunk of tokens at a time.

    Keeps count, means, centred sums of squares and co-moment in float64 and merges
    chunks with Chan et al.'s pairwise update, which avoids the cancellation of the
    naive sum-of-squares formula when a feature's mean is large against its spread.
    The state stays on the device of the chunks (copying [tokens, d_sae] chunks to the
    host would cost a GPU far more than the sums); compute() returns a CPU tensor.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean_a: torch.Tensor | None = None  # [n_features] running means, M2 sums and co-moment
        self.mean_b: torch.Tensor | None = None
        self.m2_a: torch.Tensor | None = None
        self.m2_b: torch.Tensor | None = None
        self.c_ab: torch.Tensor | None = None
        self.fired_a: torch.Tensor | None = None  # [n_features] tokens with f_a > 0
        self.max_a: torch.Tensor | None = None  # [n_features] largest f_a

    def update(self, f_a: torch.Tensor, f_b: torch.Tensor) -> None:
        """Add one chunk: f_a, f_b [tokens, n_features] for the same tokens."""
        f_a = torch.as_tensor(f_a).detach().to(torch.float64)
        f_b = torch.as_tensor(f_b).detach().to(f_a.device, torch.float64)
        if f_a.shape != f_b.shape or f_a.ndim != 2:
            raise invalid(
                "chunk shapes", (tuple(f_a.shape), tuple(f_b.shape)), "two equal [tokens, n_features] shapes"
            )
        nb = f_a.shape[0]
        if nb == 0:
            return
        mean_a, mean_b = f_a.mean(0), f_b.mean(0)
        da, db = f_a - mean_a, f_b - mean_b
        m2_a, m2_b, c_ab = (da * da).sum(0), (db * db).sum(0), (da * db).sum(0)
        fired, max_a = (f_a > 0).sum(0), f_a.amax(0)
        if self.n == 0:
            self.mean_a, self.mean_b = mean_a, mean_b
            self.m2_a, self.m2_b, self.c_ab = m2_a, m2_b, c_ab
            self.fired_a, self.max_a, self.n = fired, max_a, nb
            return
        assert self.mean_a is not None and self.mean_b is not None and self.fired_a is not None
        assert self.m2_a is not None and self.m2_b is not None and self.c_ab is not None  # set with n
        assert self.max_a is not None
        if mean_a.shape != self.mean_a.shape:
            raise invalid("n_features", mean_a.numel(), f"{self.mean_a.numel()} as before")
        n = self.n + nb
        delta_a, delta_b = mean_a - self.mean_a, mean_b - self.mean_b
        w = self.n * nb / n
        self.m2_a += m2_a + delta_a * delta_a * w
        self.m2_b += m2_b + delta_b * delta_b * w
        self.c_ab += c_ab + delta_a * delta_b * w
        self.mean_a += delta_a * nb / n
        self.mean_b += delta_b * nb / n
        self.fired_a += fired
        self.max_a = torch.maximum(self.max_a, max_a)
        self.n = n

    def compute(self) -> torch.Tensor:
        """r [n_features] float32; NaN where either stream is constant (e.g. never fires)."""
        if self.n == 0:
            raise invalid("PearsonAccumulator", "empty", "at least one update() before compute()")
        assert self.mean_a is not None and self.mean_b is not None and self.c_ab is not None
        assert self.m2_a is not None and self.m2_b is not None  # set with n
        # "constant" up to float64 rounding: spread tiny against the raw second moment
        flat_a = self.m2_a <= 1e-12 * self.n * self.mean_a**2
        flat_b = self.m2_b <= 1e-12 * self.n * self.mean_b**2
        denom = torch.sqrt(self.m2_a * self.m2_b)
        defined = ~(flat_a | flat_b) & (denom > 0)
        r = torch.where(defined, self.c_ab / denom, torch.full_like(denom, float("nan")))
        return r.clamp(-1.0, 1.0).float().cpu()


class FunctionalSurvival(NamedTuple):
    r: torch.Tensor
    """[n] Pearson r of f_i on the dense vs the pruned model (NaN if constant in either)."""
    fraction: float
    """Fraction of features alive in f_dense with r >= threshold (NaN r = lost)."""
    alive: torch.Tensor
    """[n] bool: fired at least once in f_dense."""


def functional_survival(
    f_dense: torch.Tensor, f_pruned: torch.Tensor, threshold: float = 0.7, chunk: int = 65_536
) -> FunctionalSurvival:
    """RQ2(b): the same SAE's activations on M(0) and M(m, s), both [tokens, n]."""
    acc = PearsonAccumulator()
    for s in range(0, f_dense.shape[0], chunk):  # bounded float64 copies
        acc.update(f_dense[s : s + chunk], f_pruned[s : s + chunk])
    return survival_from_accumulator(acc, threshold)


def survival_from_accumulator(acc: PearsonAccumulator, threshold: float = 0.7) -> FunctionalSurvival:
    """Finish a streamed functional-survival measurement."""
    r = acc.compute()
    assert acc.fired_a is not None  # compute() refuses an empty accumulator
    alive = acc.fired_a.cpu() > 0
    frac = float((r[alive].double() >= threshold).double().mean()) if alive.any() else float("nan")
    return FunctionalSurvival(r, frac, alive)


def wanda_magnitude_ratio(S_wanda: dict[float, float], S_magnitude: dict[float, float]) -> dict:
    """ratio(s) = S_wanda(s) / S_magnitude(s) at the sparsities both have.

    Returns {"ratio": {s: r}, "max": float, "argmax": s}. S_magnitude = 0 gives inf
    (NaN if both are 0); NaN ratios are ignored by max/argmax (NaN / None if all are).
    """
    ratio = {}
    for s in sorted(set(S_wanda) & set(S_magnitude)):
        w, m = float(S_wanda[s]), float(S_magnitude[s])
        ratio[s] = w / m if m else (math.inf if w > 0 else math.nan)
    defined = {s: r for s, r in ratio.items() if not np.isnan(r)}
    if not defined:
        return {"ratio": ratio, "max": math.nan, "argmax": None}
    best = max(defined, key=lambda s: defined[s])
    return {"ratio": ratio, "max": defined[best], "argmax": best}


def seed_pairs(seeds_a: list[int], seeds_b: list[int] | None = None) -> tuple[list, list]:
    """Every ordered seed pair (a, b): (cross pairs with a != b, same-seed pairs with a == b).

    seeds_b None: pairs within one set of SAEs (RQ1: the same SAE is never paired with itself, so
    there are no same-seed pairs). Cross pairs are docs/methods.md §4's primary RQ2 measure.
    """
    within = seeds_b is None
    seeds_b = list(seeds_a) if within else list(seeds_b)
    cross = [(a, b) for a in seeds_a for b in seeds_b if a != b]
    same = [] if within else [(a, b) for a in seeds_a for b in seeds_b if a == b]
    return cross, same


def pair_cosines(
    decoders_a: dict[int, torch.Tensor],
    decoders_b: dict[int, torch.Tensor] | None,
    pairs: list[tuple[int, int]],
    method: str = "auto",
    candidates: int = 8,
) -> torch.Tensor:
    """Matched cosine of every feature of SAE a in SAE b, for each pair (a, b) -> [P, n_a] float32.

    decoders_b None: pairs within decoders_a (RQ1); each unordered pair is matched once and (b, a)
    is read from the b side of that one-to-one matching (the same assignment). NaN = unmatched.
    """
    out, done = [], {}
    for a, b in pairs:
        if decoders_b is None and (b, a) in done:
            out.append(_b_side_cosine(done[(b, a)], decoders_a[a].shape[0]))
            continue
        m = match_features(
            decoders_a[a], (decoders_a if decoders_b is None else decoders_b)[b], method, candidates
        )
        done[(a, b)] = m
        out.append(m.cosine.float())
    return torch.stack(out) if out else torch.zeros(0, 0)

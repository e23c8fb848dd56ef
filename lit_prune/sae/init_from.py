"""Start a training SAE from an exported one (the warm start of RQ2c, docs/methods.md §4).

An export (`lit_prune.sae.io.export_sae`) works on raw activations: the input scale c is folded in
(W_enc * c, W_dec / c, b_dec / c) and, for TopK's decoder-norm rescaling, so are the decoder row
norms n_i (W_dec / n, W_enc * n, b_enc * n; the exported rows have unit norm). Unfolding both gives
a training SAE on scaled inputs that computes the same function. The rows' norms are a free
parametrisation of that function; they matter to Adam's effective step size, so the exact training
norms are used when the export records them (lit_prune.json's `decoder_norms`), else unit norms.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, cast

import torch
from sae_lens.saes.sae import TrainingSAE

from lit_prune.errors import LitPruneError, invalid
from lit_prune.sae.io import load_sae

PLAIN_KEYS = {"W_enc", "W_dec", "b_enc", "b_dec"}
"""The parameters a warm start carries over: architectures with more (JumpReLU's threshold) are refused."""


def init_from_export(sae: TrainingSAE, path: str | Path, norm_scale: float | None) -> float:
    """Load the export at `path` into the fresh training SAE `sae` (in place); returns the input scale c.

    c is the export's own (the dense fit's); a different `norm_scale` is a one-line error, as is an
    export whose d_in, width or architecture differ from `sae`'s."""
    source, meta = load_sae(path)
    field = "model.init_from"
    mine = (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.architecture())
    theirs = (source.cfg.d_in, source.cfg.d_sae, source.cfg.architecture())
    if mine != theirs:
        raise invalid(
            field, str(path), f"an SAE with d_in, width and architecture {mine} like this run's, not {theirs}"
        )
    state = source.state_dict()
    if set(state) != PLAIN_KEYS:
        raise invalid(field, str(path), "an SAE with only W_enc, W_dec, b_enc, b_dec (topk or standard)")
    c = meta.get("norm_scale") if meta.get("norm_scale_folded") else None
    if c is None:
        raise invalid(field, str(path), "a lit_prune export (its lit_prune.json records norm_scale)")
    if norm_scale is not None and not math.isclose(norm_scale, c, rel_tol=1e-6):
        raise invalid(
            "model.norm_scale", norm_scale, f"null or the init_from SAE's own {c} (the dense fit's)"
        )
    # m_i: what the export divided row i of W_dec by after the scale fold (its norm n_i / c when rescaled)
    m = _decoder_norms(meta, sae.cfg.d_sae) / c if _rescaled(sae) else torch.ones(sae.cfg.d_sae)
    with torch.no_grad():
        sae.W_dec.copy_(state["W_dec"] * (c * m)[:, None])
        sae.W_enc.copy_(state["W_enc"] / (c * m)[None, :])
        cast(torch.Tensor, sae.b_enc).copy_(state["b_enc"] / m)  # every SAE architecture has b_enc
        sae.b_dec.copy_(state["b_dec"] * c)
    _check_same_function(sae, source, c, str(path))
    return float(c)


def _rescaled(sae: TrainingSAE) -> bool:
    return bool(getattr(sae.cfg, "rescale_acts_by_decoder_norm", False))


def _decoder_norms(meta: dict[str, Any], d_sae: int) -> torch.Tensor:
    norms = meta.get("decoder_norms")
    if norms is None or len(norms) != d_sae:
        return torch.ones(d_sae)
    return torch.tensor(norms, dtype=torch.float32)


@torch.no_grad()
def _check_same_function(sae: TrainingSAE, source: Any, c: float, path: str) -> None:
    """The unfolded training SAE on c x reconstructs c times what the export does on x."""
    gen = torch.Generator().manual_seed(0)
    x = source.b_dec + torch.randn(64, sae.cfg.d_in, generator=gen) / c
    want = source.decode(source.encode(x))
    got = sae.decode(sae.encode(x * c)) / c
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max().clamp_min(1e-12))):
        raise LitPruneError(f"model.init_from={path!r}: its weights do not unfold to the same SAE here")

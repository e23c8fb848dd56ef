"""A sparse TopK SAE training step: sae-lens' loss and gradients without dense [n, d_sae] work after the
encoder.

sae-lens' `TopKTrainingSAE.training_forward_pass` keeps the TopK codes dense: the decoder is a dense
[n, d_sae] x [d_sae, d_in] matmul, and autograd then does two more dense matmuls for the decoder, two
for the encoder (W_enc and, through b_dec, the input) and the same again for the auxiliary loss. Only
k of d_sae entries per token are non-zero, so all of that but the first encoder matmul is wasted.

Here (the idea of EleutherAI/sparsify's fused encoder) the dense pre-activations are computed once
without autograd, only to choose the latents; everything that carries gradients touches just the
chosen (token, latent) pairs:
- the encoder is a custom autograd Function whose forward returns the chosen pre-activations and
  whose backward scatters their gradients into the W_enc columns, b_enc, b_dec and the decoder norms;
- the decoder is a custom autograd Function: sum_j c_ij W_dec[idx_ij] (embedding_bag) forward; a
  sampled dense-dense product (go_i . W_dec[idx_ij]) and per-latent bags for the backward.
The same ops serve the auxiliary loss, whose k_aux = d_in // 2 codes per token live among the dead
latents only; when they fill a large share of those, a dense matmul over just the dead columns is
faster than the sparse kernels, so `_Codes` picks one of two equivalent layouts.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sae_lens.saes.sae import TrainStepOutput
from sae_lens.saes.topk_sae import TopKTrainingSAE

DENSE_THRESHOLD = 0.125
"""Codes per token / candidate latents above which a dense matmul over the candidate columns beats the
sparse kernels (measured on CPU: about equal at 0.18, dense 3x faster at 0.6, sparse 9x faster at 0.002)."""


@dataclass
class StepOutput:
    """What the training loop needs from one SAE step (either path)."""

    loss: torch.Tensor
    """Scalar total loss (the one to call backward on)."""
    losses: dict[str, torch.Tensor]
    """Named parts of the loss (sae-lens' keys, e.g. mse_loss, auxiliary_reconstruction_loss)."""
    sae_out: torch.Tensor
    """Reconstruction: [n, d_in]."""
    fired: torch.Tensor
    """bool [d_sae]: which latents were active (> 0) for at least one token."""
    l0: torch.Tensor
    """0-dim float: mean number of active latents per token."""

    @classmethod
    def from_sae_lens(cls, out: TrainStepOutput) -> StepOutput:
        """Adapt sae-lens' TrainStepOutput (dense feature_acts: [n, d_sae])."""
        active = out.feature_acts > 0
        return cls(out.loss, out.losses, out.sae_out, active.any(0), active.float().sum(-1).mean())


def fast_topk_training_forward(
    sae: TopKTrainingSAE,
    x: torch.Tensor,
    dead_neuron_mask: torch.Tensor | None = None,
    *,
    dense_threshold: float = DENSE_THRESHOLD,
) -> StepOutput:
    """sae-lens' TopK training forward pass, with the same loss and gradients, done sparsely.

    Args:
        sae: the training SAE; its cfg decides rescale_acts_by_decoder_norm, apply_b_dec_to_input,
            k and aux_loss_coefficient exactly as in sae-lens.
        x: activations [n, d_in] (sae-lens' `sae_in`).
        dead_neuron_mask: bool [d_sae]; dead latents get the auxiliary loss (None or all False: none).
        dense_threshold: see DENSE_THRESHOLD (tests force either layout with 0 or inf).

    Returns: StepOutput with loss = mse_loss + auxiliary_reconstruction_loss, sae_out [n, d_in],
    fired bool [d_sae] and l0. Hooks on the SAE's hook points are not run.
    """
    _check_supported(sae)
    cfg = sae.cfg
    sae_in = x.to(sae.dtype)
    norm = sae.W_dec.norm(dim=-1) if cfg.rescale_acts_by_decoder_norm else None  # [d_sae], with autograd
    with torch.no_grad():
        # The only dense work: sae-lens' hidden_pre, op for op (in place), so topk picks the same latents.
        hidden = (sae_in - sae.b_dec * cfg.apply_b_dec_to_input) @ sae.W_enc
        hidden += sae.b_enc
        if norm is not None:
            hidden *= norm
        top = hidden.topk(cfg.k, dim=-1, sorted=False)
        main = _Codes(top.indices, None, sae.cfg.d_sae, dense_threshold)
        main_values = main.arrange(top.values)
        aux = _aux_selection(hidden, dead_neuron_mask, sae_in.shape[-1] // 2, dense_threshold)
        del hidden, top

    hidden_main = _EncodeAt.apply(
        main_values, sae_in, sae.b_dec, sae.W_enc, sae.b_enc, norm, main, bool(cfg.apply_b_dec_to_input)
    )
    acts = hidden_main.relu()  # TopK keeps the k largest, then ReLU (negative top-k values give 0)
    inv_norm = 1 / norm if norm is not None else None
    coef = acts * _at(inv_norm, main.idx) if inv_norm is not None else acts  # sae-lens' act_times_W_dec
    sae_out = _Decode.apply(coef, sae.W_dec, main) + sae.b_dec
    mse_loss = F.mse_loss(sae_out, x, reduction="none").sum(dim=-1).mean()

    if aux is None:
        aux_loss = sae_out.new_zeros(())  # not new_tensor(0.0): a copy from the host that a GPU waits for
    else:
        codes, values, scale = aux
        hidden_aux = _EncodeAt.apply(
            values, sae_in, sae.b_dec, sae.W_enc, sae.b_enc, norm, codes, bool(cfg.apply_b_dec_to_input)
        )
        coef_aux = (
            hidden_aux * _at(inv_norm, codes.idx) if inv_norm is not None else hidden_aux
        )  # no ReLU here
        recons = _Decode.apply(coef_aux, sae.W_dec, codes)  # no b_dec: it is already in the residual
        residual = (x - sae_out).detach()
        aux_loss = cfg.aux_loss_coefficient * scale * (recons - residual).pow(2).sum(dim=-1).mean()

    with torch.no_grad():
        active = acts > 0
        # OR over tokens without boolean indexing, which would wait for the GPU
        fired = torch.zeros(cfg.d_sae, dtype=torch.uint8, device=x.device)
        fired = fired.scatter_reduce_(0, main.idx.flatten(), active.flatten().to(torch.uint8), "amax").bool()
        l0 = active.float().sum(-1).mean()
    losses = {"mse_loss": mse_loss, "auxiliary_reconstruction_loss": aux_loss}
    return StepOutput(mse_loss + aux_loss, losses, sae_out, fired, l0)


def _check_supported(sae: TopKTrainingSAE) -> None:
    if not isinstance(sae, TopKTrainingSAE):
        raise TypeError(f"fast_topk_training_forward needs a TopKTrainingSAE, got {type(sae).__name__}")
    if sae.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
        raise ValueError(
            f"normalize_activations={sae.cfg.normalize_activations!r} is not supported by the fast path"
        )
    if getattr(sae, "hook_z_reshaping_mode", False):
        raise ValueError("hook_z reshaping is not supported by the fast path")


def _aux_selection(
    hidden: torch.Tensor, dead: torch.Tensor | None, k_aux: int, dense_threshold: float
) -> tuple[_Codes, torch.Tensor, float] | None:
    """sae-lens' calculate_topk_aux_acts: the top k_aux dead latents per token (values not ReLU'd).

    hidden: [n, d_sae] pre-activations (no autograd). Returns (codes, values [n, k_aux], loss scale).
    """
    if dead is None:
        return None
    cols = dead.nonzero().squeeze(1)  # ascending, so sorting local ids sorts the latent ids too
    if (num_dead := len(cols)) == 0:
        return None
    scale = min(num_dead / k_aux, 1.0)
    sub = hidden.index_select(1, cols)  # [n, num_dead]; same set as topk over where(dead, h, -inf)
    top = sub.topk(min(k_aux, num_dead), dim=-1, sorted=False)
    codes = _Codes(top.indices, cols, hidden.shape[1], dense_threshold)
    return codes, codes.arrange(top.values), scale


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run the dense-layout products on one thread. With few columns (7 dead latents in a real
    fit) MKL splits their long inner dimension over threads, so their last bits, and from there
    the whole SAE, followed the thread count. They are small: one thread costs little."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _at(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """values[idx] for a 1-D values [d_sae] and idx [n, m], through index_select: its backward
    sums with index_add_, whereas the backward of values[idx] accumulates with CPU atomics in
    thread order (W_dec's gradient then differed in its last bits from run to run)."""
    return values.index_select(0, idx.flatten()).view(idx.shape)


class _Codes:
    """The chosen (token, latent) pairs, m per token, and the three products the step needs on them.

    Two layouts give the same numbers (up to rounding): sparse kernels whose cost scales with n * m,
    or dense matmuls over the candidate columns (cost n * |cols|) when m is a large share of those.

    Attributes:
        idx: [n, m] latent ids, distinct within a row; ascending within a row (CSR order) when sparse.
    """

    def __init__(
        self, local: torch.Tensor, cols: torch.Tensor | None, d_sae: int, dense_threshold: float
    ) -> None:
        """local: [n, m] ids into `cols` ([c] ascending latent ids; None: all d_sae latents)."""
        n, m = local.shape
        self.cols, self.d_sae = cols, d_sae
        self.dense = m > dense_threshold * (len(cols) if cols is not None else d_sae)
        self.perm = None  # sparse: where each (row-sorted) entry came from in `local`
        if not self.dense:  # the CSR mask of sampled_addmm wants ascending columns within a row
            local, self.perm = local.sort(dim=-1)
        self.local = local
        self.idx = cols[local] if cols is not None else local
        if not self.dense:
            # Bags by latent: the pairs of latent j are order[offsets[j] : offsets[j + 1]]. The offsets
            # come from a search in the sorted ids, not bincount, which waits for a GPU to size its output.
            by_latent, self.order = self.idx.flatten().sort(stable=True)
            self.token = self.order // m
            self.offsets = torch.searchsorted(by_latent, torch.arange(d_sae, device=by_latent.device))
            self.crow = torch.arange(0, n * m + 1, m, device=by_latent.device)

    def arrange(self, values: torch.Tensor) -> torch.Tensor:
        """values [n, m] given in the order of `local` at construction -> in the order of idx."""
        return values if self.perm is None else values.gather(1, self.perm)

    def combine(self, coef: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """[n, d]: row i = sum_j coef_ij weight[idx_ij]; coef [n, m], weight [d_sae, d]."""
        if self.dense:
            with _one_thread():
                return self._scatter(coef) @ self._rows(weight)
        return F.embedding_bag(self.idx, weight.contiguous(), mode="sum", per_sample_weights=coef)

    def sample_dots(self, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """[n, m]: grad_i . weight[idx_ij]; grad [n, d], weight [d_sae, d]."""
        if self.dense:
            with _one_thread():
                return (grad @ self._rows(weight).t()).gather(1, self.local)
        n, m = self.idx.shape
        if grad.dtype in (torch.float32, torch.float64):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
                mask = torch.sparse_csr_tensor(
                    self.crow,
                    self.idx.flatten(),
                    grad.new_zeros(n * m),
                    (n, self.d_sae),
                    check_invariants=False,
                )
                return torch.sparse.sampled_addmm(mask, grad, weight.t(), beta=0.0).values().view(n, m)
        out = grad.new_empty(n, m)  # other dtypes: gather rows in chunks (memory stays bounded)
        for start in range(0, n, 256):
            rows = weight[self.idx[start : start + 256]]  # [c, m, d]
            out[start : start + 256] = torch.bmm(rows, grad[start : start + 256, :, None]).squeeze(-1)
        return out

    def weight_grad(self, coef: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[d_sae, d]: row j = sum over pairs (i, j) of coef_ij rows_i; coef [n, m], rows [n, d]."""
        if self.dense:
            with _one_thread():
                part = self._scatter(coef).t() @ rows
            if self.cols is None:
                return part
            return rows.new_zeros(self.d_sae, rows.shape[1]).index_copy_(0, self.cols, part)
        weights = coef.flatten()[self.order]
        return F.embedding_bag(
            self.token, rows.contiguous(), self.offsets, mode="sum", per_sample_weights=weights
        )

    def latent_sum(self, coef: torch.Tensor) -> torch.Tensor:
        """[d_sae]: sum of coef over the pairs of each latent."""
        return coef.new_zeros(self.d_sae).index_add_(0, self.idx.flatten(), coef.flatten())

    def _rows(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if self.cols is None else weight.index_select(0, self.cols)

    def _scatter(self, coef: torch.Tensor) -> torch.Tensor:
        """Dense [n, |cols|] with coef at the chosen pairs, zero elsewhere."""
        width = self.d_sae if self.cols is None else len(self.cols)
        return coef.new_zeros(coef.shape[0], width).scatter_(1, self.local, coef)


class _EncodeAt(torch.autograd.Function):
    """hidden_pre at the chosen pairs: [n, m] (values precomputed without autograd).

    hidden_ij = ((x_i - b_dec * apply) . W_enc[:, j] + b_enc[j]) * norm_j   (norm: optional [d_sae])
    """

    @staticmethod
    def forward(ctx, values, sae_in, b_dec, W_enc, b_enc, norm, codes, apply_b_dec):  # noqa: ANN001, ANN205
        shifted = sae_in - b_dec * apply_b_dec
        ctx.codes, ctx.apply_b_dec = codes, apply_b_dec
        ctx.save_for_backward(values, shifted, W_enc, norm)
        return values.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        values, shifted, W_enc, norm = ctx.saved_tensors
        codes: _Codes = ctx.codes
        grad_pre, grad_norm = grad, None
        if norm is not None:
            norm_at = norm[codes.idx]
            grad_pre = grad * norm_at
            if ctx.needs_input_grad[5]:  # d hidden / d norm_j = pre_ij = hidden_ij / norm_j
                grad_norm = codes.latent_sum(grad * (values / norm_at))
        grad_b_enc = codes.latent_sum(grad_pre)
        grad_W_enc = codes.weight_grad(grad_pre, shifted).t() if ctx.needs_input_grad[3] else None
        grad_in = codes.combine(grad_pre, W_enc.t()) if ctx.needs_input_grad[1] else None
        grad_b_dec = None
        if ctx.needs_input_grad[2] and ctx.apply_b_dec:
            # -sum_i dL/dshifted_i = -sum_ij grad_pre_ij W_enc[:, j] = -W_enc @ grad_b_enc: no [n, d] pass.
            grad_b_dec = -(W_enc @ grad_b_enc)
        return None, grad_in, grad_b_dec, grad_W_enc, grad_b_enc, grad_norm, None, None


class _Decode(torch.autograd.Function):
    """[n, d_in]: row i = sum_j coef_ij W_dec[idx_ij] (no bias)."""

    @staticmethod
    def forward(ctx, coef, W_dec, codes):  # noqa: ANN001, ANN205
        ctx.codes = codes
        ctx.save_for_backward(coef, W_dec)
        return codes.combine(coef, W_dec)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        coef, W_dec = ctx.saved_tensors
        codes: _Codes = ctx.codes
        grad = grad.contiguous()
        grad_coef = codes.sample_dots(grad, W_dec) if ctx.needs_input_grad[0] else None
        grad_W_dec = codes.weight_grad(coef, grad) if ctx.needs_input_grad[1] else None
        return grad_coef, grad_W_dec, None

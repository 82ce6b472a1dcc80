"""Fused output head + cross-entropy: the training loss straight from the last hidden states.

Shape suffixes: see ``Ava/__init__.py``; here N rows (the B·T positions), D hidden, V vocabulary,
Z rows in one chunk.

The plain path computes ``logits = h @ Wᵀ`` for all N rows, casts them to fp32, runs a
log-softmax and keeps the (N, V) result for backward; at N = 2048, V = 8192 that is 64 MiB of
fp32 logits, the same again for their gradient, and (under bf16 autocast) two more casts of
that size. Here the rows are processed Z at a time and, because the loss is the last operation,
the gradients of ``h`` and ``W`` are computed in the same pass (as in Liger-Kernel's fused
linear cross-entropy)::

    z_Z = h_Z @ Wᵀ              # (Z, V), in the compute dtype, then fp32
    loss_Z = lse(z_Z) − (1−ε)·z_Z[y] − ε/V·Σ_v z_Z,v
    g_Z = softmax(z_Z) − (1−ε)·onehot(y) − ε/V   # d loss_Z / d z_Z, 0 on ignored rows
    dh_Z = g_Z @ W ;  dW += g_Zᵀ @ h_Z

Backward then only scales the stored ``dh``, ``dW`` by the incoming gradient (the loss is a
scalar, so that is exact). One fp32 softmax per chunk gives both the gradient and, through
``lse = z_y − log p_y``, the loss. It is faster than the logits path on CPU in fp32 and bf16 and
needs a fraction of its peak memory (``docs/performance.md``, "Attention, norms, rotary and the
fused head").

Not covered: the focal loss (its per-row factor depends on p_true non-linearly; it runs on
materialised logits). ``model.loss.fused_head`` chooses (:func:`use_fused_head`).
"""

from __future__ import annotations

import torch

from ..config import LossConfig
from .language_modeling import IGNORE_INDEX, shifted_targets


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk: a (Z, V) fp32 block of about 64 MiB on CPU (at least 256 rows), 1 GiB on GPU.

    Every chunk also adds its (V, D) share into the weight's gradient, a pass over V·D floats,
    so fewer, larger chunks win until the block leaves memory to spare (the sweep over chunk
    sizes: ``docs/performance.md``, "Attention, norms, rotary and the fused head").
    """
    if device.type == "cpu":
        return max(256, 2**24 // vocab)
    return max(256, 2**28 // vocab)


def _zero_rows(g_ZV: torch.Tensor, valid_Z: torch.Tensor) -> None:
    """Zero the gradient rows of ignored targets, touching only those rows."""
    if g_ZV.device.type == "cpu":
        # Host check and row index: free on CPU. A boolean row mask (``g[~valid] = 0``) runs as a
        # masked fill over the whole (Z, V) block, milliseconds per chunk on CPU.
        ignored_Z = (~valid_Z).nonzero().squeeze(1)
        if ignored_Z.numel():
            g_ZV.index_fill_(0, ignored_Z, 0.0)
    else:  # no host sync on accelerators
        g_ZV.masked_fill_(~valid_Z[:, None], 0.0)


def _log_sum_exp(z_ZV: torch.Tensor, p_ZV: torch.Tensor, p_true_Z: torch.Tensor, z_true_Z: torch.Tensor,
                 host_sync: bool) -> torch.Tensor:
    """Each row's log-sum-exp of the logits, from the softmax already computed: ``z_y − log p_y``.

    Exact in fp32 to ~1e-7 while p_y is a normal float; rows where it underflows (p_y < 1e-30,
    a target the model rules out by ~70 nats) need another source. With ``host_sync`` (CPU, where
    it is free; such rows are rare) those rows' log-sum-exp is taken from their logits. Without
    (accelerators, no host sync) they get ``z_max − log p_max``: the row maximum's probability is
    ``1 / Σ exp(z − z_max) ≥ 1/V`` and never underflows, and a max over the softmax costs no
    fp32 copy of the (Z, V) logits. (Z,) fp32.
    """
    lse_Z = z_true_Z - torch.log(p_true_Z)
    tiny_Z = p_true_Z < 1e-30
    if host_sync:
        rows = tiny_Z.nonzero().squeeze(1)
        if rows.numel():
            lse_Z[rows] = torch.logsumexp(z_ZV[rows].float(), dim=-1)
        return lse_Z
    p_max_Z, arg_max_Z = p_ZV.max(dim=-1)
    z_max_Z = z_ZV.gather(1, arg_max_Z[:, None]).squeeze(1).float()
    return torch.where(tiny_Z, z_max_Z - torch.log(p_max_Z), lse_Z)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Sum over rows of the (smoothed) cross-entropy of ``h @ Wᵀ``; gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, targets_N, label_smoothing, ignore_index, compute_dtype, need):
        N, V = hidden_ND.shape[0], weight_VD.shape[0]
        need_h, need_w = need  # ctx.needs_input_grad is set even under no_grad
        # fp16 has the range for the logits but not for unscaled gradient sums (loss scaling
        # happens after this), so with fp16 the two gradient products run in fp32.
        grad_dtype = torch.float32 if compute_dtype == torch.float16 else compute_dtype
        w_VD = weight_VD.to(compute_dtype)  # one cast per call (a no-op in fp32)
        w_grad_VD = w_VD if grad_dtype == compute_dtype else weight_VD.to(grad_dtype)  # one cast each
        grad_h_ND = torch.empty(hidden_ND.shape, dtype=grad_dtype, device=hidden_ND.device) if need_h else None
        grad_w_VD = torch.zeros(weight_VD.shape, dtype=torch.float32, device=weight_VD.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden_ND.device)
        step = chunk_rows(V, hidden_ND.device)
        for start in range(0, N, step):
            h_ZD = hidden_ND[start:start + step].to(compute_dtype)
            y_Z = targets_N[start:start + step]
            valid_Z = y_Z != ignore_index
            y_safe_Z = torch.where(valid_Z, y_Z, 0)
            z_ZV = h_ZD @ w_VD.t()  # (Z, V) logits in the compute dtype
            z_true_Z = z_ZV.gather(1, y_safe_Z[:, None]).squeeze(1).float()
            # One softmax kernel (fp32) serves the loss and the gradient (log_softmax then exp
            # was two passes more over the block and measured slower than the logits path).
            g_ZV = torch.softmax(z_ZV, dim=-1, dtype=torch.float32)  # (Z, V)
            rows_Z = torch.arange(g_ZV.shape[0], device=g_ZV.device)
            lse_Z = _log_sum_exp(z_ZV, g_ZV, g_ZV[rows_Z, y_safe_Z], z_true_Z, g_ZV.device.type == "cpu")
            # −(1−ε)·log p_y − ε/V·Σ_v log p_v with log p_v = z_v − lse
            loss_Z = lse_Z - (1.0 - label_smoothing) * z_true_Z
            if label_smoothing:
                loss_Z = loss_Z - (label_smoothing / V) * z_ZV.sum(dim=-1, dtype=torch.float32)
            total += torch.where(valid_Z, loss_Z, 0.0).sum()
            if not (need_h or need_w):
                continue
            g_ZV[rows_Z, y_safe_Z] -= 1.0 - label_smoothing
            if label_smoothing:
                g_ZV.sub_(label_smoothing / V)
            _zero_rows(g_ZV, valid_Z)
            g_ZV = g_ZV.to(grad_dtype)
            if need_h:
                torch.mm(g_ZV, w_grad_VD, out=grad_h_ND[start:start + step])
            if need_w:  # fp32 accumulation across chunks (a bf16 product is rounded once per chunk)
                if grad_dtype == torch.float32:
                    grad_w_VD.addmm_(g_ZV.t(), h_ZD.float())
                else:
                    grad_w_VD.add_(g_ZV.t() @ h_ZD)
        ctx.save_for_backward(grad_h_ND, grad_w_VD)
        ctx.dtypes = (hidden_ND.dtype, weight_VD.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h_ND, grad_w_VD = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        grad_h = (grad_h_ND * grad_out).to(h_dtype) if grad_h_ND is not None else None
        grad_w = (grad_w_VD * grad_out).to(w_dtype) if grad_w_VD is not None else None
        return grad_h, grad_w, None, None, None, None, None


def fused_linear_cross_entropy_sum(
    hidden_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    label_smoothing: float = 0.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Σ over valid rows of the cross-entropy of ``hidden @ weightᵀ`` against ``targets``.

    Equal (value and gradients) to ``F.cross_entropy(hidden @ weight.T, targets,
    reduction="sum", label_smoothing=ε, ignore_index=...)`` computed in fp32 from logits made in
    the compute dtype: the autocast dtype of the device when autocast is on (the logits and both
    gradient products run in it, the softmax in fp32), else the weight's dtype.

    Args:
        hidden_ND: (N, D) final hidden states (after the final norm).
        weight_VD: (V, D) output-head weight.
        targets_N: (N,) long, ``ignore_index`` = no loss and no gradient.
        label_smoothing: ε.
        ignore_index: label value to skip.

    Returns:
        fp32 scalar.
    """
    device_type = hidden_ND.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = weight_VD.dtype
    grad_on = torch.is_grad_enabled()
    need = (grad_on and hidden_ND.requires_grad, grad_on and weight_VD.requires_grad)
    with torch.autocast(device_type, enabled=False):
        return _FusedLinearCrossEntropy.apply(hidden_ND, weight_VD, targets_N, float(label_smoothing),
                                              ignore_index, compute_dtype, need)


def use_fused_head(cfg: LossConfig) -> bool:
    """Whether the training loss takes the fused path under ``model.loss`` (``fused_head``).

    ``auto`` fuses unless the objective needs materialised logits (``focal_gamma > 0``) or the
    user asked for the logits-based chunked loss (``chunk_size``); ``on`` is validated against
    those at config time; ``off`` never fuses.
    """
    if cfg.fused_head == "off":
        return False
    return cfg.focal_gamma == 0.0 and cfg.chunk_size is None


def fused_causal_lm_objective(
    hidden_BTD: torch.Tensor,
    weight_VD: torch.Tensor,
    labels_BT: torch.Tensor,
    cfg: LossConfig | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """:func:`~Ava.losses.causal_lm_objective` of ``hidden @ weightᵀ`` without the (B, T, V) logits.

    Args:
        hidden_BTD: (B, T, D) normalised hidden states; position t predicts ``labels[:, t+1]``.
        weight_VD: (V, D) output-head weight.
        labels_BT: (B, T) long aligned with the inputs (shifted here), -100 = ignore.
        cfg: ``model.loss`` (label smoothing); focal loss is not supported here.
        ignore_index: label value to skip.

    Returns:
        fp32 scalar, the mean over valid positions (0 with none).
    """
    cfg = cfg or LossConfig()
    if cfg.focal_gamma:
        raise ValueError("the fused head computes cross-entropy (optionally smoothed), not the focal loss")
    targets_N = shifted_targets(labels_BT, ignore_index).reshape(-1)
    total = fused_linear_cross_entropy_sum(hidden_BTD.reshape(-1, hidden_BTD.shape[-1]), weight_VD, targets_N,
                                           cfg.label_smoothing, ignore_index)
    return total / (targets_N != ignore_index).sum().clamp(min=1)

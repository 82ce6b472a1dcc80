"""Fused output head + cross-entropy: the training loss straight from the last hidden states.

Legend: N rows (B·T positions), D hidden, V vocabulary, C rows per chunk.

The plain path computes ``logits = h @ Wᵀ`` for all N rows, casts them to fp32, runs a
log-softmax and keeps the (N, V) result for backward; at N = 2048, V = 8192 that is 64 MiB of
fp32 logits, the same again for their gradient, and (under bf16 autocast) two more casts of
that size. Here the rows are processed C at a time and, because the loss is the last operation,
the gradients of ``h`` and ``W`` are computed in the same pass (as in Liger-Kernel's fused
linear cross-entropy)::

    z_C = h_C @ Wᵀ              # (C, V), in the compute dtype, then fp32
    loss_C = lse(z_C) − (1−ε)·z_C[y] − ε/V·Σ_v z_C,v
    g_C = softmax(z_C) − (1−ε)·onehot(y) − ε/V   # d loss_C / d z_C, 0 on ignored rows
    dh_C = g_C @ W ;  dW += g_Cᵀ @ h_C

Backward then only scales the stored ``dh``, ``dW`` by the incoming gradient (the loss is a
scalar, so that is exact). One fp32 softmax per chunk gives both the gradient and, through
``lse = z_y − log p_y``, the loss. On the 2-core CPU (``python benchmarks/lm_head.py --repeats
15``, N 2048, D 256, V 8192, fused ÷ logits path, same run) it is 1.17× in fp32 and 1.33× in
bf16 (1.28× at V 32768); the version before, a log-softmax and then an exp over each chunk and a
masked fill of the whole chunk for ignored rows, measured 0.93× / 0.91× in the same setting.
Memory (``--memory``): one step of head + loss adds 158 MiB of peak memory instead of 274 (fp32)
at N 2048, D 256, V 8192, and 305 MiB instead of 2,318 (bf16) at V 65536.

Not covered: the focal loss (its per-row factor depends on p_true non-linearly; it runs on
materialised logits). ``model.loss.fused_head`` chooses (:func:`use_fused_head`).
"""

from __future__ import annotations

import torch

from ..config import LossConfig
from .language_modeling import IGNORE_INDEX, shifted_targets


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk: a (C, V) fp32 block of about 64 MiB on CPU (at least 256 rows), 1 GiB on GPU.

    Every chunk also adds its (V, D) share into the weight's gradient, a pass over V·D floats,
    so fewer, larger chunks win until the block leaves memory to spare. ``python
    benchmarks/lm_head.py --dtypes bf16 --chunk-rows …`` (2 CPU threads, ÷ the logits path): at
    V 8192, 64 / 128 / 256 / 512 / 1024 rows 0.62 / 0.89 / 1.09 / 1.18 / 1.30×, and 1.22× for
    2048 (the default since) against 1.18× for 1024 in another run; at V 32768, 256 rows (the
    earlier 16 MiB rule) 1.11×, 512 (now the default) / 1024 / 2048 rows 1.51 / 1.53 / 1.56×.
    """
    if device.type == "cpu":
        return max(256, 2**24 // vocab)
    return max(256, 2**28 // vocab)


def _zero_rows(g_CV: torch.Tensor, valid_C: torch.Tensor) -> None:
    """Zero the gradient rows of ignored targets, touching only those rows."""
    if g_CV.device.type == "cpu":
        # Host check and row index: free on CPU. A boolean row mask (``g[~valid] = 0``) runs as a
        # masked fill over the whole (C, V) block, ~3 ms per 512 × 8192 chunk on the 2-core box.
        ignored_C = (~valid_C).nonzero().squeeze(1)
        if ignored_C.numel():
            g_CV.index_fill_(0, ignored_C, 0.0)
    else:  # no host sync on accelerators
        g_CV.masked_fill_(~valid_C[:, None], 0.0)


def _log_sum_exp(z_CV: torch.Tensor, p_CV: torch.Tensor, p_true_C: torch.Tensor, z_true_C: torch.Tensor,
                 host_sync: bool) -> torch.Tensor:
    """Each row's log-sum-exp of the logits, from the softmax already computed: ``z_y − log p_y``.

    Exact in fp32 to ~1e-7 while p_y is a normal float; rows where it underflows (p_y < 1e-30,
    a target the model rules out by ~70 nats) need another source. With ``host_sync`` (CPU, where
    it is free; such rows are rare) those rows' log-sum-exp is taken from their logits. Without
    (accelerators, no host sync) they get ``z_max − log p_max``: the row maximum's probability is
    ``1 / Σ exp(z − z_max) ≥ 1/V`` and never underflows, and a max over the softmax costs no
    fp32 copy of the (C, V) logits. (C,) fp32.
    """
    lse_C = z_true_C - torch.log(p_true_C)
    tiny_C = p_true_C < 1e-30
    if host_sync:
        rows = tiny_C.nonzero().squeeze(1)
        if rows.numel():
            lse_C[rows] = torch.logsumexp(z_CV[rows].float(), dim=-1)
        return lse_C
    p_max_C, arg_max_C = p_CV.max(dim=-1)
    z_max_C = z_CV.gather(1, arg_max_C[:, None]).squeeze(1).float()
    return torch.where(tiny_C, z_max_C - torch.log(p_max_C), lse_C)


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
            h_CD = hidden_ND[start:start + step].to(compute_dtype)
            y_C = targets_N[start:start + step]
            valid_C = y_C != ignore_index
            y_safe_C = torch.where(valid_C, y_C, 0)
            z_CV = h_CD @ w_VD.t()  # (C, V) logits in the compute dtype
            z_true_C = z_CV.gather(1, y_safe_C[:, None]).squeeze(1).float()
            # One softmax kernel (fp32) serves the loss and the gradient (log_softmax then exp
            # was two passes more over the block; see the module docstring for the timings).
            g_CV = torch.softmax(z_CV, dim=-1, dtype=torch.float32)  # (C, V)
            rows_C = torch.arange(g_CV.shape[0], device=g_CV.device)
            lse_C = _log_sum_exp(z_CV, g_CV, g_CV[rows_C, y_safe_C], z_true_C, g_CV.device.type == "cpu")
            # −(1−ε)·log p_y − ε/V·Σ_v log p_v with log p_v = z_v − lse
            loss_C = lse_C - (1.0 - label_smoothing) * z_true_C
            if label_smoothing:
                loss_C = loss_C - (label_smoothing / V) * z_CV.sum(dim=-1, dtype=torch.float32)
            total += torch.where(valid_C, loss_C, 0.0).sum()
            if not (need_h or need_w):
                continue
            g_CV[rows_C, y_safe_C] -= 1.0 - label_smoothing
            if label_smoothing:
                g_CV.sub_(label_smoothing / V)
            _zero_rows(g_CV, valid_C)
            g_CV = g_CV.to(grad_dtype)
            if need_h:
                torch.mm(g_CV, w_grad_VD, out=grad_h_ND[start:start + step])
            if need_w:  # fp32 accumulation across chunks (a bf16 product is rounded once per chunk)
                if grad_dtype == torch.float32:
                    grad_w_VD.addmm_(g_CV.t(), h_CD.float())
                else:
                    grad_w_VD.add_(g_CV.t() @ h_CD)
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

"""Decode fast paths: the routed experts of a few tokens, inference only, without a dispatch.

Shapes (legend in ``Ava/__init__.py``): T tokens, D hidden, E experts, K experts per token,
S = T·K token-slots, I expert intermediate width, F = 2I.

For one to a few decoded tokens the grouped kernels still walk every expert's weights and the
dispatcher's sort and gathers cost more than the matmuls, so these paths run each token-slot on
its chosen expert's weights directly and sum the K outputs per token themselves: ``slots`` on CPU
(fewer slots than experts), ``gathered`` on accelerators (at most E/4 slots); the thresholds were
measured (``docs/performance.md``, "Expert kernels and dispatch: the measurements behind the
choices"). Same math as the kernels; the tests compare both with an independent reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..expert_kernels import compute_dtype
from ..routing import RouterOutput

DecodeFn = Callable[[torch.Tensor, RouterOutput, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DecodePath:
    """An inference fast path and the most token-slots it takes.

    Attributes:
        name: ``slots`` or ``gathered``.
        fn: ``fn(x_TD, routing, gate_up_proj_EFD, down_proj_EDI) -> out_TD`` (dispatch, experts
            and combine in one).
        max_slots: the path runs for at most this many token-slots.
    """

    name: str
    fn: DecodeFn
    max_slots: int

    def applies(self, routing: RouterOutput) -> bool:
        """Whether this call takes the path: no autograd, every slot on, few slots."""
        return (not torch.is_grad_enabled() and routing.mask_TK is None
                and routing.indices_TK.numel() <= self.max_slots)


def decode_path_for(device_type: str, num_experts: int) -> DecodePath:
    """The decode fast path of a device: ``slots`` on CPU below E slots, else ``gathered`` up to E/4.

    Args:
        device_type: ``cpu``, ``cuda``, ...
        num_experts: E.

    Returns:
        The :class:`DecodePath`.
    """
    if device_type == "cpu":
        return DecodePath("slots", experts_slots, num_experts - 1)
    return DecodePath("gathered", experts_gathered, num_experts // 4)


def experts_slots(
    x_TD: torch.Tensor,
    routing: RouterOutput,
    gate_up_proj_EFD: torch.Tensor,
    down_proj_EDI: torch.Tensor,
) -> torch.Tensor:
    """One SwiGLU per token-slot, reading the chosen expert's weights in place: (T, D) -> (T, D).

    For one to a few decoded tokens on CPU: every op here is a small matrix-vector product whose
    cost is the dispatch, so the fewest ops win; nothing is copied (the expert index is read on
    the host, a free sync on CPU). Inference only.
    """
    dtype = compute_dtype(x_TD)
    x_TD = x_TD.to(dtype)
    cast = gate_up_proj_EFD.dtype != dtype  # bf16 inference over fp32 weights: cast the chosen only
    gate_weights = routing.weights_TK.tolist()  # fp32 values, exact as Python floats
    rows: list[torch.Tensor] = []
    for t, chosen in enumerate(routing.indices_TK.tolist()):
        x_1D = x_TD[t:t + 1]  # 2-D: F.linear then needs no unsqueeze/squeeze
        y_1D = None
        for e, weight in zip(chosen, gate_weights[t]):
            w_up, w_down = gate_up_proj_EFD[e], down_proj_EDI[e]
            if cast:
                w_up, w_down = w_up.to(dtype), w_down.to(dtype)
            gate_1I, up_1I = F.linear(x_1D, w_up).chunk(2, dim=-1)  # (1, 2I) -> 2 × (1, I), one call
            out_1D = F.linear(F.silu(gate_1I) * up_1I, w_down).float() * weight
            y_1D = out_1D if y_1D is None else y_1D + out_1D  # fp32, summed in top-k order
        rows.append(y_1D)
    return (torch.cat(rows) if len(rows) > 1 else rows[0]).to(dtype)  # (T, D)


def experts_gathered(
    x_TD: torch.Tensor,
    routing: RouterOutput,
    gate_up_proj_EFD: torch.Tensor,
    down_proj_EDI: torch.Tensor,
) -> torch.Tensor:
    """One SwiGLU per token-slot with that slot's expert weights gathered: (T, D) -> (T, D).

    With S = T·K ≤ E/4 (one decoded token) the grouped kernels still walk every expert's
    weights; gathering the S chosen expert matrices reads S/E of the memory instead, without a
    host sync (accelerators; on CPU :func:`experts_slots` is faster). Inference only.
    """
    dtype = compute_dtype(x_TD)
    T, K = routing.indices_TK.shape
    idx_S = routing.indices_TK.reshape(-1)  # (S,)
    x_S1D = x_TD.to(dtype).repeat_interleave(K, dim=0).unsqueeze(1)  # (S, 1, D)
    w1_SFD = gate_up_proj_EFD.index_select(0, idx_S).to(dtype)  # (S, 2I, D)
    h_SF = torch.bmm(x_S1D, w1_SFD.transpose(1, 2)).squeeze(1)  # (S, 2I)
    inter = down_proj_EDI.shape[-1]
    act_S1I = (F.silu(h_SF[:, :inter]) * h_SF[:, inter:]).unsqueeze(1)  # (S, 1, I)
    w2_SDI = down_proj_EDI.index_select(0, idx_S).to(dtype)  # (S, D, I)
    y_SD = torch.bmm(act_S1I, w2_SDI.transpose(1, 2)).squeeze(1)  # (S, D)
    w_S1 = routing.weights_TK.reshape(-1, 1)  # (S, 1) fp32
    return (y_SD.float() * w_S1).view(T, K, -1).sum(dim=1).to(dtype)  # (T, D)

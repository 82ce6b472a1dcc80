"""Routed experts as 3-D parameters, run as ``dispatch → kernel → combine``.

Shapes (legend in ``Ava/__init__.py``): T tokens, D hidden, E experts, R rows of the expert
buffer, I expert intermediate width, F = 2I.

Layout (HF transformers 5.23 Qwen3-MoE): ``gate_up_proj [E, 2I, D]`` (rows ``:I`` are the gate,
``I:`` the up projection) and ``down_proj [E, D, I]``, so expert e computes
``down[e] @ (silu(gate[e] @ x) * (up[e] @ x))``. Every kernel is a function over these same
tensors, so switching kernels never changes a checkpoint.

A call: the token dispatcher (:mod:`~Ava.layers.token_dispatcher`; :class:`LocalDispatcher` in
one process, all-to-all under expert parallelism) gathers the routed token-slots into per-expert
row blocks in the layout the kernel asks for; the kernel (:mod:`~Ava.layers.expert_kernels`,
:mod:`~Ava.layers.kernels`) runs every expert's SwiGLU over its block; the dispatcher combines
each token's K outputs with its gate weights. Slots the router turned off (``routing.mask_TK``:
capacity dropping, expert-choice) are not computed and contribute 0.

``model.moe.backend`` (``loop``, ``grouped``, ``batched`` or ``auto``) is resolved by the kernel
registry (:func:`~Ava.layers.kernels.resolve_kernels`) once per backend, device type and compute
dtype, and cached on the module. All compute runs in the autocast dtype when autocast is on.

Expert parallelism (:func:`~Ava.layers.expert_parallel.shard_experts`): the module keeps only its
rank's ``num_local_experts`` = E/N experts (``gate_up_proj [E/N, 2I, D]``, ``down_proj [E/N, D, I]``,
experts ``ep_rank·E/N ..``), ``num_experts`` stays the global E (the router's), and an
:class:`~Ava.layers.token_dispatcher.AllToAllDispatcher` moves the rows; the kernel registry is
keyed by the local count, as the kernels run over the local experts only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .expert_kernels import ExpertKernel, compute_dtype
from .kernels import BACKEND_CHOICES, KernelChoice, describe_auto, resolve_kernels
from .routing import RouterOutput
from .token_dispatcher import LocalDispatcher, TokenDispatcher

__all__ = ["BACKEND_CHOICES", "Experts", "describe_auto", "resolve_backend", "routed_experts"]


def routed_experts(
    x_TD: torch.Tensor,
    routing: RouterOutput,
    gate_up_proj_EFD: torch.Tensor,
    down_proj_EDI: torch.Tensor,
    kernel: ExpertKernel,
    dispatcher: TokenDispatcher | None = None,
) -> torch.Tensor:
    """``dispatch → kernel → combine``: each token's gate-weighted sum over its K experts.

    Args:
        x_TD: (T, D) hidden states.
        routing: the router's decision.
        gate_up_proj_EFD: (E, 2I, D) expert gate/up weights (this rank's E/N under expert parallelism).
        down_proj_EDI: (E, D, I) expert down weights (likewise).
        kernel: the expert kernel and its buffer layout (:func:`~Ava.layers.kernels.kernel_for`).
        dispatcher: moves the token-slots to the kernel's rows and back; None = local.

    Returns:
        (T, D) in the compute dtype.
    """
    dispatcher = dispatcher if dispatcher is not None else LocalDispatcher()
    x_TD = x_TD.to(compute_dtype(x_TD))
    # (R, D), (E,): the blocks of the experts held here (E/N of them under expert parallelism)
    rows_RD, counts_E, plan = dispatcher.dispatch(x_TD, routing, kernel.layout)
    y_RD = kernel(rows_RD, counts_E, gate_up_proj_EFD, down_proj_EDI)  # (R, D)
    return dispatcher.combine(y_RD, plan)  # (T, D)


def resolve_backend(name: str, x_TD: torch.Tensor | None = None, routing: RouterOutput | None = None) -> str:
    """The kernel that ``name`` runs for this call (for tests and logs; :class:`Experts` caches the
    registry's answer instead of asking per call).

    Args:
        name: ``loop``, ``grouped``, ``batched`` or ``auto``.
        x_TD: the call's tokens (device and compute dtype), if known; else CPU fp32.
        routing: the call's routing (E and the load), if known; without it, the kernel of a
            skewed load.

    Returns:
        ``loop``, ``grouped`` or ``batched``.
    """
    device_type = x_TD.device.type if x_TD is not None else "cpu"
    dtype = compute_dtype(x_TD) if x_TD is not None else torch.float32
    num_experts = routing.tokens_per_expert_E.numel() if routing is not None else 1
    choice = resolve_kernels(name, device_type, dtype, num_experts)
    return choice.select(routing).name if routing is not None else choice.kernel.name


class Experts(nn.Module):
    """E SwiGLU experts stored as two 3-D parameters (HF 5.23 layout).

    Args:
        num_experts: E.
        hidden_size: D.
        intermediate_size: I, each expert's width.
        backend: ``loop``, ``grouped``, ``batched`` or ``auto``; may be reassigned at any time.
        dispatcher: the token dispatcher; None = :class:`LocalDispatcher`.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, backend: str = "grouped",
                 dispatcher: TokenDispatcher | None = None) -> None:
        super().__init__()
        if backend not in BACKEND_CHOICES:
            raise ValueError(f"unknown experts backend {backend!r}; use one of {sorted(BACKEND_CHOICES)}")
        self.num_experts = num_experts
        # Expert parallelism (set by ``expert_parallel.shard_experts``): this rank holds experts
        # [ep_rank·E/ep_size, (ep_rank+1)·E/ep_size); one process holds them all.
        self.ep_rank = 0
        self.ep_size = 1
        self.num_local_experts = num_experts
        self.intermediate_size = intermediate_size
        self.backend = backend
        self.dispatcher = dispatcher if dispatcher is not None else LocalDispatcher()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        # Kaiming-uniform-like defaults, as nn.Linear would give; the model re-initialises.
        nn.init.uniform_(self.gate_up_proj, -1 / math.sqrt(hidden_size), 1 / math.sqrt(hidden_size))
        nn.init.uniform_(self.down_proj, -1 / math.sqrt(intermediate_size), 1 / math.sqrt(intermediate_size))
        # The registry's answer per (backend, device type, compute dtype): resolved on first use.
        self._kernels: dict[tuple[str, str, torch.dtype], KernelChoice] = {}

    def kernels(self, device_type: str, dtype: torch.dtype) -> KernelChoice:
        """The registry's :class:`KernelChoice` for the current backend on this device and dtype (cached).

        Args:
            device_type: ``cpu``, ``cuda``, ...
            dtype: the compute dtype.

        Returns:
            The cached :class:`KernelChoice`.
        """
        key = (self.backend, device_type, dtype)
        choice = self._kernels.get(key)
        if choice is None:
            # The kernels run over the experts held here: E, or E/N under expert parallelism.
            choice = self._kernels[key] = resolve_kernels(self.backend, device_type, dtype, self.num_local_experts)
        return choice

    # Data-dependent shapes and host reads: torch.compile of a layer runs this eager (graph break).
    @torch.compiler.disable
    def forward(self, x_TD: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        """Run the routed experts.

        Args:
            x_TD: (T, D) hidden states.
            routing: the router's decision over the same T tokens.

        Returns:
            (T, D) each token's gate-weighted sum over its K experts, in the compute dtype.
        """
        choice = self.kernels(x_TD.device.type, compute_dtype(x_TD))
        # The decode paths read the chosen experts' weights in place: only when every expert is local.
        local = isinstance(self.dispatcher, LocalDispatcher)
        if local and choice.decode is not None and choice.decode.applies(routing):
            return choice.decode.fn(x_TD, routing, self.gate_up_proj, self.down_proj)
        return routed_experts(x_TD, routing, self.gate_up_proj, self.down_proj, choice.select(routing),
                              self.dispatcher)

    def extra_repr(self) -> str:
        local = (f", local_experts={self.num_local_experts} (ep rank {self.ep_rank} of {self.ep_size})"
                 if self.ep_size > 1 else "")
        return (
            f"experts={self.num_experts}{local}, intermediate={self.intermediate_size}, "
            f"backend={self.backend!r}, dispatcher={self.dispatcher!r}"
        )

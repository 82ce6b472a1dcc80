"""Quantized weights: the quantize/dequantize functions and the modules that hold them.

Schemes (all weight-only; activations stay in the compute dtype):

- ``int8``: symmetric, one fp32 scale per output channel (row of the last two dims):
  ``w ≈ q · scale``, ``q ∈ [-127, 127]``, ``scale = amax(|w_row|) / 127``; error ≤ scale/2.
- ``int4``: asymmetric, group-wise along the input dim (``group_size`` 32, 64 or 128), in the
  form torch's CPU int4 kernel (``torch._weight_int4pack_mm_for_cpu``) consumes:
  ``w ≈ (q - 8) · scale + zero``, ``q ∈ [0, 15]``, ``scale = (max - min) / 15``,
  ``zero = min + 8 · scale`` (scale and zero stored in bf16); error ≤ scale/2.
- ``fp8``: ``float8_e4m3fn`` values with one fp32 scale per output channel:
  ``w ≈ q · scale``, ``scale = amax(|w_row|) / 448``; relative error ≤ 2⁻⁴ for normal values,
  absolute error ≤ 2⁻¹⁰ · scale in the subnormal range.

Every function works on 2-D linear weights ``(out, in)`` and on 3-D expert weights
``(E, out, in)`` (each expert's rows quantized independently, as the scales are per row or per
row-group). They are pure functions (no module state), so quantization-aware training reuses
them: :func:`fake_quantize` returns the quantize→dequantize of a weight with a straight-through
gradient. :mod:`Ava.optimization.quantization` re-exports them with the model-level operations
(quantize a model, write the checkpoint).

What is quantized (:func:`quantize_modules`): every ``nn.Linear`` (attention q/k/v/o, dense and
shared-expert MLPs, the MTP projection, the output head), the token embedding, and the routed
experts' 3-D ``gate_up_proj``/``down_proj``. What stays in full precision: the routers
(``mlp.gate``: an E×D matrix whose small errors flip expert choices, and the expert bias), every
norm, and every 1-D tensor. The modules run as follows: at decode (at most
:data:`PACKED_MAX_ROWS` activation rows, on CPU) int8 and int4 weights go through torch's packed
kernels (``torch._weight_int8pack_mm``, ``torch._weight_int4pack_mm_for_cpu``) with bf16
activations (fp32 ones are rounded to bf16 for the call); otherwise (prefill, evaluation, fp8
weights, other devices) the weight is dequantized to the compute dtype for the call.
``model.to(torch.bfloat16)`` casts the full-precision parts and the compute dtype, never the
quantized storage. The crossover was measured (``benchmarks/quantization.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AvaCheckpointError
from .expert_kernels import compute_dtype
from .experts import Experts, routed_experts
from .routing import RouterOutput
from .token_dispatcher import LocalDispatcher

__all__ = [
    "DEFAULT_INT4_GROUP_SIZE",
    "QUANTIZATION_FILE",
    "read_quantization",
    "FP8_E4M3_MAX",
    "INT4_GROUP_SIZES",
    "PACKED_MAX_ROWS",
    "QuantizedEmbedding",
    "QuantizedExperts",
    "QuantizedLinear",
    "QuantizedParameter",
    "SCHEMES",
    "TiedQuantizedLinear",
    "check_group_size",
    "dequantize_fp8",
    "dequantize_int4",
    "dequantize_int8",
    "dequantize_modules",
    "fake_quantize",
    "pack_int4",
    "quantization_targets",
    "quantize_fp8",
    "quantize_int4",
    "quantize_int8",
    "quantize_modules",
    "unpack_int4",
]

QUANTIZATION_FILE = "quantization.json"  # in a quantized checkpoint folder: scheme, group size, modules
SCHEMES = ("int8", "int4", "fp8")
INT4_GROUP_SIZES = (32, 64, 128)
DEFAULT_INT4_GROUP_SIZE = 64  # from 64 up the demo model's INT4 file is ≤ 0.3× its bf16 size (docs/quantization.md)
FP8_E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_TINY = 1e-12  # floor for scales of all-zero rows/groups (keeps q finite; dequantizes to 0)
_BF16_TINY = 1e-30  # the same for bf16-stored scales (bf16 has fp32's exponent range)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel INT8.

    Args:
        w: (..., out, in) float weight (2-D linear or 3-D experts).

    Returns:
        ``(q, scale)``: q int8 of w's shape in [-127, 127]; scale fp32 of shape (..., out).
        ``dequantize_int8(q, scale)`` is within ``scale/2`` of ``w`` elementwise.
    """
    w32 = w.detach().float()
    scale = (w32.abs().amax(dim=-1) / 127.0).clamp_min(_TINY)
    q = torch.round(w32 / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q · scale`` in ``dtype`` (the inverse of :func:`quantize_int8`; computed in ``dtype``, where
    every q is exact)."""
    return q.to(dtype) * scale.to(dtype).unsqueeze(-1)


def _check_group(w: torch.Tensor, group_size: int) -> None:
    if group_size <= 0 or w.shape[-1] % group_size:
        raise ValueError(f"input dim {w.shape[-1]} is not a multiple of the group size {group_size}")


def quantize_int4(
    w: torch.Tensor, group_size: int = DEFAULT_INT4_GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise INT4 (groups of ``group_size`` along the input dim).

    Args:
        w: (..., out, in) float weight; ``in`` must be a multiple of ``group_size``.
        group_size: weights per (scale, zero) pair.

    Returns:
        ``(q, scale, zero)``: q uint8 of w's shape holding values 0..15 (unpacked; see
        :func:`pack_int4`); scale and zero fp32 of shape (..., out, in // group_size), with
        ``w ≈ (q - 8) · scale + zero`` within ``scale/2`` (scale and zero are bf16-representable,
        so at a group's extremes the bound can exceed ``scale/2`` by bf16 rounding, < 1% of scale).
    """
    _check_group(w, group_size)
    w32 = w.detach().float()
    g = w32.reshape(*w32.shape[:-1], w32.shape[-1] // group_size, group_size)
    lo = g.amin(dim=-1)
    hi = g.amax(dim=-1)
    # scale and zero are rounded to bf16 first (the precision they are stored and used in) and q
    # is computed against the rounded values, so dequantization matches the packed kernel
    scale = ((hi - lo) / 15.0).clamp_min(_BF16_TINY).to(torch.bfloat16).float()
    zero = (lo + 8.0 * scale).to(torch.bfloat16).float()
    q = torch.round((g - zero.unsqueeze(-1)) / scale.unsqueeze(-1) + 8.0).clamp_(0, 15).to(torch.uint8)
    return q.reshape(w32.shape), scale, zero


def dequantize_int4(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(q - 8) · scale + zero`` in ``dtype`` (the inverse of :func:`quantize_int4`; q unpacked)."""
    groups = scale.shape[-1]
    group_size = q.shape[-1] // groups
    g = q.float().reshape(*q.shape[:-1], groups, group_size)
    w = (g - 8.0) * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)
    return w.reshape(q.shape).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values per byte along the last dim (even index in the low nibble): (..., n) → (..., n/2)."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: (..., n/2) uint8 → (..., n) uint8 values 0..15."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel scaled FP8 (``float8_e4m3fn``).

    Args:
        w: (..., out, in) float weight.

    Returns:
        ``(q, scale)``: q float8_e4m3fn of w's shape, scale fp32 of shape (..., out), with
        ``|w - q·scale| ≤ 2⁻⁴·|w| + 2⁻¹⁰·scale`` elementwise.
    """
    w32 = w.detach().float()
    scale = (w32.abs().amax(dim=-1) / FP8_E4M3_MAX).clamp_min(_TINY)
    q = (w32 / scale.unsqueeze(-1)).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q · scale`` in ``dtype`` (the inverse of :func:`quantize_fp8`; computed in ``dtype``, where
    every e4m3 value is exact for fp32, bf16 and fp16)."""
    return q.to(dtype) * scale.to(dtype).unsqueeze(-1)


def _fake_int_groupwise_symmetric(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    _check_group(w, group_size)
    qmax = 2 ** (bits - 1) - 1
    g = w.float().reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)
    scale = (g.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(_TINY)
    return (torch.round(g / scale).clamp(-qmax, qmax) * scale).reshape(w.shape)


def fake_quantize(w: torch.Tensor, bits: int = 8, group_size: int | None = None, *, fp8: bool = False) -> torch.Tensor:
    """Quantize→dequantize ``w`` with a straight-through gradient (for QAT and error studies).

    Args:
        w: (..., out, in) float weight (2-D or 3-D experts).
        bits: 8 or 4. ``bits=8, group_size=None`` is :func:`quantize_int8` (per-channel);
            ``bits=8`` with a group size is symmetric group-wise INT8; ``bits=4`` is
            :func:`quantize_int4` with ``group_size`` (default 64).
        group_size: weights per scale along the input dim.
        fp8: use :func:`quantize_fp8` instead (``bits``/``group_size`` ignored).

    Returns:
        A tensor of w's shape and dtype equal to the dequantized weight in the forward; its
        gradient with respect to ``w`` is the identity (``w + (dq - w).detach()``).
    """
    with torch.no_grad():
        if fp8:
            dq = dequantize_fp8(*quantize_fp8(w))
        elif bits == 8 and group_size is None:
            dq = dequantize_int8(*quantize_int8(w))
        elif bits == 8:
            dq = _fake_int_groupwise_symmetric(w, 8, group_size)
        elif bits == 4:
            dq = dequantize_int4(*quantize_int4(w, group_size or DEFAULT_INT4_GROUP_SIZE))
        else:
            raise ValueError(f"bits must be 8 or 4, not {bits}")
        dq = dq.to(w.dtype)
    return w + (dq - w).detach()


# --------------------------------------------------------------------------------------------
# modules holding quantized weights
# --------------------------------------------------------------------------------------------

PACKED_MAX_ROWS = MappingProxyType({"int8": 16, "int4": 128})
"""Most activation rows (tokens, or token-slots of one expert) of one matmul for which the packed
CPU kernels run; above it the weight is dequantized for the call (one bf16/fp32 GEMM). The
largest row count at which the packed kernel beat dequantize+matmul on every demo-model weight
shape (expert gate_up 1024×256, expert down 256×512, attention 256×256, head 8192×256), measured
by ``python benchmarks/quantization.py --crossover --repeats 15`` (torch 2.13 CPU, 2 cores;
docs/quantization.md). fp32 activations are rounded to bf16 for the kernels (the int8 kernel on
fp32 inputs measured 3-30× slower)."""


class QuantizedParameter(nn.Module):
    """One quantized weight of shape (..., out, in), stored as buffers.

    Buffers (the checkpoint keys, under this module's name): ``qweight`` (int8; uint8 with two
    4-bit values per byte for int4; float8_e4m3fn for fp8), ``scale`` (fp32 per output channel;
    bf16 per group for int4) and, for int4, ``zero`` (bf16 per group).

    Args:
        shape: the full-precision weight's shape, (out, in) or (E, out, in).
        scheme: ``int8``, ``int4`` or ``fp8``.
        group_size: int4 group size (``in`` must be a multiple of it); ignored otherwise.
    """

    def __init__(self, shape: tuple[int, ...], scheme: str, group_size: int | None = None) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {scheme!r}; use one of {list(SCHEMES)}")
        *lead, out, inp = shape
        self.scheme, self.shape = scheme, tuple(shape)
        self.group_size = group_size if scheme == "int4" else None
        if scheme == "int8":
            self.register_buffer("qweight", torch.zeros(shape, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(*lead, out))
        elif scheme == "int4":
            if group_size is None or inp % group_size or inp % 2:
                raise ValueError(f"input width {inp} is not a multiple of the int4 group size {group_size}")
            self.register_buffer("qweight", torch.zeros(*lead, out, inp // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.ones(*lead, out, inp // group_size, dtype=torch.bfloat16))
            self.register_buffer("zero", torch.zeros(*lead, out, inp // group_size, dtype=torch.bfloat16))
        else:
            self.register_buffer("qweight", torch.zeros(shape, dtype=torch.float8_e4m3fn))
            self.register_buffer("scale", torch.ones(*lead, out))
        self._packed: dict = {}  # CPU kernel operands per expert index (derived; never saved)
        self.dtype = torch.float32  # the compute dtype the model was cast to (``model.to(dtype)``)
        # most rows for the packed CPU kernel (0: none; the int4 kernel needs out % 16 == 0)
        self._max_rows = PACKED_MAX_ROWS.get(scheme, 0) if scheme == "int8" or out % 16 == 0 else 0

    @classmethod
    def from_float(cls, w: torch.Tensor, scheme: str, group_size: int | None = None) -> "QuantizedParameter":
        """Quantize the full-precision ``w`` (2-D or 3-D) into a new module on w's device."""
        module = cls(tuple(w.shape), scheme, group_size).to(w.device)
        module.set_(w)
        return module

    @torch.no_grad()
    def set_(self, w: torch.Tensor) -> None:
        """Quantize ``w`` (of :attr:`shape`) into the buffers."""
        if tuple(w.shape) != self.shape:
            raise ValueError(f"weight of shape {tuple(w.shape)} for a quantized weight of shape {self.shape}")
        if self.scheme == "int8":
            q, scale = quantize_int8(w)
        elif self.scheme == "int4":
            q4, scale, zero = quantize_int4(w, self.group_size)
            q = pack_int4(q4)
            self.zero.copy_(zero)
        else:
            q, scale = quantize_fp8(w)
        self.qweight.copy_(q)
        self.scale.copy_(scale)
        self._packed.clear()

    def numel(self) -> int:
        """Elements of the full-precision weight (for parameter and FLOP accounting)."""
        return math.prod(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32, index: int | torch.Tensor | None = None) -> torch.Tensor:
        """The weight in ``dtype``: all of it, or ``[index]`` along the first dim (an expert, or
        embedding rows)."""
        pick = (lambda t: t) if index is None else (lambda t: t[index])  # noqa: E731
        if self.scheme == "int8":
            return dequantize_int8(pick(self.qweight), pick(self.scale), dtype)
        if self.scheme == "int4":
            return dequantize_int4(unpack_int4(pick(self.qweight)), pick(self.scale), pick(self.zero), dtype)
        return dequantize_fp8(pick(self.qweight), pick(self.scale), dtype)

    def packed_applies(self, rows: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether a matmul of ``rows`` activation rows in ``dtype`` takes the packed CPU kernel."""
        return device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and rows <= self._max_rows

    def _operands(self, index: int | None) -> tuple[torch.Tensor, ...]:
        ops = self._packed.get(index)
        if ops is None:
            pick = (lambda t: t) if index is None else (lambda t: t[index])  # noqa: E731
            if self.scheme == "int8":
                ops = (pick(self.qweight).contiguous(), pick(self.scale).to(torch.bfloat16))
            else:
                q_int32 = unpack_int4(pick(self.qweight)).to(torch.int32)
                packed = torch._convert_weight_to_int4pack_for_cpu(q_int32, 1)
                scales_zeros = torch.stack([pick(self.scale).t(), pick(self.zero).t()], dim=-1).contiguous()
                ops = (packed, scales_zeros)  # (out, in/2) uint8, (in/G, out, 2) bf16
            self._packed[index] = ops
        return ops

    def linear(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """``x @ W.T`` (``W = weight[index]`` for 3-D weights): (..., in) -> (..., out), in the
        compute dtype; packed kernels at decode, the dequantized weight otherwise.

        Written for the per-token decode call: a few attribute reads before the kernel.
        """
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        x_2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        # The packed kernels have no autograd: an input that needs a gradient (QLoRA training) takes the dequantized weight.
        if x_2d.shape[0] <= self._max_rows and x.is_cpu and (dtype is torch.bfloat16 or dtype is torch.float32) \
                and not (x.requires_grad and torch.is_grad_enabled()):
            ops = self._packed.get(index) or self._operands(index)
            x_bf16 = x_2d if x_2d.dtype is torch.bfloat16 else x_2d.to(torch.bfloat16)  # fp32 inputs: far slower
            if self.scheme == "int8":
                y = torch._weight_int8pack_mm(x_bf16, ops[0], ops[1])
            else:
                y = torch._weight_int4pack_mm_for_cpu(x_bf16, ops[0], self.group_size, ops[1])
            if dtype is not torch.bfloat16:
                y = y.to(dtype)
        else:
            y = F.linear(x_2d.to(dtype), self.dequantize(dtype, index))
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])

    def _apply(self, fn, recurse=True):  # noqa: D102
        # ``.to(device)`` moves the buffers; a dtype cast (``model.to(torch.bfloat16)``) leaves the
        # quantized storage and its scales as they are and sets :attr:`dtype` (the embedding's
        # output dtype) instead, so the model then computes in that dtype over quantized weights.
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.qweight.device))  # a move keeps the dtype
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(probe.device)
        if probe.dtype.is_floating_point:
            self.dtype = probe.dtype
        self._packed.clear()
        return self

    def _load_from_state_dict(self, *args, **kwargs):  # noqa: D102 - new values: drop the derived operands
        self._packed.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"shape={self.shape}, scheme={self.scheme!r}{group}"


class QuantizedLinear(QuantizedParameter):
    """A bias-free ``nn.Linear`` with a quantized weight (``weight`` dequantizes it, in fp32)."""

    def __init__(self, in_features: int, out_features: int, scheme: str, group_size: int | None = None) -> None:
        super().__init__((out_features, in_features), scheme, group_size)
        self.in_features, self.out_features = in_features, out_features

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (fp32) weight (out, in): for code that reads ``.weight``; a copy."""
        return self.dequantize(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out) in the compute dtype."""
        return self.linear(x)


class QuantizedEmbedding(QuantizedParameter):
    """An ``nn.Embedding`` with a quantized table: looked-up rows are dequantized."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scheme: str, group_size: int | None = None) -> None:
        super().__init__((num_embeddings, embedding_dim), scheme, group_size)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (fp32) table (V, D); a copy."""
        return self.dequantize(torch.float32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(...) long -> (..., D) in :attr:`dtype` (fp32 unless the model was cast)."""
        return self.dequantize(self.dtype, ids)


class TiedQuantizedLinear(nn.Module):
    """The output head of a model with tied embeddings: runs the quantized embedding's table as a
    linear (holds no buffers of its own, so the checkpoint stores the table once)."""

    def __init__(self, embedding: QuantizedEmbedding) -> None:
        super().__init__()
        object.__setattr__(self, "_embedding", embedding)  # not a submodule: no duplicate keys

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (fp32) table (V, D); a copy."""
        return self._embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., V) in the compute dtype."""
        return self._embedding.linear(x)


class QuantizedExperts(Experts):
    """:class:`~Ava.layers.experts.Experts` with quantized ``gate_up_proj`` (E, 2I, D) and
    ``down_proj`` (E, D, I) (:class:`QuantizedParameter` submodules, so the checkpoint keys are
    ``...experts.gate_up_proj.qweight`` etc.).

    Decoding (the device's decode path applies: no autograd, few token-slots) runs each slot
    through its expert's quantized weights (packed kernels where :data:`PACKED_MAX_ROWS` allows);
    every other call dequantizes the weights for the call and runs the usual kernels.

    Args:
        source: the full-precision experts (their configuration and, with ``copy_weights``,
            their weights).
        scheme, group_size: as :class:`QuantizedParameter`.
        copy_weights: quantize ``source``'s weights (False: zeros, to be loaded).
    """

    def __init__(self, source: Experts, scheme: str, group_size: int | None = None, copy_weights: bool = True) -> None:
        E, F2, D = source.gate_up_proj.shape
        super().__init__(E, D, F2 // 2, backend=source.backend, dispatcher=source.dispatcher)
        self.num_experts, self.ep_rank, self.ep_size = source.num_experts, source.ep_rank, source.ep_size
        self.num_local_experts = source.num_local_experts
        del self.gate_up_proj, self.down_proj  # the full-precision parameters __init__ made
        if copy_weights:
            self.gate_up_proj = QuantizedParameter.from_float(source.gate_up_proj.detach(), scheme, group_size)
            self.down_proj = QuantizedParameter.from_float(source.down_proj.detach(), scheme, group_size)
        else:
            self.gate_up_proj = QuantizedParameter(tuple(source.gate_up_proj.shape), scheme, group_size)
            self.down_proj = QuantizedParameter(tuple(source.down_proj.shape), scheme, group_size)

    @torch.compiler.disable
    def forward(self, x_TD: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        """Run the routed experts: (T, D) -> (T, D) in the compute dtype."""
        dtype = compute_dtype(x_TD)
        choice = self.kernels(x_TD.device.type, dtype)
        local = isinstance(self.dispatcher, LocalDispatcher)
        if local and choice.decode is not None and choice.decode.applies(routing):
            return self._decode(x_TD.to(dtype), routing)
        return routed_experts(x_TD, routing, self.gate_up_proj.dequantize(dtype), self.down_proj.dequantize(dtype),
                              choice.select(routing), self.dispatcher)

    def _decode(self, x_TD: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        """One SwiGLU per token-slot on its expert's quantized weights (the ``slots`` path's math)."""
        gate_weights = routing.weights_TK.tolist()
        rows = []
        for t, chosen in enumerate(routing.indices_TK.tolist()):
            x_1D = x_TD[t:t + 1]
            y_1D = None
            for e, weight in zip(chosen, gate_weights[t]):
                gate_1I, up_1I = self.gate_up_proj.linear(x_1D, e).chunk(2, dim=-1)
                out_1D = self.down_proj.linear(F.silu(gate_1I) * up_1I, e).float() * weight
                y_1D = out_1D if y_1D is None else y_1D + out_1D
            rows.append(y_1D)
        return (torch.cat(rows) if len(rows) > 1 else rows[0]).to(x_TD.dtype)


def quantization_targets(model: nn.Module) -> list[str]:
    """Names of the modules :func:`quantize_modules` replaces: every ``nn.Linear`` and
    ``nn.Embedding`` and every :class:`~Ava.layers.experts.Experts` (routers and norms are not
    ``nn.Linear``, so they stay in full precision)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Embedding, Experts, QuantizedParameter))
            and not isinstance(module, QuantizedExperts) and name]


def check_group_size(model: nn.Module, group_size: int) -> list[str]:
    """The quantization targets whose input width is not a multiple of ``group_size`` (int4)."""
    bad = []
    for name in quantization_targets(model):
        module = model.get_submodule(name)
        if isinstance(module, Experts):
            widths = (module.gate_up_proj.shape[-1], module.down_proj.shape[-1])
        elif isinstance(module, nn.Embedding):
            widths = (module.embedding_dim,)
        elif isinstance(module, nn.Linear):
            widths = (module.in_features,)
        else:
            continue
        if any(w % group_size for w in widths):
            bad.append(name)
    return bad


def quantize_modules(model: nn.Module, scheme: str, group_size: int | None = None,
                     copy_weights: bool = True) -> list[str]:
    """Replace the model's linears, embeddings and experts by quantized ones, in place.

    Args:
        model: any module tree (an :class:`~Ava.models.EnhancedMoEModel`).
        scheme: ``int8``, ``int4`` or ``fp8``.
        group_size: the int4 group size (32, 64 or 128).
        copy_weights: quantize the current weights (False: empty quantized modules, for loading
            a quantized checkpoint into).

    Returns:
        The replaced modules' names.

    Raises:
        ValueError: unknown scheme, or an input width not a multiple of the int4 group size.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; use one of {list(SCHEMES)}")
    if scheme == "int4":
        bad = check_group_size(model, group_size or 0)
        if bad:
            raise ValueError(f"int4 group size {group_size} does not divide the input width of {bad[0]}; "
                             f"use a group size that divides it (one of {list(INT4_GROUP_SIZES)})")
    names = [n for n in quantization_targets(model) if not isinstance(model.get_submodule(n), QuantizedParameter)]
    replaced: dict[int, QuantizedEmbedding] = {}  # id(embedding weight) -> its quantized table, for ties
    embeddings = [n for n in names if isinstance(model.get_submodule(n), nn.Embedding)]
    for name in embeddings + [n for n in names if n not in embeddings]:
        module = model.get_submodule(name)
        if isinstance(module, Experts):
            new: nn.Module = QuantizedExperts(module, scheme, group_size, copy_weights)
        elif isinstance(module, nn.Embedding):
            new = QuantizedEmbedding(module.num_embeddings, module.embedding_dim, scheme, group_size)
            if copy_weights:
                new.set_(module.weight.detach())
            replaced[id(module.weight)] = new
        elif id(module.weight) in replaced:  # an output head tied to an embedding
            new = TiedQuantizedLinear(replaced[id(module.weight)])
        else:
            if module.bias is not None:
                raise ValueError(f"{name}: quantized linears have no bias")
            new = QuantizedLinear(module.in_features, module.out_features, scheme, group_size)
            if copy_weights:
                new.set_(module.weight.detach())
        new.to(next(iter(module.state_dict().values())).device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return names


@torch.no_grad()
def dequantize_modules(model: nn.Module) -> list[str]:
    """Replace every quantized module by its full-precision (fp32) counterpart, in place: the
    inverse of :func:`quantize_modules` up to the quantization error.

    Returns:
        The replaced modules' names.
    """
    kinds = (QuantizedParameter, TiedQuantizedLinear, QuantizedExperts)
    names = [name for name, module in model.named_modules()  # not the QuantizedExperts' own weights
             if name and isinstance(module, kinds) and not isinstance(model.get_submodule(name.rpartition(".")[0]), kinds)]
    embeddings: dict[int, nn.Embedding] = {}  # id(quantized table) -> its new embedding, for tied heads
    for name in sorted(names, key=lambda n: isinstance(model.get_submodule(n), TiedQuantizedLinear)):
        module = model.get_submodule(name)
        if isinstance(module, QuantizedExperts):
            E, F2, D = module.gate_up_proj.shape
            new: nn.Module = Experts(E, D, F2 // 2, backend=module.backend, dispatcher=module.dispatcher)
            new.gate_up_proj = nn.Parameter(module.gate_up_proj.dequantize())
            new.down_proj = nn.Parameter(module.down_proj.dequantize())
        elif isinstance(module, QuantizedEmbedding):
            new = nn.Embedding(module.num_embeddings, module.embedding_dim, device=module.qweight.device)
            new.weight = nn.Parameter(module.dequantize())
            embeddings[id(module)] = new
        elif isinstance(module, TiedQuantizedLinear):
            table = embeddings[id(module._embedding)]
            new = nn.Linear(table.embedding_dim, table.num_embeddings, bias=False, device=table.weight.device)
            new.weight = table.weight
        else:
            new = nn.Linear(module.shape[1], module.shape[0], bias=False, device=module.qweight.device)
            new.weight = nn.Parameter(module.dequantize())
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return names


def read_quantization(folder: str | Path) -> dict | None:
    """The ``quantization.json`` of a checkpoint folder (None when it has none: full precision).

    Raises:
        AvaCheckpointError: the file is unreadable or names an unknown scheme or group size.
    """
    path = Path(folder) / QUANTIZATION_FILE
    if not path.exists():
        return None
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        scheme, group_size = spec["scheme"], spec.get("group_size")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise AvaCheckpointError(f"{path} is unreadable ({err}); quantize the checkpoint again") from None
    if scheme not in SCHEMES or (scheme == "int4" and group_size not in INT4_GROUP_SIZES):
        raise AvaCheckpointError(f"{path}: unknown scheme {scheme!r} / group size {group_size!r}; "
                                 "quantize the checkpoint again")
    return spec

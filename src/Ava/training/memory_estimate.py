"""How much memory a training run needs, before anything is allocated, and whether it fits.

:func:`estimate_memory` builds the configured model on PyTorch's ``meta`` device (shapes, no
storage: milliseconds at any size) and counts, per process:

- **parameters**: exactly, the bytes of every parameter (fp32 master weights; tied weights once).
- **gradients**: one fp32 gradient per trainable parameter, exactly.
- **optimizer state**: exactly, per ``optimizer.name``, for every parameter that gets a
  gradient: ``adamw`` two fp32 moments + a 4-byte step per tensor; ``lion`` one momentum;
  ``sophia`` a momentum and a Hessian estimate + a step; ``muon`` one momentum for the matrices
  it orthogonalises and AdamW's state for the rest; ``adafactor`` a row and a column second
  moment for each ≥ 2-D tensor (a full one for 1-D tensors) + a step.
- **activations**: roughly, the tensors the forward keeps for the backward of one micro-batch of
  ``training.batch_size`` × ``data.seq_len`` tokens (formula below).
- **MoE routing**: roughly, the router's buffers (logits, probabilities, chosen experts, weights)
  kept for backward.
- **other**: gradient surgery's per-term gradients (``gradient.surgery``: 2·K + 1 gradient-sized
  buffers for K terms) and, with ``checkpoint.async_save`` on a CPU run, the in-memory snapshot
  of weights and optimizer state.

The checkpoint size on disk (weights, buffers and optimizer state) is reported too, but it is
not part of the memory total.

Activation formula (bytes per token of the micro-batch, N = batch_size × seq_len tokens; a =
activation element size, 4 in fp32 and 2 under ``precision.dtype: bf16``; f = 4, the fp32
residual stream, norm inputs and router; c = a under bf16 (a bf16 copy of a fp32 tensor), else 0;
D hidden, H/G query/key-value heads, A head dim, V vocabulary, I dense MLP width, E experts, K
top_k, I_e expert width, S shared experts)::

    attention  = (f + a)·D + a·(H + 2G)·A + a·(H + G)·A + a·H·A + 4·H
    dense MLP  = (f + a)·D + 4a·I
    MoE MLP    = 2f·D + K·(2a·D + 4a·I_e)  [+ c·D + 4a·S·I_e with shared experts]
    routing    = 8·E + 24·K + 8                    (fp32 logits/probabilities, int64 indices, weights)
    head       = fused head: (f + a)·D, plus 4·V·D bytes once per pass (its fp32 weight gradient)
                 logits:     (f + a)·D + (a + 4)·V
    MTP module = its block (as a layer) + (2f + 4a)·D + head

Per layer and forward the backward also keeps weight copies: the concatenated q/k/v weight (a
bytes per element) and, under bf16 autocast, a bf16 copy (c) of every other matrix the layer
multiplies by (experts included, not the fp32 router); the output head's bf16 copy likewise.
Without activation checkpointing every layer (MTP blocks included) keeps its activations until
the backward; with it, a layer keeps only its fp32 input (f·D per token) and one layer's
activations exist at a time, while it is recomputed. Checked against the bytes of the tensors
autograd saves (``torch.autograd.graph.saved_tensors_hooks``) on small dense, MoE, shared-expert,
MTP and bf16 models: within 10 % (``tests/training/test_memory_estimate.py``). It is an estimate:
allocator caching and fragmentation, the data pipeline and the transient tensors of the backward
come on top.

Distributed (``ranks`` > 1): under FSDP2 (``distributed.strategy: fsdp2``, or ``auto`` choosing it
as :class:`~Ava.training.distributed_manager.DistributedParallelism` does) parameters,
gradients and optimizer state are divided by the number of ranks; under DDP every rank holds them
whole, and DDP's all-reduce buckets add one more copy of the gradients. Routed experts are
divided by ``distributed.expert_parallel``. Activations are per rank (``batch_size`` is per rank).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import EnhancedTrainingConfig
from ..errors import AvaConfigError
from ..losses.fused_head import use_fused_head
from ..optimization import parameter_groups

GIB = 1024**3
MIB = 1024**2
#: bytes of one fp32 element (master weights, gradients, optimizer moments, the residual stream)
FP32 = 4
#: environment variable that skips :func:`check_fits` (the estimate is rough)
SKIP_ENV = "AVA_NO_MEMORY_CHECK"


@dataclass
class MemoryEstimate:
    """Bytes one training process needs (see the module docstring for what each term counts).

    Attributes:
        num_parameters: parameters of the whole model (tied weights once, every expert).
        parameters: bytes of the parameters this process holds.
        buffers: bytes of the model's buffers (RoPE tables, router biases).
        gradients: bytes of the gradients (DDP's bucket copy included).
        optimizer_state: bytes of the optimizer's state tensors.
        activations: bytes kept for the backward of one micro-batch (and the head's buffers).
        routing: bytes of the MoE routers' buffers kept for the backward.
        other: gradient surgery's buffers and an async checkpoint's in-memory snapshot.
        checkpoint: bytes of one checkpoint on disk (not part of :attr:`total`).
        details: the settings the estimate was made for, for :meth:`describe`.
    """

    num_parameters: int
    parameters: int
    buffers: int
    gradients: int
    optimizer_state: int
    activations: int
    routing: int
    other: int
    checkpoint: int
    details: dict[str, str] = field(default_factory=dict)

    #: (attribute, label) of the terms that make up :attr:`total`
    TERMS = (("parameters", "parameters"), ("buffers", "buffers"), ("gradients", "gradients"),
             ("optimizer_state", "optimizer state"), ("activations", "activations"),
             ("routing", "MoE routing"), ("other", "other"))

    @property
    def total(self) -> int:
        """Bytes of memory the process needs: every term but the checkpoint on disk."""
        return sum(getattr(self, name) for name, _ in self.TERMS)

    def biggest_term(self) -> tuple[str, int]:
        """``(label, bytes)`` of the largest term of :attr:`total`."""
        name, label = max(self.TERMS, key=lambda term: getattr(self, term[0]))
        return label, getattr(self, name)

    def describe(self) -> list[str]:
        """A few human-readable lines: each term, the total and the checkpoint size."""
        d = self.details
        lines = [f"memory estimate per process ({d.get('setting', '')}):"]
        notes = {"parameters": f"{self.num_parameters:,} parameters, fp32",
                 "optimizer_state": d.get("optimizer", ""), "activations": d.get("activations", ""),
                 "other": d.get("other", "")}
        for name, label in self.TERMS:
            value = getattr(self, name)
            if value or name in ("parameters", "gradients", "optimizer_state", "activations"):
                note = notes.get(name, "")
                lines.append(f"  {label:<16} {format_bytes(value):>10}" + (f"  ({note})" if note else ""))
        label, _ = self.biggest_term()
        lines.append(f"  {'total':<16} {format_bytes(self.total):>10}  (biggest term: {label})")
        lines.append(f"  checkpoint on disk: {format_bytes(self.checkpoint)} each (weights + optimizer state)")
        return lines


def format_bytes(n: float) -> str:
    """``n`` bytes as GiB (≥ 1 GiB), MiB or KiB, with 3 significant digits."""
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if n >= size or unit == "KiB":
            value = n / size
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:,.0f} {unit}"
    return f"{n} B"  # unreachable


def _device(device: str | torch.device) -> torch.device:
    """``run.device`` as :func:`~Ava.training.parallel.resolve_device` reads it (``auto`` = CUDA when
    available), without importing the parallelism seam (``torch.distributed``: seconds)."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _meta_model(config: EnhancedTrainingConfig) -> torch.nn.Module:
    """The configured model on the meta device (no storage), without touching the global RNG."""
    from ..models import EnhancedMoEModel

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = EnhancedMoEModel(config.model)
        ft = config.finetune
        if ft is not None:  # LoRA: a frozen (maybe quantized) base, trainable adapters
            from ..layers.lora import adapt_base

            adapt_base(model, ft.base_quant, ft.base_group_size, ft.lora.rank, ft.lora.alpha, ft.lora.dropout,
                       ft.lora.targets, copy_weights=False)
        return model


def _optimizer_state_bytes(model: torch.nn.Module, config: EnhancedTrainingConfig) -> tuple[dict[str, int], str]:
    """Exact bytes of the optimizer state of each named parameter after the first step, and a
    note on what the optimizer keeps."""
    opt = config.optimizer
    names = {id(p): name for name, p in model.named_parameters()}
    state: dict[str, int] = {}
    for group in parameter_groups(model, opt, config.training.learning_rate):
        for p in group["params"]:
            n = p.numel() * FP32
            if opt.name in ("adamw", "sophia") or (opt.name == "muon" and not group.get("use_muon")):
                size = 2 * n + FP32  # two moments (Sophia: momentum, Hessian) + a 0-d fp32 step
            elif opt.name in ("muon", "lion"):
                size = n  # one momentum
            elif p.ndim >= 2:  # adafactor: row and column second moments + step
                size = (p.numel() // p.shape[-1] + p.numel() // p.shape[-2]) * FP32 + FP32
            else:  # adafactor: a full second moment for vectors + step
                size = n + FP32
            state[names[id(p)]] = size
    notes = {"adamw": "adamw: 2 fp32 moments per parameter", "lion": "lion: 1 fp32 momentum per parameter",
             "sophia": "sophia: fp32 momentum + Hessian estimate per parameter",
             "muon": "muon: 1 momentum per hidden-matrix parameter, adamw's 2 moments for the rest",
             "adafactor": "adafactor: factored row/column second moments"}
    return state, notes[opt.name]


def _activation_bytes(model: torch.nn.Module, config: EnhancedTrainingConfig) -> tuple[int, int]:
    """Rough bytes kept for backward of one micro-batch: (activations, MoE routing). See the module docstring."""
    cfg = config.model
    n_tokens = config.training.batch_size * config.data.seq_len
    a = 2 if config.precision.dtype == "bf16" else FP32
    f = FP32
    c = a if a != FP32 else 0  # a fp32 tensor's bf16 copy for a bf16 matmul
    D, H, G, A, V = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    K, E, I_e, S = cfg.moe.top_k, cfg.num_experts, cfg.moe.moe_intermediate_size, cfg.moe.num_shared_experts
    attention = (f + a) * D + a * (H + 2 * G) * A + a * (H + G) * A + a * H * A + 4 * H
    qkv_weight = (H + 2 * G) * A * D * a  # the concatenated q/k/v weight (its bf16 cast under bf16)

    def layer_bytes(layer: torch.nn.Module) -> tuple[int, int]:
        """(activations incl. weight copies, routing) of one decoder layer over the micro-batch."""
        matrices = layer.self_attn.o_proj.weight.numel()
        if layer.is_moe:
            per_token = attention + 2 * f * D + K * (2 * a * D + 4 * a * I_e)
            if S:
                per_token += c * D + 4 * a * S * I_e
            routing = (8 * E + 24 * K + 8) * n_tokens
            matrices += sum(p.numel() for name, p in layer.mlp.named_parameters() if not name.startswith("gate."))
        else:
            per_token = attention + (f + a) * D + 4 * a * cfg.intermediate_size
            routing = 0
            matrices += sum(p.numel() for p in layer.mlp.parameters())
        weights = qkv_weight + c * matrices  # autocast keeps the bf16 casts of the weights
        return per_token * n_tokens + weights, routing

    layers = [layer_bytes(layer) for layer in model.decoder_layers()]
    if use_fused_head(cfg.loss):  # final norm input, grad_h (N, D) and a fp32 (V, D) head gradient per pass
        head = (f + a) * D * n_tokens + FP32 * V * D
    else:  # final norm input and output, logits and their fp32 log-probabilities
        head = ((f + a) * D + (a + FP32) * V) * n_tokens
    head += c * V * D  # the head's bf16 cast
    passes = 1 + cfg.mtp.num_heads
    # each MTP module: its two input norms, the (N, 2D) input of eh_proj, and eh_proj's bf16 cast
    mtp = cfg.mtp.num_heads * ((2 * f + 2 * a + 2 * a) * D * n_tokens + c * 2 * D * D)
    routing = sum(r for _, r in layers)
    if config.performance.activation_checkpointing:
        # every layer keeps its input; one layer's activations exist while it is recomputed
        kept = len(layers) * f * D * n_tokens + max((act for act, _ in layers), default=0)
        routing = max((r for _, r in layers), default=0)
    else:
        kept = sum(act for act, _ in layers)
    return kept + passes * head + mtp + 8 * n_tokens, routing


def _resolve_strategy(config: EnhancedTrainingConfig, ranks: int, param_bytes: int,
                      device: torch.device) -> str:
    """``none``, ``ddp`` or ``fsdp2``: the strategy a run of ``ranks`` processes uses
    (``auto`` as :meth:`~Ava.training.distributed_manager.DistributedParallelism.resolve_strategy`)."""
    if ranks <= 1:
        return "none"
    requested = config.distributed.strategy
    if requested in ("ddp", "fsdp2"):
        return requested
    from .distributed_manager import auto_strategy

    if device.type == "cuda" and not torch.cuda.is_available():
        return "ddp"  # no GPU here to size against (the device checks report it)
    return auto_strategy(param_bytes // FP32, device, ranks)


def estimate_memory(config: EnhancedTrainingConfig, ranks: int = 1,
                    device: str | torch.device | None = None) -> MemoryEstimate:
    """Estimate the memory one training process of ``config`` needs, without allocating the model.

    Args:
        config: the resolved training config.
        ranks: training processes (``torchrun``'s world size); with FSDP2 the parameters,
            gradients and optimizer state are split over them.
        device: where training runs (only used to resolve ``distributed.strategy: auto`` with
            ``ranks`` > 1 and to count an async checkpoint's host copy); default ``run.device``.

    Returns:
        The :class:`MemoryEstimate` (formulas in the module docstring).
    """
    device = _device(config.run.device if device is None else device)
    model = _meta_model(config)
    num_parameters = model.num_parameters()
    params = list(model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() * FP32 for p in params if p.requires_grad)
    persistent = set(model.state_dict().keys())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    saved_buffers = sum(b.numel() * b.element_size() for name, b in model.named_buffers() if name in persistent)
    opt_state, opt_note = _optimizer_state_bytes(model, config)
    opt_bytes = sum(opt_state.values())
    checkpoint = param_bytes + saved_buffers + opt_bytes

    # expert parallelism: each rank holds num_experts / N of the routed experts (and their state)
    ep = config.distributed.expert_parallel if ranks > 1 else 1
    if ep > 1:
        for name, p in model.named_parameters():
            if ".mlp.experts." in name:
                share = p.numel() * FP32 - p.numel() * FP32 // ep
                param_bytes -= share
                trainable -= share if p.requires_grad else 0
                opt_bytes -= opt_state.get(name, 0) - opt_state.get(name, 0) // ep
    strategy = _resolve_strategy(config, ranks, param_bytes, device)
    grad_bytes = trainable
    if config.precision.param_dtype == "bf16":  # bf16 weights and gradients, fp32 masters and their gradients
        param_bytes += trainable - (param_bytes - param_bytes // 2)
        grad_bytes = trainable // 2 + trainable
    if strategy == "fsdp2":
        param_bytes, grad_bytes, opt_bytes = (math.ceil(x / ranks) for x in (param_bytes, grad_bytes, opt_bytes))
    elif strategy == "ddp":
        grad_bytes *= 2  # the all-reduce buckets hold a copy of the gradients

    activations, routing = _activation_bytes(model, config)
    other, other_notes = 0, []
    surgery = config.gradient.surgery
    if surgery.method != "none":
        other += (2 * len(surgery.terms) + 1) * grad_bytes
        other_notes.append(f"gradient.surgery {surgery.method}: {2 * len(surgery.terms) + 1} gradient copies")
    if config.checkpoint.async_save and device.type == "cpu":
        other += param_bytes + opt_bytes
        other_notes.append("checkpoint.async_save: a copy of weights and optimizer state")

    t = config.training
    dtype = config.precision.dtype
    ckpt = "activation checkpointing" if config.performance.activation_checkpointing else "no activation checkpointing"
    where = "one process" if ranks <= 1 else f"{ranks} processes, {strategy}"
    details = {
        "setting": f"{where}, {device.type}, {dtype}, micro-batch {t.batch_size} × {config.data.seq_len} tokens",
        "optimizer": opt_note,
        "activations": f"{dtype}, {ckpt}",
        "other": "; ".join(other_notes),
    }
    return MemoryEstimate(
        num_parameters=num_parameters, parameters=param_bytes, buffers=buffer_bytes, gradients=grad_bytes,
        optimizer_state=opt_bytes, activations=activations, routing=routing, other=other,
        checkpoint=checkpoint, details=details,
    )


def _meminfo_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (Linux), or None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory(device: str | torch.device) -> int:
    """Bytes this process could still allocate on ``device``.

    CPU: ``MemAvailable`` of ``/proc/meminfo`` (Linux; elsewhere the physical RAM). CUDA: the
    free memory of the GPU (``torch.cuda.mem_get_info``).

    Args:
        device: ``cpu``, ``cuda`` or ``cuda:N`` (``auto`` = CUDA when available).
    """
    device = _device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    available = _meminfo_available()
    if available is not None:
        return available
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(config: EnhancedTrainingConfig, device: str | torch.device, ranks: int = 1, *,
               held: int = 0) -> MemoryEstimate:
    """Refuse, in one line, a run whose estimate exceeds the memory available on ``device``.

    On the CPU the local ranks share the machine's RAM (``LOCAL_WORLD_SIZE`` of them, default
    ``ranks``); on CUDA each rank has its own GPU. Setting the environment variable
    ``AVA_NO_MEMORY_CHECK=1`` skips the refusal (the estimate is still returned).

    Args:
        config: the resolved training config.
        device: where training runs (``cpu``, ``cuda``, ``cuda:N``, ``auto``, or a torch.device).
        ranks: training processes of the job.
        held: bytes of the estimate this process already holds on ``device`` (e.g. the weights of
            a model built before the check), so they are not counted twice.

    Returns:
        The estimate, when it fits.

    Raises:
        AvaConfigError: the estimate is larger than the available memory; names the total, the
            biggest term, the available memory and what to lower.
    """
    device = _device(device)
    estimate = estimate_memory(config, ranks, device)
    if os.environ.get(SKIP_ENV, "").strip() not in ("", "0"):
        return estimate
    if device.type == "cuda" and not torch.cuda.is_available():
        return estimate  # no CUDA here: the config and device checks say so, with the fix
    available = available_memory(device)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(ranks))) if device.type == "cpu" else 1
    need = estimate.total * max(local, 1)
    if need <= available + held:
        return estimate
    label, biggest = estimate.biggest_term()
    where = "the GPU has" if device.type == "cuda" else "the machine has"
    per = f" ({local} processes × {format_bytes(estimate.total)})" if local > 1 else ""
    fixes = ["lower model.hidden_size / model.num_layers / model.num_experts",
             "lower training.batch_size (raise training.grad_accum_steps to keep the batch) or data.seq_len"]
    if not config.performance.activation_checkpointing:
        fixes.append("enable performance.activation_checkpointing")
    if config.precision.dtype == "fp32":
        fixes.append("set precision.dtype: bf16")
    if ranks > 1 and config.distributed.strategy != "fsdp2":
        fixes.append("use distributed.strategy: fsdp2")
    raise AvaConfigError(
        f"this run needs about {format_bytes(need)}{per} of memory (biggest term: {label} {format_bytes(biggest)}; "
        f"parameters {format_bytes(estimate.parameters)}, gradients {format_bytes(estimate.gradients)}, "
        f"optimizer state {format_bytes(estimate.optimizer_state)}, activations "
        f"{format_bytes(estimate.activations + estimate.routing)}) but {where} {format_bytes(available)} "
        f"available; {', '.join(fixes)} ({SKIP_ENV}=1 skips this check)"
    )

"""Hugging Face ``transformers`` folders: export Ava models, import Mixtral / Qwen3-MoE / OLMoE.

Ava's parameter names are HF Qwen3-MoE's without the ``model.`` prefix, and its expert layout is
transformers 5.23's fused one (``mlp.experts.gate_up_proj`` [E, 2I, D], ``down_proj`` [E, D, I],
router ``mlp.gate.weight`` [E, D]), so both directions are a rename table plus a config
translation. ``transformers`` itself is never imported here: the folder is plain JSON and
safetensors, and the tests load it with ``transformers`` to prove the logits match.

Export targets (``arch``):
- ``qwen3_moe`` (``Qwen3MoeForCausalLM``): QK-norm, ``norm_topk_prob`` either way, dense layers
  through ``mlp_only_layers`` (Ava's first ``first_dense_layers``) and ``decoder_sparse_step``
  (Ava's ``moe_every``).
- ``mixtral`` (``MixtralForCausalLM``): no QK-norm, every layer MoE, top-k weights renormalised.
- ``olmoe`` (``OlmoeForCausalLM``): QK-norm over all heads at once (``qk_norm_scope: full``), every
  layer MoE, ``num_heads·head_dim = hidden_size`` (its q_norm is hidden_size wide).
- ``auto``: Mixtral when the model fits it, else OLMoE for ``qk_norm_scope: full``, else Qwen3-MoE.

Refused (no HF architecture computes them): sigmoid / expert-choice / hash routers, routed
scaling ≠ 1, group-limited routing, shared experts (Qwen2-MoE's are gated, Ava's are not), a
non-zero aux-free expert bias, eval-time capacity dropping.

Dropped (training-only, they do not change the main head's logits; see :data:`TRAINING_ONLY`):
the noisy-top-k noise projection, a zero aux-free bias, the multi-token prediction heads
(``mtp.*``: HF's architectures have none, so speculative decoding with them stays in Ava) and
the uncertainty-weighting loss weights (``loss_weighting.*``). The export logs what it dropped.

Import reads ``config.json`` and every ``*.safetensors`` file (sharded or not) and accepts both
expert layouts: fused 3-D (transformers ≥ 5) and per-expert Linear modules
(``experts.{i}.gate_proj/up_proj/down_proj``, Mixtral's ``block_sparse_moe.experts.{i}.w1/w3/w2``).

Balancing coefficient: transformers' ``load_balancing_loss_func`` divides the routed counts by
the tokens, not by tokens × top-k, so at uniform routing it is K where Ava's
``load_balancing_loss`` is 1; for one MoE layer it is exactly K times Ava's. Export writes
``router_aux_loss_coef = aux_loss_coef / top_k`` and import sets
``aux_loss_coef = router_aux_loss_coef · num_experts_per_tok``, so the weighted term is the same
(several layers: see docs/interop.md). Import switches on no other balancing term (z-loss,
sequence/global balancing, aux-free bias): no importable HF architecture trains with one.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch

from ..config import ModelConfig
from ..data import AvaTokenizer
from ..data.records import plural
from ..errors import AvaCheckpointError, AvaConfigError, AvaDataError
from ..models import EnhancedMoEModel
from ..utils.checkpoint import TOKENIZER_FILE, WEIGHTS_FILE, resolve_checkpoint, set_default_mode
from ..utils.output_paths import check_output_dir
from ..utils.progress import progress_bar

logger = logging.getLogger(__name__)

ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM"}
IMPORTABLE = ("qwen3_moe", "mixtral", "olmoe")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
HF_AUX_LOSS_COEF_DEFAULT = {"qwen3_moe": 0.001, "mixtral": 0.001, "olmoe": 0.01}
"""transformers 5.23's ``router_aux_loss_coef`` default per ``model_type`` (used when config.json omits it)."""
HF_ABSENT_TERMS = ("seq_aux_loss_coef", "global_aux_loss_coef", "z_loss_coef")
"""Ava balancing coefficients no HF Qwen3-MoE / Mixtral / OLMoE computes: 0 on import, dropped on export."""


class _Progress(Protocol):
    """What the conversion loops report to: a :func:`~Ava.utils.progress.progress_bar`."""

    def update(self, n: int = 1) -> object: ...


def size_text(n_bytes: int) -> str:
    """``n_bytes`` for a message: ``"812 KiB"``, ``"3.4 MiB"``, ``"1.2 GiB"``."""
    if n_bytes >= 2**30:
        return f"{n_bytes / 2**30:.1f} GiB"
    if n_bytes >= 2**20:
        return f"{n_bytes / 2**20:.1f} MiB"
    return f"{max(1, round(n_bytes / 2**10)) if n_bytes else 0} KiB"


def describe_written(folder: Path, names: list[str]) -> str:
    """``"4 files, 3.4 MiB"``: how many of ``names`` exist in ``folder`` and their total size."""
    sizes = [(folder / name).stat().st_size for name in names if (folder / name).is_file()]
    return f"{plural(len(sizes), 'file')}, {size_text(sum(sizes))}"


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def hf_export_problems(model: EnhancedMoEModel, arch: str) -> list[str]:
    """Everything that stops ``model`` from being exported as ``arch``.

    Args:
        model: the Ava model (its config, and the aux-free bias values).
        arch: ``qwen3_moe``, ``mixtral`` or ``olmoe``.

    Returns:
        One message per problem (empty = exportable).
    """
    cfg, moe = model.config, model.config.moe
    problems = []
    if cfg.attention != "standard":
        problems.append(f"model.attention={cfg.attention}: HF Qwen3-MoE/Mixtral/OLMoE have standard multi-head "
                        "attention only; train with model.attention: standard to export")
    if cfg.cross_attention.every:
        problems.append(f"model.cross_attention.every={cfg.cross_attention.every}: HF Qwen3-MoE/Mixtral/OLMoE have no "
                        "cross-attention blocks; set every: 0 to export")
    if moe.router not in ("softmax", "switch", "noisy_topk"):
        problems.append(f"model.moe.router={moe.router}: HF MoE models route by softmax top-k only")
    if moe.routed_scaling_factor != 1.0:
        problems.append(f"model.moe.routed_scaling_factor={moe.routed_scaling_factor}: HF "
                        "Qwen3-MoE/Mixtral/OLMoE have no gate scaling (needs 1.0)")
    if moe.n_groups is not None and moe.n_groups > 1:
        problems.append(f"model.moe.n_groups={moe.n_groups}: group-limited routing has no HF "
                        "Qwen3-MoE/Mixtral/OLMoE equivalent")
    if moe.num_shared_experts > 0:
        problems.append(f"model.moe.num_shared_experts={moe.num_shared_experts}: Qwen3-MoE/Mixtral/OLMoE have no "
                        "shared experts (Qwen2-MoE's are sigmoid-gated, Ava's are not)")
    if moe.aux_free_bias and any(
        layer.mlp.gate.expert_bias is not None and bool(layer.mlp.gate.expert_bias.abs().max() > 0)
        for layer in model.layers if layer.is_moe
    ):
        problems.append("model.moe.aux_free_bias: the trained expert bias changes which experts are chosen, "
                        "which no HF MoE router can express")
    eval_cf = moe.eval_capacity_factor if moe.eval_capacity_factor is not None else moe.capacity_factor
    if eval_cf is not None and eval_cf < cfg.num_experts / moe.top_k:
        problems.append(f"model.moe.eval_capacity_factor={eval_cf}: HF models are dropless; set it ≥ "
                        f"num_experts/top_k = {cfg.num_experts / moe.top_k:g} to export")
    if arch == "qwen3_moe" and not cfg.qk_norm:
        problems.append("model.qk_norm=false: Qwen3-MoE always normalises queries and keys; export as mixtral "
                        "(--arch mixtral) instead")
    if arch == "qwen3_moe" and cfg.qk_norm_full:
        problems.append("model.qk_norm_scope=full: Qwen3-MoE normalises queries and keys per head; export as "
                        "olmoe (--arch olmoe) instead")
    if arch == "olmoe":
        if not cfg.qk_norm_full:
            problems.append(f"model.qk_norm={cfg.qk_norm}, qk_norm_scope={cfg.qk_norm_scope}: OLMoE normalises "
                            "queries and keys over all heads at once (needs qk_norm: true, qk_norm_scope: full); "
                            "export as qwen3_moe or mixtral instead")
        if cfg.num_heads * cfg.head_dim != cfg.hidden_size:
            problems.append(f"model.head_dim={cfg.head_dim}: OLMoE's attention is hidden_size wide (needs "
                            f"num_heads·head_dim = hidden_size = {cfg.hidden_size})")
        if moe.first_dense_layers > 0 or moe.moe_every > 1:
            problems.append(f"model.moe.first_dense_layers={moe.first_dense_layers}, moe_every={moe.moe_every}: "
                            "OLMoE has MoE in every layer")
    if arch == "mixtral":
        if cfg.qk_norm:
            problems.append("model.qk_norm=true: Mixtral has no QK-norm; export as qwen3_moe instead")
        if moe.first_dense_layers > 0 or moe.moe_every > 1:
            problems.append(f"model.moe.first_dense_layers={moe.first_dense_layers}, moe_every={moe.moe_every}: "
                            "Mixtral has MoE in every layer; export as qwen3_moe instead")
        if moe.router == "switch" or (not moe.norm_topk_prob and moe.top_k > 1):
            problems.append("model.moe: Mixtral renormalises the top-k weights (norm_topk_prob=true, router "
                            "softmax); export as qwen3_moe instead")
    if arch not in ARCHITECTURES:
        problems.append(f"arch={arch!r}: use one of {sorted(ARCHITECTURES)} or auto")
    return problems


def choose_architecture(model: EnhancedMoEModel, arch: str = "auto") -> str:
    """``arch``, or for ``auto`` Mixtral when the model fits it, else OLMoE for full-width QK-norm,
    else Qwen3-MoE.

    Raises:
        AvaConfigError: the model cannot be exported as the chosen architecture (every reason).
    """
    if arch == "auto":
        if not hf_export_problems(model, "mixtral"):
            arch = "mixtral"
        else:
            arch = "olmoe" if model.config.qk_norm_full else "qwen3_moe"
    problems = hf_export_problems(model, arch)
    if problems:
        raise AvaConfigError(f"cannot export as {ARCHITECTURES.get(arch, arch)}: " + "; ".join(problems))
    return arch


def hf_config(model: EnhancedMoEModel, arch: str, tokenizer: AvaTokenizer | None, dtype: torch.dtype) -> dict:
    """The ``config.json`` of ``model`` as ``arch`` (transformers 5.23 keys).

    Args:
        model: the Ava model.
        arch: ``qwen3_moe``, ``mixtral`` or ``olmoe`` (already checked).
        tokenizer: for the special token ids (None = unset).
        dtype: the dtype of the saved weights.

    Returns:
        The JSON-ready dict.
    """
    cfg, moe = model.config, model.config.moe
    eos = tokenizer.eos_id if tokenizer is not None else None
    pad = tokenizer.pad_id if tokenizer is not None else None
    common: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.initializer_range,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": cfg.dropout,
        "num_experts_per_tok": moe.top_k,
        "num_local_experts": cfg.num_experts,
        # HF's balancing loss is top_k × Ava's (it divides counts by T, Ava by T·K): same weighted term
        "router_aux_loss_coef": moe.aux_loss_coef / moe.top_k,
        "output_router_logits": False,
        "sliding_window": None,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "dtype": _DTYPE_NAMES[dtype],
    }
    if arch == "mixtral":
        common.update({"intermediate_size": moe.moe_intermediate_size, "router_jitter_noise": 0.0})
    elif arch == "olmoe":
        del common["num_local_experts"], common["sliding_window"]
        common.update({
            "intermediate_size": moe.moe_intermediate_size,
            "num_experts": cfg.num_experts,
            "norm_topk_prob": bool(moe.norm_topk_prob and moe.router != "switch"),
            "attention_bias": False,
            "clip_qkv": None,
        })
    else:
        common.update({
            "intermediate_size": cfg.intermediate_size,  # the dense (mlp_only) layers
            "moe_intermediate_size": moe.moe_intermediate_size,
            "norm_topk_prob": bool(moe.norm_topk_prob and moe.router != "switch"),
            "decoder_sparse_step": moe.moe_every,
            "mlp_only_layers": list(range(moe.first_dense_layers)),
            "use_sliding_window": False,
            "attention_bias": False,
        })
    return common


TRAINING_ONLY = {
    "mtp.": "the multi-token prediction heads (HF has none; speculative decoding with them stays in Ava)",
    "loss_weighting.": "the uncertainty-weighting loss weights",
    "mlp.gate.noise_weight": "the noisy-top-k noise projection (clean routing at inference)",
    "mlp.gate.expert_bias": "the aux-free expert bias, all zero (a non-zero one refuses the export)",
}
"""Name pattern (prefix when it ends in ``.``, else suffix) → what the export drops and why; the
first match names a tensor (an MTP block's router tensors count as MTP heads)."""


def _training_only(name: str) -> str | None:
    """The first :data:`TRAINING_ONLY` pattern ``name`` matches, if any."""
    for pattern in TRAINING_ONLY:
        if (name.startswith(pattern) if pattern.endswith(".") else name.endswith(pattern)):
            return pattern
    return None


def dropped_on_export(model: EnhancedMoEModel) -> dict[str, int]:
    """What :func:`hf_state_dict` leaves out of ``model``: description → tensor count."""
    counts: dict[str, int] = {}
    for name in model.state_dict():
        pattern = _training_only(name)
        if pattern is not None:
            counts[TRAINING_ONLY[pattern]] = counts.get(TRAINING_ONLY[pattern], 0) + 1
    return counts


def hf_state_dict(model: EnhancedMoEModel, dtype: torch.dtype | None = None,
                  progress: _Progress | None = None) -> dict[str, torch.Tensor]:
    """Ava weights under HF names: ``model.`` + Ava name, ``lm_head.weight`` as is.

    Training-only tensors (:data:`TRAINING_ONLY`) are dropped; with tied embeddings only
    ``model.embed_tokens.weight`` is written (HF re-ties it).

    Args:
        model: the Ava model.
        dtype: cast floating tensors to this (None = keep).
        progress: told ``update(1)`` after each tensor of the state dict (kept or dropped), so a
            bar over ``len(model.state_dict())`` tensors ends full.

    Returns:
        name → contiguous CPU tensor.
    """
    out = {}
    for name, tensor in model.state_dict().items():
        if progress is not None:
            progress.update(1)
        if _training_only(name):
            continue
        if name == "lm_head.weight":
            if model.config.tie_embeddings:
                continue
            key = name
        else:
            key = "model." + name
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[key] = tensor.contiguous()
    return out


def export_hf(path: str | Path, out: str | Path, arch: str = "auto", dtype: str | None = None,
              verify: bool = True, progress: bool | None = None) -> Path:
    """Write a Hugging Face folder that ``AutoModelForCausalLM.from_pretrained`` loads.

    Files: ``config.json``, ``model.safetensors``, ``generation_config.json`` and, when the
    checkpoint has one, ``tokenizer.json`` + ``tokenizer_config.json`` +
    ``special_tokens_map.json`` (loadable by ``AutoTokenizer`` as ``PreTrainedTokenizerFast``).

    Args:
        path: a run folder, checkpoint folder or Ava model folder.
        out: the folder to write (created; existing files of the same names are replaced).
        arch: ``auto``, ``qwen3_moe``, ``mixtral`` or ``olmoe``.
        dtype: ``fp32``, ``bf16`` or ``fp16`` (None = the checkpoint's dtype).
        verify: check the checkpoint against its manifest first (see
            :meth:`EnhancedMoEModel.from_pretrained`); False skips it with a warning.
        progress: a progress bar (with ETA, on stderr) over the tensors converted; None = when
            stderr is a terminal.

    Returns:
        The output folder. The last log line says what was written where (files, size).

    Raises:
        AvaOutputError: ``out`` cannot be written (checked before anything is loaded).
        AvaConfigError: the model uses a feature the chosen architecture lacks.
        AvaCheckpointError: no checkpoint at ``path``, or a damaged one.
    """
    from safetensors.torch import save_file

    if dtype is not None and dtype not in _DTYPES:
        raise AvaConfigError(f"--dtype {dtype!r}: use one of {sorted(_DTYPES)}")
    folder = check_output_dir(out, "out")
    checkpoint = resolve_checkpoint(path)
    model = EnhancedMoEModel.from_pretrained(checkpoint, verify=verify)
    arch = choose_architecture(model, arch)
    tokenizer_file = checkpoint / TOKENIZER_FILE
    tokenizer = AvaTokenizer.from_file(tokenizer_file) if tokenizer_file.is_file() else None
    target = _DTYPES[dtype] if dtype else next(model.parameters()).dtype
    folder.mkdir(parents=True, exist_ok=True)
    with progress_bar(len(model.state_dict()), "export: converting", "tensor", show=progress) as bar:
        weights = hf_state_dict(model, target, progress=bar)
        bar.set_description(f"export: writing {WEIGHTS_FILE}")
        save_file(weights, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    del weights
    set_default_mode(folder / WEIGHTS_FILE)  # safetensors writes 0600; config.json gets 0666 - umask
    for what, count in dropped_on_export(model).items():
        logger.info("not exported (training-only): %s, %s", what, plural(count, "tensor"))
    moe = model.config.moe
    logger.info("router_aux_loss_coef = model.moe.aux_loss_coef / top_k = %g / %d = %g (transformers' "
                "load-balancing loss is top_k times Ava's)", moe.aux_loss_coef, moe.top_k,
                moe.aux_loss_coef / moe.top_k)
    for name in HF_ABSENT_TERMS:
        if moe.coef_peak(name) > 0:
            logger.info("not exported (training-only): model.moe.%s=%g, %s has no such term", name,
                        getattr(moe, name), ARCHITECTURES[arch])
    _write_json(folder / "config.json", hf_config(model, arch, tokenizer, target))
    generation = {"eos_token_id": None, "pad_token_id": None, "bos_token_id": None}
    if tokenizer is not None:
        generation.update(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
        shutil.copyfile(tokenizer_file, folder / TOKENIZER_FILE)
        _write_tokenizer_config(folder, tokenizer, model.config.max_seq_len)
    else:
        logger.warning("%s has no %s; the export has no tokenizer", checkpoint, TOKENIZER_FILE)
    _write_json(folder / "generation_config.json", generation)
    written = [WEIGHTS_FILE, "config.json", "generation_config.json"]
    if tokenizer is not None:
        written += [TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json"]
    logger.info("exported %s as %s (%s parameters, %s) to %s (%s)", checkpoint, ARCHITECTURES[arch],
                f"{model.num_parameters():,}", _DTYPE_NAMES[target], folder, describe_written(folder, written))
    return folder


def _write_tokenizer_config(folder: Path, tokenizer: AvaTokenizer, max_len: int) -> None:
    eos = tokenizer.tokenizer.id_to_token(tokenizer.eos_id)
    pad = tokenizer.tokenizer.id_to_token(tokenizer.pad_id)
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        "pad_token": pad,
        "bos_token": None,
        "unk_token": None,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
    })
    _write_json(folder / "special_tokens_map.json", {"eos_token": eos, "pad_token": pad})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# import
# --------------------------------------------------------------------------------------------


def ava_config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Translate a Qwen3-MoE / Mixtral / OLMoE ``config.json`` into an Ava :class:`ModelConfig`.

    Args:
        hf: the parsed config.json.
        source: the file, for messages.

    Returns:
        The model config.

    Raises:
        AvaConfigError: an unsupported model type or feature (every problem at once).
    """
    kind = hf.get("model_type")
    if kind not in IMPORTABLE:
        raise AvaConfigError(f"{source}: model_type={kind!r} is not importable; Ava imports {list(IMPORTABLE)}")
    heads = hf["num_attention_heads"]
    kv_heads = hf.get("num_key_value_heads") or heads
    hidden = hf["hidden_size"]
    head_dim = hf.get("head_dim") or None  # null = hidden_size // heads, as transformers derives it
    problems = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r}: Ava's experts use SiLU (SwiGLU)")
    if hf.get("attention_bias"):
        problems.append("attention_bias=true: Ava's attention projections have no bias")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope type {rope.get('rope_type', rope.get('type'))!r}: Ava implements plain RoPE only")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if hf.get("use_sliding_window") or (kind == "mixtral" and hf.get("sliding_window")):
        problems.append(f"sliding_window={hf.get('sliding_window')}: Ava attends over the full context")
    if kind == "olmoe":
        if hf.get("clip_qkv") is not None:
            problems.append(f"clip_qkv={hf['clip_qkv']}: Ava does not clip q/k/v")
        if head_dim is not None and head_dim * heads != hidden:
            problems.append(f"head_dim={head_dim} with {plural(heads, 'head')} ≠ hidden_size={hidden}: OLMoE's q_norm is "
                            "hidden_size wide, so transformers itself cannot build this model")
    num_experts = hf.get("num_local_experts", hf.get("num_experts"))
    first_dense, moe_every = 0, 1
    if kind == "qwen3_moe":
        dense = sorted(hf.get("mlp_only_layers") or [])
        if dense != list(range(len(dense))):
            problems.append(f"mlp_only_layers={dense}: Ava's dense layers must be the first k layers")
        first_dense, moe_every = len(dense), hf.get("decoder_sparse_step", 1)
    if problems:
        raise AvaConfigError(f"{source}: cannot import this {kind} model: " + "; ".join(problems))
    expert_width = hf["intermediate_size"] if kind in ("mixtral", "olmoe") else hf["moe_intermediate_size"]
    top_k = hf["num_experts_per_tok"]
    router_aux = hf.get("router_aux_loss_coef")
    if router_aux is None:  # absent or null: what transformers trains this model_type with
        router_aux = HF_AUX_LOSS_COEF_DEFAULT[kind]
    logger.info("model.moe.aux_loss_coef = router_aux_loss_coef · num_experts_per_tok = %g · %d = %g (transformers' "
                "load-balancing loss is top_k times Ava's); %s, aux_free_bias off: %s trains with none of them",
                router_aux, top_k, router_aux * top_k, " = ".join(HF_ABSENT_TERMS) + " = 0", kind)
    if hf.get("router_jitter_noise"):
        logger.warning("%s: router_jitter_noise=%g not imported (Ava has no multiplicative router jitter)",
                       source, hf["router_jitter_noise"])
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hidden, num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=kv_heads, head_dim=head_dim, max_seq_len=hf.get("max_position_embeddings", 4096),
        num_experts=num_experts, intermediate_size=hf["intermediate_size"], rope_theta=theta,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        qk_norm=kind in ("qwen3_moe", "olmoe"), qk_norm_scope="full" if kind == "olmoe" else "head",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        moe={
            "top_k": top_k, "router": "softmax",
            "norm_topk_prob": True if kind == "mixtral" else bool(hf.get("norm_topk_prob", False)),
            "moe_intermediate_size": expert_width, "first_dense_layers": first_dense, "moe_every": moe_every,
            # the source's balancing strength, and no term it never trained with
            "aux_loss_coef": router_aux * top_k, "aux_free_bias": False, **dict.fromkeys(HF_ABSENT_TERMS, 0.0),
        },
    )


_PER_EXPERT = re.compile(
    r"^layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$"
)
_PER_EXPERT_ROLE = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def ava_state_dict_from_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors (any supported naming) → Ava state-dict names and layouts.

    Args:
        tensors: every tensor of the HF checkpoint.
        cfg: the translated config (for the expert count and widths).

    Returns:
        Ava name → tensor.

    Raises:
        AvaCheckpointError: a per-expert tensor set is incomplete or a fused tensor has an
            unexpected shape.
    """
    out: dict[str, torch.Tensor] = {}
    per_expert: dict[int, dict[str, dict[int, torch.Tensor]]] = {}
    for name, tensor in tensors.items():
        key = name[len("model."):] if name.startswith("model.") else name
        key = key.replace(".block_sparse_moe.", ".mlp.")
        match = _PER_EXPERT.match(key)
        if match:
            layer, expert, role = int(match[1]), int(match[2]), match[3]
            per_expert.setdefault(layer, {}).setdefault(_PER_EXPERT_ROLE.get(role, role), {})[expert] = tensor
            continue
        out[key] = tensor
    E, D, inter = cfg.num_experts, cfg.hidden_size, cfg.moe.moe_intermediate_size
    for layer, roles in per_expert.items():
        try:
            gate = torch.stack([roles["gate_proj"][e] for e in range(E)])  # (E, I, D)
            up = torch.stack([roles["up_proj"][e] for e in range(E)])  # (E, I, D)
            down = torch.stack([roles["down_proj"][e] for e in range(E)])  # (E, D, I)
        except KeyError as err:
            raise AvaCheckpointError(f"layer {layer}: per-expert weights incomplete (missing {err}); "
                                     "the checkpoint is damaged or sharded files are missing") from None
        out[f"layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat([gate, up], dim=1)  # (E, 2I, D)
        out[f"layers.{layer}.mlp.experts.down_proj"] = down
    for key, tensor in out.items():
        if key.endswith("experts.gate_up_proj") and tuple(tensor.shape) != (E, 2 * inter, D):
            raise AvaCheckpointError(f"{key}: shape {tuple(tensor.shape)}, expected (E, 2I, D) = "
                                     f"({E}, {2 * inter}, {D}); this transformers layout is not supported")
    if cfg.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def read_hf_tensors(folder: Path, progress: bool | None = False) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files in ``folder`` (one file or shards).

    Args:
        folder: the HF model folder.
        progress: a progress bar (with ETA, on stderr) over the tensors read; None = when stderr
            is a terminal, False (the default) = none.

    Raises:
        AvaCheckpointError: no safetensors file, or one that cannot be read.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise AvaCheckpointError(f"{folder}: no *.safetensors weights; convert a pytorch_model.bin checkpoint "
                                 "with transformers' save_pretrained(safe_serialization=True) first")
    tensors: dict[str, torch.Tensor] = {}
    try:
        handles = [safe_open(str(file), framework="pt") for file in files]
        total = sum(len(list(handle.keys())) for handle in handles)
        with progress_bar(total, "import: reading", "tensor", show=progress) as bar:
            for handle in handles:
                for name in handle.keys():
                    tensors[name] = handle.get_tensor(name)
                    bar.update(1)
    except (SafetensorError, OSError) as err:
        raise AvaCheckpointError(f"{folder}: cannot read the safetensors weights ({err}); the files are "
                                 "damaged or incomplete") from err
    return tensors


def import_hf(hf_dir: str | Path, out: str | Path | None = None, progress: bool | None = None) -> EnhancedMoEModel:
    """Load a Hugging Face Mixtral / Qwen3-MoE / OLMoE folder as an Ava model.

    Args:
        hf_dir: the HF folder (``config.json`` + safetensors, tokenizer optional).
        out: when given, save there as an Ava model folder (``model.safetensors``, ``config.yaml``
            and ``tokenizer.json`` when the HF one has an end-of-text token Ava recognises), which
            ``ava generate``/``ava eval``/``ava export`` accept.
        progress: a progress bar (with ETA, on stderr) over the tensors read; None = when stderr
            is a terminal.

    Returns:
        The model (fp32 or the checkpoint's dtype), in eval mode.

    Raises:
        AvaOutputError: ``out`` cannot be written (checked before anything is read).
        AvaCheckpointError: missing/damaged files. AvaConfigError: unsupported features.
    """
    if out is not None:
        check_output_dir(out, "out")
    folder = Path(hf_dir)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise AvaCheckpointError(f"{config_file} does not exist; pass a Hugging Face model folder")
    try:
        hf = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise AvaCheckpointError(f"{config_file}: unreadable JSON ({err})") from err
    cfg = ava_config_from_hf(hf, str(config_file))
    state = ava_state_dict_from_hf(read_hf_tensors(folder, progress=progress), cfg)
    model = EnhancedMoEModel(cfg)
    dtype = next(iter(state.values())).dtype
    model.to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise AvaCheckpointError(f"{folder}: weights do not match the config (missing {missing[:4]}, "
                                 f"unexpected {unexpected[:4]}); the checkpoint is not a plain {hf['model_type']}")
    model.eval()
    if out is not None:
        target = model.save_pretrained(out)
        tokenizer_file = folder / TOKENIZER_FILE
        if tokenizer_file.is_file():
            try:
                AvaTokenizer.from_file(tokenizer_file)
                shutil.copyfile(tokenizer_file, target / TOKENIZER_FILE)
            except AvaDataError as err:  # e.g. no end-of-text token Ava recognises: skip the copy
                logger.warning("%s not copied: %s", tokenizer_file, err)
    return model

"""GGUF files for llama.cpp and Ollama: export Ava models, read them back.

The export goes Ava → Hugging Face names and config (:mod:`Ava.interop.huggingface`, so the
features no HF architecture computes are refused in one place) → GGUF names, metadata and
quantized blocks through the ``gguf`` package (llama.cpp's own Python writer). Architectures:

- ``qwen3moe``: an MoE model with per-head QK-norm (every layer MoE; llama.cpp renormalises the
  top-k weights, so ``norm_topk_prob`` must be on).
- ``llama`` with experts (llama.cpp's Mixtral): the same without QK-norm.
- ``qwen3``: a dense model (every layer dense, or one expert per MoE layer) with QK-norm.
- ``llama``: a dense model without QK-norm. llama.cpp's ``llama`` rotates interleaved pairs where
  Ava and HF rotate halves, so the query and key rows are permuted as llama.cpp's converter does.

Refused (llama.cpp computes none of them): dense and MoE layers mixed (``first_dense_layers`` /
``moe_every``) in an MoE model, top-k weights not renormalised (``norm_topk_prob: false`` or the
``switch`` router), full-width QK-norm (``qk_norm_scope: full``), and everything the HF export
refuses (non-softmax routers, routed scaling, group-limited routing, shared experts, a trained
aux-free bias, eval-time capacity dropping).

Tensor types (``--quant``): ``f32``, ``f16``, ``bf16``, ``q8_0``, ``q4_0``. As in llama.cpp's
converter, 1-D tensors (norms) and the router (``ffn_gate_inp``) stay F32 and a matrix whose rows
are not a multiple of the 32-value block falls back to F16; with ``q4_0`` the embedding and output
matrices are Q8_0 (llama.cpp's quantizer also keeps the output matrix at a higher precision).

Tokenizer: ``tokenizer.ggml.model = gpt2`` (byte-level BPE), the tokens in id order, their types
(Ava's special tokens are control tokens), the merges, and ``tokenizer.ggml.pre = gpt-2``, whose
split rule in llama.cpp (``unicode_regex_split_custom_gpt2``) is the regex of HF ``tokenizers``'
``ByteLevel`` pre-tokenizer: ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``.
Ava adds no beginning-of-text token (``add_bos_token`` false; ``bos_token_id`` is the end-of-text
id so no stray token is named); end-of-text and padding ids are Ava's.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..data import AvaTokenizer
from ..data.records import plural
from ..errors import AvaCheckpointError, AvaConfigError, AvaDataError, AvaOutputError
from ..models import EnhancedMoEModel
from ..utils.checkpoint import TOKENIZER_FILE, resolve_checkpoint
from ..utils.output_paths import check_output_file
from ..utils.progress import progress_bar
from .huggingface import dropped_on_export, hf_config, hf_export_problems, hf_state_dict, size_text

logger = logging.getLogger(__name__)

QUANT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
"""The ``--quant`` choices."""
BLOCK = 32
"""Values per Q8_0 / Q4_0 block: a row length must be a multiple of it."""
PRE_TOKENIZER = "gpt-2"
"""llama.cpp's name for the GPT-2 / HF ``ByteLevel`` split regex."""

# HF name inside a decoder layer → GGUF name inside ``blk.{i}`` (without ``.weight``)
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}


def _gguf():
    """The ``gguf`` package, or a one-line error naming the install command."""
    try:
        import gguf
    except ImportError:
        raise AvaConfigError("GGUF export needs the gguf package: pip install gguf") from None
    return gguf


# --------------------------------------------------------------------------------------------
# what can be exported
# --------------------------------------------------------------------------------------------


def _moe_layers(model: EnhancedMoEModel) -> list[int]:
    return [i for i, layer in enumerate(model.layers) if layer.is_moe]


def gguf_plan(model: EnhancedMoEModel) -> tuple[str, bool]:
    """The GGUF architecture of ``model`` and whether its feed-forward layers are written dense.

    Returns:
        (``qwen3moe`` | ``qwen3`` | ``llama``, dense). Dense = no MoE layer, or one expert per MoE
        layer (its softmax weight is exactly 1, so the layer is a plain SwiGLU).

    Raises:
        AvaConfigError: every feature llama.cpp cannot compute, in one line.
    """
    cfg, moe = model.config, model.config.moe
    moe_layers = _moe_layers(model)
    dense = not moe_layers or cfg.num_experts == 1
    problems = []
    if moe_layers:  # the routing features no HF (and no llama.cpp) MoE computes
        problems += [p for p in hf_export_problems(model, "qwen3_moe")
                     if not p.startswith(("model.qk_norm", "model.attention", "model.cross_attention"))]
    if cfg.attention != "standard":
        problems.append(f"model.attention={cfg.attention}: llama.cpp computes standard multi-head attention only; "
                        "train with model.attention: standard to export")
    if cfg.cross_attention.every:
        problems.append(f"model.cross_attention.every={cfg.cross_attention.every}: llama.cpp's qwen3/qwen3moe/llama "
                        "have no cross-attention blocks; set every: 0 to export")
    if cfg.qk_norm_full:
        problems.append("model.qk_norm_scope=full: llama.cpp's qwen3/qwen3moe normalise queries and keys per head "
                        "(an OLMoE-style full-width QK-norm is not exported to GGUF)")
    if moe_layers and not dense:
        if len(moe_layers) != cfg.num_layers:
            problems.append(f"model.moe.first_dense_layers={moe.first_dense_layers}, moe_every={moe.moe_every}: "
                            "llama.cpp's qwen3moe and llama MoE have MoE in every layer")
        if moe.router == "switch" or not moe.norm_topk_prob:
            problems.append(f"model.moe.router={moe.router}, norm_topk_prob={moe.norm_topk_prob}: llama.cpp "
                            "renormalises the top-k weights (needs norm_topk_prob: true and a softmax router)")
    if dense and moe_layers and len(moe_layers) != cfg.num_layers and moe.moe_intermediate_size != cfg.intermediate_size:
        problems.append(f"model.intermediate_size={cfg.intermediate_size} ≠ moe.moe_intermediate_size="
                        f"{moe.moe_intermediate_size}: a dense GGUF has one feed-forward width")
    if problems:
        raise AvaConfigError("cannot export as GGUF: " + "; ".join(problems))
    if dense:
        return ("qwen3" if cfg.qk_norm else "llama"), True
    return ("qwen3moe" if cfg.qk_norm else "llama"), False


def _permute_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rotate-half rows (Ava, HF) → interleaved-pair rows (llama.cpp's ``llama``), per head."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _unpermute_rope(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Inverse of :func:`_permute_rope`."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_tensors(model: EnhancedMoEModel, arch: str, dense: bool) -> dict[str, torch.Tensor]:
    """The GGUF-named float32 tensors of ``model`` (from its HF-named state dict).

    Args:
        model: the Ava model (already checked by :func:`gguf_plan`).
        arch: the GGUF architecture.
        dense: write one-expert MoE layers as dense SwiGLU layers.

    Returns:
        GGUF name → float32 tensor, numpy order (rows = outputs); experts are ``(E, out, in)``.
    """
    cfg = model.config
    out: dict[str, torch.Tensor] = {}
    for name, tensor in hf_state_dict(model, torch.float32).items():
        if name in _GLOBAL_NAMES:
            out[_GLOBAL_NAMES[name]] = tensor
            continue
        _, _, layer, rest = name.split(".", 3)  # model.layers.{i}.rest
        blk = f"blk.{layer}"
        if rest == "mlp.experts.gate_up_proj":
            inter = tensor.shape[1] // 2
            gate, up = tensor[:, :inter], tensor[:, inter:]
            if dense:
                out[f"{blk}.ffn_gate.weight"], out[f"{blk}.ffn_up.weight"] = gate[0], up[0]
            else:
                out[f"{blk}.ffn_gate_exps.weight"], out[f"{blk}.ffn_up_exps.weight"] = gate, up
        elif rest == "mlp.experts.down_proj":
            out[f"{blk}.ffn_down{'' if dense else '_exps'}.weight"] = tensor[0] if dense else tensor
        elif rest == "mlp.gate.weight" and dense:
            continue  # one expert: its softmax weight is 1
        else:
            base = rest.removesuffix(".weight")
            if base not in _LAYER_NAMES:
                raise AvaCheckpointError(f"{name}: no GGUF name for this tensor")
            if arch == "llama" and base in ("self_attn.q_proj", "self_attn.k_proj"):
                tensor = _permute_rope(tensor, cfg.num_heads if base.endswith("q_proj") else cfg.num_kv_heads)
            out[f"{blk}.{_LAYER_NAMES[base]}.weight"] = tensor
    return {name: t.contiguous() for name, t in out.items()}


def tensor_type(name: str, shape: tuple[int, ...], quant: str):
    """The ``GGMLQuantizationType`` a tensor is written as for ``--quant quant`` (see the module doc)."""
    gguf = _gguf()
    Q = gguf.GGMLQuantizationType
    if len(shape) == 1 or name.endswith("ffn_gate_inp.weight") or quant == "f32":
        return Q.F32
    if quant in ("f16", "bf16"):
        return Q.F16 if quant == "f16" else Q.BF16
    if shape[-1] % BLOCK:
        return Q.F16
    if quant == "q4_0" and name in ("token_embd.weight", "output.weight"):
        return Q.Q8_0
    return Q.Q8_0 if quant == "q8_0" else Q.Q4_0


def _encode(array: np.ndarray, qtype) -> np.ndarray:
    gguf = _gguf()
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(array, dtype=np.float32)
    return gguf.quants.quantize(array, qtype)


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    gguf = _gguf()
    size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * (shape[-1] // size) * type_size


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------


def gguf_vocab(tokenizer: AvaTokenizer, vocab_size: int) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` values of ``tokenizer`` for a model with ``vocab_size`` rows.

    Returns:
        ``tokens`` (id order, padded with ``[PAD{id}]`` unused tokens up to ``vocab_size``),
        ``types`` and ``merges`` (``"a b"`` strings).

    Raises:
        AvaDataError: not a byte-level BPE with HF's ``ByteLevel`` split, ids with gaps, or more
            tokens than the model has rows.
    """
    gguf = _gguf()
    spec = json.loads(tokenizer.tokenizer.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if (model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True)
            or pre.get("add_prefix_space") or spec.get("normalizer")):
        raise AvaDataError(f"the tokenizer is not a plain byte-level BPE (model {model.get('type')}, pre-tokenizer "
                           f"{pre.get('type')}, normalizer {(spec.get('normalizer') or {}).get('type')}); GGUF "
                           "export writes Ava's tokenizer kind only (llama.cpp's gpt2 / gpt-2)")
    vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise AvaDataError("the tokenizer's ids have gaps; llama.cpp needs ids 0..n-1")
    if len(vocab) > vocab_size:
        raise AvaDataError(f"the tokenizer has {plural(len(vocab), 'token')}, more than model.vocab_size={vocab_size}")
    tokens = [""] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    added = {entry["id"]: entry.get("special", False) for entry in spec.get("added_tokens", [])}
    T = gguf.TokenType
    types = [(T.CONTROL if added[i] else T.USER_DEFINED) if i in added else T.NORMAL for i in range(len(tokens))]
    for index in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{index}]")
        types.append(T.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": [int(t) for t in types], "merges": merges}


# --------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------


def _file_type(quant: str) -> int:
    F = _gguf().LlamaFileType
    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q4_0": F.MOSTLY_Q4_0}[quant]


def _write_metadata(writer, model: EnhancedMoEModel, arch: str, dense: bool, quant: str,
                    tokenizer: AvaTokenizer, name: str) -> None:
    gguf = _gguf()
    cfg = model.config
    hf = hf_config(model, "qwen3_moe", tokenizer, torch.float32)  # one source for the HF-shaped numbers
    writer.add_name(name)
    writer.add_file_type(int(_file_type(quant)))
    if quant in ("q8_0", "q4_0"):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_block_count(hf["num_hidden_layers"])
    writer.add_head_count(hf["num_attention_heads"])
    writer.add_head_count_kv(hf["num_key_value_heads"])
    writer.add_key_length(hf["head_dim"])
    writer.add_value_length(hf["head_dim"])
    writer.add_rope_dimension_count(hf["head_dim"])
    writer.add_rope_freq_base(float(hf["rope_parameters"]["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(hf["rms_norm_eps"]))
    writer.add_vocab_size(hf["vocab_size"])
    if dense:
        width = hf["moe_intermediate_size"] if _moe_layers(model) else hf["intermediate_size"]
        writer.add_feed_forward_length(width)
    elif arch == "llama":  # llama.cpp's Mixtral reads the expert width from feed_forward_length
        writer.add_feed_forward_length(hf["moe_intermediate_size"])
        writer.add_expert_count(hf["num_local_experts"])
        writer.add_expert_used_count(hf["num_experts_per_tok"])
    else:
        writer.add_feed_forward_length(hf["intermediate_size"])
        writer.add_expert_feed_forward_length(hf["moe_intermediate_size"])
        writer.add_expert_count(hf["num_local_experts"])
        writer.add_expert_used_count(hf["num_experts_per_tok"])
    vocab = gguf_vocab(tokenizer, cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(tokenizer.eos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def export_gguf(path: str | Path, out: str | Path, quant: str = "f32", force: bool = False,
                verify: bool = True, progress: bool | None = None) -> Path:
    """Write ``model`` at ``path`` as one GGUF file that llama.cpp and Ollama load.

    Args:
        path: a run folder, checkpoint folder or Ava model folder (with its ``tokenizer.json``).
        out: the ``.gguf`` file to write.
        quant: ``f32``, ``f16``, ``bf16``, ``q8_0`` or ``q4_0`` (see the module doc for which
            tensors stay F32 / fall back to F16).
        force: replace an existing file.
        verify: check the checkpoint against its manifest first; False skips it with a warning.
        progress: a progress bar (with ETA, on stderr) over the tensors written; None = when
            stderr is a terminal.

    Returns:
        The file written. The last log line says what was written where (architecture, size).

    Raises:
        AvaOutputError: ``out`` cannot be written, or exists without ``force`` (checked before
            anything is loaded).
        AvaConfigError: an unknown ``quant``, or a feature llama.cpp lacks (every reason, one line).
        AvaDataError: no tokenizer, or one llama.cpp's gpt2 vocabulary cannot express.
        AvaCheckpointError: no checkpoint at ``path``, or a damaged one.
    """
    if quant not in QUANT_TYPES:
        raise AvaConfigError(f"--quant {quant!r}: use one of {', '.join(QUANT_TYPES)}")
    gguf = _gguf()
    target = check_output_file(out, "--out")
    if target.suffix != ".gguf":
        raise AvaOutputError(f"--out {target}: a GGUF file name ends in .gguf (llama.cpp and Ollama look for it)")
    if target.exists() and not force:
        raise AvaOutputError(f"--out {target}: the file exists; pass --force to replace it")
    checkpoint = resolve_checkpoint(path)
    tokenizer_file = checkpoint / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise AvaDataError(f"{checkpoint} has no {TOKENIZER_FILE}; a GGUF file carries the tokenizer llama.cpp "
                           "uses, so copy the run's tokenizer.json there")
    model = EnhancedMoEModel.from_pretrained(checkpoint, verify=verify)
    tokenizer = AvaTokenizer.from_file(tokenizer_file)
    arch, dense = gguf_plan(model)
    tensors = gguf_tensors(model, arch, dense)
    plan = {name: tensor_type(name, tuple(t.shape), quant) for name, t in tensors.items()}

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    writer = gguf.GGUFWriter(partial, arch)
    done = False
    try:
        _write_metadata(writer, model, arch, dense, quant, tokenizer, checkpoint.resolve().name)
        for name, tensor in tensors.items():
            qtype, shape = plan[name], tuple(tensor.shape)
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                np_dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
                writer.add_tensor_info(name, shape, np.dtype(np_dtype), _nbytes(shape, qtype))
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
                writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), _nbytes(shape, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with progress_bar(len(tensors), "export: writing GGUF", "tensor", show=progress) as bar:
            for name, tensor in tensors.items():
                writer.write_tensor_data(_encode(tensor.numpy(), plan[name]))
                bar.update(1)
        done = True
    finally:
        writer.close()
        if not done:  # an interrupted export leaves no half-written file behind
            partial.unlink(missing_ok=True)
    partial.replace(target)
    for what, count in dropped_on_export(model).items():
        logger.info("not exported (training-only): %s, %s", what, plural(count, "tensor"))
    counts: dict[str, int] = {}
    for qtype in plan.values():
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    logger.info("exported %s as GGUF %s (%s parameters, --quant %s: %s tensors) to %s (%s)", checkpoint, arch,
                f"{model.num_parameters():,}", quant, kinds, target, size_text(target.stat().st_size))
    return target


# --------------------------------------------------------------------------------------------
# read back
# --------------------------------------------------------------------------------------------


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    if field is None:
        return default
    return field.contents()


def read_gguf_state_dict(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a GGUF file written by :func:`export_gguf` (or a llama.cpp ``qwen3moe`` / ``qwen3`` /
    ``llama`` file of the same layout) as an Ava config and float32 state dict.

    Quantized tensors are dequantized with ``gguf.quants``; a one-expert export comes back as a
    dense model (same logits).

    Args:
        path: the ``.gguf`` file.

    Returns:
        (model config, Ava state dict) for :class:`EnhancedMoEModel` ``(config).load_state_dict``.

    Raises:
        AvaCheckpointError: not a readable GGUF file, or an architecture / tensor this reader
            does not map.
    """
    gguf = _gguf()
    path = Path(path).expanduser()
    if not path.is_file():
        raise AvaCheckpointError(f"{path} does not exist; pass a .gguf file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as err:
        raise AvaCheckpointError(f"{path}: not a readable GGUF file ({err})") from None
    arch = _field(reader, "general.architecture")
    if arch not in ("qwen3moe", "qwen3", "llama"):
        raise AvaCheckpointError(f"{path}: architecture {arch!r} is not readable; Ava reads qwen3moe, qwen3, llama")
    raw: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        raw[t.name] = torch.from_numpy(np.array(values, dtype=np.float32))
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    kv_heads = int(_field(reader, f"{arch}.attention.head_count_kv", heads))
    experts = int(_field(reader, f"{arch}.expert_count", 0) or 0)
    layers = int(_field(reader, f"{arch}.block_count"))
    ffn = int(_field(reader, f"{arch}.feed_forward_length"))
    expert_ffn = int(_field(reader, f"{arch}.expert_feed_forward_length", ffn) or ffn)
    if arch == "llama" and experts:
        expert_ffn = ffn
    hidden = raw["token_embd.weight"].shape[1]
    cfg = ModelConfig(
        vocab_size=raw["token_embd.weight"].shape[0], hidden_size=hidden, num_layers=layers,
        num_heads=heads, num_kv_heads=kv_heads,
        head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        max_seq_len=int(_field(reader, f"{arch}.context_length")),
        num_experts=max(experts, 1), intermediate_size=ffn,
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        qk_norm=arch != "llama", tie_embeddings="output.weight" not in raw,
        moe={"top_k": int(_field(reader, f"{arch}.expert_used_count", 1) or 1) if experts else 1,
             "norm_topk_prob": True, "moe_intermediate_size": expert_ffn,
             "first_dense_layers": 0 if experts else layers},
    )
    inverse = {v: k for k, v in _LAYER_NAMES.items()}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in raw.items():
        if name == "token_embd.weight":
            state["embed_tokens.weight"] = tensor
        elif name == "output_norm.weight":
            state["norm.weight"] = tensor
        elif name == "output.weight":
            state["lm_head.weight"] = tensor
        elif name.startswith("blk."):
            _, layer, base, _ = name.split(".")
            prefix = f"layers.{layer}."
            if base in ("ffn_gate_exps", "ffn_up_exps"):
                if base == "ffn_gate_exps":
                    state[prefix + "mlp.experts.gate_up_proj"] = torch.cat(
                        [tensor, raw[f"blk.{layer}.ffn_up_exps.weight"]], dim=1)
            elif base == "ffn_down_exps":
                state[prefix + "mlp.experts.down_proj"] = tensor
            elif base in inverse:
                if arch == "llama" and base in ("attn_q", "attn_k"):
                    tensor = _unpermute_rope(tensor, heads if base == "attn_q" else kv_heads)
                state[prefix + inverse[base] + ".weight"] = tensor
            else:
                raise AvaCheckpointError(f"{path}: tensor {name} has no Ava equivalent")
        else:
            raise AvaCheckpointError(f"{path}: tensor {name} has no Ava equivalent")
    return cfg, state


def load_gguf(path: str | Path) -> EnhancedMoEModel:
    """An :class:`EnhancedMoEModel` (float32, eval mode) from a GGUF file (see
    :func:`read_gguf_state_dict`)."""
    cfg, state = read_gguf_state_dict(path)
    model = EnhancedMoEModel(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise AvaCheckpointError(f"{path}: tensors do not match the metadata (missing {missing[:4]}, "
                                 f"unexpected {unexpected[:4]})")
    return model.eval()

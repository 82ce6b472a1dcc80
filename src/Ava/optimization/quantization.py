"""Post-training quantization of a model: INT8 per-channel, INT4 group-wise, FP8 (e4m3fn) weights.

The numerics (pure quantize/dequantize functions, documented with their error bounds) and the
modules holding quantized weights live in :mod:`Ava.layers.quantized` (so
:meth:`~Ava.models.EnhancedMoEModel.from_pretrained` can rebuild them); they are re-exported here,
where quantization-aware training imports them from:

- :func:`quantize_int8` ``(w) -> (q, scale)``, :func:`dequantize_int8`;
- :func:`quantize_int4` ``(w, group_size) -> (q, scale, zero)``, :func:`dequantize_int4`,
  :func:`pack_int4`/:func:`unpack_int4`;
- :func:`quantize_fp8` ``(w) -> (q, scale)``, :func:`dequantize_fp8`;
- :func:`fake_quantize` ``(w, bits, group_size, fp8=False)``: quantize→dequantize with a
  straight-through gradient.

This module adds the model-level operations: :func:`quantize_model` (in place) and
:func:`save_quantized` (a checkpoint folder that ``ava generate``, ``ava eval`` and
``EnhancedMoEModel.from_pretrained`` load like any other). See ``docs/quantization.md``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from ..config.checkpoint_layout import (
    CONFIG_FILE, MANIFEST_FILE, TOKENIZER_FILE, WEIGHTS_FILE, describe_file, set_default_mode,
)
from ..errors import AvaConfigError
from ..layers.quantized import (
    DEFAULT_INT4_GROUP_SIZE,
    FP8_E4M3_MAX,
    INT4_GROUP_SIZES,
    PACKED_MAX_ROWS,
    QUANTIZATION_FILE,
    SCHEMES,
    QuantizedEmbedding,
    QuantizedExperts,
    QuantizedLinear,
    QuantizedParameter,
    TiedQuantizedLinear,
    dequantize_fp8,
    dequantize_int4,
    dequantize_int8,
    fake_quantize,
    pack_int4,
    quantization_targets,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
    quantize_modules,
    unpack_int4,
)

__all__ = [
    "DEFAULT_INT4_GROUP_SIZE", "FP8_E4M3_MAX", "INT4_GROUP_SIZES", "PACKED_MAX_ROWS", "QUANTIZATION_FILE",
    "SCHEMES", "QuantizedEmbedding", "QuantizedExperts", "QuantizedLinear", "QuantizedParameter",
    "TiedQuantizedLinear", "dequantize_fp8", "dequantize_int4", "dequantize_int8", "fake_quantize", "pack_int4",
    "quantization_targets", "quantize_fp8", "FULL_PRECISION", "quantize_int4", "quantize_int8", "quantize_model",
    "quantize_modules", "save_quantized", "state_bytes", "unpack_int4",
]

FULL_PRECISION = "routers (mlp.gate and its expert bias), norms, and every 1-D tensor"
"""What :func:`quantize_model` leaves in full precision (recorded in ``quantization.json``)."""


def quantize_model(model: nn.Module, scheme: str, group_size: int | None = None) -> dict[str, Any]:
    """Quantize a model's weights in place and describe what was done.

    Quantized: every ``nn.Linear`` (attention, dense/shared MLPs, MTP projection, output head),
    the token embedding, and the routed experts' 3-D weights; :data:`FULL_PRECISION` stays.

    Args:
        model: an :class:`~Ava.models.EnhancedMoEModel` (or any module tree), full precision.
        scheme: ``int8``, ``int4`` or ``fp8``.
        group_size: the int4 group size (32, 64 or 128; default 64); must be None otherwise.

    Returns:
        The ``quantization.json`` content: ``scheme``, ``group_size``, ``modules`` (names),
        ``full_precision``.

    Raises:
        AvaConfigError: unknown scheme, a group size with a scheme other than int4, or a group
            size that does not divide a quantized weight's input width.
    """
    if scheme not in SCHEMES:
        raise AvaConfigError(f"unknown quantization scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if scheme == "int4":
        group_size = DEFAULT_INT4_GROUP_SIZE if group_size is None else group_size
        if group_size not in INT4_GROUP_SIZES:
            raise AvaConfigError(f"int4 group size {group_size}: use one of {', '.join(map(str, INT4_GROUP_SIZES))}")
    elif group_size is not None:
        raise AvaConfigError(f"a group size applies to int4 only, not to {scheme}")
    try:
        names = quantize_modules(model, scheme, group_size)
    except ValueError as err:
        raise AvaConfigError(str(err)) from None
    return {"format": 1, "scheme": scheme, "group_size": group_size, "modules": names,
            "full_precision": FULL_PRECISION}


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state (parameters and buffers, each storage counted once): what its
    ``model.safetensors`` holds, less the file's small header."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def save_quantized(model: nn.Module, spec: dict[str, Any], out: str | Path, source: str | Path) -> Path:
    """Write a quantized checkpoint folder: ``model.safetensors`` (quantized tensors with their
    scales), ``quantization.json``, the source checkpoint's ``config.yaml`` and ``tokenizer.json``,
    and a ``manifest.json`` with every file's size and sha256 (checked on load).

    Args:
        model: the model after :func:`quantize_model`.
        spec: what :func:`quantize_model` returned.
        out: the folder (created; its files are replaced).
        source: the full-precision checkpoint folder (for config.yaml and tokenizer.json).

    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    out, source = Path(out), Path(source)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # a half-written folder never passes verification
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt", "quantization": spec["scheme"]})
    set_default_mode(out / WEIGHTS_FILE)
    (out / QUANTIZATION_FILE).write_text(json.dumps(spec, indent=2), encoding="utf-8")
    if (source / CONFIG_FILE).is_file():
        shutil.copyfile(source / CONFIG_FILE, out / CONFIG_FILE)
    else:  # a save_pretrained folder always has one; keep the model section at least
        import yaml

        config = getattr(model, "config", None)
        (out / CONFIG_FILE).write_text(yaml.safe_dump({"model": config.model_dump(mode="json")}, sort_keys=False),
                                       encoding="utf-8")
    names = [WEIGHTS_FILE, CONFIG_FILE, QUANTIZATION_FILE]
    if (source / TOKENIZER_FILE).is_file():
        shutil.copyfile(source / TOKENIZER_FILE, out / TOKENIZER_FILE)
        names.append(TOKENIZER_FILE)
    manifest = {"quantization": spec["scheme"], "source": str(source),
                "files": {name: describe_file(out / name) for name in sorted(names)}}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return out

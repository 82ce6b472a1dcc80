"""Optimizers and their parameter groups."""

from .advanced_optimizers import DEFAULT_BETAS, build_optimizer, optimizer_state_bytes, parameter_groups
from .lion import Lion
from .muon import MuonWithAdamW, newton_schulz
from .quantization import (
    dequantize_fp8,
    dequantize_int4,
    dequantize_int8,
    fake_quantize,
    quantize_fp8,
    quantize_int4,
    quantize_int8,
    quantize_model,
    save_quantized,
)
from .sophia import SophiaG

__all__ = [
    "DEFAULT_BETAS", "Lion", "MuonWithAdamW", "SophiaG", "build_optimizer", "newton_schulz",
    "optimizer_state_bytes", "parameter_groups",
    "dequantize_fp8", "dequantize_int4", "dequantize_int8", "fake_quantize", "quantize_fp8", "quantize_int4",
    "quantize_int8", "quantize_model", "save_quantized",
]

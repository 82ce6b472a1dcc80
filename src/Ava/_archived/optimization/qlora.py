"""Seed path ``_archived.optimization.qlora`` → :mod:`Ava.layers.lora` (the adapters) and
:mod:`Ava.layers.quantized` (the quantized base); training runs through the ``finetune`` section."""

from ...layers.lora import LoRAExperts, LoRALinear, apply_lora, merge_lora
from ...layers.quantized import quantize_modules

__all__ = ["LoRAExperts", "LoRALinear", "apply_lora", "merge_lora", "quantize_modules"]

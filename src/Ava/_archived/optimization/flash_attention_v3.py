"""Seed path ``_archived.optimization.flash_attention_v3`` → :func:`Ava.layers.attention.attention`:
``torch.nn.functional.scaled_dot_product_attention``, which selects the FlashAttention kernels
on GPUs that have them (and a flash kernel on CPU)."""

from ...layers.attention import attention

__all__ = ["attention"]

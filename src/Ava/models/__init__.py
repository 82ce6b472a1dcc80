"""The MoE language model."""

from .moe_model import DecoderLayer, EnhancedMoEModel, MoEModelOutput, RouterStats

__all__ = ["DecoderLayer", "EnhancedMoEModel", "MoEModelOutput", "RouterStats"]

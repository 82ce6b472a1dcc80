"""The MoE language model."""

from .decoder_layer import DecoderLayer
from .moe_model import EnhancedMoEModel
from .outputs import MoEModelOutput, RouterStats
from .mtp import MTPModule, MTPOutput, MultiTokenPrediction

__all__ = [
    "DecoderLayer", "EnhancedMoEModel", "MTPModule", "MTPOutput", "MoEModelOutput", "MultiTokenPrediction",
    "RouterStats",
]

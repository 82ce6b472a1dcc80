"""Text generation from a trained model: sampling, batched prompts, streaming, beam search,
MTP speculative decoding."""

from .generator import GenerationOutput, TextGenerator
from .sampling import SamplingParams
from .speculative import SpeculativeStats

__all__ = ["GenerationOutput", "SamplingParams", "SpeculativeStats", "TextGenerator"]

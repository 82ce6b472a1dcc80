"""Text generation from a trained model: sampling, batched prompts, streaming, beam search,
MTP speculative decoding."""

from .generator import TextGenerator
from .rows import GenerationOutput, GenerationRow
from .sampling import SamplingParams
from .speculative import SpeculativeStats

__all__ = ["GenerationOutput", "GenerationRow", "SamplingParams", "SpeculativeStats", "TextGenerator"]

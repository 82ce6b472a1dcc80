"""Text generation from a trained model: sampling, batched prompts, streaming, beam search."""

from .generator import GenerationOutput, TextGenerator
from .sampling import SamplingParams

__all__ = ["GenerationOutput", "SamplingParams", "TextGenerator"]

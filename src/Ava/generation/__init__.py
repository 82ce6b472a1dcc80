"""Text generation from a trained model."""

from .generator import TextGenerator

__all__ = ["TextGenerator"]

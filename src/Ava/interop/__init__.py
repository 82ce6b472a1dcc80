"""Interoperability with other ecosystems (Hugging Face ``transformers`` folders)."""

from .huggingface import export_hf, hf_export_problems, import_hf

__all__ = ["export_hf", "hf_export_problems", "import_hf"]

"""Interoperability with other ecosystems (Hugging Face ``transformers`` folders, GGUF files for
llama.cpp / Ollama)."""

from .gguf_export import export_gguf, load_gguf, read_gguf_state_dict
from .huggingface import export_hf, hf_export_problems, import_hf

__all__ = ["export_gguf", "export_hf", "hf_export_problems", "import_hf", "load_gguf", "read_gguf_state_dict"]

"""Data: readers, the embedded corpus, the byte-level BPE tokenizer, splitting and packing.

``prepare_data(config.data, seed)`` is the entry point training uses; the pieces are public for
generation (``AvaTokenizer``), tools and tests.
"""

from .corpus import embedded_corpus
from .packing import PackedDataset, pack_documents, split_documents
from .pipeline import PreparedData, prepare_data
from .readers import Document, load_documents, read_source
from .tokenizer import EOS_TOKEN, PAD_TOKEN, AvaTokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "EOS_TOKEN", "PAD_TOKEN", "AvaTokenizer", "Document", "PackedDataset", "PreparedData",
    "embedded_corpus", "load_documents", "load_tokenizer", "pack_documents", "prepare_data",
    "read_source", "split_documents", "train_tokenizer",
]

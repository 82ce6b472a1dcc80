"""Data: readers, encodings, templates, the tokenizer, packing, mixtures, shards and the pipeline.

``prepare_data(config.data, seed)`` is the entry point training uses; the pieces are public for
generation (``AvaTokenizer``), ``ava prepare``, tools and tests.
"""

from .corpus import embedded_corpus
from .mixture import MixtureDataset
from .packing import PackedDataset, TokenStream, pack_documents, split_documents, tokenize_documents, window_sample
from .pipeline import PreparedData, SplitDocuments, build_tokenizer, collect_documents, prepare_data
from .readers import load_documents, read_source
from .records import DataReport, Document, Row
from .tokenizer import EOS_TOKEN, PAD_TOKEN, AvaTokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "EOS_TOKEN", "PAD_TOKEN", "AvaTokenizer", "DataReport", "Document", "MixtureDataset", "PackedDataset",
    "PreparedData", "Row", "SplitDocuments", "TokenStream", "build_tokenizer", "collect_documents",
    "embedded_corpus", "load_documents", "load_tokenizer", "pack_documents", "prepare_data", "read_source",
    "split_documents", "tokenize_documents", "train_tokenizer", "window_sample",
]

"""Data: readers, encodings, templates, the tokenizer, packing, mixtures, dedup, profiles, shards and the pipeline.

``prepare_data(config.data, seed)`` is the entry point training uses; the pieces are public for
generation (``AvaTokenizer``), ``ava prepare``, tools and tests.
"""

from .corpus import embedded_corpus
from .dedup import dedup_documents
from .mixture import MixtureDataset
from .packing import PackedDataset, TokenStream, pack_documents, split_documents, tokenize_documents, window_sample
from .datasets import PreparedData, build_tokenizer
from .pipeline import SplitDocuments, collect_documents, prepare_data
from .prepare import prepare_corpus
from .profile import profile_documents, write_profile
from .readers import load_documents, read_source
from .records import DataReport, Document, Row
from .shards import PreparedCorpus, load_prepared
from .tokenizer import EOS_TOKEN, PAD_TOKEN, AvaTokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "EOS_TOKEN", "PAD_TOKEN", "AvaTokenizer", "DataReport", "Document", "MixtureDataset", "PackedDataset",
    "PreparedCorpus", "PreparedData", "Row", "SplitDocuments", "TokenStream", "build_tokenizer",
    "collect_documents", "dedup_documents", "embedded_corpus", "load_documents", "load_prepared", "load_tokenizer",
    "pack_documents", "prepare_corpus", "prepare_data", "profile_documents", "read_source", "split_documents",
    "tokenize_documents", "train_tokenizer", "window_sample", "write_profile",
]

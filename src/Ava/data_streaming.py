"""On-the-fly streaming data (``data.streaming: true``): read, tokenize and pack while training.

The public path of :mod:`Ava.data.streaming`, where the stream's order, validation, chunking,
worker and resume rules live and are documented. The code sits inside ``data/`` because
``prepare_data`` opens a stream; this module imports ``data``, never the reverse, so the two form
no import cycle (``make test`` checks the contract).
"""

from .data.streaming import (
    DEFAULT_CHUNK_DOCUMENTS,
    TOKENIZER_SAMPLE_CHARS,
    StreamBatcher,
    StreamCursor,
    StreamingDataset,
    interleave,
    is_validation,
    open_streaming,
    source_counts,
    validation_key,
)

__all__ = [
    "DEFAULT_CHUNK_DOCUMENTS", "TOKENIZER_SAMPLE_CHARS", "StreamBatcher", "StreamCursor", "StreamingDataset",
    "interleave", "is_validation", "open_streaming", "source_counts", "validation_key",
]

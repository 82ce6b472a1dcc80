"""The ``data`` section: sources (formats, encodings, templates, mixture weights), tokenizer,
prepared shards or streaming, packing, deduplication and the train/validation split.

Rules on combinations (one origin of the data, one renderer per source) live in
:mod:`Ava.config.feature_compatibility`, with all the others.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from .base import AvaSection

SourceFormat = Literal["auto", "txt", "jsonl", "json", "csv", "parquet", "arrow"]


class TemplateConfig(AvaSection):
    """Instruction data: a prompt and a response rendered from a row's columns.

    ``{column}`` placeholders are filled from the row (``{{`` / ``}}`` for literal braces). The
    loss covers only the response tokens (and the EOS after them) unless ``train_on_prompt``.
    """

    prompt: str = Field(..., description="Prompt template, e.g. '{instruction}\\n{input}\\n'.")
    response: str = Field(..., description="Response template, e.g. '{output}'.")
    train_on_prompt: bool = Field(False, description="Also train on the prompt tokens (no loss mask).")


class ChatConfig(AvaSection):
    """Chat data: a column holding a list of ``{role, content}`` messages, rendered with a template."""

    field: str = Field("messages", description="Column holding the message list.")
    template: Literal["chatml", "plain"] = Field(
        "chatml",
        description="chatml: '<|im_start|>role\\ncontent<|im_end|>\\n' per message; plain: 'Role: content\\n'.",
    )
    train_on: Literal["assistant", "all"] = Field(
        "assistant", description="Messages whose tokens carry loss: assistant turns only, or all."
    )


class SourceConfig(AvaSection):
    """One data source: a file, folder or glob, in one format, with one weight in the mixture."""

    path: str = Field(..., description="File, folder or glob pattern (files may be .gz or .zst compressed).")
    name: str | None = Field(None, description="Name in logs, token accounting and shards; null = derived from path.")
    format: SourceFormat = Field(
        "auto",
        description="auto (by extension), txt (a file is a document), jsonl, json (an array of objects), "
        "csv, parquet or arrow (IPC file/stream, feather).",
    )
    text_field: str = Field("text", description="Column/field that holds the text (jsonl, json, csv, parquet, arrow).")
    template: TemplateConfig | None = Field(None, description="Render prompt/response from columns, loss on the response.")
    chat: ChatConfig | None = Field(None, description="Render a message list with a chat template.")
    weight: float = Field(1.0, gt=0, description="Mixture weight: share of training samples ∝ weight.")
    encoding: str = Field("auto", description="Text encoding: auto (BOM, then UTF-8, then charset-normalizer) or a codec name.")
    encoding_errors: Literal["strict", "replace", "skip"] = Field(
        "strict",
        description="Undecodable bytes: strict = stop with file and byte offset; replace = U+FFFD, counted; "
        "skip = drop the row/document, counted.",
    )
    bad_rows: Literal["error", "skip"] = Field(
        "error", description="Malformed rows (bad JSON, missing field): error = stop naming file and row; skip = count them."
    )


class TokenizerConfig(AvaSection):
    """Tokenizer: load a tokenizer.json, or train a byte-level BPE on the training split."""

    path: str | None = Field(None, description="tokenizer.json to load; null = train a byte-level BPE.")
    vocab_size: int = Field(
        8192, ge=260, description="Vocabulary size of a newly trained BPE; defaults to model.vocab_size when that is set."
    )
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")


class DataConfig(AvaSection):
    """Training data. With no sources, Ava trains on its embedded corpus (Shakespeare)."""

    sources: list[SourceConfig] = Field(
        default_factory=list, description="Text sources; empty = the embedded Shakespeare corpus."
    )
    prepared: str | None = Field(
        None, description="Folder written by `ava prepare` (memory-mapped token shards); replaces sources."
    )
    streaming: bool = Field(
        False, description="Tokenize sources on the fly instead of in memory (data too big to prepare)."
    )
    chunk_documents: int = Field(
        256, ge=1,
        description="data.streaming: documents tokenized and packed together (one DataLoader item; the tail "
        "shorter than seq_len of each chunk is dropped).",
    )
    seq_len: int | None = Field(None, ge=2, description="Training sequence length; null = model.max_seq_len.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer settings.")
    val_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Share of documents held out for validation (split by document)."
    )
    max_documents: int | None = Field(
        None, ge=1, description="Use at most this many documents (after a deterministic shuffle)."
    )
    packing: bool = Field(
        True,
        description="Pack documents into rows of data.seq_len tokens; false = each document/row is its own "
        "sequence (truncated to data.seq_len), right-padded in the batch, padding without loss.",
    )
    max_tokens_per_batch: int | None = Field(
        None, ge=2,
        description="data.packing false: micro-batches built to this token budget (rows × longest row) from "
        "length-sorted buckets; null = training.batch_size rows per micro-batch.",
    )
    document_mask: bool = Field(
        False,
        description="Block-diagonal attention inside packed rows: tokens attend only to their own document "
        "(position ids restart per document either way).",
    )
    dedup: Literal["none", "exact", "near"] = Field(
        "none", description="Remove duplicate documents: exact (hash) or near (MinHash/LSH, also exact)."
    )
    dedup_threshold: float = Field(0.8, gt=0, le=1, description="Jaccard similarity above which near-dedup drops a document.")
    cache_dir: str | None = Field(
        None, description="Where the embedded corpus is downloaded and cached; null = the user cache dir."
    )
    num_workers: int = Field(
        0, ge=0, description="DataLoader worker processes; the batch order does not depend on it."
    )

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _tokenizer_path_shorthand(cls, value: Any) -> Any:
        # `data.tokenizer: path/to/tokenizer.json` is shorthand for `{path: ...}`.
        return {"path": value} if isinstance(value, str) else value

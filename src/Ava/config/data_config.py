"""The ``data`` section: sources, tokenizer, split."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from .base import AvaSection


class SourceConfig(AvaSection):
    """One text source: a file, folder or glob."""

    path: str = Field(..., description="File, folder or glob pattern of the source.")
    format: Literal["auto", "txt", "jsonl"] = Field(
        "auto", description="auto (by extension), txt (one document per file) or jsonl (one per line)."
    )
    text_field: str = Field("text", description="JSONL field that holds the text.")


class TokenizerConfig(AvaSection):
    """Tokenizer: load a tokenizer.json, or train a byte-level BPE on the training split."""

    path: str | None = Field(None, description="tokenizer.json to load; null = train a byte-level BPE.")
    vocab_size: int = Field(8192, ge=260, description="Vocabulary size of a newly trained BPE.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")


class DataConfig(AvaSection):
    """Training data. With no sources, Ava trains on its embedded corpus (Shakespeare)."""

    sources: list[SourceConfig] = Field(
        default_factory=list, description="Text sources; empty = the embedded Shakespeare corpus."
    )
    seq_len: int | None = Field(None, ge=2, description="Training sequence length; null = model.max_seq_len.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer settings.")
    val_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Share of documents held out for validation (split by document)."
    )
    max_documents: int | None = Field(
        None, ge=1, description="Use at most this many documents (after a deterministic shuffle)."
    )
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

"""Unpacked data (``data.packing: false``): each document is its own row, padded in the batch.

A row is one document of a :class:`~.packing.TokenStream` (its tokens and the EOS after them),
cut to ``seq_len`` tokens when longer. Rows keep the keys of a packed window (``input_ids``,
``labels``, ``position_ids``, ``document_ids``, ``source``) but have their own length;
:func:`pad_rows` right-pads a micro-batch to its longest row. Padding carries no label (so no
loss) and, with causal attention, no real token attends to it: right padding needs no attention
mask. The batch's ``token_mask`` marks the real tokens so that the MoE routers leave padding out
of their statistics (balancing losses, z-loss, expert loads, capacity).

Per-row lengths and loss-token counts are computed once, vectorised, when the dataset is built,
so the batch planner (:mod:`.dynamic_batching`) and the trainer's loss normalisation know every
micro-batch's padded size and loss tokens without reading a sample.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import AvaDataError
from .packing import IGNORE_INDEX, TokenStream
from .records import plural

logger = logging.getLogger(__name__)


class RowDataset(Dataset):
    """One row per document, truncated to ``seq_len`` tokens (``data.packing: false``).

    Rows with no token to predict once truncated (a prompt longer than ``seq_len``, an empty
    document) are left out. Indices past ``len`` wrap around (``i mod len``), as in
    :class:`~.packing.PackedDataset`, so samplers and mixtures may encode an epoch in the index.

    Attributes:
        lengths: ``(R,)`` int64 tokens of each row (after truncation).
        loss_tokens: ``(R,)`` int64 positions of each row that carry a label after the shift
            (what the mean loss averages over).
        truncated: rows cut to ``seq_len``.
        dropped: documents left out for having no label within ``seq_len``.
    """

    def __init__(self, streams: TokenStream | Sequence[TokenStream], seq_len: int, split: str = "train",
                 source_id: int = 0) -> None:
        """Index the documents of ``streams`` as rows.

        Args:
            streams: a :class:`TokenStream` or a list of them (shards).
            seq_len: the longest row, in tokens.
            split: split name, for messages.
            source_id: the source's index, reported in each sample's ``source``.

        Raises:
            AvaDataError: no row with a token to predict.
        """
        if seq_len < 2:
            raise AvaDataError(f"data.seq_len={seq_len} must be at least 2")
        self.streams = [streams] if isinstance(streams, TokenStream) else list(streams)
        self.seq_len = seq_len
        self.split = split
        self.source_id = source_id
        stream_of, starts, lengths, loss_tokens = [], [], [], []
        self.truncated = self.dropped = 0
        for s, stream in enumerate(self.streams):
            if not len(stream):
                continue
            start_D = np.asarray(stream.doc_starts, dtype=np.int64)
            end_D = np.append(start_D[1:], len(stream))
            full_D = end_D - start_D
            length_D = np.minimum(full_D, seq_len)
            if stream.loss_mask is None:
                loss_D = length_D - 1
            else:  # labels at positions 1 .. length-1 of the row whose mask is 1
                cum = np.concatenate([[0], np.cumsum(np.asarray(stream.loss_mask, dtype=np.int64))])
                loss_D = cum[start_D + length_D] - cum[np.minimum(start_D + 1, start_D + length_D)]
            keep = loss_D > 0
            self.truncated += int((full_D[keep] > seq_len).sum())
            self.dropped += int((~keep).sum())
            stream_of.append(np.full(int(keep.sum()), s, dtype=np.int64))
            starts.append(start_D[keep])
            lengths.append(length_D[keep])
            loss_tokens.append(loss_D[keep])
        cat = (lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))  # noqa: E731
        self._stream_of, self._starts = cat(stream_of), cat(starts)
        self.lengths, self.loss_tokens = cat(lengths), cat(loss_tokens)
        if len(self.lengths) == 0:
            raise AvaDataError(
                f"the {split} split has no row with a token to predict within data.seq_len={seq_len}; "
                "raise data.seq_len or check the sources' templates"
            )

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def num_tokens(self) -> int:
        """Tokens in the streams (before truncation)."""
        return int(sum(len(s) for s in self.streams))

    @property
    def num_documents(self) -> int:
        """Documents in the streams (rows left out included)."""
        return int(sum(s.num_documents for s in self.streams))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        i = int(index) % len(self)
        stream = self.streams[int(self._stream_of[i])]
        start, length = int(self._starts[i]), int(self.lengths[i])
        input_ids = torch.from_numpy(np.asarray(stream.tokens[start:start + length], dtype=np.int64))
        labels = input_ids.clone()
        if stream.loss_mask is not None:
            labels[torch.from_numpy(np.asarray(stream.loss_mask[start:start + length]) == 0)] = IGNORE_INDEX
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": torch.arange(length, dtype=torch.int64),
            "document_ids": torch.zeros(length, dtype=torch.int64),
            "source": torch.tensor(self.source_id, dtype=torch.int64),
        }

    def log_summary(self) -> None:
        """One log line: rows, and how many were truncated or left out (when any)."""
        if self.truncated or self.dropped:
            logger.info(
                "%s: %s of %s truncated to data.seq_len=%d%s", self.split,
                plural(self.truncated, "row"), plural(len(self) + self.dropped, "document"), self.seq_len,
                f"; {plural(self.dropped, 'document')} with no label within it left out" if self.dropped else "",
            )

    def __repr__(self) -> str:
        return f"RowDataset(split={self.split!r}, rows={len(self)}, seq_len={self.seq_len}, truncated={self.truncated})"


def pad_rows(rows: Sequence[dict[str, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack rows of unequal length into one batch, right-padded to the longest.

    Padding positions get ``pad_id`` as input, ``-100`` as label (no loss), positions continuing
    the row's own (so they stay below ``seq_len``) and document id 1 (a document of their own,
    for the block-diagonal mask). Real tokens never attend to them under causal attention; the
    ``token_mask`` keeps them out of the MoE routing statistics (the model's ``token_mask``).

    Args:
        rows: samples of :class:`RowDataset` (or packed windows: equal lengths stack as they are).
        pad_id: input id of padding positions (the tokenizer's pad id).

    Returns:
        ``input_ids``, ``labels``, ``position_ids``, ``document_ids`` (each ``(B, T)`` int64, T the
        longest row), ``token_mask`` (``(B, T)`` bool, True = a row's own token, False = padding)
        and ``source`` (``(B,)``).
    """
    width = max(int(r["input_ids"].shape[0]) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, width), pad_id, dtype=torch.int64)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.int64)
    positions = torch.arange(width, dtype=torch.int64).repeat(B, 1)
    documents = torch.ones((B, width), dtype=torch.int64)
    real = torch.zeros((B, width), dtype=torch.bool)
    for b, r in enumerate(rows):
        n = int(r["input_ids"].shape[0])
        real[b, :n] = True
        input_ids[b, :n] = r["input_ids"]
        labels[b, :n] = r["labels"]
        if "position_ids" in r:
            positions[b, :n] = r["position_ids"]
        documents[b, :n] = r["document_ids"] if "document_ids" in r else 0
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": positions, "document_ids": documents,
             "token_mask": real}
    if all("source" in r for r in rows):
        batch["source"] = torch.stack([r["source"] for r in rows])
    return batch

"""Byte-level BPE tokenizer (HF ``tokenizers``) and the small wrapper training and generation use.

A byte-level BPE starts from all 256 bytes, so every UTF-8 string encodes and decodes back
exactly (no unknown token, no normalisation). Two special tokens come first: ``<|endoftext|>``
(id 0), appended after every document when packing, and ``<|pad|>`` (id 1).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ..errors import AvaDataError

logger = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)
# End-of-text spellings of tokenizers trained elsewhere, tried in order when loading one.
_EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "[SEP]")
_PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "[PAD]", "<|finetune_right_pad_id|>")


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2, special_tokens: Sequence[str] = ()
) -> Tokenizer:
    """Train a byte-level BPE.

    Args:
        texts: training texts (the training split only, so validation stays unseen).
        vocab_size: target vocabulary size including the 256 bytes and the special tokens; a
            small corpus may yield fewer tokens.
        min_frequency: minimum count of a pair for it to be merged.
        special_tokens: extra special tokens (e.g. ``<|im_start|>``), given ids 2, 3, ... in
            order after Ava's two; repeats and Ava's own two are ignored.

    Returns:
        The trained ``tokenizers.Tokenizer`` (``<|endoftext|>`` = 0, ``<|pad|>`` = 1, then
        ``special_tokens``).
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(dict.fromkeys([*SPECIAL_TOKENS, *special_tokens])),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json``.

    Args:
        path: the file (HF ``tokenizers`` JSON format).

    Returns:
        The tokenizer.

    Raises:
        AvaDataError: the file is missing or is not a valid tokenizer.json.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise AvaDataError(
            f"tokenizer file {path} does not exist; fix data.tokenizer.path, or set it to null "
            "to train a new tokenizer"
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise AvaDataError(
            f"tokenizer file {path} is not a valid tokenizer.json ({err}); point "
            "data.tokenizer.path at a HF tokenizers JSON file, or set it to null to train one"
        ) from None


class AvaTokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer`` with the ids Ava needs.

    Special-token strings inside ordinary text (a document quoting ``<|endoftext|>``) are encoded
    as plain bytes, never as the special id, so ``decode(encode(text)) == text`` for any text and
    only packing inserts EOS.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        """Wrap ``tokenizer``.

        Args:
            tokenizer: a trained or loaded HF tokenizer.

        Raises:
            AvaDataError: it has no end-of-text token Ava can use.
        """
        self.tokenizer = tokenizer
        self.tokenizer.encode_special_tokens = True
        eos = _first_token_id(tokenizer, _EOS_CANDIDATES)
        if eos is None:
            raise AvaDataError(
                f"the tokenizer has no end-of-text token (looked for {', '.join(_EOS_CANDIDATES)}); "
                f"add {EOS_TOKEN} as a special token or train a new tokenizer (data.tokenizer.path: null)"
            )
        pad = _first_token_id(tokenizer, _PAD_CANDIDATES)
        self._eos_id = eos
        self._pad_id = eos if pad is None else pad

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int = 8192, min_frequency: int = 2, special_tokens: Sequence[str] = ()
    ) -> "AvaTokenizer":
        """Train a byte-level BPE (see :func:`train_tokenizer`) and wrap it."""
        return cls(train_tokenizer(texts, vocab_size=vocab_size, min_frequency=min_frequency,
                                   special_tokens=special_tokens))

    @classmethod
    def from_file(cls, path: str | Path) -> "AvaTokenizer":
        """Load a ``tokenizer.json`` (see :func:`load_tokenizer`) and wrap it."""
        return cls(load_tokenizer(path))

    def save(self, path: str | Path) -> Path:
        """Write the tokenizer as ``tokenizer.json``.

        Args:
            path: target file; parent folders are created.

        Returns:
            The path written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(path))
        return path

    @property
    def eos_id(self) -> int:
        """Id of the end-of-text token (0 for a tokenizer trained by Ava)."""
        return self._eos_id

    @property
    def pad_id(self) -> int:
        """Id of the padding token (the EOS id when the tokenizer has none)."""
        return self._pad_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's embedding needs at least this)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no EOS appended)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts, encoded in parallel (Rust threads).

        Uses ``encode_batch_fast`` (same ids, no character offsets) where ``tokenizers`` has it.
        """
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``.

        Args:
            ids: token ids.
            skip_special_tokens: drop EOS/PAD from the text (generation output); by default they
                are written out, so decoding a packed stream shows document boundaries.

        Returns:
            The decoded text; bytes that do not form valid UTF-8 (a cut multi-byte character)
            become U+FFFD.
        """
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"AvaTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, pad_id={self.pad_id})"


def _first_token_id(tokenizer: Tokenizer, candidates: Sequence[str]) -> int | None:
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return None

"""``ava tokenizer train`` and ``ava prepare``: data commands, parsers and plain functions.

Registered by :func:`add_commands` from :func:`Ava.cli.main.build_parser`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# tokenizer train
# --------------------------------------------------------------------------------------------


_TOKENIZER_FILE = "tokenizer.json"
_BYTE_TOKENS = 256  # a byte-level BPE always holds every byte
_PROGRESS_EVERY_S = 10.0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    """``ava tokenizer train SOURCE ... --out tokenizer.json``: byte-level BPE on all text of the sources.

    Sources are the SOURCE arguments (each read as one ``SourceConfig`` with ``--format`` and
    ``--text-field``) plus, with ``--config``, that config's ``data.sources`` (whose
    ``data.tokenizer.vocab_size`` / ``min_frequency`` are the defaults then). Every document of
    every source is used: there is no train/validation split here.
    """
    import time

    from ..config import SourceConfig, TokenizerConfig, load_config
    from ..data.tokenizer import SPECIAL_TOKENS, train_tokenizer
    from ..errors import AvaConfigError, AvaDataError
    from ..utils.logging import setup_logging

    setup_logging()
    sources = [SourceConfig(path=path, format=args.format, text_field=args.text_field) for path in args.sources]
    vocab_size, min_frequency = args.vocab_size, args.min_frequency
    if args.config is not None:
        config = load_config(args.config, check_environment=False)
        if not config.data.sources:
            raise AvaConfigError(
                f"{args.config}: data.sources is empty, so there is no text to train on; add data.sources "
                "to the config or pass the files as SOURCE arguments"
            )
        sources.extend(config.data.sources)
        vocab_size = config.data.tokenizer.vocab_size if vocab_size is None else vocab_size
        min_frequency = config.data.tokenizer.min_frequency if min_frequency is None else min_frequency
    if not sources:
        raise AvaConfigError(
            "ava tokenizer train: no sources; pass text files, folders or globs as SOURCE arguments, "
            "or --config CONFIG.yaml to use its data.sources"
        )
    defaults = TokenizerConfig.model_fields
    vocab_size = defaults["vocab_size"].default if vocab_size is None else vocab_size
    min_frequency = defaults["min_frequency"].default if min_frequency is None else min_frequency
    special_tokens = list(dict.fromkeys(args.special_token or []))
    all_specials = list(dict.fromkeys([*SPECIAL_TOKENS, *special_tokens]))  # Ava's two first, no repeats
    num_special = len(all_specials)
    if vocab_size < _BYTE_TOKENS + num_special:
        raise AvaConfigError(
            f"--vocab-size {vocab_size} is smaller than the {_BYTE_TOKENS} byte tokens plus {num_special} "
            f"special tokens; use at least {_BYTE_TOKENS + num_special} (e.g. {defaults['vocab_size'].default})"
        )
    for source in sources:
        _check_source_exists(source.path)
    out = _writable_output(args.out)

    from ..data.readers import read_source
    from ..data.records import plural

    counts = {"documents": 0, "chars": 0}
    started = time.perf_counter()

    def texts():
        last_log = started
        for source in sources:
            before = dict(counts)
            for doc in read_source(source):
                counts["documents"] += 1
                counts["chars"] += len(doc.text)
                yield doc.text
                now = time.perf_counter()
                if now - last_log >= _PROGRESS_EVERY_S:
                    last_log = now
                    logger.info("tokenizer: %d documents, %d chars so far (%.0fs)",
                                counts["documents"], counts["chars"], now - started)
            logger.info("tokenizer: %s: %s, %d chars", source.name or source.path,
                        plural(counts["documents"] - before["documents"], "document"), counts["chars"] - before["chars"])

    logger.info("tokenizer: training a byte-level BPE (vocab size %d, min frequency %d) on %s",
                vocab_size, min_frequency, plural(len(sources), "source"))
    tokenizer = train_tokenizer(texts(), vocab_size=vocab_size, min_frequency=min_frequency,
                                special_tokens=special_tokens)
    if counts["chars"] == 0:
        raise AvaDataError(
            f"the sources ({', '.join(s.path for s in sources)}) hold no text; point SOURCE or "
            "data.sources at files with text"
        )
    _save_tokenizer(tokenizer, out)
    seconds = time.perf_counter() - started
    logger.info("tokenizer: special tokens %s",
                ", ".join(f"{tok}={tokenizer.token_to_id(tok)}" for tok in all_specials))
    print(f"trained a byte-level BPE with {tokenizer.get_vocab_size(with_added_tokens=True)} tokens "
          f"(asked for {vocab_size}) on {plural(counts['documents'], 'document')}, {counts['chars']} chars, "
          f"in {seconds:.1f}s: {out}")
    return 0


def _check_source_exists(path: str) -> None:
    """Fail before reading anything when a source is missing (not after the others were read)."""
    import glob

    from ..errors import AvaDataError

    if Path(path).expanduser().exists():
        return
    if any(ch in path for ch in "*?[") and glob.glob(str(Path(path).expanduser()), recursive=True):
        return
    raise AvaDataError(
        f"tokenizer source {path!r} does not exist (relative to {Path.cwd()}); "
        "fix the path or create the file"
    )


def _writable_output(out: str) -> Path:
    """The file to write (``tokenizer.json`` inside ``out`` when it is a folder), checked writable now."""
    import os
    import tempfile

    from ..errors import AvaDataError

    path = Path(out).expanduser()
    if path.is_dir() or out.endswith(("/", os.sep)):
        path = path / _TOKENIZER_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".ava-write-check-"):
            pass
    except OSError as err:
        raise AvaDataError(
            f"--out {out}: cannot write to the folder {path.parent} ({err.strerror or err}); "
            "pick a writable folder"
        ) from None
    return path


def _save_tokenizer(tokenizer, path: Path) -> None:
    """Write atomically: a crash never leaves a half-written tokenizer.json."""
    import os

    from ..errors import AvaDataError

    partial = path.with_name(path.name + ".partial")
    try:
        tokenizer.save(str(partial))
        os.replace(partial, path)
    except Exception as err:  # tokenizers raises a bare Exception on I/O errors
        partial.unlink(missing_ok=True)
        raise AvaDataError(f"--out {path}: cannot write the tokenizer ({err}); pick a writable path") from None


def _non_empty(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _add_tokenizer(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from typing import get_args

    from ..config import SourceConfig, TokenizerConfig
    from ..config.data_config import SourceFormat
    from .arg_types import positive_int

    source, tok = SourceConfig.model_fields, TokenizerConfig.model_fields

    tokenizer = sub.add_parser("tokenizer", parents=[common], help="train a byte-level BPE tokenizer")
    tokenizer_sub = tokenizer.add_subparsers(dest="tokenizer_command", required=True, parser_class=type(tokenizer))
    train = tokenizer_sub.add_parser(
        "train", parents=[common],
        help="train a byte-level BPE on all text of the sources (no train/validation split)",
        description="Train a byte-level BPE (HF tokenizers) on all text of the sources (every document; "
                    "there is no train/validation split) and save it as a tokenizer.json that "
                    "data.tokenizer.path can load. <|endoftext|> is id 0 and <|pad|> id 1; "
                    "--special-token adds more after them.",
    )
    train.add_argument("sources", nargs="*", metavar="SOURCE",
                       help="text files, folders or globs (as data.sources[].path)")
    train.add_argument("--out", required=True, help="tokenizer.json to write (a folder gets tokenizer.json inside)")
    train.add_argument("--vocab-size", type=positive_int, default=None,
                       help="target vocabulary size incl. the 256 bytes and special tokens "
                            f"(default: the config's data.tokenizer.vocab_size, else {tok['vocab_size'].default})")
    train.add_argument("--min-frequency", type=positive_int, default=None,
                       help=f"minimum pair count for a merge (default: the config's, else {tok['min_frequency'].default})")
    train.add_argument("--special-token", action="append", type=_non_empty, metavar="TOK", default=[],
                       help="extra special token, e.g. <|im_start|> (repeatable; ids 2, 3, ... in order)")
    train.add_argument("--format", choices=list(get_args(SourceFormat)), default=source["format"].default,
                       help=f"format of the SOURCE arguments (default {source['format'].default}: by extension)")
    train.add_argument("--text-field", default=source["text_field"].default,
                       help=f"field holding the text in SOURCE rows (default {source['text_field'].default})")
    train.add_argument("--config", default=None, metavar="CONFIG.yaml",
                       help="also train on this config's data.sources (with their formats, templates, chat)")
    train.set_defaults(func=cmd_tokenizer_train)


# --------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> int:
    """``ava prepare CONFIG [key=value ...] --out DIR``: tokenize ``data.sources`` into shards.

    Reads, deduplicates and splits the documents exactly as training would, loads or trains the
    tokenizer, and writes memory-mapped shards that ``data: {prepared: DIR}`` trains from.
    """
    import time

    from ..config import load_config
    from ..data.prepare import DEFAULT_SHARD_TOKENS, check_out_dir, prepare_corpus
    from ..errors import AvaDataError
    from ..utils.logging import setup_logging

    started = time.perf_counter()
    setup_logging()
    # No environment checks: preparing needs no GPU, and missing sources are reported by the readers.
    config = load_config(args.config, args.overrides, check_environment=False)
    check_out_dir(args.out, args.force)  # before reading anything
    if args.tokenizer is not None and not Path(args.tokenizer).expanduser().is_file():
        raise AvaDataError(f"--tokenizer {args.tokenizer} is not a file; pass the path of a tokenizer.json")
    manifest = prepare_corpus(
        config.data, args.out, config.run.seed, workers=args.workers,
        shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS,
        tokenizer_path=args.tokenizer, profile=not args.no_profile, overwrite=args.force,
    )
    _print_prepare_summary(manifest, Path(args.out), time.perf_counter() - started)
    return 0


def _print_prepare_summary(manifest: dict, out: Path, seconds: float) -> None:
    """Documents and tokens per split and source, throughput and where the folder is."""
    from ..data.records import plural

    rows = [("split", "source", "documents", "tokens", "shards")]
    for split, entry in manifest["splits"].items():
        for name, source in entry["sources"].items():
            rows.append((split, name, f"{source['documents']:,}", f"{source['tokens']:,}", str(len(source["shards"]))))
        if len(entry["sources"]) > 1:
            rows.append((split, "(all)", f"{entry['documents']:,}", f"{entry['tokens']:,}",
                         str(sum(len(s["shards"]) for s in entry["sources"].values()))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    totals = manifest["totals"]
    print(f"tokenizer: {manifest.get('tokenizer_source', '?')} (vocab {manifest['vocab_size']}, "
          f"{manifest['dtype']} ids); weights: "
          + ", ".join(f"{n}={s['weight']:g}" for n, s in manifest["sources"].items()))
    print(f"read {manifest.get('collect_seconds', 0):.1f} s, tokenizer {manifest.get('tokenizer_seconds', 0):.1f} s, "
          f"tokenize+write {manifest['seconds']:.1f} s ({manifest['tokens_per_second']:,.0f} tokens/s)")
    print(f"prepared {plural(totals['documents'], 'document')}, {totals['tokens']:,} tokens in {seconds:.1f} s "
          f"({totals['tokens'] / max(seconds, 1e-9):,.0f} tokens/s overall): {out}")
    if manifest.get("profile"):
        import json

        from ..data.profile import format_profile

        print(f"\ndata profile ({out / manifest['profile']['json']}, {manifest['profile']['png']}):")
        print(format_profile(json.loads((out / manifest["profile"]["json"]).read_text(encoding="utf-8"))))
    print(f"\ntrain with: data: {{prepared: {out}}}")


def _add_prepare(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from .arg_types import positive_int

    prepare = sub.add_parser(
        "prepare", parents=[common], help="pre-tokenize data.sources into memory-mapped token shards",
        description="Read, deduplicate and split CONFIG's data.sources as training would, load or train "
                    "the tokenizer, and write memory-mapped token shards (uint16/uint32 ids, document "
                    "offsets, loss masks) with a manifest and a data profile into --out. Train from them "
                    "with data: {prepared: DIR}; one folder serves any sequence length.",
    )
    prepare.add_argument("config", help="YAML config file (its data section and run.seed are used)")
    prepare.add_argument("overrides", nargs="*", metavar="key=value",
                         help="dotted overrides, e.g. data.dedup=exact data.tokenizer.vocab_size=16000")
    prepare.add_argument("--out", required=True, metavar="DIR", help="folder to write (must not exist or be empty)")
    prepare.add_argument("--workers", type=positive_int, default=None, metavar="N",
                         help="chunks of documents encoded at once (each uses all tokenizer threads; default 2)")
    prepare.add_argument("--shard-tokens", type=positive_int, default=None, metavar="N",
                         help="largest shard in tokens, cut at document boundaries (default 2**27 = 134217728)")
    prepare.add_argument("--tokenizer", default=None, metavar="TOKENIZER.json",
                         help="use this tokenizer instead of data.tokenizer (default: the config's, else train one)")
    prepare.add_argument("--no-profile", action="store_true", help="skip the data profile")
    prepare.add_argument("--force", action="store_true", help="replace --out when it holds a prepared folder")
    prepare.set_defaults(func=cmd_prepare)


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``tokenizer`` and ``prepare`` on the ``ava`` subparsers."""
    _add_tokenizer(sub, common)
    _add_prepare(sub, common)

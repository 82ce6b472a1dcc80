"""``ava tokenizer train`` and ``ava prepare``: data commands, parsers and plain functions.

Registered by :func:`add_commands` from :func:`Ava.cli.main.build_parser`.
"""

from __future__ import annotations

import argparse


# --------------------------------------------------------------------------------------------
# tokenizer train
# --------------------------------------------------------------------------------------------


def _add_tokenizer(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    raise NotImplementedError  # filled in by the tokenizer-command work


# --------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------


def _add_prepare(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    raise NotImplementedError  # filled in by the shards work


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``tokenizer`` and ``prepare`` on the ``ava`` subparsers."""
    _add_tokenizer(sub, common)
    _add_prepare(sub, common)

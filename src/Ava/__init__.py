"""Ava: a PyTorch framework for training Mixture-of-Experts language models.

Import the pieces from their modules (``Ava.config``, ``Ava.models``, ``Ava.training``); this
top-level module stays light so ``import Ava`` is fast.
"""

__version__ = "0.1.0"

"""Episodic replay memory (SPEC §10): a bounded, importance-scored store of training sequences
whose items are mixed back into later micro-batches (see :mod:`.episodic_memory`), and can be the
context of the model's cross-attention blocks in training and generation (:mod:`.memory_context`)."""

from .episodic_memory import EpisodicMemory, ReplayMemory, build_replay_memory
from .memory_context import MemoryContext

__all__ = ["EpisodicMemory", "MemoryContext", "ReplayMemory", "build_replay_memory"]

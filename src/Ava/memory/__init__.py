"""Episodic replay memory (SPEC §10): a bounded, importance-scored store of training sequences
whose items are mixed back into later micro-batches (see :mod:`.episodic_memory`)."""

from .episodic_memory import EpisodicMemory, ReplayMemory, build_replay_memory

__all__ = ["EpisodicMemory", "ReplayMemory", "build_replay_memory"]

"""A trained run's replay memory as the cross-attention context of generation
(``ava generate --memory-context``, ``memory.context_items``; see :mod:`.episodic_memory`).

Shape suffixes: B prompts, K items per prompt, D hidden, E key width (= D).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from ..errors import AvaCheckpointError, AvaConfigError
from ..utils.checkpoint import CONFIG_FILE, STATE_FILE, resolve_checkpoint
from .episodic_memory import EpisodicMemory, mean_input_embeddings


class MemoryContext:
    """A trained run's replay memory as the cross-attention context of generation
    (``ava generate --memory-context``).

    A prompt's key is its mean input token embedding (:func:`mean_input_embeddings`, the same key
    training rows have); it gets the stored hidden-state embeddings of the ``k`` items whose keys
    are nearest by cosine, as ``context`` (1, k, D) with ``context_mask`` (1, k), which
    :class:`~Ava.generation.TextGenerator` passes to the model at every decoding step.

    Args:
        store: the memory's items (with keys: trained with ``memory.context_items`` > 0).
        k: items per prompt.
    """

    def __init__(self, store: EpisodicMemory, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.store, self.k = store, k

    @classmethod
    def from_checkpoint(cls, path: str | Path, k: int | None = None) -> "MemoryContext":
        """The memory saved in a checkpoint (key ``memory`` of its ``state.pt``).

        Args:
            path: run folder (its latest checkpoint) or checkpoint folder.
            k: items per prompt; None = the run's ``memory.context_items``.

        Raises:
            AvaCheckpointError: no ``state.pt``, or it cannot be read.
            AvaConfigError: the checkpoint's model has no cross-attention block; the checkpoint
                holds no memory, an empty one, or one without retrieval keys; ``k`` is None and the
                run trained with ``memory.context_items: 0``.
        """
        checkpoint = resolve_checkpoint(path)
        config_path = checkpoint / CONFIG_FILE
        raw = (yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None) or {}
        model = raw.get("model") or {}
        every, layers = int((model.get("cross_attention") or {}).get("every") or 0), model.get("num_layers")
        if every == 0 or (layers is not None and every > int(layers)):
            raise AvaConfigError(f"--memory-context: the model has no cross-attention block (model.cross_attention.every: "
                                 f"{every}); drop --memory-context, or train with model.cross_attention.every: N, "
                                 "memory.enabled: true and memory.context_items: k")
        state_path = checkpoint / STATE_FILE
        if not state_path.is_file():
            raise AvaCheckpointError(f"{checkpoint} has no {STATE_FILE}: --memory-context reads the replay memory "
                                     "that a training run saves there; pass a training run or checkpoint")
        try:  # mmap: only the memory's tensors are read, not the optimizer state beside them
            state = torch.load(state_path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises many types for corrupt files
            raise AvaCheckpointError(f"{state_path} cannot be loaded ({err}); use an earlier checkpoint") from err
        memory = state.get("memory")
        if memory is None:
            raise AvaConfigError(f"--memory-context: {checkpoint} holds no replay memory (trained with memory.enabled: "
                                 "false); drop --memory-context, or train with memory.enabled: true and "
                                 "memory.context_items: k")
        store = EpisodicMemory(max(1, len(memory["store"]["ids"])))
        store.load_state_dict(memory["store"])
        if not len(store) or store.keys_NE.shape[1] == 0 or not bool(torch.isfinite(store.keys_NE).all(dim=1).any()):
            raise AvaConfigError(f"--memory-context: the replay memory of {checkpoint} holds no item with a retrieval "
                                 "key (trained with memory.context_items: 0, or empty); drop --memory-context, or "
                                 "train with memory.context_items: k")
        if k is None:
            k = int((raw.get("memory") or {}).get("context_items") or 0)
            if k < 1:
                raise AvaConfigError(f"--memory-context: {checkpoint} was trained with memory.context_items: 0; "
                                     "pass the number of items, --memory-context K")
        return cls(store, k)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, prompts_ids: Sequence[Sequence[int]]
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(context_BKD, mask_BK)`` of B prompts on the model's device, or ``(None, None)`` when
        no prompt has an item.

        Args:
            model: the model (its ``embed_tokens`` and ``config.max_seq_len``: a longer prompt is
                keyed by its last ``max_seq_len`` tokens, the ones generation reads).
            prompts_ids: B non-empty lists of token ids.
        """
        max_len = model.config.max_seq_len
        device = model.embed_tokens.weight.device
        keys_BE = torch.cat([mean_input_embeddings(model, torch.tensor([list(p)[-max_len:]], device=device))
                             for p in prompts_ids])
        context_BKD, mask_BK = self.store.context_for(keys_BE, self.k)
        if not bool(mask_BK.any()):
            return None, None
        return context_BKD.to(device), mask_BK.to(device)


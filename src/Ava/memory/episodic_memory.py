"""Episodic replay memory: a bounded store of training sequences, scored by importance, whose
items are mixed back into later micro-batches to counter forgetting (SPEC §10).

Two objects:

- :class:`EpisodicMemory` is the store: rows of token ids (with their labels, positions,
  document ids and source), one importance score and one embedding per item. When it is full,
  the items of lowest importance are evicted (:meth:`EpisodicMemory.push`). Items are retrieved by
  importance (seeded importance-proportional sampling) or by embedding similarity to a query
  (cosine or euclidean nearest neighbours).
- :class:`ReplayMemory` is what the trainer holds (``memory`` in its stateful registry): it
  replaces the last ``round(replay_ratio × rows)`` rows of each micro-batch with retrieved items
  before the forward (:meth:`ReplayMemory.mix`), captures the model's final hidden states during
  that forward (:meth:`ReplayMemory.capture`), and after the backward scores every row and pushes
  the fresh ones (:meth:`ReplayMemory.observe`); no extra forward pass.

Scores (``memory.score``), per row ``b`` of a micro-batch:

- ``loss``: the row's mean next-token cross-entropy over its labelled positions.
- ``surprise``: that loss minus the running mean of the fresh rows' losses (an exponential moving
  average with decay :data:`SURPRISE_DECAY`, updated once per micro-batch).
- ``grad_norm``: ‖∂L/∂h_b‖, the norm of the gradient of the micro-batch's summed next-token loss L
  with respect to row b's final (normed) hidden states h_b, the input of the LM head. The backward
  computes it anyway; it is read from the hidden states' ``.grad`` (so it costs one (B, T, D)
  tensor kept alive, not a per-row backward) and rescaled by the micro-batch's labelled-token
  count, the accumulation steps and the fp16 loss scale, so it does not depend on how rows were
  grouped. A cheap proxy for the per-row parameter-gradient norm.

Embeddings are the final hidden states averaged over the row's labelled positions, kept as one
fp32 vector per item.

With ``memory.context_items: k`` the memory is also the context of the model's cross-attention
blocks (``model.cross_attention``). Every item keeps a second vector, its *key*: the row's input
token embeddings (``embed_tokens``) averaged over the same positions. A row's own key is known
before the forward (one embedding lookup), so each row of a micro-batch gets, without an extra
forward pass, the hidden-state embeddings of the k items whose keys are nearest to its key by
cosine (:meth:`ReplayMemory.context`, :meth:`EpisodicMemory.context_for`); missing items are
masked. The hidden states are not available before the forward; the input embeddings are, and
they are what a prompt has too (``ava generate --memory-context``,
:class:`~Ava.memory.memory_context.MemoryContext`).

The memory lives on the CPU; its contents (keys included), its sampling generator, the
running mean and the similarity query are saved in every checkpoint, so a resumed run replays
exactly what an uninterrupted one does.

Shape suffixes: B rows, T positions, D hidden, N stored items, W stored row width, E key width
(= D), K context items per row.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import AvaConfigError
from ..losses.language_modeling import IGNORE_INDEX, causal_lm_row_losses

if TYPE_CHECKING:
    from ..config.training_sections import MemoryConfig

SURPRISE_DECAY = 0.99  # running mean of the loss for ``score: surprise``
STATE_VERSION = 2  # 2: the store holds retrieval keys (a version-1 store loads without them)
_HEAD_CHUNK_ROWS = 8  # rows per LM-head pass when the fused head left no logits

# What padding a stored row to a longer batch puts in each key (labels: no loss there).
_PAD_VALUES = {"labels": IGNORE_INDEX}


def replay_rows(ratio: float, rows: int) -> int:
    """Rows of a ``rows``-row micro-batch replaced from memory: ``ratio × rows`` rounded half up,
    at most ``rows − 1`` (one fresh row always stays)."""
    return max(0, min(rows - 1, math.floor(ratio * rows + 0.5)))


class EpisodicMemory:
    """A bounded store of sequences, each with an importance score and an embedding.

    Items get increasing ids in the order they are pushed; the store keeps them in id order.

    Args:
        capacity: the most items kept.
        seed: seed of the generator of importance sampling (saved in :meth:`state_dict`).
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.rows: dict[str, torch.Tensor] = {}  # key → (N, W) long, padded past each row's length
        self.lengths_N = torch.zeros(0, dtype=torch.long)
        self.source_N = torch.zeros(0, dtype=torch.long)  # mixture source; -1 = none
        self.importance_N = torch.zeros(0, dtype=torch.float64)
        self.embeddings_ND = torch.zeros(0, 0, dtype=torch.float32)
        self.keys_NE = torch.zeros(0, 0, dtype=torch.float32)  # retrieval keys (context_items); E = 0: none
        self.ids_N = torch.zeros(0, dtype=torch.long)
        self.next_id = 0
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return int(self.ids_N.numel())

    # -- writing ----------------------------------------------------------------------------

    def push(self, rows: dict[str, torch.Tensor], importance: torch.Tensor, embeddings: torch.Tensor,
             source: torch.Tensor | None = None, keys: torch.Tensor | None = None) -> torch.Tensor:
        """Add B rows, then keep the ``capacity`` items of highest importance.

        Ties keep the older item. Rows whose importance is not finite are not stored.

        Args:
            rows: ``{key: (B, T) long}``, ``input_ids`` included; the keys of the first push are
                the keys stored (a later push lacking one gets its default, see :meth:`rows_for`).
            importance: (B,) scores.
            embeddings: (B, D) vectors.
            source: (B,) mixture source of each row, or None.
            keys: (B, E) retrieval keys of :meth:`context_for`, or None. Items stored without a
                key while others have one get a NaN key (never retrieved as context).

        Returns:
            (B,) the ids given to the rows (those of rows not stored, or evicted at once, included).
        """
        ids_B = torch.arange(self.next_id, self.next_id + len(importance), dtype=torch.long)
        self.next_id += len(importance)
        importance_B = importance.detach().to("cpu", torch.float64)
        keep_B = torch.isfinite(importance_B)
        if not bool(keep_B.any()):
            return ids_B
        input_ids = rows["input_ids"]
        B, T = input_ids.shape
        if not self.rows:
            self.rows = {k: torch.zeros(0, T, dtype=torch.long) for k, v in rows.items() if v.dim() == 2}
            self.embeddings_ND = torch.zeros(0, embeddings.shape[-1], dtype=torch.float32)
        width = max(T, self._width())
        new = {k: _pad_right(_row_values(rows, k, B, T).cpu(), width, _PAD_VALUES.get(k, 0))[keep_B]
               for k in self.rows}
        old = {k: _pad_right(v, width, _PAD_VALUES.get(k, 0)) for k, v in self.rows.items()}
        source_B = source.detach().cpu().long() if source is not None else torch.full((B,), -1, dtype=torch.long)
        keys_BE = self._fit_keys(keys, B)
        # Existing items come first and are in id order, new ones have larger ids: a stable sort
        # on importance keeps the older item of equal importance.
        importance_all = torch.cat([self.importance_N, importance_B[keep_B]])
        order = torch.sort(importance_all, descending=True, stable=True).indices[: self.capacity]
        keep = torch.sort(order).values  # back to id order
        self.rows = {k: torch.cat([old[k], new[k]])[keep] for k in self.rows}
        self.lengths_N = torch.cat([self.lengths_N, torch.full((B,), T, dtype=torch.long)[keep_B]])[keep]
        self.source_N = torch.cat([self.source_N, source_B[keep_B]])[keep]
        self.importance_N = importance_all[keep]
        self.embeddings_ND = torch.cat([self.embeddings_ND,
                                        embeddings.detach().to("cpu", torch.float32)[keep_B]])[keep]
        self.keys_NE = torch.cat([self.keys_NE, keys_BE[keep_B]])[keep]
        self.ids_N = torch.cat([self.ids_N, ids_B[keep_B]])[keep]
        return ids_B

    def update(self, ids: torch.Tensor, importance: torch.Tensor, embeddings: torch.Tensor | None = None,
               keys: torch.Tensor | None = None) -> None:
        """Rescore the items ``ids`` that are still stored (replayed rows, after their forward).

        Non-finite scores leave the item unchanged (embedding and key included).
        """
        keys_KE = self._fit_keys(keys, len(ids)) if keys is not None else None
        for i, item in enumerate(ids.tolist()):
            slot = self._slot(item)
            value = float(importance[i])
            if slot is None or not math.isfinite(value):
                continue
            self.importance_N[slot] = value
            if embeddings is not None:
                self.embeddings_ND[slot] = embeddings[i].detach().to("cpu", torch.float32)
            if keys_KE is not None:
                self.keys_NE[slot] = keys_KE[i]

    def _fit_keys(self, keys: torch.Tensor | None, B: int) -> torch.Tensor:
        """(B, E) fp32 keys to store beside B rows: the first keys given fix E (the stored items
        get NaN keys then); rows without keys get NaN keys."""
        if keys is not None:
            keys_BE = keys.detach().to("cpu", torch.float32)
            if self.keys_NE.shape[1] == 0:  # the first keys: the items stored so far have none
                self.keys_NE = torch.full((len(self), keys_BE.shape[1]), float("nan"))
            elif keys_BE.shape[1] != self.keys_NE.shape[1]:
                raise ValueError(f"keys of width {keys_BE.shape[1]}, the stored ones have {self.keys_NE.shape[1]}")
            return keys_BE
        return torch.full((B, self.keys_NE.shape[1]), float("nan"))

    # -- reading ----------------------------------------------------------------------------

    def sample_by_importance(self, k: int, exclude_from: int | None = None) -> torch.Tensor:
        """``k`` distinct item ids drawn with probability proportional to importance (seeded).

        Scores are used as they are when all are positive; otherwise they are shifted so the
        lowest is a small positive weight (``surprise`` can be negative).

        Args:
            exclude_from: leave out items with an id ≥ this (the ones just pushed).
        """
        slots = self._candidates(exclude_from)
        k = min(k, len(slots))
        if k == 0:
            return torch.zeros(0, dtype=torch.long)
        weights = self.importance_N[slots]
        low, high = float(weights.min()), float(weights.max())
        if low <= 0:
            weights = weights - low + max(1e-3 * (high - low), 1e-12)
        picked = torch.multinomial(weights, k, replacement=False, generator=self.generator)
        return self.ids_N[slots[picked]]

    def nearest(self, query: torch.Tensor, k: int, metric: str = "cosine",
                exclude_from: int | None = None) -> torch.Tensor:
        """The ids of the ``k`` items whose embeddings are nearest to ``query``, nearest first.

        Args:
            query: (D,) vector.
            metric: ``cosine`` (highest cosine similarity) or ``euclidean`` (smallest L2 distance);
                ties go to the older item.
            exclude_from: leave out items with an id ≥ this.
        """
        slots = self._candidates(exclude_from)
        k = min(k, len(slots))
        if k == 0:
            return torch.zeros(0, dtype=torch.long)
        emb_ND = self.embeddings_ND[slots]
        q_1D = query.detach().to("cpu", torch.float32).reshape(1, -1)
        if metric == "cosine":
            order = torch.sort(F.cosine_similarity(emb_ND, q_1D, dim=1), descending=True, stable=True).indices
        elif metric == "euclidean":
            order = torch.sort(torch.linalg.vector_norm(emb_ND - q_1D, dim=1), stable=True).indices
        else:
            raise ValueError(f"unknown metric {metric!r}; use cosine or euclidean")
        return self.ids_N[slots[order[:k]]]

    def nearest_by_key(self, queries_BE: torch.Tensor, k: int, exclude_ids_B: torch.Tensor | None = None,
                       input_ids_BT: torch.Tensor | None = None) -> torch.Tensor:
        """For each query, the ids of the ``k`` items whose keys have the highest cosine similarity
        to it, nearest first (ties go to the older item); -1 where fewer items qualify.

        Items without a key (NaN) never qualify.

        Args:
            queries_BE: (B, E) one query per row.
            k: items per row.
            exclude_ids_B: (B,) an item id each row must not get (its own stored item: a replayed
                row), -1 = none; or None.
            input_ids_BT: (B, T) the rows' tokens, or None: an item holding exactly the same T
                tokens as a row (the same sequence, seen in an earlier epoch) is left out for it.

        Returns:
            (B, k) long item ids.
        """
        slots_BK = self._nearest_key_slots(queries_BE, k, exclude_ids_B, input_ids_BT)
        if not len(self):
            return slots_BK
        return torch.where(slots_BK >= 0, self.ids_N[slots_BK.clamp(min=0)], slots_BK)

    def context_for(self, queries_BE: torch.Tensor, k: int, exclude_ids_B: torch.Tensor | None = None,
                    input_ids_BT: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-attention context of B rows: the stored embeddings of :meth:`nearest_by_key`.

        Returns:
            ``(context_BKD, mask_BK)``: (B, k, D) fp32 embeddings, nearest first, zero where no
            item qualifies, and (B, k) bool, True = a real item.
        """
        slots_BK = self._nearest_key_slots(queries_BE, k, exclude_ids_B, input_ids_BT)
        mask_BK = slots_BK >= 0
        B, D = queries_BE.shape[0], self.embeddings_ND.shape[1]
        if not bool(mask_BK.any()):
            return torch.zeros(B, k, D), mask_BK
        context_BKD = self.embeddings_ND[slots_BK.clamp(min=0)] * mask_BK.unsqueeze(-1)
        return context_BKD, mask_BK

    def _nearest_key_slots(self, queries_BE: torch.Tensor, k: int, exclude_ids_B: torch.Tensor | None,
                           input_ids_BT: torch.Tensor | None) -> torch.Tensor:
        """(B, k) slots of :meth:`nearest_by_key`, -1 = none."""
        B = queries_BE.shape[0]
        slots_BK = torch.full((B, k), -1, dtype=torch.long)
        N, E = self.keys_NE.shape
        if N == 0 or E == 0:
            return slots_BK
        q_BE = F.normalize(queries_BE.detach().to("cpu", torch.float32), dim=1)
        sim_BN = q_BE @ F.normalize(self.keys_NE, dim=1).T  # a NaN key gives NaN
        ok_BN = torch.isfinite(sim_BN)
        if exclude_ids_B is not None:
            ok_BN &= self.ids_N.unsqueeze(0) != exclude_ids_B.cpu().long().unsqueeze(1)
        if input_ids_BT is not None:
            ok_BN &= ~self._same_sequence(input_ids_BT.detach().cpu().long())
        sim_BN = torch.where(ok_BN, sim_BN, torch.full_like(sim_BN, -math.inf))
        order_BN = torch.sort(sim_BN, dim=1, descending=True, stable=True).indices[:, :k]
        found_BK = torch.gather(ok_BN, 1, order_BN)
        slots_BK[:, : order_BN.shape[1]] = torch.where(found_BK, order_BN, -1)
        return slots_BK

    def _same_sequence(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """(B, N) True where item n holds exactly row b's T tokens (and nothing more)."""
        B, T = input_ids_BT.shape
        same_BN = torch.zeros(B, len(self), dtype=torch.bool)
        stored_NW = self.rows.get("input_ids")
        if stored_NW is None or stored_NW.shape[1] < T:
            return same_BN
        stored_NT, full_N = stored_NW[:, :T], self.lengths_N == T
        for b in range(B):  # one (N, T) comparison at a time keeps the memory bounded
            same_BN[b] = full_N & (stored_NT == input_ids_BT[b]).all(dim=1)
        return same_BN

    def rows_for(self, ids: torch.Tensor, length: int, keys: list[str]) -> dict[str, torch.Tensor]:
        """The stored rows of ``ids`` fitted to ``length`` positions, for each of ``keys``.

        A longer row is cut; a shorter one is padded at the end with positions that carry no loss
        (labels ``-100``) and form a document of their own. A key the memory does not hold gets
        its default (``labels`` = the ids, ``position_ids`` = 0…T−1, ``document_ids`` = 0, else 0).

        Returns:
            ``{key: (k, length) long}`` plus ``"source"`` (k,) (-1 = none).
        """
        slots = torch.tensor([self._slot(i) for i in ids.tolist()], dtype=torch.long)
        lengths = self.lengths_N[slots]
        width = self._width()
        k = len(slots)
        stored = {key: _pad_right(v[slots], max(length, width), _PAD_VALUES.get(key, 0))[:, :length]
                  for key, v in self.rows.items()}
        pos_T = torch.arange(length)
        pad_KT = pos_T.unsqueeze(0) >= lengths.unsqueeze(1)  # (k, length): past the stored row
        out: dict[str, torch.Tensor] = {}
        ids_KT = stored["input_ids"]
        for key in keys:
            if key in stored:
                value = stored[key].clone()
            elif key == "labels":
                value = ids_KT.clone()
            elif key == "position_ids":
                value = pos_T.expand(k, length).clone()
            else:
                value = torch.zeros(k, length, dtype=torch.long)
            if key == "labels":
                value[pad_KT] = IGNORE_INDEX
            elif key == "position_ids":  # the padding restarts at position 0, as a new document would
                value = torch.where(pad_KT, pos_T - lengths.unsqueeze(1).clamp(max=length), value)
            elif key == "document_ids":
                value = torch.where(pad_KT, value.max(dim=1, keepdim=True).values + 1, value)
            elif key == "input_ids":
                value[pad_KT] = 0
            out[key] = value
        out["source"] = self.source_N[slots].clone()
        return out

    def importance_of(self, ids: torch.Tensor) -> torch.Tensor:
        """(k,) the stored importance of ``ids`` (all must be stored)."""
        return self.importance_N[torch.tensor([self._slot(i) for i in ids.tolist()], dtype=torch.long)]

    def _slot(self, item: int) -> int | None:
        slot = int(torch.searchsorted(self.ids_N, torch.tensor(item)))
        return slot if slot < len(self.ids_N) and int(self.ids_N[slot]) == item else None

    def _candidates(self, exclude_from: int | None) -> torch.Tensor:
        if exclude_from is None:
            return torch.arange(len(self))
        return torch.nonzero(self.ids_N < exclude_from).flatten()

    def _width(self) -> int:
        return next(iter(self.rows.values())).shape[1] if self.rows else 0

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything stored (retrieval keys included), the id counter and the sampling generator's state."""
        return {
            "capacity": self.capacity, "rows": {k: v.clone() for k, v in self.rows.items()},
            "lengths": self.lengths_N.clone(), "source": self.source_N.clone(),
            "importance": self.importance_N.clone(), "embeddings": self.embeddings_ND.clone(),
            "keys": self.keys_NE.clone(), "ids": self.ids_N.clone(), "next_id": self.next_id,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a smaller ``capacity`` now keeps the most important items."""
        self.rows = {k: v.clone() for k, v in state["rows"].items()}
        self.lengths_N, self.source_N = state["lengths"].clone(), state["source"].clone()
        self.importance_N, self.embeddings_ND = state["importance"].clone(), state["embeddings"].clone()
        # a memory saved before retrieval keys existed holds none (E = 0)
        self.keys_NE = state["keys"].clone() if "keys" in state else torch.zeros(len(state["ids"]), 0)
        self.ids_N, self.next_id = state["ids"].clone(), int(state["next_id"])
        self.generator.set_state(state["generator"])
        if len(self) > self.capacity:
            order = torch.sort(self.importance_N, descending=True, stable=True).indices[: self.capacity]
            keep = torch.sort(order).values
            self.rows = {k: v[keep] for k, v in self.rows.items()}
            for name in ("lengths_N", "source_N", "importance_N", "embeddings_ND", "keys_NE", "ids_N"):
                setattr(self, name, getattr(self, name)[keep])


class ReplayMemory:
    """The trainer's replay memory: mixes stored rows into micro-batches and scores rows after
    the backward (``memory`` section; see :mod:`Ava.memory.episodic_memory`).

    Per micro-batch the trainer calls :meth:`mix` (before moving the batch to the device),
    runs the forward inside :meth:`capture`, and calls :meth:`observe` after the backward.

    Args:
        config: the ``memory`` section (enabled).
        seed: the run seed (importance sampling).
    """

    def __init__(self, config: MemoryConfig, seed: int = 0) -> None:
        self.config = config
        self.store = EpisodicMemory(config.capacity, seed)
        self.loss_mean: float | None = None  # running mean of the fresh rows' loss (surprise)
        self.query: torch.Tensor | None = None  # (D,) mean embedding of the last fresh rows
        self.recent_from = 0  # ids ≥ this came from the last micro-batch: not retrieved by similarity
        self._pending: dict[str, torch.Tensor] | None = None  # the host batch mix() returned
        self._replayed_ids = torch.zeros(0, dtype=torch.long)
        self._hidden_BTD: torch.Tensor | None = None  # captured final hidden states
        self._replayed_in_step = 0
        self._keys_BE: torch.Tensor | None = None  # the retrieval keys of the batch of context()

    # -- before the forward -----------------------------------------------------------------

    def mix(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
        """``batch`` with its last ``round(replay_ratio × rows)`` rows replaced by retrieved items.

        Nothing is replaced before ``memory.start_step`` or while the memory is empty; fewer rows
        are replaced while it holds fewer retrievable items.

        Args:
            batch: a host micro-batch (``{"input_ids": (B, T), ...}``).
            step: optimizer steps completed so far.
        """
        B, T = batch["input_ids"].shape
        want = replay_rows(self.config.replay_ratio, B) if step >= self.config.start_step else 0
        ids = self._retrieve(want) if want and len(self.store) else torch.zeros(0, dtype=torch.long)
        k = len(ids)
        if k:
            keys = [key for key, v in batch.items() if v.dim() == 2 and v.shape[0] == B]
            replay = self.store.rows_for(ids, T, keys)
            mixed = dict(batch)
            for key in keys:
                mixed[key] = torch.cat([batch[key][: B - k], replay[key].to(batch[key].dtype)])
            if "source" in batch:
                source_K = torch.where(replay["source"] >= 0, replay["source"], batch["source"][B - k:].long())
                mixed["source"] = torch.cat([batch["source"][: B - k], source_K.to(batch["source"].dtype)])
            batch = mixed
        self._pending, self._replayed_ids = batch, ids
        self._replayed_in_step += k
        return batch

    def context(self, batch: dict[str, torch.Tensor], model: torch.nn.Module
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The cross-attention context of the batch :meth:`mix` returned (``memory.context_items``).

        Each row's key is its mean input token embedding over its labelled positions
        (:func:`mean_input_embeddings`): known before the forward, so retrieval needs no extra
        pass. A row gets the stored hidden-state embeddings of the ``context_items`` items whose
        keys are nearest (cosine) to its own; a replayed row never gets its own item, and no row
        gets an item holding exactly its tokens. The keys are kept for :meth:`observe`, which
        stores them with the fresh rows.

        Args:
            batch: the mixed micro-batch, on the model's device (``input_ids``, ``labels``).
            model: the model (its ``embed_tokens``).

        Returns:
            ``(context_BKD, mask_BK)`` on the batch's device: (B, k, D) fp32 and (B, k) bool
            (False = no item: the memory holds fewer); ``(None, None)`` with ``context_items`` 0
            or while no row has an item (the blocks are then skipped).
        """
        k = self.config.context_items
        if not k:
            return None, None
        input_ids_BT = batch["input_ids"]
        self._keys_BE = mean_input_embeddings(model, input_ids_BT, real_tokens(batch.get("labels"), input_ids_BT))
        B, r = input_ids_BT.shape[0], len(self._replayed_ids)
        exclude_B = torch.full((B,), -1, dtype=torch.long)
        exclude_B[B - r:] = self._replayed_ids  # the last r rows are the replayed items
        host_ids_BT = self._pending["input_ids"] if self._pending is not None else input_ids_BT
        return self._context(self._keys_BE, exclude_B, host_ids_BT, input_ids_BT.device)

    def validation_context(self, batch: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The forward's ``context`` / ``context_mask`` for a validation batch (``memory.context_items``),
        or ``{}`` (0, or no item yet): what ``validation_loss`` adds per batch, so the validation
        loss is that of the model with its context.

        Rows are keyed as in :meth:`context`, without excluding an item: validation rows are not
        stored (an item holding exactly a row's tokens is still left out).
        """
        if not self.config.context_items:
            return {}
        input_ids_BT = batch["input_ids"]
        keys_BE = mean_input_embeddings(model, input_ids_BT, real_tokens(batch.get("labels"), input_ids_BT))
        context_BKD, mask_BK = self._context(keys_BE, None, input_ids_BT, input_ids_BT.device)
        return {} if context_BKD is None else {"context": context_BKD, "context_mask": mask_BK}

    def _context(self, keys_BE: torch.Tensor, exclude_B: torch.Tensor | None, input_ids_BT: torch.Tensor,
                 device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """:meth:`EpisodicMemory.context_for` on ``device``; ``(None, None)`` when no row has an item."""
        if not len(self.store):
            return None, None
        context_BKD, mask_BK = self.store.context_for(keys_BE, self.config.context_items, exclude_B, input_ids_BT)
        if not bool(mask_BK.any()):
            return None, None
        return context_BKD.to(device, non_blocking=True), mask_BK.to(device, non_blocking=True)

    def _retrieve(self, k: int) -> torch.Tensor:
        if self.config.retrieval == "importance":
            return self.store.sample_by_importance(k)
        if self.query is None:
            return torch.zeros(0, dtype=torch.long)
        return self.store.nearest(self.query, k, self.config.retrieval, exclude_from=self.recent_from)

    @contextmanager
    def capture(self, model: torch.nn.Module) -> Iterator[None]:
        """Keep the model's final hidden states (the output of ``model.norm``) of the forward run inside."""
        norm = getattr(model, "norm", None)
        if not isinstance(norm, torch.nn.Module):
            raise TypeError(f"{type(model).__name__} has no final norm module `norm`: the replay memory reads its output")
        keep_grad = self.config.score == "grad_norm"

        def hook(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
            if keep_grad and output.requires_grad:
                output.retain_grad()
            self._hidden_BTD = output

        handle = norm.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    # -- after the backward -----------------------------------------------------------------

    def observe(self, out: Any, labels_BT: torch.Tensor, model: torch.nn.Module, accum: int = 1,
                loss_scale: float = 1.0) -> None:
        """Score the micro-batch just trained on; push its fresh rows, rescore its replayed ones.

        Args:
            out: the forward's :class:`~Ava.models.outputs.MoEModelOutput`.
            labels_BT: the batch's labels (on the model's device).
            model: the model (its ``lm_head`` gives the logits when the fused head made none).
            accum: micro-batches of this optimizer step (``grad_norm`` rescaling).
            loss_scale: the fp16 loss scale of this backward (1 otherwise).
        """
        hidden_BTD, batch, keys_BE = self._hidden_BTD, self._pending, self._keys_BE
        self._hidden_BTD = self._pending = self._keys_BE = None
        if hidden_BTD is None or batch is None:
            raise RuntimeError("ReplayMemory.observe needs a forward run inside capture() of a batch from mix()")
        with torch.no_grad():
            losses_B, embeddings_BD = self._losses_and_embeddings(out, hidden_BTD, labels_BT, model)
            if self.config.score == "grad_norm":
                importance_B = self._grad_norms(hidden_BTD, labels_BT, accum, loss_scale, losses_B)
            else:
                importance_B = losses_B
        losses_B, importance_B, embeddings_BD = losses_B.cpu().double(), importance_B.cpu().double(), embeddings_BD.cpu()
        k = len(self._replayed_ids)
        fresh = losses_B.shape[0] - k
        if self.config.score == "surprise":
            finite = losses_B[:fresh][torch.isfinite(losses_B[:fresh])]
            mean = self.loss_mean if self.loss_mean is not None else (float(finite.mean()) if len(finite) else 0.0)
            importance_B = losses_B - mean
            if len(finite):
                self.loss_mean = (float(finite.mean()) if self.loss_mean is None
                                  else SURPRISE_DECAY * self.loss_mean + (1 - SURPRISE_DECAY) * float(finite.mean()))
        if k:
            self.store.update(self._replayed_ids, importance_B[fresh:], embeddings_BD[fresh:],
                              None if keys_BE is None else keys_BE[fresh:])
        self.query = embeddings_BD[:fresh].mean(dim=0)
        self.recent_from = self.store.next_id
        rows = {key: v[:fresh] for key, v in batch.items() if v.dim() == 2}
        self.store.push(rows, importance_B[:fresh], embeddings_BD[:fresh],
                        batch["source"][:fresh] if "source" in batch else None,
                        None if keys_BE is None else keys_BE[:fresh])

    def _losses_and_embeddings(self, out: Any, hidden_BTD: torch.Tensor, labels_BT: torch.Tensor,
                               model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(B,) each row's mean next-token cross-entropy (NaN without a labelled target) and
        (B, D) its hidden states averaged over its labelled positions (all positions if none)."""
        hidden_BTD = hidden_BTD.detach()
        if out.logits is not None:
            losses_B = causal_lm_row_losses(out.logits.detach(), labels_BT)
        else:  # the fused head made no logits: the LM head over a few rows at a time
            losses_B = torch.cat([causal_lm_row_losses(model.lm_head(hidden_BTD[i:i + _HEAD_CHUNK_ROWS]),
                                                       labels_BT[i:i + _HEAD_CHUNK_ROWS])
                                  for i in range(0, hidden_BTD.shape[0], _HEAD_CHUNK_ROWS)])
        real_BT = labels_BT != IGNORE_INDEX
        real_BT = torch.where(real_BT.any(dim=1, keepdim=True), real_BT, torch.ones_like(real_BT))
        weights_BT1 = real_BT.unsqueeze(-1).float()
        embeddings_BD = (hidden_BTD.float() * weights_BT1).sum(dim=1) / weights_BT1.sum(dim=1)
        return losses_B, embeddings_BD

    @staticmethod
    def _grad_norms(hidden_BTD: torch.Tensor, labels_BT: torch.Tensor, accum: int, loss_scale: float,
                    losses_B: torch.Tensor) -> torch.Tensor:
        """(B,) ‖∂(summed next-token loss)/∂h_b‖ from the hidden states' retained gradient.

        The backward ran on ``loss_scale · mean_loss / accum``, the mean over the micro-batch's
        labelled targets; undoing those factors gives the summed loss's gradient. NaN for rows
        without a target (and for all rows when no gradient reached the hidden states)."""
        grad_BTD = hidden_BTD.grad
        if grad_BTD is None:
            return torch.full_like(losses_B, float("nan"))
        count = (labels_BT[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)
        norms_B = torch.linalg.vector_norm(grad_BTD.float().flatten(1), dim=1) * (accum * count / loss_scale)
        return torch.where(torch.isfinite(losses_B), norms_B.to(losses_B.dtype), losses_B)

    # -- metrics and state ------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """``memory/size``, ``memory/replayed`` (rows replaced since the last call: one step) and
        ``memory/mean_importance`` (over the stored items; 0 when empty)."""
        replayed, self._replayed_in_step = self._replayed_in_step, 0
        size = len(self.store)
        return {"memory/size": float(size), "memory/replayed": float(replayed),
                "memory/mean_importance": float(self.store.importance_N.mean()) if size else 0.0}

    def state_dict(self) -> dict[str, Any]:
        """The store, the surprise running mean and the similarity query."""
        return {"version": STATE_VERSION, "store": self.store.state_dict(), "loss_mean": self.loss_mean,
                "query": None if self.query is None else self.query.clone(), "recent_from": self.recent_from}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.store.load_state_dict(state["store"])
        self.loss_mean = state["loss_mean"]
        self.query = None if state["query"] is None else state["query"].clone()
        self.recent_from = int(state["recent_from"])


def build_replay_memory(config: MemoryConfig, seed: int, world_size: int = 1) -> ReplayMemory | None:
    """The trainer's :class:`ReplayMemory`, or None when ``memory.enabled`` is false.

    Raises:
        AvaConfigError: several data-parallel processes (each would need its own memory saved per
            rank, which checkpoints do not hold).
    """
    if not config.enabled:
        return None
    if world_size > 1:
        raise AvaConfigError(f"memory.enabled: the replay memory runs in one process, this run has {world_size}; "
                             "set memory.enabled: false or train on one process")
    return ReplayMemory(config, seed)


def real_tokens(labels_BT: torch.Tensor | None, input_ids_BT: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions a row's key averages over, its labelled ones (every position of a
    row without labels or without any labelled position), as the stored embeddings do."""
    if labels_BT is None:
        return torch.ones_like(input_ids_BT, dtype=torch.bool)
    real_BT = labels_BT != IGNORE_INDEX
    return torch.where(real_BT.any(dim=1, keepdim=True), real_BT, torch.ones_like(real_BT))


@torch.no_grad()
def mean_input_embeddings(model: torch.nn.Module, input_ids_BT: torch.Tensor,
                          real_BT: torch.Tensor | None = None) -> torch.Tensor:
    """(B, D) fp32 on the CPU: each row's input token embeddings (``model.embed_tokens``, the
    decoder's first activations) averaged over its ``real_BT`` positions (None = all): the
    retrieval key of ``memory.context_items``.

    Raises:
        TypeError: the model has no ``embed_tokens`` module.
    """
    embed = getattr(model, "embed_tokens", None)
    if not isinstance(embed, torch.nn.Module):
        raise TypeError(f"{type(model).__name__} has no token embedding `embed_tokens`: the memory's keys read it")
    x_BTD = embed(input_ids_BT).float()
    if real_BT is None:
        return x_BTD.mean(dim=1).cpu()
    weights_BT1 = real_BT.to(x_BTD.device).unsqueeze(-1).float()
    return ((x_BTD * weights_BT1).sum(dim=1) / weights_BT1.sum(dim=1).clamp(min=1)).cpu()


def _row_values(rows: dict[str, torch.Tensor], key: str, B: int, T: int) -> torch.Tensor:
    """``rows[key]``, or the key's default when a batch lacks it (see :meth:`EpisodicMemory.rows_for`)."""
    if key in rows:
        return rows[key].long()
    if key == "labels":
        return rows["input_ids"].long()
    if key == "position_ids":
        return torch.arange(T).expand(B, T)
    return torch.zeros(B, T, dtype=torch.long)


def _pad_right(x_NT: torch.Tensor, width: int, value: int) -> torch.Tensor:
    """(N, width): ``x`` padded with ``value`` at the end of each row (unchanged when wide enough)."""
    return x_NT if x_NT.shape[1] >= width else F.pad(x_NT, (0, width - x_NT.shape[1]), value=value)

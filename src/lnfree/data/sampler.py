"""``SequenceSampler``: deterministic, resumable batches of ``ctx``-token sequences from a ``TokenCache``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from .cache import TokenCache
from .sources import DataSourceError

if TYPE_CHECKING:  # torch is imported lazily so tokenizer worker processes start fast.
    import torch


class SequenceSampler:
    """Deterministic batches of ``ctx``-token sequences from a ``TokenCache``.

    With ``shuffle=True`` each epoch visits every sequence once, in a permutation seeded by ``(seed, epoch)``, and
    ``next_batch`` runs across epoch boundaries forever. The cursor (epoch, position) is all the state there is, so
    ``state_dict``/``load_state_dict`` (plain ints, JSON in checkpoints) make a resumed run see exactly the batches
    the uninterrupted run would have. ``shuffle=False`` keeps stream order, for evaluation (``iter_batches``).
    ``window`` reads only the first N sequences: a run's own prefix of a sampled cache that other runs may have
    grown since (see ``lnfree.data.cache``).
    """

    def __init__(self, cache: TokenCache, ctx: int, seed: int = 0, shuffle: bool = True, window: int | None = None):
        for name, value, least in (("ctx", ctx, 2), ("seed", seed, 0), ("window", 1 if window is None else window, 1)):
            if value < least:
                raise ValueError(f"{name} must be at least {least}, got {value}")
        self.cache, self.ctx, self.seed, self.shuffle, self.window = cache, ctx, seed, shuffle, window
        self.n_sequences = cache.n_sequences(ctx) if window is None else min(window, cache.n_sequences(ctx))
        if self.n_sequences == 0:
            raise ValueError(f"{cache.path} has {cache.token_count} tokens, fewer than one sequence of ctx={ctx}")
        self.epoch = self.position = 0  # position: index into the epoch's order of the next sequence to hand out
        self._order: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sequence indices of ``epoch`` in visiting order."""
        if not self.shuffle:
            return np.arange(self.n_sequences)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_sequences))
        return self._order[1]

    def next_batch(self, n: int) -> torch.Tensor:
        """The next ``n`` sequences as a LongTensor of shape (n, ctx); advances the cursor."""
        return self.gather(self.next_indices(n))

    def next_indices(self, n: int) -> np.ndarray:
        """Indices of the next ``n`` sequences (``gather`` reads them); advances the cursor. A rank of a distributed
        run takes all of a step's indices and reads only its own rows, so the cursor is the same on every rank."""
        if n < 1:
            raise ValueError(f"batch size must be positive, got {n}")
        parts = []
        while n:
            parts.append(self.epoch_order(self.epoch)[self.position : self.position + n])
            self.position += len(parts[-1])
            n -= len(parts[-1])
            if self.position == self.n_sequences:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(parts)

    def iter_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """One pass over every sequence in epoch-0 order (stream order when ``shuffle=False``), in (batch_size, ctx)
        batches, the last one smaller when the count does not divide. Does not move the cursor."""
        if batch_size < 1:
            raise ValueError(f"batch size must be positive, got {batch_size}")
        order = self.epoch_order(0)
        for start in range(0, self.n_sequences, batch_size):
            yield self.gather(order[start : start + batch_size])

    def state_dict(self) -> dict[str, int]:
        """The cursor plus what identifies the data, all ints (JSON-serializable)."""
        return {"seed": self.seed, "shuffle": int(self.shuffle), "epoch": self.epoch, "position": self.position,
                "ctx": self.ctx, "n_sequences": self.n_sequences, "data_id": self.data_id}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from ``state_dict()``; refuses a state taken on other data or another ``ctx``."""
        for name, mine in (("ctx", self.ctx), ("n_sequences", self.n_sequences), ("data_id", self.data_id)):
            if int(state[name]) != mine:
                raise ValueError(
                    "--resume: the tokens this run reads differ from those it started on (the data or the "
                    f"tokenizer changed since: {name} {state[name]} then, {mine} now); resume with the same data "
                    "and model, or start a new run")
        if not 0 <= int(state["position"]) < self.n_sequences:
            raise ValueError(f"sampler state position {state['position']} out of range [0, {self.n_sequences})")
        # The saved seed/shuffle win: the point of resuming is to continue the saved run's order.
        self.seed, self.shuffle, self.epoch, self.position = (int(state["seed"]), bool(state["shuffle"]),
                                                              int(state["epoch"]), int(state["position"]))
        self._order = None

    @property
    def data_id(self) -> int:
        """What identifies the tokens this sampler reads: the cache's id, or that of its prefix in a window."""
        if self.window is None:
            return self.cache.data_id
        return self.cache.prefix_id(self.n_sequences * self.ctx)  # unchanged when the cache grows behind it

    def gather(self, indices: np.ndarray) -> torch.Tensor:
        """Sequences ``indices`` as a LongTensor (len(indices), ctx)."""
        import torch

        tokens = self.cache.tokens
        # The memmap viewed as (sequences, ctx): one row gather (a memcpy per row inside numpy, no Python loop).
        rows = tokens[: tokens.shape[0] // self.ctx * self.ctx].reshape(-1, self.ctx)
        batch = rows[np.asarray(indices, dtype=np.int64)].astype(np.int64)
        vocab = self.cache.manifest.get("vocab_size")
        if vocab is not None and batch.size and batch.max() >= vocab:
            raise DataSourceError(f"token cache {self.cache.path} holds id {int(batch.max())}, outside its "
                                  f"{vocab}-token vocabulary: the file is corrupt; delete the folder to rebuild it")
        return torch.from_numpy(batch)

"""Streaming item-frequency estimation for logQ correction.

Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item
Recommendations" (RecSys 2019), Algorithm 2: per hashed slot, ``A`` is the step
an item was last seen and ``B`` a moving average of the steps between
sightings; the probability of the item appearing in a batch is ``1 / B``.
Several hash functions, taking the largest ``B``, limit the damage collisions
do (a collision can only make an item look more frequent).

>>> est = FrequencyEstimator(hash_size=1024, num_hashes=2, alpha=0.1)
>>> hot, rare = stable_hash(["hot", "rare"])
>>> for step in range(400):
...     est.update(np.array([hot] + ([rare] if step % 4 == 0 else []), dtype=np.uint64))
>>> est.probability(np.array([hot, rare], dtype=np.uint64)).round(2).tolist()
[1.0, 0.25]
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

_MULTIPLIERS = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                         0xD6E8FEB86659FD93, 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53,
                         0x94D049BB133111EB, 0xBF58476D1CE4E5B9], dtype=np.uint64)


def stable_hash(ids: Iterable[str]) -> np.ndarray:
    """64-bit hashes of raw ids, identical across processes (unlike ``hash``)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little")
         for i in ids), dtype=np.uint64)


class FrequencyEstimator:
    """Per-batch appearance probability of items, learned from the stream of batches."""

    def __init__(self, hash_size: int = 1 << 20, num_hashes: int = 2, alpha: float = 0.01):
        if not 1 <= num_hashes <= len(_MULTIPLIERS):
            raise ValueError(f"num_hashes must be in 1..{len(_MULTIPLIERS)}")
        self.hash_size = hash_size
        self.alpha = alpha
        self.last_step = np.zeros((num_hashes, hash_size), dtype=np.int64)
        self.delta = np.zeros((num_hashes, hash_size), dtype=np.float32)
        self.step = 0

    def _slots(self, keys: np.ndarray) -> np.ndarray:
        mult = _MULTIPLIERS[: self.last_step.shape[0], None]
        with np.errstate(over="ignore"):
            mixed = keys[None, :].astype(np.uint64) * mult
        return ((mixed >> np.uint64(32)) % np.uint64(self.hash_size)).astype(np.int64)

    def update(self, keys: np.ndarray) -> None:
        """Record one training batch's items (hashed ids); advances the global step."""
        self.step += 1
        slots = self._slots(keys)
        hashes = np.arange(slots.shape[0])[:, None]
        # No de-duplication needed: every copy of a repeated (hash, slot) reads the same old
        # state, so the copies compute and write the same new value.
        last = self.last_step[hashes, slots]
        gap = (self.step - last).astype(np.float32)
        # A first sighting has no previous one: take the whole gap as the estimate
        # rather than averaging it with zero, which would make newcomers look hot.
        self.delta[hashes, slots] = np.where(
            last == 0, gap, (1 - self.alpha) * self.delta[hashes, slots] + self.alpha * gap)
        self.last_step[hashes, slots] = self.step

    def probability(self, keys: np.ndarray) -> np.ndarray:
        """Estimated probability that each item appears in a batch, in (0, 1]."""
        slots = self._slots(keys)
        rows = np.arange(slots.shape[0])[:, None]
        delta = self.delta[rows, slots].max(axis=0)
        return 1.0 / np.maximum(delta, 1.0)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"last_step": self.last_step, "delta": self.delta,
                "step": np.int64(self.step), "alpha": np.float64(self.alpha)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> FrequencyEstimator:
        last_step = np.asarray(state["last_step"], dtype=np.int64)
        est = cls(last_step.shape[1], last_step.shape[0], float(state["alpha"]))
        est.last_step = last_step.copy()
        est.delta = np.asarray(state["delta"], dtype=np.float32).copy()
        est.step = int(state["step"])
        return est

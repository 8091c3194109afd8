"""Per-sample randomness: every random choice about a sample (its frames, crop, flip, masks,
its place in an epoch) comes from a generator seeded by what identifies it, never by a
worker id, a rank or the clock, so any process that looks at a sample sees the same one."""

from __future__ import annotations

import hashlib

import numpy as np


def sample_rng(seed: int, key: str, view: int, purpose: str) -> np.random.Generator:
    """A generator that depends on nothing but its arguments (no worker id, rank or clock)."""
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{view}\x00{purpose}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))

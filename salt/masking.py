"""Multi-block masks, a pure function of (dataset seed, key, view).

Each generator unions `num_blocks` rectangles of `int(H*W*scale)` spatial tokens that
span `temporal_scale` of the time axis; masked tokens are the targets, the rest the
context. As in V-JEPA, one block shape is drawn per generator and shared by all of
its blocks (a shape per block would mask more: ~83.6% instead of ~81.7% for the
long-range generator on 8x14x14). The reference code draws that shape once per batch
and truncates every sample to the batch minimum, which drops late-frame tokens; here
each sample draws its own shape, keeps its own mask, and batches are padded instead
(`valid` marks real entries). An empty context redraws the positions, not the shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from salt.config import BlockMaskConfig
from salt.devices import to_device
from salt.seeds import sample_rng


@dataclass(frozen=True)
class Mask:
    context: np.ndarray  # sorted token indices, int64
    target: np.ndarray  # sorted token indices, int64, disjoint from context


def block_shape(gen: BlockMaskConfig, grid: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    t, h, w = grid
    keep = int(h * w * gen.spatial_scale)
    lo, hi = gen.aspect_ratio
    ar = lo + rng.random() * (hi - lo)
    bh = min(max(round(math.sqrt(keep * ar)), 1), h)
    bw = min(max(round(math.sqrt(keep / ar)), 1), w)
    bt = min(max(int(t * gen.temporal_scale), 1), t)
    return bt, bh, bw


def sample_mask(gen: BlockMaskConfig, grid: tuple[int, int, int], rng: np.random.Generator) -> Mask:
    t, h, w = grid
    bt, bh, bw = block_shape(gen, grid, rng)
    if (bt, bh, bw) == (t, h, w):  # every draw would leave no context: redrawing positions cannot end
        raise ValueError(f"mask generator {gen} covers the whole {t}x{h}x{w} token grid with one block")
    while True:
        covered = np.zeros(grid, dtype=bool)
        for _ in range(gen.num_blocks):
            t0 = rng.integers(0, t - bt + 1)
            y0 = rng.integers(0, h - bh + 1)
            x0 = rng.integers(0, w - bw + 1)
            covered[t0 : t0 + bt, y0 : y0 + bh, x0 : x0 + bw] = True
        flat = covered.reshape(-1)
        if not flat.all():  # an empty context is resampled
            return Mask(context=np.flatnonzero(~flat), target=np.flatnonzero(flat))


def sample_masks(
    generators: list[BlockMaskConfig], grid: tuple[int, int, int], *, seed: int, key: str, view: int, epoch: int = 0
) -> list[Mask]:
    """One mask per generator. `epoch` > 0 only when a run opts into fresh masks per pass."""
    purpose = "mask" if epoch == 0 else f"mask-epoch{epoch}"
    rng = sample_rng(seed, key, view, purpose)
    return [sample_mask(gen, grid, rng) for gen in generators]


@dataclass
class MaskBatch:
    """Padded index tensors for one generator across a batch."""

    ctx_idx: torch.Tensor  # [B, Kc] int64
    ctx_valid: torch.Tensor  # [B, Kc] bool
    tgt_idx: torch.Tensor  # [B, Kt] int64
    tgt_valid: torch.Tensor  # [B, Kt] bool

    def to(self, device: torch.device | str) -> "MaskBatch":
        return MaskBatch(*(to_device(t, device) for t in self.tensors()))

    def pin_memory(self) -> "MaskBatch":
        """What torch's DataLoader calls with pin_memory=True (it pins only tensors and objects with this method)."""
        return MaskBatch(*(t.pin_memory() for t in self.tensors()))

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.ctx_idx, self.ctx_valid, self.tgt_idx, self.tgt_valid


def _pad(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r) for r in rows)
    idx = torch.zeros(len(rows), n, dtype=torch.int64)
    valid = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = torch.from_numpy(r)
        valid[i, : len(r)] = True
    return idx, valid


def collate_masks(per_sample: list[list[Mask]]) -> list[MaskBatch]:
    """[sample][generator] masks -> one padded MaskBatch per generator."""
    out = []
    for g in range(len(per_sample[0])):
        ctx_idx, ctx_valid = _pad([s[g].context for s in per_sample])
        tgt_idx, tgt_valid = _pad([s[g].target for s in per_sample])
        out.append(MaskBatch(ctx_idx, ctx_valid, tgt_idx, tgt_valid))
    return out

import math

import numpy as np
import pytest

from salt.config import BlockMaskConfig, MaskConfig
from salt.masking import collate_masks, sample_masks

GENERATORS = MaskConfig().generators  # METHOD.md: 8 x 0.15 (short range), 2 x 0.7 (long range)


def test_masks_are_a_pure_function_of_seed_key_view():
    grid = (8, 8, 8)
    a = sample_masks(GENERATORS, grid, seed=0, key="clip-7", view=1)
    sample_masks(GENERATORS, grid, seed=0, key="other", view=0)  # unrelated draws in between change nothing
    b = sample_masks(GENERATORS, grid, seed=0, key="clip-7", view=1)
    for ma, mb in zip(a, b):
        assert np.array_equal(ma.context, mb.context) and np.array_equal(ma.target, mb.target)
    for other in (dict(seed=1, key="clip-7", view=1), dict(seed=0, key="clip-8", view=1), dict(seed=0, key="clip-7", view=0)):
        c = sample_masks(GENERATORS, grid, **other)
        assert any(not np.array_equal(x.target, y.target) for x, y in zip(a, c)), other


@pytest.mark.parametrize("grid", [(8, 8, 8), (8, 14, 14)])
def test_context_and_target_partition_the_grid(grid):
    n = math.prod(grid)
    for i in range(50):
        for m in sample_masks(GENERATORS, grid, seed=3, key=f"k{i}", view=0):
            assert len(np.intersect1d(m.context, m.target)) == 0
            assert len(m.context) + len(m.target) == n and len(m.context) > 0
            assert np.all(np.diff(m.context) > 0) and np.all(np.diff(m.target) > 0)


def expected_masked_fraction(gen: BlockMaskConfig, h: int, w: int) -> float:
    """Independent of the sampler: P(token masked) = 1 - (P(one block misses it))^num_blocks,
    with the block's h x w distribution integrated over the aspect-ratio range."""
    keep = int(h * w * gen.spatial_scale)
    ars = np.linspace(*gen.aspect_ratio, 20001)
    miss = np.zeros((h, w))
    for ar in ars:
        bh = min(max(round(math.sqrt(keep * ar)), 1), h)
        bw = min(max(round(math.sqrt(keep / ar)), 1), w)
        cover_y = np.array([sum(1 for y0 in range(h - bh + 1) if y0 <= y < y0 + bh) for y in range(h)]) / (h - bh + 1)
        cover_x = np.array([sum(1 for x0 in range(w - bw + 1) if x0 <= x < x0 + bw) for x in range(w)]) / (w - bw + 1)
        miss += 1 - np.outer(cover_y, cover_x)
    miss /= len(ars)
    return float(np.mean(1 - miss**gen.num_blocks))


@pytest.mark.parametrize("grid", [(8, 8, 8), (8, 14, 14)])
def test_mean_masked_fraction_matches_block_sizes(grid):
    samples = 1500
    fractions = np.zeros((samples, len(GENERATORS)))
    for i in range(samples):
        for g, m in enumerate(sample_masks(GENERATORS, grid, seed=0, key=f"k{i}", view=0)):
            fractions[i, g] = len(m.target) / math.prod(grid)
    for g, gen in enumerate(GENERATORS):
        expected = expected_masked_fraction(gen, grid[1], grid[2])
        assert abs(fractions[:, g].mean() - expected) < 0.015, (g, fractions[:, g].mean(), expected)
    # every token of a masked spatial position is masked at every time step (temporal scale 1.0)
    m = sample_masks(GENERATORS, grid, seed=0, key="k0", view=0)[0]
    per_time = np.isin(np.arange(math.prod(grid)), m.target).reshape(grid)
    assert (per_time == per_time[:1]).all()


def test_collate_pads_and_marks_valid():
    grid = (8, 8, 8)
    masks = [sample_masks(GENERATORS, grid, seed=0, key=f"k{i}", view=0) for i in range(3)]
    batches = collate_masks(masks)
    assert len(batches) == 2
    for g, mb in enumerate(batches):
        for i in range(3):
            n_ctx = len(masks[i][g].context)
            assert mb.ctx_valid[i].sum() == n_ctx
            assert np.array_equal(mb.ctx_idx[i, :n_ctx].numpy(), masks[i][g].context)
            assert np.array_equal(mb.tgt_idx[i][mb.tgt_valid[i]].numpy(), masks[i][g].target)

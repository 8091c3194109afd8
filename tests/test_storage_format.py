"""The storage format (salt/storage.py): every allowed format written through a real Zarr array
and read back, its error bounded by what it keeps, and the planner's byte estimate."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import zarr

from salt.storage import CODECS, DTYPES, MANTISSA_BITS, StorageFormat

FORMATS = [StorageFormat(dtype=d, codec=c, keepbits=k)
           for d, c in itertools.product(DTYPES, CODECS) for k in (0, 5)]


def latents(rows: int = 6, tokens: int = 64, width: int = 32) -> np.ndarray:
    # LayerNorm'd teacher tokens look like this: zero mean, unit scale
    return np.random.default_rng(0).standard_normal((rows, tokens, width)).astype(np.float32)


def round_trip(fmt: StorageFormat, tmp_path) -> tuple[np.ndarray, int]:
    values = latents().astype(fmt.dtype)
    folder = tmp_path / fmt.name()
    array = zarr.create_array(store=str(folder), shape=values.shape, chunks=(1, *values.shape[1:]), dtype=fmt.dtype,
                              **fmt.zarr_codecs())
    array[:] = values
    chunk_bytes = sum(f.stat().st_size for f in (folder / "c").rglob("*") if f.is_file())
    return np.asarray(zarr.open_array(str(folder), mode="r")[:]), chunk_bytes


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name())
def test_every_format_round_trips_within_what_it_keeps(fmt, tmp_path):
    exact = latents().astype(fmt.dtype)
    stored, chunk_bytes = round_trip(fmt, tmp_path)
    assert stored.dtype == np.dtype(fmt.dtype)
    if fmt.keepbits == 0:
        assert np.array_equal(stored, exact)  # lossless
    else:
        # rounding to k mantissa bits moves a value by at most half a unit of its last kept bit
        relative = np.abs(stored.astype(np.float64) - exact) / np.abs(exact.astype(np.float64))
        assert relative.max() <= 2.0 ** -(fmt.keepbits + 1) * 1.0001
        assert 0 < relative.mean() < 2.0 ** -(fmt.keepbits + 1)
    raw = exact.nbytes
    if fmt.codec == "none":
        assert chunk_bytes == raw  # no codec: the chunks are the raw values
    elif fmt.keepbits:
        # the codec drops the zeroed bits; the planner's estimate is sign + exponent + kept bits,
        # which real latents beat (their exponents compress too)
        assert chunk_bytes <= raw * fmt.value_bytes() / (np.dtype(fmt.dtype).itemsize)


def test_invalid_formats_name_the_field():
    with pytest.raises(ValueError, match=r"keepbits=10: expected 0 \(off\) to 9 for float16"):
        StorageFormat(dtype="float16", keepbits=10)
    with pytest.raises(ValueError, match="codec='lz4': expected one of none, zstd, blosc"):
        StorageFormat(codec="lz4")
    assert StorageFormat(dtype="float32", keepbits=MANTISSA_BITS["float32"] - 1).keepbits == 22


def test_value_bytes_follow_the_bits_a_format_keeps():
    assert StorageFormat(dtype="float32").value_bytes() == 4
    assert StorageFormat(dtype="float16", codec="zstd").value_bytes() == 2  # lossless on floats: no saving assumed
    assert StorageFormat(dtype="float32", keepbits=7, codec="blosc").value_bytes() == 2  # 1 + 8 + 7 of 32 bits
    assert StorageFormat(dtype="float16", keepbits=5, codec="blosc").value_bytes() == 2 * 11 / 16  # 1 + 5 + 5 of 16
    assert StorageFormat(dtype="float16", keepbits=5, codec="blosc").value_bytes(compression_ratio=4) == 0.5

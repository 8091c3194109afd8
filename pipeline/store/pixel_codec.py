"""The pixel cache's codec: one view's uint8 crop box [frames, h, w, 3] <-> one compressed blob.

A store extracted with extract.pixel_cache=true keeps, next to each shard's latents, the crop
box the teacher's actor received (before resize and flip), so stage 2 can rebuild the clip
without decoding video. The blobs of a shard are concatenated into its pixels.bin; the
manifest gives each row's offset, length and crc32 (pipeline/store/layout.py).
"""

from __future__ import annotations

import struct

import numpy as np
from numcodecs import Blosc

# Blosc(zstd, level 3): on the moving-digits crops, a higher zstd level compressed little more at a
# fraction of the encode speed, and plain Zstd, Blosc lz4 and bitshuffle were no better. Its ratio on
# make bench's 640x360 clip is BENCHMARKS.md's pixel_cache_mb_per_view. Byte shuffle is a no-op on
# uint8 (item size 1); it is kept so the config reads as the usual Blosc one.
CODEC = Blosc(cname="zstd", clevel=3, shuffle=Blosc.SHUFFLE)
CODEC_INFO: dict = CODEC.get_config()

# Blosc's 16-byte header: version, versionlz, flags, typesize (one byte each), then nbytes,
# blocksize and cbytes as little-endian uint32
_HEADER = 16


def encode(crop: np.ndarray) -> bytes:
    """uint8 [frames, h, w, 3] -> blob."""
    if crop.dtype != np.uint8 or crop.ndim != 4 or crop.shape[-1] != 3:
        raise ValueError(f"pixel cache holds uint8 [frames, h, w, 3] crops, got {crop.dtype} {list(crop.shape)}")
    return CODEC.encode(np.ascontiguousarray(crop))


def decode(blob: bytes, shape: tuple) -> np.ndarray:
    """blob -> uint8 array of `shape` (writable, decompressed in place).

    The size is checked from the header first: decompressing into a larger buffer would
    succeed and leave the rest uninitialised."""
    shape = tuple(int(n) for n in shape)
    want = int(np.prod(shape))
    if len(blob) < _HEADER:
        raise ValueError(f"pixel blob of {len(blob)} bytes is shorter than its {_HEADER}-byte header")
    size = struct.unpack_from("<I", blob, 4)[0]
    if size != want:
        raise ValueError(f"pixel blob holds {size} bytes, but shape {list(shape)} needs {want}")
    out = np.empty(shape, np.uint8)
    CODEC.decode(blob, out=out)
    return out

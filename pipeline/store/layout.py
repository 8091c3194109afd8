"""The target store's layout: one Zarr array per source shard, Arrow manifests, provenance.

Layout of a store folder:

    store.json                      provenance (teacher, geometry, preprocessing, dtype, sources;
                                    pipeline/store/provenance.py)
    projection.safetensors          the teacher-width projection matrix, when extract.projection is set
    targets/shard-000000.zarr/      committed shard: Zarr array [rows, tokens, width] plus
        manifest.parquet            key, view, row, clip hash, sample spec of each row
        errors.parquet              key, view, reason of each sample that could not be extracted
        pixels.bin                  with extract.pixel_cache: each row's uint8 crop box, compressed
                                    (pipeline/store/pixel_codec.py), concatenated in row order; the manifest
                                    then has pixels_offset, pixels_bytes, pixels_crc32
        shard.json                  counts, sha256 of every file; its presence marks the shard complete
    targets/.parts/shard-000001/    while a job runs: the teacher actors' outputs of a shard not yet
                                    committed (pipeline/store/parts.py); gone from a finished store
    manifest.parquet, errors.parquet  all shards' tables, rebuilt when a job finishes

A shard is written under a temporary name and renamed into place once whole, so a
reader (or a resumed job) sees either all of a shard or nothing of it
(pipeline/store/write.py).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import fs

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("view", pa.int32()),
        ("shard", pa.string()),
        ("row", pa.int64()),
        ("clip_hash", pa.string()),
        ("frame_indices", pa.list_(pa.int32())),
        ("crop", pa.list_(pa.int32())),
        ("flip", pa.bool_()),
        ("crc32", pa.int64()),  # of the row as stored: reading it back must give the same bytes
    ]
)


# only in stores extracted with extract.pixel_cache: stores without it keep the schema above
PIXEL_COLUMNS = [
    ("pixels_offset", pa.int64()),  # where the row's blob starts in the shard's pixels.bin
    ("pixels_bytes", pa.int64()),  # the blob's length
    ("pixels_crc32", pa.int64()),  # of the uncompressed uint8 crop box
]


PIXEL_SCHEMA = pa.schema([*MANIFEST_SCHEMA, *PIXEL_COLUMNS])


PIXELS = "pixels.bin"


ERRORS_SCHEMA = pa.schema([("key", pa.string()), ("view", pa.int32()), ("shard", pa.string()), ("reason", pa.string())])


PROJECTION = "projection.safetensors"


class StoreMismatchError(ValueError):
    pass


class CorruptStoreError(RuntimeError):
    pass


def shard_dir(store: str, shard: str) -> str:
    return fs.join(str(store), "targets", f"{shard}.zarr")


def parts_dir(store: str, shard: str | None = None) -> str:
    """Where the teacher's actors leave a shard's rows until its commit (all shards' without `shard`)."""
    root = fs.join(str(store), "targets", ".parts")
    return fs.join(root, shard) if shard else root


def committed_shards(store: str) -> list[str]:
    """Shards whose marker (shard.json, written last) exists."""
    markers = fs.glob(fs.join(str(store), "targets", "*.zarr", "shard.json"))
    return sorted(m.rstrip("/").split("/")[-2].removesuffix(".zarr") for m in markers)


def row_crc32(row: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(row).data)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def read_parquet(location: str) -> pa.Table:
    return pq.read_table(pa.BufferReader(fs.read_bytes(location)))


def store_bytes(path: str) -> int:
    return fs.total_bytes(str(path))


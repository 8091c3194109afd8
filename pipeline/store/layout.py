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
    targets/.parts/                 left by a killed job of an earlier version (its actors' part files);
                                    removed by the next job. Actors' outputs now stay in Ray's object
                                    store until their shard's commit (pipeline/store/parts.py)
    manifest.parquet, errors.parquet  all shards' tables, rebuilt when a job finishes; manifest.parquet's
                                    schema metadata (`SHARDS_KEY`) names each shard it holds with its marker's
                                    version and store id, so a reader uses it for the shards whose marker is
                                    unchanged and reads no per-shard file for them (pipeline/store/read.py)

A shard is committed whole: on a local disk written under a temporary name and renamed into
place; on an object store written under its final names, each object once, with the marker
(shard.json) last. Readers and resumed jobs go by the marker, so they see either all of a shard
or nothing of it, and a job removes folders without one (pipeline/store/write.py).
"""

from __future__ import annotations

import os
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

# key of the store-level manifest.parquet's schema metadata: JSON {shard: {"marker", "store_id"}}
SHARDS_KEY = b"salt.shards"


class StoreMismatchError(ValueError):
    pass


class CorruptStoreError(RuntimeError):
    pass


def shard_dir(store: str, shard: str) -> str:
    return fs.join(str(store), "targets", f"{shard}.zarr")


def parts_dir(store: str, shard: str | None = None) -> str:
    """Where a job of an earlier version left its actors' part files (removed by the next job)."""
    root = fs.join(str(store), "targets", ".parts")
    return fs.join(root, shard) if shard else root


def committed_shards(store: str) -> list[str]:
    """Shards whose marker (shard.json, written last) exists."""
    return sorted(marker_versions(store))


def marker_versions(store: str) -> dict[str, str]:
    """Committed shard -> its marker's version (size and ETag, or size and modification time on a
    local disk), from one listing: the store-level tables record the versions they were built
    from, so a reader knows, without opening a shard, whether they still describe it."""
    if not fs.is_remote(str(store)):
        return _local_marker_versions(fs.resolve(fs.join(str(store), "targets"))[1])
    targets = fs.join(str(store), "targets")
    filesystem, root = fs.resolve(targets)
    root = root.rstrip("/")
    # one flat listing of the prefix, page after page: a glob would list each shard's folder on its own
    found = fs.with_retries("find", targets, lambda: filesystem.find(root, detail=True))
    versions = {}
    for path, info in found.items():
        parts = path[len(root) + 1 :].split("/")
        if len(parts) == 2 and parts[1] == "shard.json" and parts[0].endswith(".zarr") and not parts[0].startswith("."):
            versions[parts[0].removesuffix(".zarr")] = _version(info)
    return versions


def marker_version(store: str, shard: str) -> str | None:
    """One shard's marker version (one HEAD on an object store), None where it has no marker."""
    location = fs.join(shard_dir(store, shard), "shard.json")
    filesystem, path = fs.resolve(location)
    try:
        info = fs.with_retries("info", location, lambda: filesystem.info(path)) if fs.is_remote(store) else filesystem.info(path)
    except FileNotFoundError:
        return None
    return _version(info)


def _version(info: dict) -> str:
    if "mtime" in info and "ETag" not in info:  # a local disk: as _local_marker_versions gives it
        return f"{info.get('size')}:{float(info['mtime'])}"
    tag = next((info[k] for k in ("ETag", "etag", "LastModified", "updated", "created") if info.get(k) is not None), "")
    if hasattr(tag, "timestamp"):  # a listing and an info of one file may give its time as a float or a datetime
        tag = float(tag.timestamp())
    return f"{info.get('size')}:{tag}"


def _local_marker_versions(targets: str) -> dict[str, str]:
    """marker_versions on a local disk: one stat per shard folder (fsspec's glob would walk every
    folder of every shard)."""
    versions = {}
    try:
        entries = list(os.scandir(targets))
    except FileNotFoundError:
        return versions
    for entry in entries:
        if entry.name.endswith(".zarr") and not entry.name.startswith("."):
            try:
                info = os.stat(os.path.join(entry.path, "shard.json"))
            except FileNotFoundError:
                continue
            versions[entry.name.removesuffix(".zarr")] = f"{info.st_size}:{info.st_mtime}"
    return versions


def row_crc32(row: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(row).data)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def read_parquet(location: str) -> pa.Table:
    return pq.ParquetFile(pa.BufferReader(fs.read_bytes(location))).read()  # ParquetFile: read_table would import pandas (0.4 s)


def store_bytes(path: str) -> int:
    return fs.total_bytes(str(path))


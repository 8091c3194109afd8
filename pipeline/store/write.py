"""Writing a store: a shard committed whole under a temporary name, then the store-level tables."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import zarr
from safetensors.torch import save

from pipeline import fs
from pipeline.store.layout import (
    ERRORS_SCHEMA,
    MANIFEST_SCHEMA,
    PIXEL_SCHEMA,
    PIXELS,
    PROJECTION,
    committed_shards,
    parquet_bytes,
    parts_dir,
    row_crc32,
    shard_dir,
)
from pipeline.store.read import read_tables
from salt.storage import StorageFormat

@dataclass(frozen=True)
class ExtractedRow:
    key: str
    view: int
    clip_hash: str
    frame_indices: tuple[int, ...]
    crop: tuple[int, int, int, int]
    flip: bool
    latents: np.ndarray  # [tokens, width]
    pixels: bytes | None = None  # the crop box as pipeline.store.pixel_codec.encode made it, with a pixel cache
    pixels_crc32: int | None = None  # of the uncompressed crop box (row_crc32)


def remove_partial_shards(store: str) -> int:
    """Temporary folders, shard folders without their marker and part files left by a killed
    job. Every part is stale when a job starts: those of uncommitted shards are extracted again,
    and those of a shard committed just before the kill are no longer needed."""
    targets = fs.join(str(store), "targets")
    committed = {f"{s}.zarr" for s in committed_shards(store)}
    stale = fs.glob(fs.join(targets, ".*.tmp-*")) + [
        d for d in fs.glob(fs.join(targets, "*.zarr")) if d.rstrip("/").split("/")[-1] not in committed
    ]
    if fs.exists(parts_dir(store)):
        stale.append(parts_dir(store))
    for d in stale:
        fs.remove(d)
    return len(stale)


def commit_shard(
    store: str | Path,
    shard: str,
    rows: list[ExtractedRow],
    errors: list[tuple[str, int, str]],
    *,
    fmt: StorageFormat,
    store_id: str,
    pixel_cache: bool = False,
) -> str:
    """Write one shard whole under a temporary name, move it into place, then write its
    marker (shard.json). On a local disk the move is a rename; on an object store it is a
    copy, which is why the marker comes last and readers go by the marker.

    With `pixel_cache`, every row must carry its encoded pixels; they go to pixels.bin."""
    final = shard_dir(store, shard)
    tmp = fs.join(str(store), "targets", f".{shard}.zarr.tmp-{uuid.uuid4().hex[:8]}")
    try:
        fs.makedirs(tmp)  # zarr's fsspec store writes files, it does not make folders
        _write_shard(tmp, shard, rows, errors, fmt, pixel_cache)
        files = {name: fs.sha256(fs.join(tmp, name)) for name in fs.files_under(tmp)}
        fs.move(tmp, final)
        meta = {"shard": shard, "store_id": store_id, "rows": len(rows), "errors": len(errors), "storage": fmt.describe(), "sha256": files}
        fs.write_bytes(fs.join(final, "shard.json"), json.dumps(meta, indent=1).encode())
    except BaseException:  # a full disk or a failed write: nothing half-written stays behind
        fs.remove(tmp)
        if not fs.exists(fs.join(final, "shard.json")):
            fs.remove(final)
        raise
    return final


def _write_shard(
    folder: str, shard: str, rows: list[ExtractedRow], errors: list[tuple[str, int, str]], fmt: StorageFormat,
    pixel_cache: bool = False,
) -> None:
    """The array, the pixel cache (if kept), then the manifest and errors tables.

    The array is read back once: the manifest's per-row checksums are of what a reader
    will get (after lossy bit-rounding), and a write that did not land fails here
    rather than in a student run.
    """
    checksums: list[int] = []
    if rows:
        tokens, width = rows[0].latents.shape
        array = zarr.create_array(
            store=fs.for_zarr(folder),
            shape=(len(rows), tokens, width),
            chunks=(1, tokens, width),  # one sample per read, the student's access pattern
            shards=(len(rows), tokens, width),  # one file per source shard
            dtype=fmt.dtype,
            **fmt.zarr_codecs(),
        )
        array[:] = np.stack([r.latents for r in rows]).astype(fmt.dtype)
        checksums = [row_crc32(r) for r in zarr.open_array(fs.for_zarr(folder), mode="r")[:]]
    manifest = {
        "key": [r.key for r in rows],
        "view": [r.view for r in rows],
        "shard": [shard] * len(rows),
        "row": list(range(len(rows))),
        "clip_hash": [r.clip_hash for r in rows],
        "frame_indices": [list(r.frame_indices) for r in rows],
        "crop": [list(r.crop) for r in rows],
        "flip": [r.flip for r in rows],
        "crc32": checksums,
    }
    if pixel_cache:
        manifest |= _write_pixels(folder, shard, rows)
    schema = PIXEL_SCHEMA if pixel_cache else MANIFEST_SCHEMA
    fs.write_bytes(fs.join(folder, "manifest.parquet"), parquet_bytes(pa.table(manifest, schema=schema)))
    error_table = {
        "key": [e[0] for e in errors],
        "view": [e[1] for e in errors],
        "shard": [shard] * len(errors),
        "reason": [e[2] for e in errors],
    }
    fs.write_bytes(fs.join(folder, "errors.parquet"), parquet_bytes(pa.table(error_table, schema=ERRORS_SCHEMA)))


def _write_pixels(folder: str, shard: str, rows: list[ExtractedRow]) -> dict[str, list[int]]:
    """pixels.bin (the rows' blobs back to back, streamed: a shard's blobs can be large) and
    the manifest columns that find each blob."""
    missing = [(r.key, r.view) for r in rows if r.pixels is None or r.pixels_crc32 is None]
    if missing:
        raise ValueError(f"shard {shard}: rows {missing[:5]} have no pixels, but this store keeps a pixel cache")
    sizes = [len(r.pixels) for r in rows]
    with fs.open_file(fs.join(folder, PIXELS), "wb") as f:
        for r in rows:
            f.write(r.pixels)
    return {
        "pixels_offset": [int(x) for x in np.cumsum([0, *sizes])[:-1]],
        "pixels_bytes": sizes,
        "pixels_crc32": [r.pixels_crc32 for r in rows],
    }


def rebuild_tables(store: str | Path) -> tuple[pa.Table, pa.Table]:
    """Write the store-level manifest and errors tables (derived from the shards, so safe to redo)."""
    manifest, errors = read_tables(store)
    fs.write_bytes(fs.join(str(store), "manifest.parquet"), parquet_bytes(manifest))
    fs.write_bytes(fs.join(str(store), "errors.parquet"), parquet_bytes(errors))
    return manifest, errors



def write_projection(store: str, matrix: torch.Tensor) -> None:
    """The projection matrix itself, so a reader needs neither the seed rule nor the teacher."""
    fs.write_bytes(fs.join(store, PROJECTION), save({"projection": matrix.contiguous()}))

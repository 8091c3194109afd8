"""Writing a store: a shard committed whole (its files encoded in memory, each written once, the
marker last), then the store-level tables."""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import zarr
from numcodecs import BitRound
from safetensors.torch import save
from zarr.storage import MemoryStore

from pipeline import fs
from pipeline.store.layout import (
    ERRORS_SCHEMA,
    MANIFEST_SCHEMA,
    PIXEL_SCHEMA,
    PIXELS,
    PROJECTION,
    SHARDS_KEY,
    committed_shards,
    parquet_bytes,
    parts_dir,
    row_crc32,
    shard_dir,
)
from pipeline.store.read import collect_tables
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
    """Temporary folders and shard folders without their marker, left by a killed job (on an object
    store a shard being committed is written under its final names, so a folder without its marker
    is one whose commit did not finish), and the part files a job of an earlier version left."""
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
) -> dict:
    """Write one shard whole, then its marker (shard.json). Every file is encoded in memory
    (`encode_shard`) and written once; its sha256 is taken from those bytes, not by reading the
    file back. Returns the shard's tables as written, for the store-level tables: {"manifest",
    "errors"} (parquet bytes) and "store_id".

    On a local disk the files go to a temporary folder that is renamed into place. On an object
    store, where a rename is a copy plus a delete, they go straight to their final names: until the
    marker exists the folder is not a committed shard (readers and resumes go by the marker, and a
    rerun removes a folder without one), so the marker, written last, is the commit.

    With `pixel_cache`, every row must carry its encoded pixels; they go to pixels.bin."""
    final = shard_dir(store, shard)
    local = not fs.is_remote(str(store))
    folder = fs.join(str(store), "targets", f".{shard}.zarr.tmp-{uuid.uuid4().hex[:8]}") if local else final
    try:
        files = encode_shard(shard, rows, errors, fmt, pixel_cache)
        digests = _write_shard(folder, shard, files, rows, pixel_cache)
        if local:
            fs.move(folder, final)
        meta = {"shard": shard, "store_id": store_id, "rows": len(rows), "errors": len(errors), "storage": fmt.describe(),
                "sha256": dict(sorted(digests.items()))}
        fs.write_bytes(fs.join(final, "shard.json"), json.dumps(meta, indent=1).encode())
    except BaseException:  # a full disk or a failed write: nothing half-written stays behind
        if local:
            fs.remove(folder)
        if not fs.exists(fs.join(final, "shard.json")):
            fs.remove(final)
        raise
    return {"manifest": files["manifest.parquet"], "errors": files["errors.parquet"], "store_id": store_id}


def _write_shard(folder: str, shard: str, files: dict[str, bytes], rows: list[ExtractedRow], pixel_cache: bool) -> dict[str, str]:
    """Each file written once into `folder` (and pixels.bin streamed from the rows); returns the
    sha256 of each, taken from the bytes written."""
    digests = {}
    for name, data in files.items():
        fs.write_bytes(fs.join(folder, name), data, durable=False)  # on a local disk the folder's rename is the durable step
        digests[name] = hashlib.sha256(data).hexdigest()
    if pixel_cache:
        digests[PIXELS] = _write_pixels(folder, rows)
    return digests


def stored_values(latents: np.ndarray, fmt: StorageFormat) -> np.ndarray:
    """The rows as a reader will get them back: in the storage dtype, bit-rounded where the format
    rounds (numcodecs BitRound, the filter zarr applies; rounding a rounded value changes nothing)."""
    values = np.ascontiguousarray(latents, dtype=fmt.dtype)
    if fmt.keepbits:
        values = np.asarray(BitRound(fmt.keepbits).encode(values)).view(fmt.dtype).reshape(values.shape)
    return values


def encode_shard(
    shard: str, rows: list[ExtractedRow], errors: list[tuple[str, int, str]], fmt: StorageFormat, pixel_cache: bool = False
) -> dict[str, bytes]:
    """A shard's files except pixels.bin, as bytes: the Zarr array (encoded in memory), the manifest
    and the errors table. The manifest's per-row checksums are of the stored values (after
    bit-rounding), computed from the array in memory: a reader's check_row compares with them."""
    files: dict[str, bytes] = {}
    checksums: list[int] = []
    if rows:
        values = stored_values(np.stack([r.latents for r in rows]), fmt)
        checksums = [row_crc32(row) for row in values]
        encoded: dict = {}
        array = zarr.create_array(
            store=MemoryStore(encoded),
            shape=values.shape,
            chunks=(1, *values.shape[1:]),  # one sample per read, the student's access pattern
            shards=values.shape,  # one file per source shard
            dtype=fmt.dtype,
            **fmt.zarr_codecs(),
        )
        array[:] = values
        files |= {name: buffer.to_bytes() for name, buffer in encoded.items()}
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
        manifest |= _pixel_columns(shard, rows)
    schema = PIXEL_SCHEMA if pixel_cache else MANIFEST_SCHEMA
    files["manifest.parquet"] = parquet_bytes(pa.table(manifest, schema=schema))
    error_table = {
        "key": [e[0] for e in errors],
        "view": [e[1] for e in errors],
        "shard": [shard] * len(errors),
        "reason": [e[2] for e in errors],
    }
    files["errors.parquet"] = parquet_bytes(pa.table(error_table, schema=ERRORS_SCHEMA))
    return files


def _pixel_columns(shard: str, rows: list[ExtractedRow]) -> dict[str, list[int]]:
    """The manifest columns that find each row's blob in pixels.bin."""
    missing = [(r.key, r.view) for r in rows if r.pixels is None or r.pixels_crc32 is None]
    if missing:
        raise ValueError(f"shard {shard}: rows {missing[:5]} have no pixels, but this store keeps a pixel cache")
    sizes = [len(r.pixels) for r in rows]
    return {
        "pixels_offset": [int(x) for x in np.cumsum([0, *sizes])[:-1]],
        "pixels_bytes": sizes,
        "pixels_crc32": [r.pixels_crc32 for r in rows],
    }


def _write_pixels(folder: str, rows: list[ExtractedRow]) -> str:
    """pixels.bin, the rows' blobs back to back, streamed (a shard's blobs can be large); returns
    its sha256, taken from the blobs as they are written."""
    digest = hashlib.sha256()
    with fs.open_file(fs.join(folder, PIXELS), "wb") as f:
        for r in rows:
            f.write(r.pixels)
            digest.update(r.pixels)
    return digest.hexdigest()


def rebuild_tables(store: str | Path, fresh: dict[str, dict] | None = None) -> tuple[pa.Table, pa.Table]:
    """Write the store-level manifest and errors tables (derived from the shards, so safe to redo).
    `fresh`: the tables of shards just committed (commit_shard's returns), so that neither they nor
    the shards the previous tables still describe are read again (pipeline/store/read.py: collect_tables).
    The errors table is written first: a reader takes manifest.parquet's record as valid for both."""
    manifest, errors, recorded = collect_tables(store, fresh)
    fs.write_bytes(fs.join(str(store), "errors.parquet"), parquet_bytes(errors))
    meta = {SHARDS_KEY: json.dumps(recorded, sort_keys=True).encode()}
    fs.write_bytes(fs.join(str(store), "manifest.parquet"), parquet_bytes(manifest.replace_schema_metadata(meta)))
    return manifest, errors



def write_projection(store: str, matrix: torch.Tensor) -> None:
    """The projection matrix itself, so a reader needs neither the seed rule nor the teacher."""
    fs.write_bytes(fs.join(store, PROJECTION), save({"projection": matrix.contiguous()}))

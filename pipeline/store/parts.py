"""Part files: where the teacher's actors leave each batch's latents (and encoded crops) until their
shard is complete, and the commit that turns a complete shard's parts into a committed shard.

Parts live under `targets/.parts/<shard>/` (pipeline/store/layout.py: parts_dir); a shard's commit
removes its folder, the job removes the rest when it ends, and a rerun removes what a killed job left.
"""

from __future__ import annotations

import io
import os
import time
import uuid

import numpy as np

from pipeline import fs
from pipeline.store import pixel_codec
from pipeline.store.layout import parts_dir, row_crc32
from pipeline.store.write import ExtractedRow, commit_shard
from salt.storage import StorageFormat

def write_parts(
    store: str, shards: np.ndarray, orders: np.ndarray, latents: np.ndarray, crops: list[np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """One part file per shard present in a batch; returns each row's part and its index there.

    A part is an .npz (no pickles): `latents` [rows, tokens, width], and with crops also
    `pixels` (the rows' encoded crops back to back), `pixels_offsets` [rows + 1] and
    `pixels_crc32` [rows] (of the uncompressed crops). Its name is unique, so a re-run task
    writes a part of its own rather than over one the driver may already have chosen."""
    part = np.empty(len(shards), dtype=object)
    part_row = np.zeros(len(shards), np.int64)
    for shard in dict.fromkeys(str(s) for s in shards):  # the batch's shards, in order of appearance
        rows = np.flatnonzero(shards == shard)
        arrays = {"latents": latents[rows]}
        if crops is not None:
            blobs = [pixel_codec.encode(crops[i]) for i in rows]
            arrays |= {
                "pixels": np.frombuffer(b"".join(blobs), np.uint8),
                "pixels_offsets": np.cumsum([0, *map(len, blobs)], dtype=np.int64),
                "pixels_crc32": np.array([row_crc32(crops[i]) for i in rows], np.int64),
            }
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        path = fs.join(parts_dir(store, shard), f"{int(orders[rows[0]]):06d}-{uuid.uuid4().hex[:8]}.npz")
        fs.write_bytes(path, buffer.getvalue(), durable=False)  # a part outlives no crash: a rerun extracts its shard again
        part[rows] = path
        part_row[rows] = np.arange(len(rows))
    return part, part_row


def read_part(path: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(fs.read_bytes(path)), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def commit_from_parts(
    store: str, shard: str, rows: list[dict], fmt: StorageFormat, store_id: str, pixel_cache: bool
) -> tuple[int, int, float]:
    """Ray task: one shard's rows, their latents (and pixels) read from the parts they name, ->
    the committed shard; then its parts are removed. Returns (rows extracted, pid, seconds)."""
    t0 = time.perf_counter()
    ordered = sorted(rows, key=lambda r: int(r["order"]))
    good = [r for r in ordered if r["error"] == ""]
    parts = {path: read_part(path) for path in {str(r["part"]) for r in good}}
    commit_shard(
        store,
        shard,
        [extracted_row(r, parts[str(r["part"])], pixel_cache) for r in good],
        [(str(r["key"]), int(r["view"]), str(r["error"])) for r in ordered if r["error"] != ""],
        fmt=fmt,
        store_id=store_id,
        pixel_cache=pixel_cache,
    )
    fs.remove(parts_dir(store, shard))
    return len(good), os.getpid(), time.perf_counter() - t0


def extracted_row(row: dict, part: dict[str, np.ndarray], pixel_cache: bool) -> ExtractedRow:
    """A driver row plus its part's arrays -> what commit_shard writes."""
    i = int(row["part_row"])
    cached = {}
    if pixel_cache:
        start, end = part["pixels_offsets"][i], part["pixels_offsets"][i + 1]
        cached = {"pixels": part["pixels"][start:end].tobytes(), "pixels_crc32": int(part["pixels_crc32"][i])}
    return ExtractedRow(
        key=str(row["key"]),
        view=int(row["view"]),
        clip_hash=str(row["clip_hash"]),
        frame_indices=tuple(int(x) for x in row["frame_indices"]),
        crop=tuple(int(x) for x in row["crop"]),
        flip=bool(row["flip"]),
        latents=part["latents"][i],
        **cached,
    )


"""A shard's commit from the teacher actors' outputs: rows that carry their latents (and encoded crops).

The actors return each batch's latents as columns of their output rows, so the rows' bytes stay in
Ray's object store (the output blocks, spilled to a node's local disk when memory is short), never
in the store's storage: the store is written once, by the commit (pipeline/store/write.py:
commit_shard). The driver reads only the small columns of each block (`block_rows`, a Ray task next
to the block) and hands a complete shard's rows, each naming its block and its row there, to
`commit_from_blocks`, which fetches the blocks it needs and commits the shard.

Columns of an actor's output row (pipeline/extract.py: teacher_forward): the decode columns
(shard, shard_total, order, key, view, error, clip_hash, frame_indices, crop, flip), `latents`
[tokens, width] in the storage dtype, `writer_pid`, and with the pixel cache `pixels` (the encoded
crop box, pipeline/store/pixel_codec.py) and `pixels_crc32` (of the uncompressed crop box).
"""

from __future__ import annotations

import os
import time

import numpy as np

from pipeline.store.write import ExtractedRow, commit_shard
from salt.storage import StorageFormat

# what the driver keeps of a row: everything but the latents and pixels
SMALL_COLUMNS = ("shard", "shard_total", "order", "key", "view", "error", "clip_hash", "frame_indices", "crop", "flip",
                 "writer_pid")
BIG_COLUMNS = ("latents", "pixels", "pixels_crc32")


def block_rows(block, start: int = 0, end: int | None = None) -> list[dict]:
    """Ray task: the small columns of rows start..end of an actor's output block, each with its
    row number in the block (`block_row`)."""
    from ray.data.block import BlockAccessor

    acc = BlockAccessor.for_block(block)
    end = acc.num_rows() if end is None else end
    cols = acc.to_numpy(list(SMALL_COLUMNS))
    return [{name: cols[name][i] for name in SMALL_COLUMNS} | {"block_row": i} for i in range(start, end)]


def commit_from_blocks(
    store: str, shard: str, rows: list[dict], blocks: list, fmt: StorageFormat, store_id: str, pixel_cache: bool
) -> tuple[int, int, float, dict]:
    """Ray task: one shard's rows (small columns, each naming `block`, an index into `blocks`,
    and its `block_row` there) -> the committed shard, the latents (and pixels) read from the
    actors' output blocks in the object store. Returns what commit_rows does."""
    import ray
    from ray.data.block import BlockAccessor

    t0 = time.perf_counter()
    wanted = sorted({int(r["block"]) for r in rows if r["error"] == ""})
    big = [name for name in BIG_COLUMNS if pixel_cache or name == "latents"]
    columns = {i: BlockAccessor.for_block(b).to_numpy(big) for i, b in zip(wanted, ray.get([blocks[i] for i in wanted]))}
    full = [r | ({name: columns[int(r["block"])][name][int(r["block_row"])] for name in big} if r["error"] == "" else {})
            for r in rows]
    forwarded, pid, _, tables = commit_rows(store, shard, full, fmt, store_id, pixel_cache)
    return forwarded, pid, time.perf_counter() - t0, tables


def commit_rows(
    store: str, shard: str, rows: list[dict], fmt: StorageFormat, store_id: str, pixel_cache: bool
) -> tuple[int, int, float, dict]:
    """One shard's rows, in any order, each with its latents (and pixels) -> the committed shard.
    Returns (rows extracted, pid, seconds, the shard's tables as commit_shard returns them)."""
    t0 = time.perf_counter()
    ordered = sorted(rows, key=lambda r: int(r["order"]))
    good = [r for r in ordered if r["error"] == ""]
    tables = commit_shard(
        store,
        shard,
        [extracted_row(r, pixel_cache) for r in good],
        [(str(r["key"]), int(r["view"]), str(r["error"])) for r in ordered if r["error"] != ""],
        fmt=fmt,
        store_id=store_id,
        pixel_cache=pixel_cache,
    )
    return len(good), os.getpid(), time.perf_counter() - t0, tables


def extracted_row(row: dict, pixel_cache: bool) -> ExtractedRow:
    """A row with its latents (and pixels) -> what commit_shard writes."""
    cached = {"pixels": bytes(row["pixels"]), "pixels_crc32": int(row["pixels_crc32"])} if pixel_cache else {}
    return ExtractedRow(
        key=str(row["key"]),
        view=int(row["view"]),
        clip_hash=str(row["clip_hash"]),
        frame_indices=tuple(int(x) for x in row["frame_indices"]),
        crop=tuple(int(x) for x in row["crop"]),
        flip=bool(row["flip"]),
        latents=np.asarray(row["latents"]),
        **cached,
    )

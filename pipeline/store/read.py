"""Reading a store: `TargetStore` (lazy Zarr handles, checked pixels), the tables, and what `make inspect` prints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import zarr

from pipeline import fs
from pipeline.store import pixel_codec
from pipeline.store.layout import (
    ERRORS_SCHEMA,
    MANIFEST_SCHEMA,
    PIXELS,
    CorruptStoreError,
    StoreMismatchError,
    committed_shards,
    read_parquet,
    row_crc32,
    shard_dir,
    store_bytes,
)

class TargetStore:
    """Read side of a store. Zarr arrays are opened lazily, once per process."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        meta_file = fs.join(self.path, "store.json")
        if not fs.exists(meta_file):
            raise FileNotFoundError(f"{self.path} is not a target store: no store.json (run `make extract-targets`)")
        self.meta = json.loads(fs.read_bytes(meta_file))
        self.shards = committed_shards(self.path)
        self._arrays: dict[str, zarr.Array] = {}

    @property
    def teacher_width(self) -> int:
        return int(self.meta["teacher"]["width"])

    @property
    def has_pixels(self) -> bool:
        """Whether extraction kept each row's crop box (extract.pixel_cache)."""
        return "pixel_cache" in self.meta

    def check_identity(self, shard: str) -> None:
        """A shard written for another store (or a store.json copied from one) is refused."""
        written_for = json.loads(fs.read_bytes(fs.join(shard_dir(self.path, shard), "shard.json"))).get("store_id")
        if written_for != self.meta.get("store_id"):
            raise CorruptStoreError(
                f"target store {self.path}: shard {shard} was written for store {written_for}, "
                f"but store.json is store {self.meta.get('store_id')} (store.json from another store?)"
            )

    def manifest(self, shard: str) -> dict[tuple[str, int], dict]:
        table = read_parquet(fs.join(shard_dir(self.path, shard), "manifest.parquet"))
        return {(r["key"], r["view"]): r for r in table.to_pylist()}

    def latents(self, shard: str, row: int) -> np.ndarray:
        if shard not in self._arrays:
            self._arrays[shard] = zarr.open_array(fs.for_zarr(shard_dir(self.path, shard)), mode="r")
        return self._arrays[shard][row]

    def pixels(self, shard: str, entry: dict) -> np.ndarray:
        """The crop box the teacher saw for a manifest row: uint8 [frames, crop h, crop w, 3],
        before resize and flip, checked against the row's crc32."""
        if not self.has_pixels:
            raise StoreMismatchError(
                f"target store {self.path} has no pixel cache; extract it with extract.pixel_cache=true "
                "to train from stored pixels"
            )
        where = f"target store {self.path}: pixels of key {entry['key']!r} view {entry['view']} in shard {shard}"
        try:
            blob = fs.read_range(fs.join(shard_dir(self.path, shard), PIXELS), entry["pixels_offset"], entry["pixels_bytes"])
            crop = pixel_codec.decode(blob, (len(entry["frame_indices"]), entry["crop"][2], entry["crop"][3], 3))
        except (EOFError, ValueError, RuntimeError) as e:  # a truncated pixels.bin, a wrong size in a header, a blob the codec refuses
            raise CorruptStoreError(f"{where} cannot be decoded ({e}); run `make inspect STORE={self.path} VERIFY=1`") from None
        if row_crc32(crop) != entry["pixels_crc32"]:
            raise CorruptStoreError(f"{where} do not match their checksum; run `make inspect STORE={self.path} VERIFY=1`")
        return crop


def check_row(row: np.ndarray, entry: dict, store: str | Path) -> None:
    """Stop before training on a row that is not what extraction wrote."""
    if row_crc32(row) != entry["crc32"]:
        raise CorruptStoreError(
            f"target store {store}: row {entry['row']} (key {entry['key']!r}, view {entry['view']}) of shard "
            f"{entry['shard']} does not match its checksum; run `make inspect STORE={store} VERIFY=1`"
        )


def read_tables(store: str | Path) -> tuple[pa.Table, pa.Table]:
    """The committed shards' manifests and errors, concatenated in shard order."""
    shards = committed_shards(store)
    manifest = pa.concat_tables(
        [read_parquet(fs.join(shard_dir(store, s), "manifest.parquet")) for s in shards] or [MANIFEST_SCHEMA.empty_table()]
    )
    errors = pa.concat_tables(
        [read_parquet(fs.join(shard_dir(store, s), "errors.parquet")) for s in shards] or [ERRORS_SCHEMA.empty_table()]
    )
    return manifest, errors


def summarize(path: str | Path) -> dict:
    """What `make inspect` prints."""
    store = TargetStore(path)
    manifest, errors = read_tables(path)
    expected = [s["name"] for s in store.meta["source"]["shards"]]
    return {
        "store": str(path),
        "samples": manifest.num_rows,
        "clips": len(set(manifest.column("key").to_pylist())),
        "views_per_clip": store.meta["views_per_clip"],
        "errors": errors.num_rows,
        "error_reasons": errors.select(["key", "reason"]).to_pylist()[:20],
        "shards_committed": len(store.shards),
        "shards_expected": len(expected),
        "missing_shards": sorted(set(expected) - set(store.shards)),
        "bytes": store_bytes(path),
        "storage": store.meta["storage"],
        "tokens_per_sample": store.meta["geometry"]["num_tokens"],
        "teacher": store.meta["teacher"],
        "decoder": store.meta["decoder"],
        **({"pixel_cache": pixel_cache_summary(manifest, store.meta["pixel_cache"])} if store.has_pixels else {}),
    }


def pixel_cache_summary(manifest: pa.Table, recorded: dict) -> dict:
    """Mean stored and raw (uint8) bytes of a sample's crop box, and the codec."""
    stored = manifest.column("pixels_bytes").to_numpy()
    raw = np.array([len(f) * c[2] * c[3] * 3 for f, c in zip(manifest.column("frame_indices").to_pylist(), manifest.column("crop").to_pylist())])
    return {
        "bytes_per_sample": float(stored.mean()) if len(stored) else 0.0,
        "raw_bytes_per_sample": float(raw.mean()) if len(raw) else 0.0,
        "codec": recorded["codec"],
    }


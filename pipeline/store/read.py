"""Reading a store: `TargetStore` (lazy Zarr handles, checked pixels), the tables, and what `make inspect` prints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from pipeline import fs
from pipeline.store import pixel_codec
from pipeline.store.layout import (
    ERRORS_SCHEMA,
    MANIFEST_SCHEMA,
    PIXELS,
    SHARDS_KEY,
    CorruptStoreError,
    StoreMismatchError,
    marker_version,
    marker_versions,
    read_parquet,
    row_crc32,
    shard_dir,
    store_bytes,
)

class StoreTables:
    """The store-level manifest and errors tables, for the shards they still describe: those they
    record with the marker version the store has now (`covered`). One read each, on first use."""

    def __init__(self, store: str, markers: dict[str, str] | None):
        self.store = str(store)
        self.recorded: dict[str, dict] = {}
        self.manifest = self.errors = None
        location = fs.join(self.store, "manifest.parquet")
        if fs.exists(location):
            table = read_parquet(location)
            raw = (table.schema.metadata or {}).get(SHARDS_KEY)
            if raw is not None:  # tables written before the key existed describe no shard for sure
                self.recorded = json.loads(raw)
                self.manifest = table.replace_schema_metadata(None)
        # markers None: every recorded shard (the reader checks each one's marker when it first reads it)
        self.covered = {s for s, r in self.recorded.items() if markers is None or markers.get(s) == r["marker"]}
        self._ranges: dict[str, dict[str, tuple[int, int]]] = {}
        self._rows: list[dict] | None = None

    def _table(self, which: str) -> pa.Table:
        if which == "errors" and self.errors is None:
            self.errors = read_parquet(fs.join(self.store, "errors.parquet")).replace_schema_metadata(None)
        return self.manifest if which == "manifest" else self.errors

    def rows(self, which: str, shard: str) -> pa.Table:
        """A covered shard's rows of the manifest or errors table (rows of a shard are contiguous)."""
        table = self._table(which)
        if which not in self._ranges:
            ranges: dict[str, tuple[int, int]] = {}
            for i, name in enumerate(table.column("shard").to_pylist()):  # to_numpy would import pandas (0.4 s)
                start, _ = ranges.get(name, (i, i))
                ranges[name] = (start, i + 1)
            self._ranges[which] = ranges
        start, end = self._ranges[which].get(shard, (0, 0))
        return table.slice(start, end - start)

    def manifest_rows(self, shard: str) -> list[dict]:
        """A covered shard's manifest rows as dicts (the whole table converted once: a loader asks for every shard)."""
        if self._rows is None:
            self.rows("manifest", shard)  # the ranges
            self._rows = self._table("manifest").to_pylist()
        start, end = self._ranges["manifest"].get(shard, (0, 0))
        return self._rows[start:end]


class ShardNames(list):
    """The committed shards, sorted, with a set's membership test (a loader asks once per source
    shard). `on_miss`: asked once, on the first name it does not hold, for the full list."""

    def __init__(self, names: list[str], on_miss=None):
        super().__init__(sorted(names))
        self._names = set(names)
        self._on_miss = on_miss

    def __contains__(self, name: object) -> bool:
        if name not in self._names and self._on_miss is not None:
            refresh, self._on_miss = self._on_miss, None
            self[:] = sorted(refresh())
            self._names = set(self)
        return name in self._names


class TargetStore:
    """Read side of a store. Zarr arrays are opened lazily, once per process. A shard's manifest
    and identity come from the store-level tables where they still describe it (one read for every
    shard), else from the shard's own files.

    Which shards are committed, and whether the tables still describe them: on a local disk from
    a listing of the markers (one stat each). On an object store a listing reads every object's
    name, page after page, so with `listed` False (the default there) the shards the store-level
    tables record are taken as committed, and each shard's marker is checked (one HEAD) the first
    time this process reads the shard's latents or pixels: a shard recommitted or removed since
    the tables were built is refused then, naming it. A shard the tables do not hold (committed by
    a job killed before it rebuilt them) makes the store list its markers after all, once."""

    def __init__(self, path: str | Path, *, listed: bool | None = None):
        self.path = str(path)
        meta_file = fs.join(self.path, "store.json")
        if not fs.exists(meta_file):
            raise FileNotFoundError(f"{self.path} is not a target store: no store.json (run `make extract-targets`)")
        self.meta = json.loads(fs.read_bytes(meta_file))
        self._arrays: dict[str, zarr.Array] = {}
        self._tables: StoreTables | None = None
        self._unchecked: set[str] = set()  # shards whose marker is taken from the tables until first read
        if not (fs.is_remote(self.path) if listed is None else not listed):
            self._list()
            return
        self._tables = StoreTables(self.path, None)
        if not self._tables.recorded:
            self._list()
            return
        self.markers = {s: r["marker"] for s, r in self._tables.recorded.items()}
        self._unchecked = set(self.markers)
        self.shards = ShardNames(list(self.markers), on_miss=self._list_names)

    def _list(self) -> None:
        self.markers = marker_versions(self.path)
        self.shards = ShardNames(list(self.markers))
        self._unchecked = set()
        self._tables = None

    def _list_names(self) -> list[str]:
        self._list()
        return list(self.markers)

    @property
    def tables(self) -> StoreTables:
        if self._tables is None:
            self._tables = StoreTables(self.path, self.markers)
        return self._tables

    def _check_marker(self, shard: str) -> None:
        """A shard whose marker was taken from the store-level tables: the marker now must be that one."""
        if shard in self._unchecked:
            now = marker_version(self.path, shard)
            if now != self.markers.get(shard):
                raise CorruptStoreError(
                    f"target store {self.path}: shard {shard} "
                    + ("has no marker (removed?)" if now is None else "was recommitted")
                    + " since the store-level tables were built; rerun `make extract-targets` on the store to rebuild them"
                )
            self._unchecked.discard(shard)

    @property
    def teacher_width(self) -> int:
        return int(self.meta["teacher"]["width"])

    @property
    def has_pixels(self) -> bool:
        """Whether extraction kept each row's crop box (extract.pixel_cache)."""
        return "pixel_cache" in self.meta

    def check_identity(self, shard: str) -> None:
        """A shard written for another store (or a store.json copied from one) is refused."""
        if shard in self.tables.covered:
            written_for = self.tables.recorded[shard]["store_id"]  # read from its marker when the tables were built
        else:
            written_for = json.loads(fs.read_bytes(fs.join(shard_dir(self.path, shard), "shard.json"))).get("store_id")
        if written_for != self.meta.get("store_id"):
            raise CorruptStoreError(
                f"target store {self.path}: shard {shard} was written for store {written_for}, "
                f"but store.json is store {self.meta.get('store_id')} (store.json from another store?)"
            )

    def manifest_table(self, shard: str) -> pa.Table:
        if shard in self.tables.covered:
            return self.tables.rows("manifest", shard)
        return read_parquet(fs.join(shard_dir(self.path, shard), "manifest.parquet"))

    def errors_table(self, shard: str) -> pa.Table:
        if shard in self.tables.covered:
            return self.tables.rows("errors", shard)
        return read_parquet(fs.join(shard_dir(self.path, shard), "errors.parquet"))

    def manifest(self, shard: str) -> dict[tuple[str, int], dict]:
        rows = self.tables.manifest_rows(shard) if shard in self.tables.covered else self.manifest_table(shard).to_pylist()
        return {(r["key"], r["view"]): r for r in rows}

    def latents(self, shard: str, row: int) -> np.ndarray:
        if shard not in self._arrays:
            self._check_marker(shard)
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
        self._check_marker(shard)
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
    manifest, errors, _ = collect_tables(store)
    return manifest, errors


def collect_tables(store: str | Path, fresh: dict[str, dict] | None = None) -> tuple[pa.Table, pa.Table, dict[str, dict]]:
    """read_tables, and what the store-level tables record of each shard ({"marker", "store_id"}). A
    shard's tables come from
    `fresh` (commit_shard's return, for the shards a job has just committed), else from the
    store-level tables where they still describe it, else from its own files."""
    markers = marker_versions(str(store))
    tables = StoreTables(str(store), markers)
    fresh = fresh or {}
    manifests, errors, recorded = [], [], {}
    for shard in sorted(markers):
        if shard in fresh:
            m, e = (pq.ParquetFile(pa.BufferReader(fresh[shard][k])).read() for k in ("manifest", "errors"))
            store_id = fresh[shard]["store_id"]
        elif shard in tables.covered:
            m, e = tables.rows("manifest", shard), tables.rows("errors", shard)
            store_id = tables.recorded[shard]["store_id"]
        else:
            folder = shard_dir(str(store), shard)
            m, e = read_parquet(fs.join(folder, "manifest.parquet")), read_parquet(fs.join(folder, "errors.parquet"))
            store_id = json.loads(fs.read_bytes(fs.join(folder, "shard.json"))).get("store_id")
        manifests.append(m.replace_schema_metadata(None))
        errors.append(e.replace_schema_metadata(None))
        recorded[shard] = {"marker": markers[shard], "store_id": store_id}
    return (pa.concat_tables(manifests or [MANIFEST_SCHEMA.empty_table()]),
            pa.concat_tables(errors or [ERRORS_SCHEMA.empty_table()]), recorded)


def summarize(path: str | Path) -> dict:
    """What `make inspect` prints."""
    store = TargetStore(path, listed=True)
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


"""The target store: one Zarr array per source shard, Arrow manifests, provenance.

Layout of a store folder:

    store.json                      provenance (teacher, geometry, preprocessing, dtype, sources)
    projection.safetensors          the teacher-width projection matrix, when extract.projection is set
    targets/shard-000000.zarr/      committed shard: Zarr array [rows, tokens, width] plus
        manifest.parquet            key, view, row, clip hash, sample spec of each row
        errors.parquet              key, view, reason of each sample that could not be extracted
        pixels.bin                  with extract.pixel_cache: each row's uint8 crop box, compressed
                                    (pipeline/pixels.py), concatenated in row order; the manifest
                                    then has pixels_offset, pixels_bytes, pixels_crc32
        shard.json                  counts, sha256 of every file; its presence marks the shard complete
    targets/.parts/shard-000001/    while a job runs: the teacher actors' outputs of a shard not yet
                                    committed (pipeline/extract.py); gone from a finished store
    manifest.parquet, errors.parquet  all shards' tables, rebuilt when a job finishes

A shard is written under a temporary name and renamed into place once whole, so a
reader (or a resumed job) sees either all of a shard or nothing of it.
"""

from __future__ import annotations

import hashlib
import json
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from safetensors.torch import load as safetensors_load

from pipeline import fs, pixels
from salt.config import Config, to_dict
from salt.storage import StorageFormat

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
# store.json's "pixel_cache" entry, present exactly when the store keeps one
PIXEL_CACHE = {
    "layout": "uint8 [frames, h, w, 3] crop box before resize and flip; h, w = manifest crop[2], crop[3]",
    "codec": pixels.CODEC_INFO,
}
ERRORS_SCHEMA = pa.schema([("key", pa.string()), ("view", pa.int32()), ("shard", pa.string()), ("reason", pa.string())])
PROJECTION = "projection.safetensors"


class StoreMismatchError(ValueError):
    pass


class CorruptStoreError(RuntimeError):
    pass


@dataclass(frozen=True)
class ExtractedRow:
    key: str
    view: int
    clip_hash: str
    frame_indices: tuple[int, ...]
    crop: tuple[int, int, int, int]
    flip: bool
    latents: np.ndarray  # [tokens, width]
    pixels: bytes | None = None  # the crop box as pipeline.pixels.encode made it, with a pixel cache
    pixels_crc32: int | None = None  # of the uncompressed crop box (row_crc32)


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


def row_crc32(row: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(row).data)


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


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def read_parquet(location: str) -> pa.Table:
    return pq.read_table(pa.BufferReader(fs.read_bytes(location)))


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


def rebuild_tables(store: str | Path) -> tuple[pa.Table, pa.Table]:
    """Write the store-level manifest and errors tables (derived from the shards, so safe to redo)."""
    manifest, errors = read_tables(store)
    fs.write_bytes(fs.join(str(store), "manifest.parquet"), parquet_bytes(manifest))
    fs.write_bytes(fs.join(str(store), "errors.parquet"), parquet_bytes(errors))
    return manifest, errors


def compatibility(cfg: Config) -> dict:
    """What a store and the run reading it must agree on, as recorded in store.json.

    Only what the stored targets depend on: the clips (geometry, sampling, crop,
    normalisation). Masks are not in it: every token is stored, so any masking
    config trains on any store. The teacher, views and dtype are the store's own."""
    d = to_dict(cfg)
    data = d["data"]
    return {
        "geometry": {
            "frames": data["frames"],
            "frame_step": data["frame_step"],
            "fps": data["fps"],
            "crop_size": data["crop_size"],
            "patch_size": d["model"]["patch_size"],
            "tubelet": d["model"]["tubelet"],
        },
        "preprocessing": {k: data[k] for k in ("seed", "crop_area", "crop_aspect", "hflip_prob", "mean", "std")},
    }


def check_compatible(store_meta: dict, cfg: Config, store: str) -> None:
    """Refuse to train on a store made for other clips, naming both values."""
    wanted = compatibility(cfg)
    for section, values in wanted.items():
        for key, value in values.items():
            stored = store_meta.get(section, {}).get(key)
            if stored != value:
                raise StoreMismatchError(
                    f"target store {store} was extracted with {section}.{key}={stored!r} "
                    f"but this run has {section}.{key}={value!r}"
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
            crop = pixels.decode(blob, (len(entry["frame_indices"]), entry["crop"][2], entry["crop"][3], 3))
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


def verify_store(path: str | Path) -> list[str]:
    """Re-read every file and every row; one line per problem, naming the shard and key."""
    path = str(path)
    problems: list[str] = []
    try:
        store = TargetStore(path)
    except (OSError, ValueError) as e:
        return [f"store.json: {e}"]
    problems += projection_problems(path, store.meta.get("teacher", {}).get("projection"))
    expected = {s["name"] for s in store.meta["source"]["shards"]}
    problems += [f"shard {s}: missing (not committed)" for s in sorted(expected - set(store.shards))]
    problems += [f"shard {s}: not a source shard of this store" for s in sorted(set(store.shards) - expected)]
    for shard in store.shards:
        try:
            store.check_identity(shard)
        except CorruptStoreError as e:
            problems.append(f"shard {shard}: {e}")
        folder = shard_dir(path, shard)
        recorded = json.loads(fs.read_bytes(fs.join(folder, "shard.json")))["sha256"]
        for name, digest in recorded.items():
            f = fs.join(folder, name)
            if not fs.exists(f):
                problems.append(f"shard {shard}: file {name} is missing")
            elif fs.sha256(f) != digest:
                problems.append(f"shard {shard}: file {name} changed since extraction")
        try:
            entries = store.manifest(shard)
        except Exception as e:  # a truncated or overwritten parquet file
            problems.append(f"shard {shard}: manifest.parquet unreadable ({type(e).__name__}: {e})")
            continue
        for entry in entries.values():
            try:
                check_row(store.latents(shard, entry["row"]), entry, path)
                if store.has_pixels:
                    store.pixels(shard, entry)
            except Exception as e:
                problems.append(f"shard {shard}: key {entry['key']!r} view {entry['view']}: {type(e).__name__}: {e}")
    return problems


def projection_problems(path: str, recorded: dict | None) -> list[str]:
    """The stored projection matrix must be the one store.json describes (shape and digest)."""
    if not recorded:
        return []
    file = fs.join(path, PROJECTION)
    if not fs.exists(file):
        return [f"{PROJECTION}: missing, but store.json records a {recorded['kind']} projection"]
    matrix = safetensors_load(fs.read_bytes(file))["projection"]
    if list(matrix.shape) != [recorded["from_width"], recorded["dim"]] or hashlib.sha256(matrix.numpy().tobytes()).hexdigest() != recorded["sha256"]:
        return [f"{PROJECTION}: differs from the projection store.json records (shape {list(matrix.shape)})"]
    return []


def store_bytes(path: str) -> int:
    return fs.total_bytes(str(path))


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

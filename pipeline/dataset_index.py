"""The dataset index: one small file per split folder that says what its shards hold.

    <split folder>/index.parquet     one row per shard (`INDEX_SCHEMA`): its name (the file name
                                     without `.tar`), bytes, sha256, sample count, and every member's
                                     key, extension, data offset and size, in tar order

Ingest writes it with the shards (`entry_from_bytes` on the bytes it just wrote, `write_index` once
the shards are there); a folder made before the index gets it from `python -m jobs.index` (make index)
or on first use by extraction (`ensure_index`, in parallel, once). Readers then need no tar walk and
no hash of the whole dataset:

- `pipeline/shards.py: index_shard` serves a shard's members from its folder's index (loaded once
  per process), and `read_member` reads a member by its byte range;
- extraction's provenance (store.json's source shards) takes bytes and sha256 from here, and each
  decode task checks the bytes it reads against them (`check_shard_bytes`): a shard edited after
  indexing is refused by the worker that opens it, naming it, not by a serial pre-pass.

The file is written whole (`pipeline/fs.py: write_bytes`: a rename on a local disk, one PUT on an
object store), so a reader sees the old index or the new one. Offsets are of the member's data (after
its 512-byte tar header), as `tarfile.TarInfo.offset_data` gives them. Members follow WebDataset's
rule: `dir/key.ext.more` belongs to key `dir/key`; only regular files with relative names and no
`..` count (tars come from strangers).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import IO, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import fs

log = logging.getLogger(__name__)

INDEX_FILE = "index.parquet"
FORMAT = "salt-dataset-index/1"

INDEX_SCHEMA = pa.schema(
    [
        ("name", pa.string()),  # shard file name without .tar
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("samples", pa.int64()),  # keys
        # one entry per member, in tar order; a key appears once per extension it has
        ("member_keys", pa.list_(pa.string())),
        ("member_exts", pa.list_(pa.string())),
        ("member_offsets", pa.list_(pa.int64())),
        ("member_sizes", pa.list_(pa.int64())),
    ],
    metadata={"format": FORMAT},
)


class Member(NamedTuple):
    """A member's data: `size` bytes from byte `offset` of its tar."""

    offset: int
    size: int


Members = dict[str, dict[str, Member]]  # key -> extension -> byte range, in tar order


class ShardChangedError(ValueError):
    """A shard's bytes differ from what its index recorded (a ValueError: one line from a job)."""


def shard_name(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1].removesuffix(".tar")


def split_folder(path: str) -> str:
    """The folder a shard path lies in (its index's folder), in the form the path was given."""
    return str(path).rstrip("/").rsplit("/", 1)[0] if "/" in str(path) else "."


def index_location(folder: str) -> str:
    return fs.join(str(folder), INDEX_FILE)


def walk_tar(fileobj: IO[bytes]) -> Members:
    """key -> extension -> Member, from the tar headers alone (the data is skipped, not read)."""
    members: Members = {}
    with tarfile.open(fileobj=fileobj, mode="r:") as tar:
        for info in tar:
            if not info.isreg() or info.name.startswith("/") or ".." in info.name.split("/"):
                continue
            folder, _, base = info.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot:
                continue
            key = f"{folder}/{stem}" if folder else stem
            members.setdefault(key, {})[ext] = Member(info.offset_data, info.size)
    return members


def entry_from_bytes(name: str, data: bytes) -> dict:
    """A shard's index entry from its bytes (ingest calls it on the bytes it has just written):
    {"name", "bytes", "sha256", "samples", "members": {key: {ext: Member(offset, size)}}}."""
    members = walk_tar(io.BytesIO(data))
    return {
        "name": shard_name(name),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "samples": len(members),
        "members": members,
    }


def entry_from_file(url: str) -> dict:
    """A shard's index entry, read once (one GET on an object store)."""
    return entry_from_bytes(shard_name(url), fs.read_bytes(url))


def _to_table(entries: list[dict]) -> pa.Table:
    columns: dict[str, list] = {name: [] for name in INDEX_SCHEMA.names}
    for e in sorted(entries, key=lambda e: e["name"]):
        members = [(k, ext, int(m[0]), int(m[1])) for k, exts in e["members"].items() for ext, m in exts.items()]
        columns["name"].append(shard_name(e["name"]))
        columns["bytes"].append(int(e["bytes"]))
        columns["sha256"].append(str(e["sha256"]))
        columns["samples"].append(int(e.get("samples", len(e["members"]))))
        columns["member_keys"].append([m[0] for m in members])
        columns["member_exts"].append([m[1] for m in members])
        columns["member_offsets"].append([m[2] for m in members])
        columns["member_sizes"].append([m[3] for m in members])
    return pa.table(columns, schema=INDEX_SCHEMA)


def write_index(split_folder: str, entries: list[dict]) -> None:
    """The index of a split folder, written whole (readers see the old file or the new one).
    `entries`: one per shard (`entry_from_bytes` / `entry_from_file`); names must be unique."""
    names = [shard_name(e["name"]) for e in entries]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"dataset index of {split_folder}: shard name(s) {dupes[:5]} given more than once")
    sink = pa.BufferOutputStream()
    pq.write_table(_to_table(entries), sink, compression="zstd")
    fs.write_bytes(index_location(split_folder), sink.getvalue().to_pybytes())
    _CACHE.pop(_cache_key(split_folder), None)  # this process reads the new one on its next use


class DatasetIndex(Mapping):
    """A loaded index: shard name -> entry (as `entry_from_bytes` gives it). The members are
    converted from the table on the first entry asked for, all at once (a loader asks for every
    shard); `fingerprint` (bytes, sha256) converts none."""

    def __init__(self, folder: str, table: pa.Table):
        self.folder = str(folder)
        self.table = table
        names = table.column("name").to_pylist()
        self._row = {n: i for i, n in enumerate(names)}
        self._entries: dict[str, dict] = {}
        self._columns: dict | None = None
        self._fingerprints: dict | None = None

    def __getitem__(self, name: str) -> dict:
        name = shard_name(name)
        if name not in self._entries:
            i = self._row[name]  # KeyError for a shard the index does not know
            if self._columns is None:
                # every shard's members at once, one column at a time: a loader asks for every shard,
                # and per-shard slices of the table would cost more than the whole conversion
                self._columns = {c: self.table.column(c).combine_chunks() for c in INDEX_SCHEMA.names}
                self._flat = {c: self._columns[c].values.to_pylist() for c in
                              ("member_keys", "member_exts", "member_offsets", "member_sizes")}
                self._bounds = self._columns["member_keys"].offsets.to_pylist()
                self._scalars = {c: self._columns[c].to_pylist() for c in ("name", "bytes", "sha256", "samples")}
            start, end = self._bounds[i], self._bounds[i + 1]
            flat = self._flat
            members: Members = {}
            for j in range(start, end):
                members.setdefault(flat["member_keys"][j], {})[flat["member_exts"][j]] = Member(flat["member_offsets"][j], flat["member_sizes"][j])
            self._entries[name] = {c: self._scalars[c][i] for c in self._scalars} | {"members": members}
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._row)

    def __len__(self) -> int:
        return len(self._row)

    def fingerprint(self, name: str) -> dict:
        """bytes and sha256 of a shard, without building its members."""
        if self._fingerprints is None:
            self._fingerprints = dict(zip(self._row, zip(self.table.column("bytes").to_pylist(), self.table.column("sha256").to_pylist())))
        size, digest = self._fingerprints[shard_name(name)]
        return {"bytes": size, "sha256": digest}


def load_index(split_folder: str) -> DatasetIndex | None:
    """The folder's index (one read of one file), or None where it has none."""
    location = index_location(split_folder)
    if not fs.exists(location):
        return None
    try:
        table = pq.ParquetFile(pa.BufferReader(fs.read_bytes(location))).read()
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"dataset index {location} is unreadable ({e}); rebuild it: make index DATA={split_folder} ARGS=--rebuild") from None
    if table.schema.metadata is None or table.schema.metadata.get(b"format") != FORMAT.encode():
        raise ValueError(f"dataset index {location} is not a {FORMAT} file; rebuild it: make index DATA={split_folder} ARGS=--rebuild")
    return DatasetIndex(split_folder, table)


_CACHE: dict[str, DatasetIndex | None] = {}


def _cache_key(folder: str) -> str:
    return str(folder).rstrip("/")


def cached_index(split_folder: str) -> DatasetIndex | None:
    """load_index, once per process and folder (a folder without an index is remembered as such
    too: a loader asks once per shard, and 4,000 shards must not mean 4,000 reads)."""
    key = _cache_key(split_folder)
    if key not in _CACHE:
        _CACHE[key] = load_index(key)
    return _CACHE[key]


def forget_cached_indexes() -> None:
    """Drop this process's loaded indexes (a folder indexed by another process since)."""
    _CACHE.clear()


def _parallel_entries(urls: list[str], workers: int | None, use_ray: bool) -> list[dict]:
    """entry_from_file of each url: Ray tasks with `use_ray` (the cluster's nodes read and hash in
    parallel; local Ray, or the cluster RAY_ADDRESS names), else a thread pool (reads and sha256
    release the GIL)."""
    if not urls:
        return []
    if use_ray:
        import ray

        from pipeline.cluster import init_ray

        init_ray()
        task = ray.remote(entry_from_file).options(num_cpus=0.5)
        return ray.get([task.remote(u) for u in urls])
    with ThreadPoolExecutor(max_workers=workers or min(32, 4 * (os.cpu_count() or 1))) as pool:
        return list(pool.map(entry_from_file, urls))


def ensure_index(
    split_folder: str, shards: list[str] | None = None, *, workers: int | None = None, use_ray: bool = False
) -> DatasetIndex:
    """The folder's index, made first where it has none (or where it lacks some of its shards):
    the missing entries are read in parallel, once, and the whole index written. `shards`: the
    folder's `*.tar` files where the caller has listed them already (else they are listed here);
    `use_ray`: read them in Ray tasks (extraction's driver), else in `workers` threads.
    A folder that cannot be written (a read-only bucket) keeps no index; this process then uses
    the one it built, with a warning."""
    folder = str(split_folder).rstrip("/")
    shards = sorted(shards) if shards is not None else fs.glob(fs.join(folder, "*.tar"))
    index = _CACHE[_cache_key(folder)] = load_index(folder)  # fresh: another process may have written it
    names = {shard_name(s) for s in shards}
    if index is not None and names <= set(index):
        return index
    have = [index[n] for n in (set(index) & names)] if index is not None else []
    missing = [s for s in shards if index is None or shard_name(s) not in index]
    log.warning("dataset index of %s: indexing %d shard(s) (once; later runs read %s)", folder, len(missing), INDEX_FILE)
    entries = have + _parallel_entries(missing, workers, use_ray)
    try:
        write_index(folder, entries)
    except (PermissionError, OSError) as e:  # a dataset we may read but not write
        log.warning("dataset index of %s could not be written (%s); using it in this process only", folder, e)
        sink = pa.BufferOutputStream()
        pq.write_table(_to_table(entries), sink)
        _CACHE[_cache_key(folder)] = DatasetIndex(folder, pq.ParquetFile(pa.BufferReader(sink.getvalue())).read())
    return cached_index(folder)


def check_shard_bytes(path: str, data: bytes, entry: Mapping) -> None:
    """Refuse a shard whose bytes are not those its index recorded, naming it."""
    if len(data) != int(entry["bytes"]) or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ShardChangedError(
            f"source shard {path} changed after it was indexed: it has {len(data)} bytes, sha256 "
            f"{hashlib.sha256(data).hexdigest()[:16]}..., its index ({INDEX_FILE}) records {entry['bytes']} bytes, "
            f"sha256 {str(entry['sha256'])[:16]}... (restore it, or re-index and extract into a new store)"
        )

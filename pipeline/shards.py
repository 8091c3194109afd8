"""Reading WebDataset video shards: `KEY.mp4` + `KEY.json` members per sample.

Where a shard's folder has a dataset index (pipeline/dataset_index.py), a shard's members come
from it, loaded once per process, and neither a loader nor extraction walks a tar: `index_shard`
serves the byte ranges, `read_member` reads one member by its range (a kept descriptor locally,
one ranged GET remotely), and `read_shard` reads a whole shard once and checks it against the
index. Without an index, `index_shard` walks the tar's headers, as before the index existed.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import webdataset as wds

from pipeline import fs
from pipeline.dataset_index import (
    INDEX_FILE,
    Member,
    Members,
    ShardChangedError,
    cached_index,
    check_shard_bytes,
    shard_name,
    split_folder,
    walk_tar,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSample:
    key: str
    video: bytes
    meta: dict


def list_shards(data: str, split: str = "train", *, listing: bool = False) -> list[str]:
    """Sorted `*.tar` shards of `data`, or of `data/<split>` where the dataset has splits.
    `data` is a path or an fsspec URL; the shards come back in the same form.

    Where the folder has a dataset index, its shards are the index's (one read, which this process
    keeps for `index_shard`): no listing, whose pages on an object store grow with the shards.
    `listing`: list the folder whatever the index says (extraction and `make index` do, so that a
    shard added to the folder gets indexed)."""
    root = str(data).rstrip("/")
    if not listing:
        for folder in (fs.join(root, split), root):
            index = cached_index(folder)
            if index is not None and len(index):
                filesystem, base = fs.resolve(folder)
                paths = [f"{base.rstrip('/')}/{name}.tar" for name in sorted(index)]
                return [filesystem.unstrip_protocol(p) for p in paths] if "://" in folder else paths
    # the split folder's listing first: one listing where the data has splits (an isdir is a listing too on an object store)
    shards = fs.glob(fs.join(root, split, "*.tar"))
    if shards:
        return shards
    if fs.isdir(fs.join(root, split)):
        root = fs.join(root, split)
    if not fs.isdir(root):
        raise FileNotFoundError(f"DATA={data!r}: no such folder of shards (run `make data` first?)")
    shards = fs.glob(fs.join(root, "*.tar"))
    if not shards:
        raise FileNotFoundError(f"DATA={data!r}: no *.tar shards in {root}")
    return shards


VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")


def index_shard(path: str) -> Members:
    """key -> extension -> byte range (`Member`), in tar order.

    From the shard's folder's dataset index where it has one (read once per process:
    pipeline/dataset_index.py), else from a walk over the tar's headers. As in WebDataset, a
    member `dir/key.ext.more` belongs to key `dir/key`. Only regular files with relative names
    count: links, devices, absolute names and `..` are skipped (tars come from strangers;
    nothing here extracts them, and nothing should start to).
    """
    entry = indexed_entry(path)
    if entry is not None:
        return entry["members"]
    folder = split_folder(path)
    if folder not in _UNINDEXED:
        _UNINDEXED.add(folder)
        log.warning("%s has no dataset index (%s) for %s: walking tar headers; `make index DATA=...` writes one",
                    folder, INDEX_FILE, shard_name(path))
    with fs.open_file(path) as f:
        return walk_tar(f)


_UNINDEXED: set[str] = set()  # folders this process has warned about


def indexed_entry(path: str) -> dict | None:
    """The shard's entry in its folder's dataset index (this process's copy), or None."""
    index = cached_index(split_folder(path))
    return index.get(shard_name(path)) if index is not None else None


# Open files of local shards, per process (a forked loader worker opens its own: `os.pread`
# keeps no shared offset, but the pid in the key keeps each process to its own descriptors).
# A few dozen, least recently used first out: 4,000 shards must not mean 4,000 descriptors.
_HANDLES: OrderedDict[tuple[int, str], int] = OrderedDict()
_MAX_HANDLES = 64
_CHECKED: set[tuple[int, str]] = set()


def _local_fd(path: str) -> int:
    key = (os.getpid(), path)
    if key in _HANDLES:
        _HANDLES.move_to_end(key)
        return _HANDLES[key]
    fd = os.open(fs.resolve(path)[1], os.O_RDONLY)
    _HANDLES[key] = fd
    while len(_HANDLES) > _MAX_HANDLES:
        (pid, _), old = _HANDLES.popitem(last=False)
        if pid == os.getpid():
            os.close(old)
    return fd


def _check_size(path: str, size: int) -> None:
    """The first read of an indexed shard in a process checks its size against the index (the
    whole-shard sha256 is extraction's check; a sample's clip hash is stage 2's)."""
    key = (os.getpid(), path)
    if key in _CHECKED:
        return
    entry = indexed_entry(path)
    if entry is not None and size != int(entry["bytes"]):
        raise ShardChangedError(
            f"source shard {path} changed after it was indexed: it has {size} bytes, its index "
            f"({INDEX_FILE}) records {entry['bytes']} (restore it, or re-index and extract into a new store)"
        )
    _CHECKED.add(key)


def read_member(path: str, member: Member) -> bytes:
    """A member's bytes: `os.pread` on a descriptor this process keeps open for a local shard, one
    ranged GET for a remote one (no open, no HEAD, no read-ahead past the member)."""
    if fs.is_remote(path):
        if (os.getpid(), path) not in _CHECKED and indexed_entry(path) is not None:
            _check_size(path, fs.size(path))  # once per shard and process: one HEAD
        return fs.read_range(path, member.offset, member.size)
    fd = _local_fd(path)
    _check_size(path, os.fstat(fd).st_size)
    data = os.pread(fd, member.size, member.offset)
    if len(data) != member.size:
        raise EOFError(f"{path}: wanted {member.size} bytes at offset {member.offset}, the file has {len(data)} there")
    return data


def video_member(members: dict[str, Member]) -> Member | None:
    return next((members[e] for e in VIDEO_EXTS if e in members), None)


def samples_from_bytes(data: bytes, members: Members | None = None) -> Iterator[ShardSample]:
    """A shard's samples from its bytes in memory, in tar order (`members` from its index, else
    from a walk of the in-memory tar); a sample without a video member has empty bytes."""
    view = memoryview(data)
    for key, m in (members if members is not None else walk_tar(io.BytesIO(data))).items():
        video = video_member(m)
        meta = json.loads(bytes(view[m["json"].offset : m["json"].offset + m["json"].size])) if "json" in m else {}
        yield ShardSample(key=key, video=bytes(view[video.offset : video.offset + video.size]) if video else b"", meta=meta)


def read_shard(path: str, expected: dict | None = None) -> list[ShardSample]:
    """Every sample of a shard, from one read of the whole file (one GET on an object store).
    The bytes are checked against `expected` ({"bytes", "sha256"}: what the caller recorded), else
    against the folder's dataset index where there is one: a shard changed since is refused here,
    by the process that opens it, naming it."""
    data = fs.read_bytes(path)
    if expected is not None:  # extraction's decode task: the bytes the driver recorded; the tar walked in memory
        check_shard_bytes(path, data, expected)
        return list(samples_from_bytes(data))
    entry = indexed_entry(path)
    if entry is not None:
        check_shard_bytes(path, data, entry)
    return list(samples_from_bytes(data, entry["members"] if entry is not None else None))


def iter_shard(path: str) -> Iterator[ShardSample]:
    """Samples in tar order (read_shard: one read, checked against the dataset index)."""
    yield from read_shard(path)


def write_shard(path: Path, samples: list[dict]) -> int:
    """A reproducible tar (fixed mtime and owner) written under a temporary name, so a
    killed run never leaves half a shard. Samples are WebDataset dicts of bytes."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f, wds.TarWriter(f, user="", group="", mtime=0, encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
    os.replace(tmp, path)
    return path.stat().st_size

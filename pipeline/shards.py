"""Reading WebDataset video shards: `KEY.mp4` + `KEY.json` members per sample."""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import webdataset as wds

from pipeline import fs


@dataclass(frozen=True)
class ShardSample:
    key: str
    video: bytes
    meta: dict


def list_shards(data: str, split: str = "train") -> list[str]:
    """Sorted `*.tar` shards of `data`, or of `data/<split>` where the dataset has splits.
    `data` is a path or an fsspec URL; the shards come back in the same form."""
    root = str(data).rstrip("/")
    if fs.isdir(fs.join(root, split)):
        root = fs.join(root, split)
    if not fs.isdir(root):
        raise FileNotFoundError(f"DATA={data!r}: no such folder of shards (run `make data` first?)")
    shards = fs.glob(fs.join(root, "*.tar"))
    if not shards:
        raise FileNotFoundError(f"DATA={data!r}: no *.tar shards in {root}")
    return shards


def shard_name(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1].removesuffix(".tar")


VIDEO_EXTS = ("mp4", "webm", "mkv", "avi", "mov")


@dataclass(frozen=True)
class Member:
    offset: int
    size: int


def index_shard(path: str) -> dict[str, dict[str, Member]]:
    """key -> extension -> byte range, in tar order, from the tar headers alone.

    As in WebDataset, a member `dir/key.ext.more` belongs to key `dir/key`. Only regular
    files with relative names count: links, devices, absolute names and `..` are skipped
    (tars come from strangers; nothing here extracts them, and nothing should start to).
    """
    index: dict[str, dict[str, Member]] = {}
    with fs.open_file(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
            if not info.isreg() or info.name.startswith("/") or ".." in info.name.split("/"):
                continue
            folder, _, base = info.name.rpartition("/")
            stem, dot, ext = base.partition(".")
            if not dot:
                continue
            key = f"{folder}/{stem}" if folder else stem
            index.setdefault(key, {})[ext] = Member(info.offset_data, info.size)
    return index


def read_member(path: str, member: Member) -> bytes:
    with fs.open_file(path) as f:
        f.seek(member.offset)
        return f.read(member.size)


def video_member(members: dict[str, Member]) -> Member | None:
    return next((members[e] for e in VIDEO_EXTS if e in members), None)


def iter_shard(path: str) -> Iterator[ShardSample]:
    """Samples in tar order; a sample without a video member is yielded with empty bytes."""
    for key, members in index_shard(path).items():
        video = video_member(members)
        meta = json.loads(read_member(path, members["json"])) if "json" in members else {}
        yield ShardSample(key=key, video=read_member(path, video) if video else b"", meta=meta)


def write_shard(path: Path, samples: list[dict]) -> int:
    """A reproducible tar (fixed mtime and owner) written under a temporary name, so a
    killed run never leaves half a shard. Samples are WebDataset dicts of bytes."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f, wds.TarWriter(f, user="", group="", mtime=0, encoder=False) as sink:
        for sample in samples:
            sink.write(sample)
    os.replace(tmp, path)
    return path.stat().st_size

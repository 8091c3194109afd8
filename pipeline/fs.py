"""Paths or URLs: local paths, `file://`, `s3://`, `gs://`, `memory://`, through fsspec.

A location keeps the form it was given in (a local path stays a path, a URL keeps its
protocol), so what is written to manifests and store.json is what the user typed.
"""

from __future__ import annotations

import hashlib
import os
import uuid

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from salt.checkpoint import durable_replace


def resolve(location: str) -> tuple[AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(str(location))


def join(location: str, *parts: str) -> str:
    return "/".join([str(location).rstrip("/"), *parts])


def _as_given(fs: AbstractFileSystem, original: str, path: str) -> str:
    return fs.unstrip_protocol(path) if "://" in str(original) else path


def glob(pattern: str) -> list[str]:
    fs, path = resolve(pattern)
    return sorted(_as_given(fs, pattern, p) for p in fs.glob(path))


def exists(location: str) -> bool:
    fs, path = resolve(location)
    return fs.exists(path)


def isdir(location: str) -> bool:
    fs, path = resolve(location)
    return fs.isdir(path)


def read_bytes(location: str) -> bytes:
    fs, path = resolve(location)
    return fs.cat_file(path)


def read_range(location: str, start: int, length: int) -> bytes:
    """`length` bytes from `start`: one ranged GET on object stores, not the whole file."""
    fs, path = resolve(location)
    data = fs.cat_file(path, start=int(start), end=int(start) + int(length))
    if len(data) != length:
        raise EOFError(f"{location}: wanted {length} bytes at offset {start}, the file has {len(data)} there")
    return data


def write_bytes(location: str, data: bytes, *, durable: bool = True) -> None:
    """Whole-file write; on a local disk through a temporary name, so readers see old or new, and
    (`durable`) on the disk before the rename, so a power cut does too (salt.checkpoint.durable_replace)."""
    fs, path = resolve(location)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
        (durable_replace if durable else os.replace)(tmp, path)
    else:
        fs.pipe_file(path, data)


def open_file(location: str, mode: str = "rb"):
    fs, path = resolve(location)
    return fs.open(path, mode)


def size(location: str) -> int:
    fs, path = resolve(location)
    return int(fs.size(path))


def total_bytes(location: str) -> int:
    fs, path = resolve(location)
    return int(fs.du(path, total=True)) if fs.exists(path) else 0


def sha256(location: str) -> str:
    h = hashlib.sha256()
    with open_file(location) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def files_under(location: str) -> list[str]:
    """Relative names of every file below a folder."""
    fs, path = resolve(location)
    root = path.rstrip("/") + "/"
    return sorted(p[len(root) :] for p in fs.find(path))


def move(src: str, dst: str) -> None:
    """A rename on a local disk (atomic, and durable: salt.checkpoint.durable_replace); `dst` must
    not exist there. Copy-then-delete on object stores."""
    fs, a = resolve(src)
    _, b = resolve(dst)
    if isinstance(fs, LocalFileSystem):
        durable_replace(a, b)
        return
    # object stores have no folders: a recursive mv also copies the folder's own (absent) key,
    # which S3 answers with NoSuchKey, so copy each object, then delete the sources
    a = a.rstrip("/")
    for obj in fs.find(a):
        fs.copy(obj, b.rstrip("/") + obj[len(a):])
    fs.rm(a, recursive=True)


def for_zarr(location: str) -> str:
    """zarr's own LocalStore for local paths and file:// URLs: its fsspec store does not
    create the nested chunk folders on a local disk."""
    fs, path = resolve(location)
    return path if isinstance(fs, LocalFileSystem) else str(location)


def makedirs(location: str) -> None:
    fs, path = resolve(location)
    fs.makedirs(path, exist_ok=True)


def remove(location: str) -> None:
    fs, path = resolve(location)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def is_remote(location: str) -> bool:
    """A URL whose bytes are not on this machine's disk (s3://, gs://, http(s)://, ...)."""
    return not isinstance(resolve(location)[0], LocalFileSystem)


def _version(info: dict) -> object:
    for field in ("ETag", "etag", "LastModified", "mtime", "updated", "created"):
        if info.get(field) is not None:
            return info[field]
    return None


def local_copy(folder: str, cache_root: str) -> str:
    """A folder at a URL, copied once into `cache_root` on this machine: every worker of a
    cluster reads the same URL and gets its own local copy (named by the URL and each file's
    size and version, written under a temporary name and renamed, so processes sharing a disk
    agree). The version (ETag, modification or creation time, whichever the store reports) is
    in the name because a checkpoint rewritten at the same URL can keep every size."""
    fs, path = resolve(folder)
    root = path.rstrip("/")
    files = {p[len(root) + 1:]: (info["size"], str(_version(info))) for p, info in fs.find(root, detail=True).items()}
    if not files:
        raise FileNotFoundError(f"{folder}: no files there")
    key = hashlib.sha256(repr((str(folder), sorted(files.items()))).encode()).hexdigest()[:16]
    target = os.path.join(cache_root, key)
    if not os.path.isdir(target):
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        for name in files:
            os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
            fs.get_file(f"{root}/{name}", os.path.join(tmp, name))
        try:
            os.rename(tmp, target)
        except OSError:  # another process of this machine got there first: its copy is the same
            remove(tmp)
    return target

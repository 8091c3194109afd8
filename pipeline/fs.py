"""Paths or URLs: local paths, `file://`, `s3://`, `gs://`, `memory://`, through fsspec.

A location keeps the form it was given in (a local path stays a path, a URL keeps its
protocol), so what is written to manifests and store.json is what the user typed.

Every function here that reaches a remote store retries its transient errors (HTTP 5xx,
throttling, timeouts, reset or closed connections) with bounded exponential backoff and
jitter, on top of what botocore and s3fs already retry; the Zarr store `for_zarr` gives
retries each key's operations the same way. Each retry is one WARNING line on the `pipeline.fs` logger
naming the operation and the object, and is counted (`retry_counts`). Errors that are not
transient (403, a missing key, no credentials) are not retried: they stop at once as one
line naming the object, `s3://bucket/key: access denied (403 AccessDenied)`, with the
built-in type their callers catch (PermissionError, FileNotFoundError, OSError). Retries
that run out raise `StorageUnavailable` (an OSError). Settings: SALT_STORAGE_RETRIES,
SALT_STORAGE_BACKOFF_S, SALT_STORAGE_MAX_BACKOFF_S (`retry_policy`; docs/storage.md).
Local paths are not wrapped at all: a disk's errors are not the network's.
A filesystem taken from `resolve` is fsspec's own, without these retries: call it through
`with_retries`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import random
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from salt.checkpoint import durable_replace

log = logging.getLogger(__name__)
T = TypeVar("T")


# ---- retries ------------------------------------------------------------------------------

RETRIES_ENV = "SALT_STORAGE_RETRIES"
BACKOFF_ENV = "SALT_STORAGE_BACKOFF_S"
MAX_BACKOFF_ENV = "SALT_STORAGE_MAX_BACKOFF_S"


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often and how long an operation is tried again after a transient error.

    The wait before retry n (1, 2, ...) is d/2 plus a random part of d/2, with
    d = min(max_backoff_s, backoff_s * 2**(n-1)): the jitter spreads the retries of many
    workers hit by the same outage, the fixed half keeps a throttled store's pause real.
    With the defaults an operation waits at most 1+2+4+8+16 = 31 s over 5 retries, after
    botocore's own (about 7.5 s on average over its 5 attempts)."""

    retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0

    def wait_s(self, retry: int, rng: random.Random) -> float:
        d = min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1))
        return d / 2 + rng.uniform(0, d / 2)


def _env_number(name: str, default: float, kind: type) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = -1
    if value < 0:
        what = "a whole number" if kind is int else "a number of seconds"
        raise ValueError(f"{name}={raw!r}: expected {what} >= 0")
    return value


def retry_policy() -> RetryPolicy:
    """The policy the environment sets (read at each operation, so a test or a job may change
    it; Ray's local workers inherit the driver's environment, a cluster's nodes need it set)."""
    return RetryPolicy(
        retries=int(_env_number(RETRIES_ENV, RetryPolicy.retries, int)),
        backoff_s=float(_env_number(BACKOFF_ENV, RetryPolicy.backoff_s, float)),
        max_backoff_s=float(_env_number(MAX_BACKOFF_ENV, RetryPolicy.max_backoff_s, float)),
    )


class StorageUnavailable(OSError):
    """A transient storage error that lasted through every retry."""


_counts: Counter[str] = Counter()
_counts_lock = threading.Lock()  # Zarr's I/O thread counts beside the caller's
_rng = random.Random()  # jitter only: timing, never what is read or written


def retry_counts() -> dict[str, int]:
    """Retries this process made since it started, per operation (a job prints them in its summary)."""
    with _counts_lock:
        return dict(_counts)


# Responses that say "try again": throttling and server-side timeouts, whatever their status.
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded", "RequestTimeout",
    "RequestTimeoutException", "ServiceUnavailable", "InternalError", "BandwidthLimitExceeded",
    "PriorRequestNotComplete", "EC2ThrottledException",
})
# Transport failures by class name (module.qualname anywhere in the exception's MRO), so this
# module imports neither botocore nor aiohttp: connections refused, reset or closed, timeouts,
# bodies cut short, and the unparsable answers some throttled endpoints send.
_TRANSIENT_CLASSES = frozenset({
    "builtins.ConnectionError", "builtins.TimeoutError",
    "botocore.exceptions.HTTPClientError", "botocore.exceptions.ConnectionError",
    "botocore.exceptions.IncompleteReadError", "botocore.parsers.ResponseParserError",
    "aiohttp.client_exceptions.ClientConnectionError", "aiohttp.client_exceptions.ClientPayloadError",
    "http.client.IncompleteRead", "urllib3.exceptions.ProtocolError", "urllib3.exceptions.TimeoutError",
    "requests.exceptions.ConnectionError", "requests.exceptions.Timeout",
})
_FINAL = (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)


def _chain(e: BaseException) -> list[BaseException]:
    """The exception and what caused it (s3fs turns botocore's errors into OSErrors `from` them)."""
    out: list[BaseException] = []
    while e is not None and e not in out and len(out) < 16:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _http(e: BaseException) -> tuple[int | None, str]:
    """The HTTP status and error code an exception carries (botocore's ClientError, aiohttp's
    and gcsfs's response errors), or (None, "")."""
    response = getattr(e, "response", None)
    if isinstance(response, dict) and ("Error" in response or "ResponseMetadata" in response):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return (int(status) if status else None), str(response.get("Error", {}).get("Code", ""))
    # an answer's status, not a parse error's code (aiohttp's HttpProcessingError has a `code` too)
    field = "status" if "ResponseError" in type(e).__name__ else "code" if type(e).__name__ in ("HttpError", "HTTPError") else ""
    value = getattr(e, field, None) if field else None
    if isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599:
        return value, ""
    return None, ""


def _names(e: BaseException) -> set[str]:
    return {f"{c.__module__}.{c.__qualname__}" for c in type(e).__mro__}


def is_transient(e: BaseException) -> bool:
    """Whether trying again may succeed: the first link of the cause chain that decides wins (a
    response's status and code, a missing or forbidden object, a transport failure)."""
    for link in _chain(e):
        status, code = _http(link)
        if status is not None or code:
            return code in _TRANSIENT_CODES or (status is not None and (status >= 500 or status in (408, 429)))
        if isinstance(link, (*_FINAL, StorageUnavailable)):  # the latter: retried already, by a call inside this one
            return False
        if _names(link) & _TRANSIENT_CLASSES:
            return True
    return False


def _answer(e: BaseException) -> str:
    """The server's answer an exception carries, `503 SlowDown`, or ""."""
    for link in _chain(e):
        status, code = _http(link)
        if status is not None or code:
            return " ".join(dict.fromkeys(str(x) for x in (status, code) if x))  # a HEAD's 403 has no code but "403"
    return ""


def _reason(e: BaseException) -> str:
    """One line: `HTTP 503 SlowDown`, or the exception's type and first line."""
    if _answer(e):
        return f"HTTP {_answer(e)}"
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text if len(text) <= 160 else text[:159] + "…"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _named(e: Exception, location: str) -> Exception:
    """A final error as one line naming the object, with the built-in type callers catch; `e`
    itself where it already names it or is no storage error."""
    answer = _answer(e)
    status = int(answer.split()[0]) if answer[:1].isdigit() else None
    botocore = any(n.startswith("botocore.") for n in _names(e))
    if isinstance(e, PermissionError) or status == 403 or (botocore and "Credential" in type(e).__name__):
        return PermissionError(f"{location}: access denied ({answer or e})")
    if isinstance(e, FileNotFoundError) or status == 404:
        return FileNotFoundError(f"{location}: no such object" + (f" ({answer})" if answer else ""))
    if isinstance(e, OSError) or botocore:
        if location in str(e):
            return e
        kind = type(e) if type(e) in (OSError, *_FINAL) else OSError
        return kind(f"{location}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
                    + (f" ({answer})" if answer and answer not in str(e) else ""))
    return e


def _after_failure(operation: str, location: str, e: Exception, retry: int, policy: RetryPolicy) -> float | Exception:
    """What follows failure number `retry` (1, 2, ...): the wait before trying again (counted, and
    logged as one WARNING line), or the error to raise (`e` itself where it is to go out as it is)."""
    if not is_transient(e):
        return _named(e, location)
    if retry > policy.retries:
        return StorageUnavailable(
            f"{location}: {operation} failed {retry} time{'s' * (retry > 1)} in a row ({_reason(e)}); storage "
            f"unavailable (more patience: {RETRIES_ENV}, {BACKOFF_ENV})"
        )
    wait = policy.wait_s(retry, _rng)
    with _counts_lock:
        _counts[operation] += 1
    log.warning("storage retry %d/%d: %s %s failed (%s); trying again in %.1f s",
                retry, policy.retries, operation, location, _reason(e), wait)
    return wait


def with_retries(operation: str, location: str, fn: Callable[[], T]) -> T:
    """`fn()`, tried again after each transient error as `retry_policy` says; a final error
    comes out naming `location` (see the module docstring). `fn` must be safe to repeat."""
    policy, failures = retry_policy(), 0
    while True:
        try:
            return fn()
        except Exception as e:
            failures += 1
            outcome = _after_failure(operation, location, e, failures, policy)
            if outcome is e:
                raise
            if isinstance(outcome, Exception):
                raise outcome from e
            time.sleep(outcome)


async def with_retries_async(operation: str, location: str, fn: Callable[[], Awaitable[T]]) -> T:
    """`with_retries` for a coroutine function (the Zarr store's operations)."""
    policy, failures = retry_policy(), 0
    while True:
        try:
            return await fn()
        except Exception as e:
            failures += 1
            outcome = _after_failure(operation, location, e, failures, policy)
            if outcome is e:
                raise
            if isinstance(outcome, Exception):
                raise outcome from e
            await asyncio.sleep(outcome)


def _io(operation: str, location: str, fs: AbstractFileSystem, fn: Callable[[], T]) -> T:
    """Local disks directly; every other filesystem through `with_retries`."""
    return fn() if isinstance(fs, LocalFileSystem) else with_retries(operation, str(location), fn)


# ---- locations ----------------------------------------------------------------------------


def resolve(location: str) -> tuple[AbstractFileSystem, str]:
    return fsspec.core.url_to_fs(str(location))


def join(location: str, *parts: str) -> str:
    return "/".join([str(location).rstrip("/"), *parts])


def _as_given(fs: AbstractFileSystem, original: str, path: str) -> str:
    return fs.unstrip_protocol(path) if "://" in str(original) else path


def glob(pattern: str) -> list[str]:
    fs, path = resolve(pattern)
    return sorted(_as_given(fs, pattern, p) for p in _io("glob", pattern, fs, lambda: fs.glob(path)))


def exists(location: str) -> bool:
    fs, path = resolve(location)
    return _io("exists", location, fs, lambda: fs.exists(path))


def isdir(location: str) -> bool:
    fs, path = resolve(location)
    return _io("isdir", location, fs, lambda: fs.isdir(path))


def read_bytes(location: str) -> bytes:
    fs, path = resolve(location)
    return _io("read_bytes", location, fs, lambda: fs.cat_file(path))


def read_range(location: str, start: int, length: int) -> bytes:
    """`length` bytes from `start`: one ranged GET on object stores, not the whole file."""
    fs, path = resolve(location)
    data = _io("read_range", location, fs, lambda: fs.cat_file(path, start=int(start), end=int(start) + int(length)))
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
        with_retries("write_bytes", location, lambda: fs.pipe_file(path, data))


class _RetryingReader:
    """A remote file open for reading whose reads are retried: fsspec's buffered files move their
    position and cache only once a fetch succeeds, so a failed read can simply be asked again."""

    def __init__(self, f, location: str):
        self._f = f
        self._location = location

    def read(self, size: int = -1) -> bytes:
        return with_retries("read", self._location, lambda: self._f.read(size))

    def readinto(self, buffer) -> int:
        data = self.read(len(memoryview(buffer)))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def seek(self, *args) -> int:
        return self._f.seek(*args)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> _RetryingReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getattr__(self, name: str):
        return getattr(self._f, name)


class _UploadOnClose:
    """A remote file open for writing: the bytes go to a local temporary file, and `close` uploads
    it whole, retried like any operation (a multipart upload cut half-way cannot be resumed from
    its buffer). Leaving a `with` block on an exception uploads nothing."""

    def __init__(self, fs: AbstractFileSystem, path: str, location: str):
        self._fs, self._path, self._location = fs, path, location
        self._tmp = tempfile.NamedTemporaryFile(prefix="salt-upload-", delete=False)
        self.closed = False

    def write(self, data) -> int:
        return self._tmp.write(data)

    def tell(self) -> int:
        return self._tmp.tell()

    def flush(self) -> None:
        self._tmp.flush()

    def writable(self) -> bool:
        return True

    def _finish(self, upload: bool) -> None:
        if self.closed:
            return
        self.closed = True
        self._tmp.close()
        try:
            if upload:
                with_retries("upload", self._location, lambda: self._fs.put_file(self._tmp.name, self._path))
        finally:
            os.remove(self._tmp.name)

    def close(self) -> None:
        self._finish(upload=True)

    def __enter__(self) -> _UploadOnClose:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._finish(upload=exc_type is None)


def open_file(location: str, mode: str = "rb"):
    """A file object; on a remote store "rb" reads are retried and "wb" is uploaded whole at
    close (see `_RetryingReader`, `_UploadOnClose`); other modes retry only the opening."""
    fs, path = resolve(location)
    if isinstance(fs, LocalFileSystem):
        return fs.open(path, mode)
    if mode == "wb":
        return _UploadOnClose(fs, path, str(location))
    f = with_retries("open", location, lambda: fs.open(path, mode))
    return _RetryingReader(f, str(location)) if mode == "rb" else f


def size(location: str) -> int:
    fs, path = resolve(location)
    return int(_io("size", location, fs, lambda: fs.size(path)))


def total_bytes(location: str) -> int:
    fs, path = resolve(location)
    return _io("total_bytes", location, fs, lambda: int(fs.du(path, total=True)) if fs.exists(path) else 0)


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
    return sorted(p[len(root) :] for p in _io("files_under", location, fs, lambda: fs.find(path)))


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
    for obj in with_retries("move", src, lambda: fs.find(a)):
        target = b.rstrip("/") + obj[len(a):]
        with_retries("move", fs.unstrip_protocol(obj), lambda: fs.copy(obj, target))
    # asked again on each try: a delete whose answer was lost may have happened
    with_retries("move", src, lambda: fs.rm(a, recursive=True) if fs.exists(a) else None)


def for_zarr(location: str):
    """zarr's own LocalStore for local paths and file:// URLs: its fsspec store does not
    create the nested chunk folders on a local disk. Elsewhere zarr's FsspecStore for the
    URL, with every operation on a key retried like this module's functions."""
    fs, path = resolve(location)
    if isinstance(fs, LocalFileSystem):
        return path
    from zarr.storage import FsspecStore

    return _retrying_zarr_store()(FsspecStore.from_url(str(location)), str(location))


@functools.cache
def _retrying_zarr_store() -> type:
    """The Zarr store class, made on first use so that importing this module imports no zarr."""
    from zarr.storage import WrapperStore

    async def listed(it) -> list[str]:
        return [k async for k in it]

    class RetryingStore(WrapperStore):
        """Zarr 3 talks to object stores through its FsspecStore, which calls the async side of
        the filesystem (`_cat_file`, `_pipe_file`, ...) on Zarr's own event loop: none of the sync
        calls above. So each store operation is retried here, naming `location/key`."""

        def __init__(self, store, location: str):
            super().__init__(store)
            self._location = location.rstrip("/")

        def _with_store(self, store):
            return type(self)(store, self._location)

        def _at(self, key: str) -> str:
            return f"{self._location}/{key}" if key else self._location

        def __str__(self) -> str:
            return self._location

        async def get(self, key, prototype, byte_range=None):
            return await with_retries_async("zarr get", self._at(key), lambda: self._store.get(key, prototype, byte_range))

        async def get_partial_values(self, prototype, key_ranges):
            key_ranges = list(key_ranges)
            where = self._at(key_ranges[0][0]) if key_ranges else self._location
            return await with_retries_async("zarr get", where, lambda: self._store.get_partial_values(prototype, key_ranges))

        async def _get_many(self, requests):
            for key, prototype, byte_range in requests:
                yield key, await self.get(key, prototype, byte_range)

        async def exists(self, key):
            return await with_retries_async("zarr exists", self._at(key), lambda: self._store.exists(key))

        async def set(self, key, value):
            await with_retries_async("zarr set", self._at(key), lambda: self._store.set(key, value))

        async def set_if_not_exists(self, key, value):
            await with_retries_async("zarr set", self._at(key), lambda: self._store.set_if_not_exists(key, value))

        async def _set_many(self, values):
            await asyncio.gather(*(self.set(key, value) for key, value in values))

        async def delete(self, key):
            await with_retries_async("zarr delete", self._at(key), lambda: self._store.delete(key))

        async def delete_dir(self, prefix):
            await with_retries_async("zarr delete", self._at(prefix), lambda: self._store.delete_dir(prefix))

        async def clear(self):
            await with_retries_async("zarr delete", self._location, lambda: self._store.clear())

        async def is_empty(self, prefix):
            return await with_retries_async("zarr list", self._at(prefix), lambda: self._store.is_empty(prefix))

        async def getsize(self, key):
            return await with_retries_async("zarr getsize", self._at(key), lambda: self._store.getsize(key))

        async def list(self):
            for key in await with_retries_async("zarr list", self._location, lambda: listed(self._store.list())):
                yield key

        async def list_prefix(self, prefix):
            for key in await with_retries_async("zarr list", self._at(prefix), lambda: listed(self._store.list_prefix(prefix))):
                yield key

        async def list_dir(self, prefix):
            for key in await with_retries_async("zarr list", self._at(prefix), lambda: listed(self._store.list_dir(prefix))):
                yield key

    return RetryingStore


def makedirs(location: str) -> None:
    fs, path = resolve(location)
    _io("makedirs", location, fs, lambda: fs.makedirs(path, exist_ok=True))


def remove(location: str) -> None:
    fs, path = resolve(location)
    # existence asked on each try: a delete whose answer was lost may have happened
    _io("remove", location, fs, lambda: fs.rm(path, recursive=True) if fs.exists(path) else None)


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
    found = _io("local_copy", folder, fs, lambda: fs.find(root, detail=True))
    files = {p[len(root) + 1:]: (info["size"], str(_version(info))) for p, info in found.items()}
    if not files:
        raise FileNotFoundError(f"{folder}: no files there")
    key = hashlib.sha256(repr((str(folder), sorted(files.items()))).encode()).hexdigest()[:16]
    target = os.path.join(cache_root, key)
    if not os.path.isdir(target):
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            for name in files:
                os.makedirs(os.path.dirname(os.path.join(tmp, name)), exist_ok=True)
                _io("local_copy", join(str(folder), name), fs, lambda: fs.get_file(f"{root}/{name}", os.path.join(tmp, name)))
        except BaseException:  # a file refused or gone: no half copy stays behind
            remove(tmp)
            raise
        try:
            os.rename(tmp, target)
        except OSError:  # another process of this machine got there first: its copy is the same
            remove(tmp)
    return target

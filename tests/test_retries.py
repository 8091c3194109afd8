"""Storage faults: pipeline/fs.py retries what is transient beyond botocore's and s3fs's own
retries, visibly (a WARNING line per retry, `retry_counts`), and stops on what is not (403, a
missing key, no credentials) with one line naming the object.

Between the S3 client and moto's server sits `FaultProxy`, a small HTTP proxy (a thread on
127.0.0.1, bounded in requests and in time) that answers the first requests matching a rule with
the rule's faults: a 500 or 503 answer, a reset connection, a body cut short. Each rule injects more
faults in a row than the libraries absorb with their defaults: botocore makes 5 attempts at a
request answered 5xx (and s3fs none more, unless the code is SlowDown), and s3fs tries a read whose
body is cut short 5 times. (A SlowDown or a reset would need more than 25 in a row, and minutes
of the libraries' own backoff, so the rules use the others.)
"""

from __future__ import annotations

import http.client
import logging
import re
import socket
import struct
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator
from urllib.parse import urlsplit

import numpy as np
import pytest

from pipeline import fs
from tests.conftest import start_moto_server, tiny_config

ANSWERS = {  # fault -> (HTTP status, S3 error code)
    "500": (500, "InternalError"),
    "503": (503, "ServiceUnavailable"),
    "403": (403, "AccessDenied"),
    "404": (404, "NoSuchKey"),
}


@dataclass
class Fault:
    """The i-th request (from 0) whose method is `method` and whose path matches `path` (a regex)
    gets `faults[i]` instead of the server's answer, while i < len(faults); later ones pass."""

    method: str
    path: str
    faults: tuple[str, ...]
    seen: int = 0

    def next_fault(self, method: str, path: str) -> str | None:
        if method != self.method or not re.fullmatch(self.path, path) or self.seen >= len(self.faults):
            return None
        self.seen += 1
        return self.faults[self.seen - 1]

    @property
    def spent(self) -> bool:
        return self.seen == len(self.faults)


class FaultProxy:
    """An HTTP/1.1 proxy in front of `upstream` that injects the armed faults (see the module
    docstring). Past `max_requests` it resets every connection, and it stops with the fixture."""

    def __init__(self, upstream: str, max_requests: int = 5000):
        self.upstream = urlsplit(upstream)
        self.max_requests = max_requests
        self.requests = 0
        self.rules: list[Fault] = []
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as botocore's connection pool expects
            timeout = 30  # an idle client connection is dropped, so no thread outlives the test by long

            def log_message(self, *args) -> None:
                pass

            def relay(self) -> None:
                proxy.handle(self)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = relay

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # a client that went away, or a connection this proxy reset on purpose

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def arm(self, *rules: Fault) -> None:
        with self.lock:
            self.rules = list(rules)

    def fault_for(self, method: str, path: str) -> str | None:
        with self.lock:
            self.requests += 1
            if self.requests > self.max_requests:
                return "reset"
            return next((f for f in (rule.next_fault(method, path) for rule in self.rules) if f), None)

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        body = read_body(h)
        fault = self.fault_for(h.command, urlsplit(h.path).path)
        if fault == "reset":
            return reset(h)
        if fault in ANSWERS:
            status, code = ANSWERS[fault]
            xml = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>injected</Message>"
                   f"<RequestId>fault</RequestId></Error>").encode()
            payload = b"" if h.command == "HEAD" else xml
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
            return
        headers = {k: v for k, v in h.headers.items() if k.lower() not in ("transfer-encoding", "connection", "content-length")}
        upstream = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
        try:
            upstream.request(h.command, h.path, body=body, headers=headers | {"Content-Length": str(len(body))})
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        h.send_response(response.status, response.reason)
        for k, v in response.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                h.send_header(k, v)
        # a HEAD's length is the object's; otherwise the body's as read
        length = response.getheader("Content-Length") if h.command == "HEAD" else str(len(data))
        if length is not None:
            h.send_header("Content-Length", length)
        h.end_headers()
        if h.command == "HEAD":
            return
        if fault == "truncate":  # the headers promise the whole body; half of it comes, then the connection drops
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            return reset(h)
        h.wfile.write(data)


def read_body(h: BaseHTTPRequestHandler) -> bytes:
    if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
        out = bytearray()
        while size := int(h.rfile.readline().split(b";")[0].strip() or b"0", 16):
            out += h.rfile.read(size)
            h.rfile.readline()
        while h.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return bytes(out)
    return h.rfile.read(int(h.headers.get("Content-Length") or 0))


def reset(h: BaseHTTPRequestHandler) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a dropped connection looks to the client."""
    h.close_connection = True
    try:
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        h.connection.close()


@pytest.fixture(scope="module")
def s3(digits, tmp_path_factory) -> Iterator[FaultProxy]:
    """moto's S3 server with the digits shards in s3://salt/data, reached through a FaultProxy:
    AWS_ENDPOINT_URL names the proxy. The libraries keep their default retries (no AWS config file,
    no AWS_MAX_ATTEMPTS); this module's own retries wait little, to keep the test short."""
    import s3fs
    server, moto_url = start_moto_server()
    proxy = FaultProxy(moto_url)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                           "AWS_ENDPOINT_URL": proxy.url, "AWS_CONFIG_FILE": str(tmp_path_factory.mktemp("aws") / "none"),
                           "AWS_EC2_METADATA_DISABLED": "true", fs.BACKOFF_ENV: "0.05", fs.MAX_BACKOFF_ENV: "0.2"}.items():
            mp.setenv(key, value)
        for key in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_PROFILE", "AWS_SESSION_TOKEN", fs.RETRIES_ENV):
            mp.delenv(key, raising=False)
        s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches filesystems, with the endpoint they were made for
        direct = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=moto_url)
        direct.mkdir("salt")
        direct.put(digits, "salt/data", recursive=True)
        try:
            yield proxy
        finally:
            proxy.stop()
            server.stop()
            s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(autouse=True)
def _disarm(s3) -> Iterator[None]:
    """No test's faults outlive it."""
    yield
    s3.arm()


def store_contents(store: str) -> dict[str, tuple[list[dict], np.ndarray]]:
    """Per committed shard, its manifest rows and its array, read through pipeline/ (Zarr through fs.for_zarr)."""
    import zarr

    from pipeline.store.layout import shard_dir
    from pipeline.store.read import TargetStore

    target = TargetStore(store)
    return {shard: (sorted(target.manifest(shard).values(), key=lambda r: r["row"]),
                    zarr.open_array(fs.for_zarr(shard_dir(store, shard)), mode="r")[:]) for shard in target.shards}


def test_extraction_through_storage_faults_equals_a_fault_free_run(s3, teacher_dir, store_fp32, caplog):
    """Faults past the libraries' retries on a source shard's read and on a target shard's write
    during extraction, then on a stored row's read: the job ends as a fault-free run does, each
    rule cost this layer one retry, and each retry is a WARNING line naming the operation and object."""
    from pipeline.extract import extract_targets

    s3.arm(
        # a source shard: a reset (botocore retries it), then 5 bodies cut short (s3fs's 5 tries)
        Fault("GET", r"/salt/data/train/shard-000001\.tar", ("reset",) + ("truncate",) * 5),
        # the array of target shard 0, written at commit (under a temporary name, or its final one): 5 x 5xx
        Fault("PUT", r"/salt/store/targets/\.?shard-000000\.zarr[^/]*/c/0/0/0", ("500", "503", "500", "503", "500")),
    )
    before = sum(fs.retry_counts().values())
    with caplog.at_level(logging.WARNING, logger="pipeline.fs"):
        # in this process (the Ray job's code, shard by shard), so that retry_counts sees every retry
        summary = extract_targets(tiny_config("extract.dtype=float32"), data="s3://salt/data", teacher=teacher_dir,
                                  store="s3://salt/store", progress=False, in_process=True)
        job_rules = s3.rules
        # stage 2's read of a stored row goes through Zarr's store: 5 bodies cut short
        s3.arm(Fault("GET", r"/salt/store/targets/shard-000001\.zarr/c/0/0/0", ("truncate",) * 5))
        got = store_contents("s3://salt/store")
        read_rules = s3.rules
    assert summary["samples"] == 16
    assert all(rule.spent for rule in job_rules + read_rules), [(r.path, r.seen) for r in job_rules + read_rules]

    expected = store_contents(store_fp32)
    assert got.keys() == expected.keys() and len(got) == 2
    for shard in expected:
        assert got[shard][0] == expected[shard][0], f"manifest of {shard} differs"
        assert np.array_equal(got[shard][1], expected[shard][1]), f"array of {shard} differs"

    assert sum(fs.retry_counts().values()) - before == 3  # one per rule: each outlasted the libraries' tries once
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.fs" and r.levelno == logging.WARNING]
    assert len(lines) == 3, lines
    assert any("s3://salt/data/train/shard-000001.tar failed (" in line for line in lines), lines
    assert any(re.search(r"s3://salt/store/targets/\.?shard-000000\.zarr\S*/c/0/0/0 failed \(HTTP 50[03] ", line) for line in lines), lines
    assert any(line.startswith("storage retry 1/5: zarr get s3://salt/store/targets/shard-000001.zarr/c/0/0/0 failed (") for line in lines), lines


def error_line(capsys, job) -> str:
    """The job run as its entry point runs it: exit status 2, no traceback, and one error line on
    stderr (the last), which is returned."""
    from jobs.cli import entry

    with pytest.raises(SystemExit) as stop:
        entry(job)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert stop.value.code == 2 and "Traceback" not in err and len(errors) == 1 and err.strip().endswith(errors[0]), err
    return errors[0]


def test_final_storage_errors_stop_with_one_line_naming_the_object(s3, teacher_dir, capsys, monkeypatch):
    """403 and a missing key (a teacher's file, listed, then refused or gone) and missing credentials
    are not retried: the extraction job stops at once with one line naming the object. Transient
    errors that outlast the retries stop the same way (StorageUnavailable)."""
    import s3fs

    from jobs.extract_targets import main

    teacher = f"s3://salt/teacher-{uuid.uuid4().hex[:8]}"  # a fresh URL: a copy cached on this machine is not used
    s3fs.S3FileSystem(skip_instance_cache=True).put(teacher_dir, teacher, recursive=True)
    job = ["--data", "s3://salt/data", "--teacher", teacher, "--store", "s3://salt/never", "--no-progress"]
    before = fs.retry_counts()

    s3.arm(Fault("GET", rf"/{teacher[5:]}/[^/]+", ("403",) * 100))
    line = error_line(capsys, lambda: main(job))
    assert re.fullmatch(rf"error: {teacher}/checkpoint\.\w+: access denied \(403 AccessDenied\)", line), line
    assert s3.rules[0].seen == 1  # asked once: retried by none of botocore, s3fs and this layer

    s3.arm(Fault("GET", rf"/{teacher[5:]}/checkpoint\.safetensors", ("404",) * 100))
    line = error_line(capsys, lambda: main(job))
    assert line == f"error: {teacher}/checkpoint.safetensors: no such object (404 NoSuchKey)", line
    assert s3.rules[0].seen == 1
    assert fs.retry_counts() == before

    s3.arm(Fault("GET", r"/salt/data/train/shard-000000\.tar", ("truncate",) * 100))
    monkeypatch.setenv(fs.RETRIES_ENV, "1")
    with pytest.raises(fs.StorageUnavailable, match=r"^s3://salt/data/train/shard-000000\.tar: read_bytes failed 2 times in a row "
                                                    r"\(ClientPayloadError: .*\); storage unavailable"):
        fs.read_bytes("s3://salt/data/train/shard-000000.tar")
    assert s3.rules[0].seen == 10  # s3fs's 5 tries, twice

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3fs.S3FileSystem.clear_instance_cache()  # credentials are read when a filesystem is made
    try:
        with pytest.raises(PermissionError, match=r"^s3://salt/data/train/\*\.tar: access denied \(Unable to locate credentials\)$"):
            fs.glob("s3://salt/data/train/*.tar")
    finally:
        s3fs.S3FileSystem.clear_instance_cache()

"""Shared fixtures: one tiny dataset, one briefly trained teacher, one local Ray, per session."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

from salt.config import load_config

TINY = "jobs/configs/tiny.yaml"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small batches and few steps: the tests check behaviour, not learning.
FAST = [
    "data.num_workers=0",
    "teacher.optim.batch_size=4",
    "teacher.optim.steps=3",
    "teacher.optim.warmup_steps=1",
    "teacher.log_every=1",
    "student.optim.batch_size=4",
    "student.optim.steps=4",
    "student.optim.warmup_steps=1",
    "student.log_every=1",
    "extract.batch_size=4",
]


# The files that take longest (about a minute or more each in a `make test` run alone), started first: with
# two workers taking whole files, a long file collected last (alphabetically) ran while the other
# worker sat idle at the end.
LONG_FILES_FIRST = ("test_probe.py", "test_store_integrity.py", "test_reliability.py", "test_replication.py", "test_slurm.py",
                    "test_training_scale.py", "test_pipeline.py", "test_teachers.py")


def pytest_addoption(parser):
    parser.addoption("--run-demo", action="store_true",
                     help="run the tests marked demo: the whole make demo, ~8 minutes on 2 cores (make demo-check)")


def pytest_collection_modifyitems(config, items):
    """The long files first (LONG_FILES_FIRST); tests marked gpu count as skipped, not passed, on a
    machine without CUDA, and tests marked demo without --run-demo."""
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    skips = {"demo": None if config.getoption("--run-demo") else
             pytest.mark.skip(reason="demo test: runs the whole make demo (~8 min), with --run-demo (make demo-check; CI runs it)"),
             "gpu": None if torch.cuda.is_available() else
             pytest.mark.skip(reason="gpu test: torch.cuda.is_available() is False on this machine")}
    for item in items:
        for marker, skip in skips.items():  # by marker, not keyword: a parameter id "demo" is a keyword too
            if skip is not None and item.get_closest_marker(marker) is not None:
                item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _repo_root():
    os.chdir(ROOT)
    torch.set_num_threads(1)  # Ray workers and the test process share two cores


def tree_digest(root: str) -> str:
    """sha256 over every file's relative path and bytes: equal digests, untouched tree."""
    h = hashlib.sha256()
    for f in sorted(Path(root).rglob("*")):
        if f.is_file():
            h.update(str(f.relative_to(root)).encode() + f.read_bytes())
    return h.hexdigest()


def assert_same_batch(a: dict, b: dict) -> None:
    """Two loader batches hold the same samples: keys, views, uint8 crops, flips, targets and masks."""
    assert (a["keys"], a["views"]) == (b["keys"], b["views"])
    assert len(a["crops"]) == len(b["crops"]) and all(torch.equal(x, y) for x, y in zip(a["crops"], b["crops"]))
    assert torch.equal(a["flips"], b["flips"])
    assert ("targets" in a) == ("targets" in b) and ("targets" not in a or torch.equal(a["targets"], b["targets"]))
    assert all(torch.equal(x.ctx_idx, y.ctx_idx) and torch.equal(x.tgt_idx, y.tgt_idx) for x, y in zip(a["masks"], b["masks"]))


def read_tensorboard(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] of every scalar in a TensorBoard log folder, as TensorBoard reads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def tiny_config(*overrides: str):
    return load_config(os.path.join(ROOT, TINY), [*FAST, *overrides])


# The tests' dataset; make gpu-wheels writes the same one (from these values) for GPU nodes,
# whose Python need not have the generator's PyAV and scikit-learn: SALT_TEST_DIGITS names that copy.
TEST_DIGITS = {"seed": 1, "num_train": 16, "num_val": 8, "samples_per_shard": 8}
HAS_RAY = importlib.util.find_spec("ray") is not None


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("digits")
    if os.environ.get("SALT_TEST_DIGITS"):
        shutil.copytree(os.environ["SALT_TEST_DIGITS"], out, dirs_exist_ok=True)
        return str(out)
    from pipeline.digits import write_moving_digits

    write_moving_digits(str(out), **TEST_DIGITS, progress=False)
    return str(out)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray for the session; where Ray is not installed (a GPU node of make gpu-check),
    nothing, and the stores are extracted in process (extract_fp32)."""
    if not HAS_RAY:
        yield
        return
    import ray

    from pipeline.cluster import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def teacher_dir(digits, tmp_path_factory) -> str:
    from pipeline.shards import list_shards
    from pipeline.loaders import ClipStream
    from salt.train.teacher import train_teacher

    cfg = tiny_config()
    out = tmp_path_factory.mktemp("run") / "teacher"
    shards = list_shards(digits)
    train_teacher(cfg, out, lambda state: ClipStream(cfg, shards, batch_size=4).at(state), progress=False)
    return str(out)


def extract_fp32(data: str, teacher_dir: str, store: str, *overrides: str) -> str:
    from pipeline.extract import extract_targets

    extract_targets(tiny_config("extract.dtype=float32", *overrides), data=data, teacher=teacher_dir, store=store, progress=False,
                    in_process=not HAS_RAY)
    return store


@pytest.fixture(scope="session")
def store_fp32(digits, teacher_dir, ray_local, tmp_path_factory) -> str:
    return extract_fp32(digits, teacher_dir, str(tmp_path_factory.mktemp("stores") / "fp32"))


@pytest.fixture(scope="session")
def pixel_store(digits, teacher_dir, ray_local, tmp_path_factory) -> str:
    """store_fp32's job with the pixel cache (extract.pixel_cache=true)."""
    return extract_fp32(digits, teacher_dir, str(tmp_path_factory.mktemp("stores") / "pixels"), "extract.pixel_cache=true")


@pytest.fixture(scope="session")
def six_shards(tmp_path_factory) -> str:
    from pipeline.digits import write_moving_digits

    out = tmp_path_factory.mktemp("six")  # enough shards for a kill to land between commits
    write_moving_digits(str(out), seed=2, num_train=24, num_val=4, samples_per_shard=4, progress=False)
    return str(out)


@pytest.fixture(scope="session")
def clean_six(six_shards, teacher_dir, ray_local, tmp_path_factory) -> str:
    return extract_fp32(six_shards, teacher_dir, str(tmp_path_factory.mktemp("clean") / "store"))


def start_moto_server():
    """moto's S3 server on a free localhost port, its state emptied: moto keeps its buckets in
    process-wide memory, so a server started after another test's would otherwise see that test's
    buckets. Returns (server, url); the caller stops the server."""
    import logging
    import socket
    import urllib.request

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST")).close()
    return server, url

"""The dataset index: what it records equals a walk of the tars; readers use it instead of the tars;
a shard edited after indexing is refused, naming it; commits on object storage write each object once."""

from __future__ import annotations

import hashlib
import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest

from jobs import index as index_job
from pipeline import dataset_index, fs
from pipeline.dataset_index import (
    INDEX_FILE,
    ShardChangedError,
    ensure_index,
    entry_from_file,
    forget_cached_indexes,
    load_index,
    walk_tar,
    write_index,
)
from pipeline.loaders import ClipStream, TargetStream
from pipeline.shards import index_shard, list_shards, read_member, read_shard, video_member
from pipeline.store.layout import shard_dir
from pipeline.store.read import TargetStore
from pipeline.store.write import ExtractedRow, commit_shard, stored_values
from salt.storage import StorageFormat
from tests.conftest import tiny_config
from tests.test_urls import s3_endpoint  # noqa: F401  (the fixture)


@pytest.fixture
def old_folder(digits, tmp_path) -> Path:
    """The test dataset as a folder made before the index existed: shards and no index.parquet."""
    data = tmp_path / "data"
    shutil.copytree(digits, data, ignore=shutil.ignore_patterns(INDEX_FILE))
    forget_cached_indexes()
    yield data
    forget_cached_indexes()


def test_the_index_equals_a_walk_of_the_tars(old_folder):
    folder = str(old_folder / "train")
    assert load_index(folder) is None
    index = ensure_index(folder)
    shards = list_shards(str(old_folder))
    assert sorted(index) == ["shard-000000", "shard-000001"] and (old_folder / "train" / INDEX_FILE).exists()
    for shard in shards:
        data = Path(shard).read_bytes()
        with open(shard, "rb") as f:
            walked = walk_tar(f)
        entry = load_index(folder)[shard]
        assert entry["members"] == walked and entry["samples"] == len(walked) == 8
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry == entry_from_file(shard)
    # written again from entries (as ingest does), read back the same
    write_index(folder, [entry_from_file(s) for s in shards])
    assert {n: load_index(folder)[n] for n in index} == {n: index[n] for n in index}


def test_loaders_and_stage_2_read_the_index_not_the_tars(store_fp32, digits, monkeypatch):
    """With the index, the shards are listed from it, neither stream walks a tar, and stage 2 reads
    no shard's own manifest or marker: the store-level tables hold them (one read each, whatever
    the number of shards)."""
    from pipeline.store import read as store_read

    ensure_index(str(Path(digits) / "train"))
    forget_cached_indexes()
    monkeypatch.setattr(dataset_index, "walk_tar", lambda f: pytest.fail("a tar was walked"))
    monkeypatch.setattr("pipeline.shards.walk_tar", lambda f: pytest.fail("a tar was walked"))
    read: list[str] = []
    real_parquet, real_bytes = store_read.read_parquet, fs.read_bytes
    monkeypatch.setattr(store_read, "read_parquet", lambda location: read.append(str(location)) or real_parquet(location))
    monkeypatch.setattr(fs, "read_bytes", lambda location: read.append(str(location)) or real_bytes(location))
    monkeypatch.setattr(fs, "glob", lambda pattern: pytest.fail(f"listed {pattern}"))  # the shards are the index's
    shards = list_shards(digits)
    stage1 = ClipStream(tiny_config(), shards, batch_size=4)
    stage2 = TargetStream(tiny_config(), shards, batch_size=4, store=store_fp32)
    assert len(next(iter(stage1))["keys"]) == 4 and len(next(iter(stage2))["keys"]) == 4
    assert not [r for r in read if r.endswith(".tar")]  # members are read by range, not whole shards
    assert not [r for r in read if "/targets/" in r and r.endswith((".parquet", "shard.json"))]
    assert sum(r.endswith(INDEX_FILE) for r in read) == 1  # once per process


def test_a_shard_edited_after_indexing_is_refused_naming_it(old_folder):
    shard = list_shards(str(old_folder))[1]
    ensure_index(str(old_folder / "train"))
    members = index_shard(shard)
    with open(shard, "ab") as f:
        f.write(b"\0" * 512)  # a tar padded by one block: same samples, other bytes
    forget_cached_indexes()
    with pytest.raises(ShardChangedError, match=rf"source shard {shard} changed after it was indexed: it has \d+ bytes"):
        read_shard(shard)
    with pytest.raises(ShardChangedError, match=rf"source shard {shard} changed after it was indexed"):
        read_member(shard, video_member(next(iter(members.values()))))
    assert len(read_shard(list_shards(str(old_folder))[0])) == 8  # the others still read


def test_make_index_indexes_an_old_folder_once(old_folder, monkeypatch, capsys):
    summary = index_job.main(["--data", str(old_folder)])
    assert {Path(k).name: v["shards"] for k, v in summary.items()} == {"train": 2, "val": 1}
    assert summary[str(old_folder / "train")]["samples"] == 16
    monkeypatch.setattr(dataset_index, "_parallel_entries", lambda *a: pytest.fail("indexed twice"))
    index_job.main(["--data", str(old_folder)])  # already indexed: nothing read


def test_a_commit_on_object_storage_writes_each_object_once_under_its_final_name(s3_endpoint, monkeypatch):  # noqa: F811
    """No temporary name, no copy, no delete; every file once; the marker last. The manifest's row
    checksums are those of the bit-rounded values a reader gets back."""
    import s3fs

    s3 = s3fs.S3FileSystem(skip_instance_cache=True)
    s3.mkdir("salt")
    calls: list[tuple[str, str]] = []
    for name in ("_pipe_file", "_put_file", "_copy", "_cp_file", "_rm", "_rm_file", "_mv"):
        real = getattr(s3fs.S3FileSystem, name, None)
        if real is None:
            continue

        async def spy(self, path, *a, _name=name, _real=real, **k):
            calls.append((_name, str(path)))
            return await _real(self, path, *a, **k)

        monkeypatch.setattr(s3fs.S3FileSystem, name, spy)
    fmt = StorageFormat(dtype="float16", keepbits=5, codec="zstd")
    rng = np.random.default_rng(0)
    rows = [ExtractedRow(key=f"k{i}", view=0, clip_hash="h", frame_indices=(0,), crop=(0, 0, 1, 1), flip=False,
                         latents=rng.standard_normal((3, 4)).astype(np.float32)) for i in range(3)]
    store = "s3://salt/store"
    fs.write_bytes(fs.join(store, "store.json"), json.dumps({"store_id": "s1", "views_per_clip": 1}).encode())
    calls.clear()
    commit_shard(store, "shard-000000", rows, [("bad", 0, "no video")], fmt=fmt, store_id="s1")
    names = [path.removeprefix("salt/store/targets/shard-000000.zarr/") for _, path in calls]
    assert {kind for kind, _ in calls} <= {"_pipe_file", "_put_file"}, calls  # no copy, no delete
    assert len(names) == len(set(names)) and names[-1] == "shard.json"  # each object once, the marker last
    assert all(path.startswith("salt/store/targets/shard-000000.zarr/") for _, path in calls)  # final names only
    recorded = json.loads(fs.read_bytes(fs.join(shard_dir(store, "shard-000000"), "shard.json")))["sha256"]
    assert recorded == {n: hashlib.sha256(fs.read_bytes(fs.join(shard_dir(store, "shard-000000"), n))).hexdigest()
                        for n in names[:-1]}
    target = TargetStore(store)
    for row, (_, entry) in zip(stored_values(np.stack([r.latents for r in rows]), fmt), sorted(target.manifest("shard-000000").items())):
        back = target.latents("shard-000000", entry["row"])
        assert np.array_equal(back, row) and entry["crc32"] == zlib.crc32(back.tobytes())

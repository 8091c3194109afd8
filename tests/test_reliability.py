"""Faults injected: killed workers and runs, full disks, foreign files, hostile inputs, load."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path

import pytest
import torch

from pipeline.shards import index_shard, list_shards
from pipeline.loaders import TargetStream
from pipeline.store.layout import CorruptStoreError
from pipeline.store.verify import verify_store
from salt.checkpoint import load_tensors, read_meta
from salt.models.teachers import load_teacher
from tests.conftest import FAST, ROOT, tiny_config, tree_digest
from tests.test_pipeline import assert_same_store
from tests.test_store_integrity import extract_cli


def descendants(root: int) -> dict[int, str]:
    """pid -> command line of every live process below `root`: what a test started, and nothing
    else on the machine (a neighbour's extraction job has the same command lines)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(proc.name))
        except (OSError, IndexError, ValueError):
            pass
    found, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        try:
            found[pid] = (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        todo += children.get(pid, [])
    return found


def teacher_actors(proc: subprocess.Popen) -> list[int]:
    return [pid for pid, cmd in descendants(proc.pid).items() if "TeacherForward" in cmd]


def wait_for(predicate, timeout_s: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_sigkill_of_the_teacher_actor_mid_job(six_shards, teacher_dir, clean_six, tmp_path):
    store = tmp_path / "store"
    proc = subprocess.Popen(extract_cli(six_shards, teacher_dir, str(store)), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    committed = lambda: list((store / "targets").glob("*.zarr/shard.json"))
    assert wait_for(lambda: teacher_actors(proc) and committed())
    victims, done_before = teacher_actors(proc), len(committed())
    for pid in victims:
        os.kill(pid, signal.SIGKILL)  # raises if the actor had already gone
    assert victims and 1 <= done_before < 6 and proc.poll() is None, "the kill must land mid-job"
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    assert '"shards_extracted_now": 6' in out
    assert_same_store(clean_six, str(store))


def test_sigkill_of_a_student_run_then_resume(store_fp32, digits, tmp_path):
    """Killed at a random step (after a checkpoint or between two), the resumed run sees every
    batch once and ends with the loss trajectory of an uninterrupted run."""
    total = 16
    steps = [f"student.optim.steps={total}", "student.checkpoint_every=2"]

    def cli(run: Path) -> list[str]:
        return [sys.executable, "-m", "jobs.student", "--data", digits, "--run", str(run), "--store", store_fp32, "--no-progress", *FAST, *steps]

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(cli(whole), cwd=ROOT, check=True, capture_output=True, timeout=300)
    metrics = killed / "student" / "metrics.jsonl"
    proc = subprocess.Popen(cli(killed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    logged = lambda: len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    assert wait_for(lambda: logged() >= 3)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and logged() < total, "the kill must land mid-run"
    subprocess.run(cli(killed), cwd=ROOT, check=True, capture_output=True, timeout=300)
    read = lambda run: [json.loads(l) for l in (run / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in read(killed)] == list(range(total))  # nothing skipped, nothing repeated
    assert [r["loss"] for r in read(killed)] == [r["loss"] for r in read(whole)]


KILL_AFTER_SECOND_WEIGHTS = """
import os, runpy, signal, sys
real_replace, commits = os.replace, []
def replace(src, dst):
    real_replace(src, dst)
    if str(dst).endswith(os.path.join("student", "checkpoint.safetensors")):
        commits.append(dst)
        if len(commits) == 2:  # the step-4 save has replaced its weights; nothing after that runs
            os.kill(os.getpid(), signal.SIGKILL)
os.replace = replace
sys.argv = ["jobs.student", *sys.argv[1:]]
runpy.run_module("jobs.student", run_name="__main__")
"""


def test_a_kill_between_the_writes_of_a_checkpoint_resumes_to_the_exact_batch(store_fp32, digits, tmp_path):
    """A save writes weights and then their readable metadata; killed in between, the run must
    resume at the batch after the saved weights, not replay from the previous checkpoint's."""
    args = ["--data", digits, "--store", store_fp32, "--no-progress", *FAST, "student.optim.steps=6", "student.checkpoint_every=2"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run([sys.executable, "-m", "jobs.student", "--run", str(whole), *args], cwd=ROOT, check=True, capture_output=True, timeout=300)
    crashed = subprocess.run([sys.executable, "-c", KILL_AFTER_SECOND_WEIGHTS, "--run", str(killed), *args], cwd=ROOT, capture_output=True, timeout=300)
    assert crashed.returncode == -signal.SIGKILL
    run = killed / "student"
    assert json.loads((run / "checkpoint.json").read_text())["step"] == 2  # the readable copy is one save behind
    assert read_meta(run)["step"] == 4 and read_meta(run)["loader"]["next_batch"] == 4
    subprocess.run([sys.executable, "-m", "jobs.student", "--run", str(killed), *args], cwd=ROOT, check=True, capture_output=True, timeout=300)
    read = lambda r: [json.loads(l) for l in (r / "student" / "metrics.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in read(killed)] == list(range(6))
    assert [r["loss"] for r in read(killed)] == [r["loss"] for r in read(whole)]
    a, b = load_tensors(whole / "student"), load_tensors(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_store_json_from_another_store_is_caught(store_fp32, digits, tmp_path):
    # another extraction of the same data and teacher differs from this one in its store.json by the
    # store id (and the time it was made): a copy of this store given another store's id is that case
    other = tmp_path / "other"
    shutil.copytree(store_fp32, other)
    meta = json.loads((other / "store.json").read_text())
    (other / "store.json").write_text(json.dumps(meta | {"store_id": uuid.uuid4().hex}))
    problems = verify_store(other)
    assert len(problems) == 2 and all("was written for store" in p for p in problems)
    with pytest.raises(CorruptStoreError, match=r"shard shard-000000 was written for store \w+, but store.json is store \w+"):
        TargetStream(tiny_config(), list_shards(digits), batch_size=4, store=str(other))


def test_pickled_checkpoint_is_refused_and_never_run(teacher_dir, tmp_path):
    run = tmp_path / "teacher"
    shutil.copytree(teacher_dir, run)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"encoder.patch_embed.weight": Payload()}, run / "checkpoint.safetensors")
    with pytest.raises(ValueError, match=r"checkpoint.safetensors is not a safetensors checkpoint .*pickled checkpoints are refused"):
        load_teacher(run, tiny_config())
    assert not marker.exists()


def test_hostile_tar_members_are_never_followed(tmp_path):
    tar_path = tmp_path / "data" / "shard-000000.tar"
    tar_path.parent.mkdir()
    with tarfile.open(tar_path, "w") as tar:
        for name in ("../escape.mp4", "/abs/evil.mp4", "fine.mp4"):
            info = tarfile.TarInfo(name)
            info.size = 4
            tar.addfile(info, io.BytesIO(b"abcd"))
        link = tarfile.TarInfo("link.mp4")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    assert list(index_shard(str(tar_path))) == ["fine"]
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == before


def test_four_students_and_a_verify_on_one_store(store_fp32, digits, tmp_path):
    before = tree_digest(store_fp32)
    students = [
        subprocess.Popen([sys.executable, "-m", "jobs.student", "--data", digits, "--run", str(tmp_path / f"s{i}"), "--store", store_fp32,
                          "--no-progress", *FAST, "student.optim.steps=2", f"student.seed={i}"],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    verify = subprocess.run([sys.executable, "-m", "jobs.inspect_store", store_fp32, "--verify"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    results = [(p.wait(timeout=300), p.stderr.read()[-1000:]) for p in students]
    assert verify.returncode == 0 and "verify: 0 problem(s)" in verify.stdout
    assert all(rc == 0 for rc, _ in results), results
    assert all(json.loads((tmp_path / f"s{i}" / "student" / "checkpoint.json").read_text())["step"] == 2 for i in range(4))
    assert tree_digest(store_fp32) == before


def watch_commits(monkeypatch) -> list[tuple]:
    """os.fsync (with the path its descriptor names) and os.replace / os.rename, in call order.
    A power cut cannot be staged in a test; the order of these calls is what survives one."""
    events: list[tuple] = []
    fsync, replace, rename = os.fsync, os.replace, os.rename

    def spy_fsync(fd):
        events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))
        return fsync(fd)

    def spy_rename(real):
        def call(src, dst, *args, **kwargs):
            events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
            return real(src, dst, *args, **kwargs)
        return call

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_rename(replace))
    monkeypatch.setattr(os, "rename", spy_rename(rename))
    return events


def assert_durable_commit(events: list[tuple], dst: Path, skip: tuple[str, ...] = ()) -> None:
    """The rename onto `dst` comes after an fsync of everything it moves (a file, or a folder with
    every file and folder in it), and is followed by an fsync of the folder that holds `dst`."""
    dst = Path(os.path.realpath(dst))
    (i, src), = [(i, Path(e[1])) for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(dst)]
    moved = [src] + [src / p.relative_to(dst) for p in dst.rglob("*") if p.name not in skip]
    synced = {e[1] for e in events[:i] if e[0] == "fsync"}
    assert [str(p) for p in moved if str(p) not in synced] == []
    assert ("fsync", str(dst.parent)) in events[i + 1 :]


def test_checkpoints_and_shards_reach_the_disk_before_their_rename_commits_them(tmp_path, monkeypatch):
    import numpy as np

    from pipeline.store.write import ExtractedRow, commit_shard
    from pipeline.store.layout import shard_dir
    from salt.checkpoint import META, WEIGHTS, save_checkpoint
    from salt.storage import StorageFormat

    events = watch_commits(monkeypatch)
    (tmp_path / "run").mkdir()
    model = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path / "run", {"encoder": model}, torch.optim.AdamW(model.parameters()), {"step": 1})
    assert_durable_commit(events, tmp_path / "run" / WEIGHTS)
    assert_durable_commit(events, tmp_path / "run" / META)

    events.clear()
    row = ExtractedRow(key="a", view=0, clip_hash="0" * 64, frame_indices=(0, 1), crop=(0, 0, 4, 4), flip=False,
                       latents=np.ones((4, 3), np.float32))
    commit_shard(str(tmp_path / "store"), "shard-000000", [row], [], fmt=StorageFormat.of(tiny_config().extract), store_id="s")
    final = Path(shard_dir(str(tmp_path / "store"), "shard-000000"))
    assert_durable_commit(events, final, skip=("shard.json",))  # the shard's files, before its rename
    assert_durable_commit(events, final / "shard.json")  # then the marker that makes it count
    renames = [e[2] for e in events if e[0] == "rename"]
    assert renames.index(str(final.resolve())) < renames.index(str((final / "shard.json").resolve()))

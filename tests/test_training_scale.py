"""Training as a cluster runs it (docs/training-at-scale.md): the global batch on any world size and
its gradient accumulation, the memory and speed switches, preemption and a resume on another world
size, bad stage-2 clips counted against a bound, a step that reads nothing back until it logs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from experiments.runs import run_student
from pipeline.loaders import PREEMPTION_SIGNALS, TargetStream, make_loader
from pipeline.shards import index_shard, list_shards, video_member
from pipeline.store.read import TargetStore
from salt.batching import plan_batch, plan_for
from salt.checkpoint import read_meta
from salt.config import ConfigError, load_config
from salt.flops import inputs_from_config
from salt.train import switches
from salt.train.badclips import TooManyBadClips
from salt.train.loop import fit, prepare_batch
from salt.train.preemption import MARKER, PREEMPTED_EXIT, SIGNALS
from salt.train.student import build_student_state, cached_targets, train_student
from tests.conftest import FAST, ROOT, assert_same_batch, tiny_config
from tests.test_reliability import wait_for

# Losses of runs that differ only in how a global batch is split (micro-batches, ranks): the same
# samples and the same per-sample weights, summed in another order. fp32 on a CPU; measured at most
# 1.1e-7 relative over 6 steps of batch 8 in 1, 2, 4 or 8 micro-batches, and 7.5e-8 over 12 steps
# of batch 4 on 2 gloo ranks x 2 micro-batches against 1 process.
SPLIT_RTOL = 1e-5


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def steps_samples(run: Path) -> dict[int, Counter]:
    """step -> the multiset of (key, view) trained on in that step, over every rank's sample log."""
    out: dict[int, Counter] = {}
    for path in run.glob("samples.rank*.jsonl"):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            out.setdefault(r["step"], Counter()).update(zip(r["keys"], r["views"]))
    return out


def student(cfg, store: str, digits: str, run: Path, **kwargs) -> dict:
    opt = cfg.student.optim
    make = lambda state: TargetStream(cfg, list_shards(digits), batch_size=opt.batch_size, micro_batch_size=opt.micro_batch_size,
                                      store=store).at(state)
    return train_student(cfg, run, make, teacher_width=96, store_meta=TargetStore(store).meta, progress=False, **kwargs)


# --- 1. one meaning of batch ------------------------------------------------------------------------


def test_the_global_batch_splits_over_any_world_size_and_the_planner_counts_it():
    assert plan_batch(3072, 64).as_dict() == {"global_batch": 3072, "world_size": 64, "micro_batch": 48, "accumulation_steps": 1}
    assert plan_batch(3072, 8, 48).accumulation == 8 and plan_batch(3072, 1, 48).accumulation == 64
    # 7 nodes of 8 instead of 8: ranks take 55 or 54 clips, in 2 micro-batches of at most 28
    seven = plan_batch(3072, 56, 48)
    assert (seven.accumulation, seven.micro_batch, seven.rank_clips(0), seven.rank_clips(55)) == (2, 28, 55, 54)
    assert sum(seven.rank_clips(r) for r in range(56)) == 3072
    for bad, match in (((3072, 4096), "fewer than the 4096 ranks"), ((6, 1, 0, 4), "not a multiple of data.views_per_decode=4"),
                       ((10, 4, 1), "empty micro-batch")):
        with pytest.raises(ConfigError, match=match):
            plan_batch(*bad)
    # vitl.yaml's 3072 is the global batch of a run on 1, 8 or 64 GPUs, and of make plan's count
    vitl = load_config(Path(ROOT, "jobs/configs/vitl.yaml"))
    assert inputs_from_config(vitl).batch_size == 3072
    assert {plan_for(vitl.student.optim, w).global_batch for w in (1, 8, 64)} == {3072}
    assert plan_for(vitl.student.optim, 64).micro_batch == 48


def test_a_global_step_trains_on_the_same_samples_on_any_world_size(store_fp32, digits):
    """Each step's global batch is one block of the epoch's order: 1, 2 or 3 ranks (3 split 6 clips
    2-2-2, 4 clips 2-1-1), with or without micro-batches, cover exactly it, each clip once."""
    cfg = tiny_config()
    shards = list_shards(digits)

    def streams(batch: int, world: int, micro: int = 0) -> list[TargetStream]:
        return [TargetStream(cfg, shards, store=store_fp32, batch_size=batch, micro_batch_size=micro, rank=r, world_size=world)
                for r in range(world)]

    def step_clips(ranks: list[TargetStream]) -> list[Counter]:
        return [sum((Counter(clip for _, clip in r.step_share(g)) for r in ranks), Counter()) for g in range(5)]

    for batch in (4, 6):
        one = step_clips(streams(batch, 1))
        assert all(sum(c.values()) == batch and max(c.values()) == 1 for c in one)
        assert step_clips(streams(batch, 2)) == one and step_clips(streams(batch, 3)) == one
    # the micro-batches a rank loads are its share of the step: 2 ranks x 2 micro-batches of 1 clip
    ranks = streams(4, 2, micro=1)
    assert ranks[0].plan.accumulation == 2
    loaded = Counter(k for r in ranks for i in (2, 3) for k in r.batch(i)["keys"])  # global step 1
    assert loaded == Counter(key for _, key in step_clips(streams(4, 1))[1])


def test_k_accumulation_steps_of_b_over_k_equal_one_step_of_b(store_fp32, digits, tmp_path):
    """Batch 8 as 1, 2 or 4 micro-batches: the same samples per step, and the same losses within
    SPLIT_RTOL after 3 steps (each sample weighs 1/8 in every split; only the summation order differs)."""
    runs = {}
    for micro in (0, 4, 2):
        cfg = tiny_config("student.optim.batch_size=8", f"student.optim.micro_batch_size={micro}", "student.optim.steps=3",
                          "student.log_samples=true")
        run = tmp_path / f"micro{micro}"
        student(cfg, store_fp32, digits, run)
        runs[micro] = run
        assert read_meta(run)["batch"]["accumulation_steps"] == {0: 1, 4: 2, 2: 4}[micro]
    for micro in (4, 2):
        assert steps_samples(runs[micro]) == steps_samples(runs[0])
        assert losses(runs[micro]) == pytest.approx(losses(runs[0]), rel=SPLIT_RTOL)


# --- 2. memory and speed switches --------------------------------------------------------------------


def test_activation_checkpointing_recomputes_each_block_and_keeps_the_losses(store_fp32, digits, tmp_path, monkeypatch):
    """Checkpointed blocks run twice per step (forward, and again in the backward pass); the forward
    is the same computation, so the losses are equal to the last bit (tolerance 0)."""
    from salt.models import vit

    real, calls = vit.Block.forward, []
    monkeypatch.setattr(vit.Block, "forward", lambda self, *args: calls.append(1) or real(self, *args))
    runs = {}
    for name, switch in (("plain", "false"), ("ckpt", "true")):
        calls.clear()
        student(tiny_config("student.optim.steps=2", f"student.activation_checkpointing={switch}"), store_fp32, digits, tmp_path / name)
        runs[name] = len(calls)
    per_step = (4 + 2) * 2  # (vit_cpu_s encoder + tiny predictor blocks) x 2 masks
    assert runs == {"plain": 2 * per_step, "ckpt": 2 * 2 * per_step}
    assert losses(tmp_path / "ckpt") == losses(tmp_path / "plain")


def test_compiled_blocks_keep_the_losses(store_fp32, digits, tmp_path, monkeypatch):
    """torch.compile of every block. On this CPU with aot_eager (Dynamo's capture and AOT autograd,
    no code generation): inductor's C++ build of the tiny model takes ~90 s on 2 cores, too long
    for the suite; tests/test_gpu.py compiles with inductor under bf16."""
    monkeypatch.setattr(switches, "COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    student(tiny_config("student.optim.steps=2"), store_fp32, digits, tmp_path / "eager")
    student(tiny_config("student.optim.steps=2", "student.compile=true"), store_fp32, digits, tmp_path / "compiled")
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), rel=1e-6)
    torch._dynamo.reset()


# --- 3. preemption and a resume on another world size -------------------------------------------------

STEPS = 12


def student_cli(digits: str, store: str, run: Path, *extra: str, ranks: int = 1) -> list[str]:
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), "-m", "jobs.student", "--"] if ranks > 1 \
        else ["-m", "jobs.student"]
    return [sys.executable, *launch, "--data", digits, "--run", str(run), "--store", store, "--no-progress", *FAST,
            f"student.optim.steps={STEPS}", "student.checkpoint_every=100", "student.log_samples=true", *extra]


@pytest.fixture(scope="module")
def uninterrupted(store_fp32, digits, tmp_path_factory) -> Path:
    """student_cli's run in this process (one torch thread, as the job's tiny config sets): the same numbers."""
    run = tmp_path_factory.mktemp("whole") / "student"
    cfg = tiny_config(f"student.optim.steps={STEPS}", "student.checkpoint_every=100", "student.log_samples=true")
    run_student(cfg, digits, store_fp32, run, progress=False)
    return run


def preempt(cmd: list[str], run: Path, sig: signal.Signals) -> tuple[subprocess.CompletedProcess, int]:
    """Start a run, signal it once it has logged 2 steps; returns the finished process and the step it stopped after."""
    metrics = run / "student" / "metrics.jsonl"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2, timeout_s=240)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    marker = json.loads((run / "student" / MARKER).read_text())
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), marker["step"]


def test_sigterm_finishes_the_step_checkpoints_exits_75_and_resumes_exactly(uninterrupted, store_fp32, digits, tmp_path):
    run = tmp_path / "run"
    cmd = student_cli(digits, store_fp32, run)
    done, stopped = preempt(cmd, run, signal.SIGTERM)
    assert done.returncode == PREEMPTED_EXIT, done.stderr[-2000:]
    assert 2 <= stopped < STEPS, "the signal must land mid-run"
    meta = read_meta(run / "student")
    assert meta["step"] == stopped and meta["loader"]["next_batch"] == stopped  # checkpoint_every=100: this one is the preemption's
    assert f"preempted by SIGTERM after step {stopped}" in done.stdout
    resumed = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming after a preemption (SIGTERM) at step {stopped}" in resumed.stdout
    assert not (run / "student" / MARKER).exists()
    read = lambda r: [json.loads(l) for l in (r / "metrics.jsonl").read_text().splitlines()]
    assert [r["batch"] for r in read(run / "student")] == list(range(STEPS))  # nothing skipped, nothing repeated
    assert losses(run / "student") == losses(uninterrupted)  # exactly: same process count, same order of every sum


def test_two_ranks_preempted_by_sigusr1_resume_on_one_rank(uninterrupted, store_fp32, digits, tmp_path):
    """2 gloo ranks under torchrun (forwarding SIGUSR1), each accumulating 2 micro-batches of 1 (DDP
    reduces on the second), signalled mid-run, resume as 1 process with one micro-batch of 4: every
    global step trains on exactly the samples of an uninterrupted 1-process run (the same multiset
    of (key, view) per step), so none is repeated or skipped across the change; the losses agree
    within SPLIT_RTOL (the global batch is summed over 2 ranks and 2 micro-batches, then at once)."""
    run = tmp_path / "run"
    cmd = student_cli(digits, store_fp32, run, "student.optim.micro_batch_size=1", ranks=2)
    cmd[cmd.index("--standalone"):cmd.index("--standalone")] = ["--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]
    done, stopped = preempt(cmd, run, signal.SIGUSR1)
    assert 2 <= stopped < STEPS, "the signal must land mid-run"
    # torchrun forwarded the signal, its workers checkpointed and left with 75, and torchrun itself
    # ends with 1 on the signal it got: a launcher around torchrun reads preempted.json
    assert done.returncode == 1 and f"got signal: {int(signal.SIGUSR1)}" in done.stderr, done.stderr[-3000:]
    assert f"preempted by SIGUSR1 after step {stopped}" in done.stdout
    assert read_meta(run / "student")["loader"]["world_size"] == 2
    assert read_meta(run / "student")["batch"] == {"global_batch": 4, "world_size": 2, "micro_batch": 1, "accumulation_steps": 2}
    one = subprocess.run(student_cli(digits, store_fp32, run), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    assert "world size 2 -> 1" in one.stdout
    seen = steps_samples(run / "student")
    assert sorted(seen) == list(range(1, STEPS + 1)) and seen == steps_samples(uninterrupted)
    assert losses(run / "student") == pytest.approx(losses(uninterrupted), rel=SPLIT_RTOL)


def test_loader_workers_ignore_the_preemption_signals_and_resume_in_order(store_fp32, digits):
    """A signal sent to the process group reaches the loader's workers too: they leave it to the
    training process. A stream resumed at an odd position gives the same batches through 2 workers
    as through none (worker 0 takes the first batch after the resume point)."""
    assert set(PREEMPTION_SIGNALS) == set(SIGNALS)
    cfg = tiny_config()
    make = lambda: TargetStream(cfg, list_shards(digits), batch_size=4, store=store_fp32)
    state = make().state_dict(3)
    direct = make().at(state)
    it = iter(make_loader(make().at(state), 2))
    for i in range(3, 6):
        assert_same_batch(next(it), direct.batch(i))


# --- 4. bad clips ----------------------------------------------------------------------------------------


def with_bad_clips(digits: str, store: str, tmp_path: Path) -> tuple[str, str, list[str]]:
    """Copies of the data and the store where one clip no longer decodes (its video's bytes zeroed)
    and another no longer hashes to what its teacher saw (its manifest's hash changed)."""
    data, bad_store = tmp_path / "data", tmp_path / "store"
    shutil.copytree(digits, data)
    shutil.copytree(store, bad_store)
    shard = list_shards(str(data))[0]
    undecodable = sorted(index_shard(shard))[1]
    member = video_member(index_shard(shard)[undecodable])
    with open(shard, "r+b") as f:
        f.seek(member.offset)
        f.write(b"\0" * member.size)
    mismatched = sorted(index_shard(list_shards(str(data))[1]))[2]
    for path in bad_store.rglob("manifest.parquet"):  # the shard's own table and the store's table of all shards
        table = pq.read_table(path)
        rows = [r | {"clip_hash": "0" * 64} if r["key"] == mismatched else r for r in table.to_pylist()]
        pq.write_table(table.from_pylist(rows, schema=table.schema), path)
    return str(data), str(bad_store), sorted([undecodable, mismatched])


def test_bad_clips_are_replaced_logged_counted_and_bounded(store_fp32, digits, tmp_path):
    data, store, bad = with_bad_clips(digits, store_fp32, tmp_path)
    # default 0: the first bad clip stops the run, naming it (the old behaviour)
    with pytest.raises(Exception, match="|".join(bad)):
        student(tiny_config(), store, data, tmp_path / "strict")
    # 2 of 16 allowed: the epoch trains with full batches; each bad clip is named once, with its reason
    cfg = tiny_config("data.max_bad_fraction=0.125", "student.log_samples=true", "student.checkpoint_every=2")
    student(cfg, store, data, tmp_path / "whole")
    logged = [json.loads(l) for l in (tmp_path / "whole" / "bad_clips.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in logged) == bad and all(r["reason"] and r["replaced_by"] not in bad for r in logged)
    assert sum("clip hash mismatch" in r["reason"] for r in logged) == 1  # the other one failed to decode
    per_step = steps_samples(tmp_path / "whole")
    assert all(sum(c.values()) == 4 for c in per_step.values()) and not any(k in bad for c in per_step.values() for k, _ in c)
    assert json.loads((tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()[-1])["bad_clips"] == 2
    assert sorted(read_meta(tmp_path / "whole")["bad_clips"]) == bad
    # the replacements are a function of the position: a resumed run trains as the whole one did
    student(cfg, store, data, tmp_path / "split", stop_after=2)
    student(cfg, store, data, tmp_path / "split")
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    assert steps_samples(tmp_path / "split") == per_step
    # 1 of 16 allowed: the run stops, naming both
    with pytest.raises(TooManyBadClips, match=rf"2 of 16 clips failed .* data.max_bad_fraction=0.1 allows \(1\): {bad[0]}: .*; {bad[1]}: "):
        student(tiny_config("data.max_bad_fraction=0.1"), store, data, tmp_path / "bounded")


# --- 6. a step that never waits on the host ---------------------------------------------------------------


def test_a_nonfinite_loss_stops_the_run_within_a_log_interval_naming_its_step(store_fp32, digits, tmp_path):
    """The loss is read at log steps and checkpoints only; a NaN at step 3 stops the run at the
    step-4 read, naming step 3, before step 4's checkpoint could keep its weights."""
    cfg = tiny_config("student.optim.steps=8", "student.log_every=4", "student.checkpoint_every=2")
    state = build_student_state(cfg, teacher_width=96)
    made = []

    def poisoned(batch: dict) -> torch.Tensor:
        made.append(1)
        targets = cached_targets(batch)
        return targets * float("nan") if len(made) == 3 else targets

    make = lambda s: TargetStream(cfg, list_shards(digits), batch_size=4, store=store_fp32).at(s)
    with pytest.raises(FloatingPointError, match=r"loss is nan at step 3 \(read at step 4; log_every=4\)"):
        fit(state, tmp_path, make, poisoned, cfg.student, data=cfg.data, checkpoint_meta={}, progress=False)
    assert read_meta(tmp_path)["step"] == 2 and not (tmp_path / "metrics.jsonl").read_text()


def test_fp16_targets_travel_as_stored_and_become_fp32_on_the_device(digits, teacher_dir, tmp_path):
    from pipeline.extract import extract_targets

    store = str(tmp_path / "fp16")
    extract_targets(tiny_config("extract.dtype=float16"), data=digits, teacher=teacher_dir, store=store, progress=False, in_process=True)
    loaded = TargetStream(tiny_config(), list_shards(digits), batch_size=4, store=store).batch(0)
    assert loaded["targets"].dtype == torch.float16  # half the bytes through workers, pinned memory and the copy
    batch = prepare_batch(loaded, "cpu", tiny_config().data)
    assert batch["targets"].dtype == torch.float32 and torch.equal(batch["targets"], loaded["targets"].float())


def test_training_stops_its_loader_workers_even_while_the_loader_is_still_referenced(digits, tmp_path):
    """Loader workers ignore SIGTERM (preemption is the trainer's), and Python's exit SIGTERMs its daemon
    children, then waits for them: a loader that outlived its training (held by anything) hung its
    process at exit. Training now stops the workers itself; the loader here stays referenced."""
    import multiprocessing

    from pipeline.loaders import ClipStream
    from salt.train.teacher import train_teacher

    cfg = tiny_config("teacher.optim.steps=2")
    loaders = []

    def make_batches(state):
        loaders.append(make_loader(ClipStream(cfg, list_shards(digits), batch_size=4).at(state), num_workers=1))
        return loaders[-1]

    before = set(multiprocessing.active_children())
    train_teacher(cfg, tmp_path / "teacher", make_batches, progress=False)
    assert len(loaders) == 1 and loaders[0]._iterator is None  # the loader object itself lives on
    assert set(multiprocessing.active_children()) <= before  # its worker is gone


class _Counting(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(range(1000))


def _abort_at_exit(worker_id: int) -> None:
    """The worker aborts when it exits, as one whose decoder threads are still alive then can."""
    import faulthandler
    import multiprocessing.util
    import os

    faulthandler.disable()  # pytest's fault handler would print the abort's stacks into the test log
    multiprocessing.util.Finalize(None, os.abort, exitpriority=100)


def test_closing_a_loader_is_no_failure_when_a_worker_aborts_on_its_way_out():
    import multiprocessing

    from pipeline.loaders import WorkerLoader

    before = set(multiprocessing.active_children())
    loader = WorkerLoader(_Counting(), batch_size=None, num_workers=1, persistent_workers=True, worker_init_fn=_abort_at_exit)
    assert next(iter(loader)) == 0
    loader.close()  # DataLoader's SIGCHLD watch used to raise "DataLoader worker ... is killed by signal: Aborted" here
    assert loader._iterator is None and set(multiprocessing.active_children()) <= before

"""The streaming evaluation (docs/evaluation.md): features cached once in a store of the target store's
kind and re-read, the encoder skipped on a second run, two ranks give one rank's results, the
attentive probe reads a batch at a time, and V-JEPA 2's frozen protocol as a preset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from experiments.probing import probe_checkpoint, probe_data_config, run_probes, view_plans
from jobs import probe as probe_job
from pipeline.features import FeatureSplit, StoreRows, sample_rows
from pipeline.labelled import segment_starts
from pipeline.store.layout import CorruptStoreError
from pipeline.store.read import summarize
from pipeline.store.verify import verify_store
from salt.config import PROBE_PROTOCOLS, ConfigError, ProbeConfig
from salt.readouts import ReadoutSplits, TensorRows, standardizing, streamed_norm, train_probe_grid
from tests.conftest import FAST, ROOT, tiny_config

QUICK = ["probe.seeds=1", "probe.epochs=1", "probe.lrs=[1e-3]", "probe.wds=[0.01,0.1]", "probe.batch_size=8"]


def results_json(out: Path) -> dict:
    return json.loads((out / "probe_results.json").read_text())


def readings(results: dict) -> dict:
    """task -> result without its timing."""
    return {task: {k: v for k, v in r.items() if k != "train_s"} for task, r in results.items()}


def test_a_second_probe_run_reads_the_cached_features_and_never_runs_the_encoder(digits, tmp_path, capsys):
    out = tmp_path / "probe"
    argv = ["--ckpt", "random:vit_cpu_xs", "--data", digits, "--out", str(out), "--no-progress", *FAST, *QUICK,
            "probe.eval_views=2"]
    first = probe_job.main(argv)
    features = results_json(out)["features"]
    assert features["encoded_rows"] == 16 + 8 * 2 and features["cached"] == {"train": False, "val": False}
    assert "encoding" in capsys.readouterr().out
    again = probe_job.main(argv)
    printed = capsys.readouterr().out
    features = results_json(out)["features"]
    assert features["encoded_rows"] == 0 and features["cached"] == {"train": True, "val": True}  # no forward pass
    assert "train: cached in" in printed and "the encoder is not run" in printed and "all cached" in printed
    assert readings(again) == readings(first)  # the same readings, read from disk
    # another view plan is another store: the cached one is neither reused nor overwritten
    probe_job.main([*argv[:-1], "probe.eval_views=1"])
    assert results_json(out)["features"]["cached"] == {"train": True, "val": False}


def test_the_feature_store_is_a_target_store_with_its_checks(digits, tmp_path):
    cfg = tiny_config("probe.seeds=0", "probe.clips_per_shard=5")
    probe_checkpoint("random:vit_cpu_xs", cfg, digits, tmp_path / "p", progress=False)
    path = results_json(tmp_path / "p")["features"]["stores"]["train"]
    assert verify_store(path) == []  # every file's sha256 and every row's crc32, as `make inspect VERIFY=1` checks
    meta = json.loads(Path(path, "store.json").read_text())
    assert meta["format"] == "salt-feature-store/1" and meta["teacher"]["kind"] == "random"
    assert meta["storage"]["dtype"] == "float32" and meta["views"]["views"] == 1
    # 2 source shards of 8 clips, 5 clips per unit: units of 5, 3, 5, 3 clips, named after their source
    assert [s["name"] for s in meta["source"]["shards"]] == [f"shard-00000{i}-000{n}" for i in (0, 1) for n in (0, 1)]
    assert summarize(path)["samples"] == 16
    split = FeatureSplit(path)
    assert len(split.keys) == 16 and split.keys == sorted(split.keys)
    reference = split.read(np.arange(16), np.zeros(16, dtype=np.int64))
    split.close()
    # one flipped bit in one row: the reader names the row and the store's checker finds it
    unit = Path(path, "targets", "shard-000001-0000.zarr")
    chunk = unit / "c" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x01
    chunk.write_bytes(bytes(data))
    broken = FeatureSplit(path)
    assert torch.equal(torch.from_numpy(broken.read(np.array([0]), np.array([0]))), torch.from_numpy(reference[:1]))
    with pytest.raises(CorruptStoreError, match=r"key 'train-000008', view 0\) of unit shard-000001-0000 does not match"):
        broken.read(np.array([8]), np.array([0]))
    broken.close()
    assert any("shard-000001-0000" in problem for problem in verify_store(path))


def test_two_ranks_extract_their_shares_and_read_what_one_rank_reads(digits, tmp_path):
    """torchrun, 2 gloo ranks: each rank extracts the units i with i % 2 == its rank; the stores hold
    the same rows bit for bit as one process's, and every readout agrees."""
    overrides = [*FAST, *QUICK, "probe.eval_views=2", "probe.clips_per_shard=4"]
    common = ["--ckpt", "random:vit_cpu_xs", "--data", digits, "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "jobs.probe",
           "--", *common, "--out", str(tmp_path / "two"), *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 16 train clips in 2 shards, 4 per unit: 4 units, 2 each; 8 val clips: 2 units, 1 each
    assert "rank 0/2 train: 2 unit(s) ['shard-000000-0000', 'shard-000001-0000']" in proc.stdout, proc.stdout
    assert "rank 1/2 train: 2 unit(s) ['shard-000000-0001', 'shard-000001-0001']" in proc.stdout, proc.stdout
    one = probe_job.main([*common, "--out", str(tmp_path / "one"), *overrides])
    two, single = results_json(tmp_path / "two"), results_json(tmp_path / "one")
    for split in ("train", "val"):
        a, b = FeatureSplit(two["features"]["stores"][split]), FeatureSplit(single["features"]["stores"][split])
        assert a.keys == b.keys
        views = np.repeat(np.arange(a.views)[None], len(a.keys), 0).reshape(-1)
        clips = np.repeat(np.arange(len(a.keys)), a.views)
        assert np.array_equal(a.read(clips, views), b.read(clips, views))
    assert two["features"]["effective_rank"] == single["features"]["effective_rank"]
    for task, r in one.items():
        theirs = two["tasks"][task]
        assert {k: theirs[k] for k in ("top1", "knn_top1", "linear_l2")} == {k: r[k] for k in ("top1", "knn_top1", "linear_l2")}
        for mine, other in zip(r["attentive"]["heads"], theirs["attentive"]["heads"]):  # data-parallel heads: sums in another order
            assert mine["train_loss"] == pytest.approx(other["train_loss"], rel=1e-4)
            assert mine["select_top1"] == other["select_top1"] and mine["top1"] == other["top1"]


class CountingRows:
    """Rows (not a tensor: read as the feature store is) that remember the largest batch they handed out."""

    def __init__(self, x: torch.Tensor):
        self.x, self.largest = x, 0

    def __len__(self) -> int:
        return len(self.x)

    def take(self, idx, epoch=0):
        self.largest = max(self.largest, len(idx))
        return self.x[idx]


def test_the_attentive_probe_streams_a_batch_at_a_time_and_equals_in_memory_training():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 8, 12, generator=g), torch.randint(0, 3, (60,), generator=g)
    x[..., 0] += 2 * y[:, None]  # something to learn
    cfg = ProbeConfig(heads=2, epochs=3, batch_size=16, lrs=[1e-2, 1e-3], wds=[0.01])
    rows = CountingRows(x[:40])
    streamed = train_probe_grid(ReadoutSplits(rows, y[:40], CountingRows(x[40:50]), y[40:50], CountingRows(x[50:]),
                                              y[50:], num_classes=3), probe_cfg=cfg, encoder_heads=2, seed=0)
    in_memory = train_probe_grid(ReadoutSplits(x[:40], y[:40], x[40:50], y[40:50], x[50:], y[50:], num_classes=3),
                                 probe_cfg=cfg, encoder_heads=2, seed=0)
    assert rows.largest == 16
    assert streamed == in_memory


def test_streamed_normalisation_agrees_with_the_in_memory_fit():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 7, 5, generator=g) * torch.tensor([30.0, 1.0, 0.01, 3.0, 1.0]) + 4
    probe = torch.randn(3, 7, 5, generator=g)
    assert torch.allclose(streamed_norm("standardize", TensorRows(x), batch_size=8)(probe), standardizing(x)(probe),
                          rtol=1e-5, atol=1e-5)
    from salt.readouts import whitening

    assert torch.allclose(streamed_norm("whiten", TensorRows(x), batch_size=8)(probe), whitening(x)(probe), atol=1e-4)
    assert torch.equal(streamed_norm("none", TensorRows(x), batch_size=8)(probe), probe)


def test_vjepa2_preset_fills_what_is_left_unset():
    r = tiny_config("probe.protocol=vjepa2").probe.resolved()
    assert (r.depth, r.heads, r.epochs, r.batch_size, r.warmup_epochs, r.norm) == (4, 16, 20, 256, 0, "none")
    assert r.lrs == [5e-3, 3e-3, 1e-3, 3e-4, 1e-4] and r.wds == [0.01, 0.1, 0.4, 0.8]
    assert (r.segments, r.eval_crops, r.eval_views, r.augment, r.crop_area) == (2, 3, 1, True, (0.08, 1.0))
    assert r.train_views == PROBE_PROTOCOLS["vjepa2"]["train_views"]
    mine = tiny_config("probe.protocol=vjepa2", "probe.epochs=2", "probe.segments=8").probe.resolved()
    assert (mine.epochs, mine.segments, mine.depth) == (2, 8, 4)  # what a user sets wins
    default = tiny_config().probe.resolved()  # today's reading on the embedded data
    assert (default.depth, default.lrs, default.wds, default.norm, default.segments, default.augment) == (
        1, [1e-2, 3e-3], [0.01, 0.1], "standardize", 1, False)
    with pytest.raises(ConfigError, match="probe.protocol='v-jepa'"):
        tiny_config("probe.protocol=v-jepa")
    with pytest.raises(ConfigError, match="evenly spaced segments replace seeded windows"):
        tiny_config("probe.protocol=vjepa2", "probe.eval_views=2").probe.resolved()


def test_segments_are_evenly_spaced():
    # a 1/8 partition (37 frames) holds no 61-frame window: the starts spread from 0 to 300 - 61
    assert segment_starts(300, 61, 8) == [0, 34, 68, 102, 136, 170, 204, 239]
    assert segment_starts(64, 61, 2) == [0, 3]
    assert segment_starts(200, 61, 2) == [0, 100]  # each half holds a window: the halves' starts
    assert segment_starts(40, 61, 3) == [0, 0, 0]  # shorter than a window: the start (its last frame repeats)


def test_vjepa2_preset_on_a_small_case(digits, tmp_path):
    """Two evenly spaced segments x three crops per val video, the segments' tokens side by side, the
    three crops softmax-averaged; augmented train views; the heads chosen on held-out train clips."""
    cfg = tiny_config("probe.protocol=vjepa2", *QUICK, "probe.train_views=2")
    r = run_probes({"enc": ("random:vit_cpu_xs", tmp_path / "p")}, cfg, digits, cache=tmp_path / "cache",
                   tasks=["motion"], progress=False)["enc"]["motion"]
    a = r["attentive"]
    assert (r["num_train"], r["num_select"], r["num_val"]) == (13, 3, 8)
    assert a["heads"][0]["top1"] is not None and len(a["heads"]) == 2  # lr [1e-3] x wd [0.01, 0.1]
    chosen = max(a["heads"], key=lambda h: (h["select_top1"], -h["select_loss"]))
    assert (a["lr"], a["wd"]) == (chosen["lr"], chosen["wd"])
    stores = results_json(tmp_path / "p")["features"]["stores"]
    plans = view_plans(cfg)
    val, train = FeatureSplit(stores["val"]), FeatureSplit(stores["train"])
    assert (val.views, train.views) == (2 * 3, 2 * 2)  # segments x crops; views x segments
    rows, video = sample_rows(val, plans["val"], epochs_cycle=False)
    assert len(rows) == 24 and video.tolist() == [i // 3 for i in range(24)]  # 3 crops of each video, averaged
    sample = rows.take(torch.tensor([4]))  # video 1, crop 1: its two segments
    expected = val.read(np.array([1, 1]), np.array([plans["val"].view(0, 0, 1), plans["val"].view(0, 1, 1)]))
    assert sample.shape == (1, 2 * 128, 64) and torch.equal(sample[0], torch.from_numpy(expected).reshape(256, 64))
    manifest = val.store.manifest("shard-000000-0000")
    first, second = manifest[("val-000000", 0)], manifest[("val-000000", 3)]  # segment 0 and 1 of crop 0
    assert first["frame_indices"] == list(range(0, 61, 4)) and second["frame_indices"] == list(range(3, 64, 4))
    train_manifest = train.store.manifest("shard-000000-0000")
    boxes = {tuple(train_manifest[("train-000000", v)]["crop"]) for v in range(4)}
    assert len(boxes) == 4 and not any(train_manifest[("train-000000", v)]["flip"] for v in range(4))
    train_rows, _ = sample_rows(train, plans["train"], epochs_cycle=True)
    assert not torch.equal(train_rows.take(torch.tensor([0]), epoch=0), train_rows.take(torch.tensor([0]), epoch=1))
    assert torch.equal(train_rows.take(torch.tensor([0]), epoch=0), train_rows.take(torch.tensor([0]), epoch=2))
    val.close()
    train.close()
    assert isinstance(rows, StoreRows) and probe_data_config(cfg).probe.depth == 4

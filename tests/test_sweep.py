"""make sweep: variants of one config against one read-only store, locally or as Ray tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from experiments.sweep import load_sweep, run_sweep
from salt.config import ConfigError
from tests.conftest import FAST, ROOT, TINY, read_tensorboard, tree_digest


def write_sweep(path: Path, **fields) -> Path:
    sweep = {"base": str(Path(ROOT) / TINY), "overrides": [*FAST, "student.optim.steps=2"]} | fields
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_sweep_trains_every_variant_on_one_store_and_tabulates(executor, store_fp32, digits, ray_local, tmp_path) -> None:
    variants = [{"name": "base"}, {"name": "xs", "overrides": ["model.student=vit_cpu_xs"]},
                {"name": "seed-1", "overrides": ["student.seed=1"]}]
    sweep = load_sweep(write_sweep(tmp_path / "sweep.yaml", variants=variants, executor=executor))
    before = tree_digest(store_fp32)
    rows = run_sweep(sweep, data=digits, store=store_fp32, out=tmp_path / "out", progress=False)
    assert [r["variant"] for r in rows] == ["base", "xs", "seed-1"] and all(r["steps"] == 2 for r in rows)
    assert rows[0]["final_loss"] != rows[2]["final_loss"]  # the seed override took effect
    assert yaml.safe_load((tmp_path / "out" / "seed-1" / "config.yaml").read_text())["student"]["seed"] == 1
    meta = json.loads((tmp_path / "out" / "xs" / "checkpoint.json").read_text())
    assert meta["encoder"]["size"] == "vit_cpu_xs"
    table = (tmp_path / "out" / "results.md").read_text()
    assert table.startswith("| variant | overrides | steps | final_loss | wall_s |") and "| xs | model.student=vit_cpu_xs | 2 |" in table
    assert tree_digest(store_fp32) == before  # students only read the store
    # one TensorBoard root holds every student; results.md links the plot of all their loss curves
    root = tmp_path / "out" / "tensorboard"
    assert sorted(p.name for p in root.iterdir()) == ["base", "seed-1", "xs"]
    for v in ("base", "seed-1", "xs"):
        losses = [json.loads(l)["loss"] for l in (tmp_path / "out" / v / "metrics.jsonl").read_text().splitlines()]
        assert read_tensorboard(root / v)["train/loss"] == [(i + 1, pytest.approx(x)) for i, x in enumerate(losses)]
    assert "![loss_curves](loss_curves.png)" in table
    assert (tmp_path / "out" / "loss_curves.png").read_bytes().startswith(b"\x89PNG")
    # rerun: finished variants are reported, not retrained
    again = run_sweep(sweep, data=digits, store=store_fp32, out=tmp_path / "out", progress=False)
    assert again == rows


def test_sweep_checks_every_variant_before_training(tmp_path) -> None:
    path = write_sweep(tmp_path / "s.yaml", variants=[{"name": "ok"}, {"name": "typo", "overrides": ["student.optim.lrr=1"]}])
    sweep = load_sweep(path)
    with pytest.raises(ConfigError, match=r"sweep variant 'typo': unknown key config.student.optim.lrr"):
        run_sweep(sweep, data="unused", store="unused", out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "ok").exists()
    with pytest.raises(ConfigError, match=r"not a sweep file"):
        load_sweep(Path(ROOT) / TINY)
    with pytest.raises(ConfigError, match=r"repeated: \['a'\]"):
        load_sweep(write_sweep(tmp_path / "d.yaml", variants=[{"name": "a"}, {"name": "a"}]))


def test_a_ray_sweep_asks_the_cluster_for_gpus_not_the_driver(store_fp32, digits, ray_local, tmp_path, monkeypatch) -> None:
    """A driver that sees CUDA, on a cluster without GPUs, must not ask Ray for one: the task would
    wait forever (and a CPU driver of a GPU cluster must ask: pipeline.cluster.actor_gpus)."""
    import ray
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_remote = ray.remote

    def feasible_remote(*args, **kwargs):  # Ray leaves an unfillable request pending without a word: fail instead
        if kwargs.get("num_gpus", 0) > ray.cluster_resources().get("GPU", 0):
            raise AssertionError(f"asked Ray for {kwargs} on a cluster with {ray.cluster_resources().get('GPU', 0)} GPUs")
        return real_remote(*args, **kwargs)

    monkeypatch.setattr(ray, "remote", feasible_remote)
    sweep = load_sweep(write_sweep(tmp_path / "sweep.yaml", variants=[{"name": "base"}], executor="ray"))
    rows = run_sweep(sweep, data=digits, store=store_fp32, out=tmp_path / "out", progress=False)
    assert [r["steps"] for r in rows] == [2]

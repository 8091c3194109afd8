import json
import re

import pytest

from jobs import plan as plan_job
from salt.config import ConfigError
from pipeline.feeding import PlanInputs, plan
from salt.flops import TABLE10_TOTALS, CostInputs, costs, inputs_from_overrides, table10
from salt.storage import StorageFormat


def test_table10_totals_within_5_percent():
    rows = table10()
    assert [r["student"] for r in rows] == list(TABLE10_TOTALS)
    for r in rows:
        assert r["total_flops"] == pytest.approx(r["paper_total_flops"], rel=0.05), r["student"]
    # the paper's D columns (x1e9 tokens) come out exactly
    assert rows[0]["De"] / 1e9 == pytest.approx(154.1, abs=0.05)
    assert rows[0]["Dp"] / 1e9 == pytest.approx(1541.4, abs=0.05)
    assert rows[0]["Dt"] / 1e9 == pytest.approx(770.7, abs=0.05)
    # stage 1 alone, 80k ViT-L steps: 0.24e21 (table 11 and docs/method.md)
    assert rows[0]["stage1_flops"] == pytest.approx(0.24e21, rel=0.05)


def test_paper_default_split_matches_table16():
    pl = costs(CostInputs())  # 40k teacher + 200k student steps: 0.121 + 1.190 = 1.311 x1e21
    assert pl.stage1.flops == pytest.approx(0.121e21, rel=0.05)
    assert pl.student_run_online.flops == pytest.approx(1.190e21, rel=0.05)
    assert pl.total_online.flops == pytest.approx(1.311e21, rel=0.05)


def test_storage_arithmetic():
    assert costs(CostInputs()).bytes_per_view / 1e6 == pytest.approx(3.2, abs=0.05)  # 1568 x 1024 x 2 B
    assert costs(CostInputs(teacher="vit_b")).bytes_per_view / 1e6 == pytest.approx(2.4, abs=0.05)
    assert costs(CostInputs()).store_bytes / 1e12 == pytest.approx(11.6, rel=0.03)
    assert costs(CostInputs(views_per_clip=3)).store_bytes == pytest.approx(3 * costs(CostInputs()).store_bytes)
    fp32 = StorageFormat(dtype="float32")
    assert costs(CostInputs(storage=fp32)).bytes_per_view == 2 * costs(CostInputs()).bytes_per_view
    # bit-rounding under a codec keeps sign + exponent + kept bits at best: 1 + 8 + 7 of 32 bits
    assert StorageFormat(dtype="float32", keepbits=7, codec="blosc").value_bytes() == 2.0
    assert StorageFormat(dtype="float16", keepbits=5, codec="zstd").value_bytes() == 2 * 11 / 16
    assert StorageFormat(dtype="float16", keepbits=5).value_bytes() == 2.0  # rounded but not compressed
    assert StorageFormat(dtype="float32", keepbits=7, codec="blosc").value_bytes(compression_ratio=4.0) == 1.0
    # the planner takes the store's own format, through the same override syntax as configs
    pl = costs(inputs_from_overrides(["storage.dtype=float16", "storage.keepbits=5", "storage.codec=blosc"]))
    assert pl.bytes_per_view == costs(CostInputs()).bytes_per_view * 11 / 16
    with pytest.raises(ConfigError, match=re.escape("plan.storage.dtype='bfloat16': expected one of float32, float16")):
        inputs_from_overrides(["storage.dtype=bfloat16"])
    with pytest.raises(ConfigError, match=re.escape("plan.storage.keepbits=10: expected 0 (off) to 9 for float16")):
        inputs_from_overrides(["storage.keepbits=10"])


def test_break_even():
    pl = costs(CostInputs())
    # ViT-L/ViT-L: the teacher forward is about half of an online step, so one run pays for the store
    forward = pl.student_run_online.flops - pl.student_run_cached.flops
    assert forward / pl.student_run_online.flops == pytest.approx(0.5, abs=0.05)
    assert pl.break_even_runs == pl.break_even_runs_gpu_hours == 1
    assert pl.total_cached.flops < pl.total_online.flops
    # a store read ~once per run: 1000 clips, 10 x 100 samples per run
    small = dict(num_clips=1000, batch_size=10, student_steps=100)
    runs = [costs(CostInputs(views_per_clip=v, **small)).break_even_runs for v in range(1, 8)]
    assert runs == [2, 3, 4, 5, 6, 7, 8]  # an exact tie at 1 view is not yet cheaper
    assert runs == sorted(runs)
    # extraction at half the training throughput doubles its cost in GPU-hours only
    slow = costs(CostInputs(views_per_clip=3, extract_flops_per_s=80e12, **small))
    assert (slow.break_even_runs, slow.break_even_runs_gpu_hours) == (4, 7)


def test_overrides_parse_and_reject():
    inp = inputs_from_overrides(["num_clips=3.6e5", "student=vit_h", "gpu_flops_per_s=1e15", "compression_ratio=none"])
    assert (inp.num_clips, inp.student, inp.gpu_flops_per_s, inp.compression_ratio) == (360_000, "vit_h", 1e15, None)
    with pytest.raises(ConfigError, match=r"unknown key plan\.num_clip\b"):
        inputs_from_overrides(["num_clip=5"])
    with pytest.raises(ConfigError, match=r"plan\.batch_size: expected an integer, got 1.5"):
        inputs_from_overrides(["batch_size=1.5"])
    with pytest.raises(ConfigError, match=r"plan\.student: unknown size"):
        inputs_from_overrides(["student=vit_xl"])
    with pytest.raises(SystemExit, match=r"unknown key plan\.stepz"):
        plan_job.main(["stepz=3"])


def test_cli_preset_json(capsys):
    printed = plan_job.main(["--preset", "table10", "--json"])
    out = capsys.readouterr().out
    assert out.strip() == printed
    rows = json.loads(out)
    assert isinstance(rows, list) and len(rows) == 4
    assert all({"student", "teacher", "total_flops"} <= set(r) for r in rows)


def test_cli_human_output(capsys):
    printed = plan_job.main(["views_per_clip=2"])
    assert "23.12 TB" in printed and "break-even" in printed
    assert json.loads(plan_job.main(["--json"]))["store_bytes"] == pytest.approx(11.56e12, rel=0.01)


def test_feed_arithmetic_names_what_binds():
    """A hand-computed case: the GPU rate is set so that a GPU eats 160 clips/s of stage 2; at 5
    clips/s per core that is 32 decode cores against the 16 a node of 8 GPUs and 128 cores
    offers (50%); a ViT-L fp16 view is 1568 x 1024 x 2 B, so 160 clips/s read 513.8 MB/s."""
    paper = plan(PlanInputs())
    cost_only = costs(CostInputs())  # the feed rows are added to salt.flops' costs, which they leave as they were
    assert {k: v for k, v in vars(paper).items() if k not in ("inputs", "feeds")} == {k: v for k, v in vars(cost_only).items() if k != "inputs"}
    per_sample = paper.student_run_cached.flops / (paper.inputs.student_steps * paper.inputs.batch_size)
    node = dict(gpu_flops_per_s=160 * per_sample, decode_clips_per_s_per_core=5.0, gpus_per_node=8, cpu_cores_per_node=128)
    view_mb = 1568 * 1024 * 2 / 1e6

    feeds = {f.stage: f for f in plan(PlanInputs(**node, storage_mb_per_s_per_node=8 * 1000.0)).feeds}
    cached = feeds["stage 2: cached targets"]
    assert cached.clips_per_s_per_gpu == pytest.approx(160)
    assert cached.decode_cores_per_gpu == pytest.approx(32)
    assert cached.target_mb_per_s_per_gpu == pytest.approx(160 * view_mb)
    assert cached.target_mb_per_s_per_node == pytest.approx(8 * 160 * view_mb)
    assert (cached.binding, cached.gpu_utilisation) == ("decode", pytest.approx(0.5))
    # the online teacher adds a forward per sample: fewer clips per GPU, no target reads
    online = feeds["stage 2: online teacher"]
    assert online.clips_per_s_per_gpu < 160 and online.target_mb_per_s_per_gpu == 0

    # 2,000 MB/s per node is 250 per GPU: storage now binds before decode
    starved = {f.stage: f for f in plan(PlanInputs(**node, storage_mb_per_s_per_node=2000.0)).feeds}
    cached = starved["stage 2: cached targets"]
    assert (cached.binding, cached.gpu_utilisation) == ("storage", pytest.approx(250 / (160 * view_mb)))

    # enough of both: the GPU binds at full rate
    fed = plan(PlanInputs(**{**node, "cpu_cores_per_node": 512}, storage_mb_per_s_per_node=1e6)).feeds
    assert {(f.binding, f.gpu_utilisation) for f in fed} == {("gpu", 1.0)}


def test_stage_2_input_modes_decode_less():
    """The same 160 clips/s per GPU: 2 views per decode at 8 samples/s per core need 20 cores (the
    node offers 16: 80%); the pixel cache at 40 samples/s needs 4 cores but reads 4 MB of pixels
    more per sample: 160 x (3.21 + 4) MB/s per GPU, against 8,000 / 8 = 1,000 MB/s (storage binds)."""
    paper = plan(PlanInputs())
    per_sample = paper.student_run_cached.flops / (paper.inputs.student_steps * paper.inputs.batch_size)
    node = dict(gpu_flops_per_s=160 * per_sample, decode_clips_per_s_per_core=5.0, storage_mb_per_s_per_node=8000.0)
    modes = dict(views_per_clip=2, views_per_decode=2, multiview_samples_per_s_per_core=8.0,
                 pixel_samples_per_s_per_core=40.0, pixel_mb_per_view=4.0)
    feeds = {f.stage: f for f in plan(PlanInputs(**node, **modes)).feeds}
    view_mb = 1568 * 1024 * 2 / 1e6
    two = feeds["stage 2: cached, 2 views/decode"]
    assert two.decode_cores_per_gpu == pytest.approx(20)
    assert (two.binding, two.gpu_utilisation) == ("decode", pytest.approx(16 / 20))
    pixels = feeds["stage 2: cached, pixel cache"]
    assert pixels.decode_cores_per_gpu == pytest.approx(4)
    assert pixels.target_mb_per_s_per_gpu == pytest.approx(160 * (view_mb + 4.0))
    assert (pixels.binding, pixels.gpu_utilisation) == ("storage", pytest.approx(1000 / (160 * (view_mb + 4.0))))
    # unmeasured, k views per decode count the decode once and the crops as free
    unmeasured = {f.stage: f for f in plan(PlanInputs(**node, views_per_clip=2, views_per_decode=2)).feeds}
    assert unmeasured["stage 2: cached, 2 views/decode"].decode_cores_per_gpu == pytest.approx(16)
    assert "stage 2: cached, 2 views/decode" not in {f.stage for f in paper.feeds}  # one view per decode: no row
    with pytest.raises(ConfigError, match="views_per_decode"):
        PlanInputs(views_per_decode=2)  # a single stored view cannot serve two


def test_plan_reads_the_measured_decode_rate(tmp_path, capsys):
    bench = tmp_path / "benchmarks.json"
    measured = {"decode_clips_per_s_per_core": 2.5, "loader_video_samples_per_s_per_core": 2.0, "loader_views2_samples_per_s_per_core": 4.5,
                "loader_pixels_samples_per_s_per_core": 30.0, "pixel_cache_mb_per_view": 2.0}
    bench.write_text(json.dumps([{"name": k, "value": v} for k, v in measured.items()]))
    out = json.loads(plan_job.main(["--json", "--bench", str(bench)]))
    assert out["inputs"]["decode_clips_per_s_per_core"] == 2.5
    assert (out["inputs"]["pixel_samples_per_s_per_core"], out["inputs"]["pixel_mb_per_view"]) == (30.0, 2.0)
    assert out["inputs"]["multiview_samples_per_s_per_core"] is None  # measured at 2 views per decode, not 1
    two = json.loads(plan_job.main(["--json", "--bench", str(bench), "views_per_clip=2", "views_per_decode=2"]))
    assert two["inputs"]["multiview_samples_per_s_per_core"] == 4.5
    feeds = {f["stage"]: f for f in out["feeds"]}
    assert feeds["stage 1: teacher"]["decode_cores_per_gpu"] == pytest.approx(feeds["stage 1: teacher"]["clips_per_s_per_gpu"] / 2.5)
    cached = feeds["stage 2: cached targets"]  # the stage-2 loader's own rate: decode plus the targets
    assert cached["decode_cores_per_gpu"] == pytest.approx(cached["clips_per_s_per_gpu"] / 2.0)
    # an override wins over the file; a file that is not make bench's is named in the error
    assert json.loads(plan_job.main(["--json", "--bench", str(bench), "decode_clips_per_s_per_core=4"]))[
        "inputs"]["decode_clips_per_s_per_core"] == 4
    bench.write_text("{}")
    with pytest.raises(ValueError, match="benchmarks.json"):
        plan_job.main(["--bench", str(bench)])


def test_make_plan_and_a_run_of_a_config_count_the_same_global_batch():
    """optim.batch_size is the global batch in both: make plan --config vitl.yaml counts 200k steps of
    3072 clips whatever the GPU count, and a run of that config on 1, 8 or 64 GPUs trains 3072 per
    step (48 per GPU in one micro-batch on 64, 8 micro-batches of 48 on 8). Stage 1 has its own."""
    from salt.batching import plan_for
    from salt.config import load_config, with_overrides
    from salt.flops import inputs_from_config

    cfg = load_config("jobs/configs/vitl.yaml")
    printed = plan_job.main(["--config", "jobs/configs/vitl.yaml", "--json"])
    assert json.loads(printed)["inputs"]["batch_size"] == 3072
    assert [plan_for(cfg.student.optim, w).as_dict() for w in (1, 8, 64)] == [
        {"global_batch": 3072, "world_size": w, "micro_batch": 48, "accumulation_steps": 3072 // 48 // w} for w in (1, 8, 64)]
    one_gpu = costs(inputs_from_config(cfg)).student_run_cached.flops
    assert costs(inputs_from_config(with_overrides(cfg, "student.optim.micro_batch_size=24"))).student_run_cached.flops == one_gpu
    small_teacher = inputs_from_config(with_overrides(cfg, "teacher.optim.batch_size=1024"))
    assert costs(small_teacher).stage1.flops == pytest.approx(costs(inputs_from_config(cfg)).stage1.flops / 3)
    assert "global batch 3072, " in plan_job.main(["--config", "jobs/configs/vitl.yaml"])
    assert "global batch 3072 (stage 1: 1024), " in plan_job.main(["teacher_batch_size=1024"])

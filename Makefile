# SALT pipeline. Every target installs what it needs first (make setup).
PY      := .venv/bin/python
DATA    ?= data/moving-digits
CONFIG  ?= jobs/configs/tiny.yaml
RUN     ?= runs/demo
ARGS    ?=
STORE   ?= $(RUN)/targets
# the frozen teacher make extract-targets runs: a run folder, hf-videomae:<folder> or hf-vjepa2:<folder>
TEACHER ?= $(RUN)/teacher
# CPU build by default (it lies on the CI machine's disk); GPU users: see README.
TORCH   ?= torch==2.13.0
DEFAULT_DATA := data/moving-digits
# OpenMP threads that spin-wait crawl when anything else wants the cores (Ray workers,
# loader workers, a neighbour): on a loaded 2-core box a tiny step took several times longer.
export OMP_WAIT_POLICY ?= PASSIVE
COMMON   = --config $(CONFIG) --data $(DATA) --run $(RUN)
# NPROC=N trains teacher/student data-parallel on N local processes (torchrun; NCCL on GPUs,
# gloo on CPU). "--" keeps torchrun from reading our --run as an abbreviation of its --run-path.
NPROC   ?= 1
TRAIN    = $(if $(filter 1,$(NPROC)),$(PY) -m,$(PY) -m torch.distributed.run --standalone --nproc_per_node $(NPROC) -m)
TRAIN_SEP = $(if $(filter 1,$(NPROC)),,--)

.PHONY: setup lock data teacher extract-targets index student sweep slurm-teacher slurm-extract-targets slurm-student slurm-sweep probe select export replicate yardstick stage1-variants inspect plan bench demo demo-check test clean gpu-wheels gpu-check
.DEFAULT_GOAL := demo

setup: .venv/.installed

# torch first, by pip (TORCH may name another index for a CUDA build; pip's own configuration
# finds a wheel on local disk), then the project under the lock, by uv: every package resolved
# there, torch's own dependencies included, comes at its locked version. uv installs those ~200
# packages in half the time pip took on the CI machine; it reads UV_INDEX_URL, not pip.conf.
# --compile-bytecode as pip does: where PYTHONDONTWRITEBYTECODE is set (the CI machine) nothing else
# writes .pyc files, and every process (each Ray worker, each test's job) would compile its imports
# from source: the suite took about 1.4x as long (784 s against 549 s of tests, one run each).
UV      ?= uv==0.13.8
.venv/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip $(UV)
	$(PY) -m pip install -q $(TORCH)
	UV_LINK_MODE=copy .venv/bin/uv pip install -q --compile-bytecode --python $(PY) -c constraints.txt -e ".[dev]"
	touch $@

# constraints.txt is the lock: every package `make setup` installs (runtime + dev extra, not
# xformers) pinned exactly, resolved by pip-compile (pip-tools) for this Python and platform.
# Run it on the CI machine: its CPU torch wheel lies on disk (PyPI's would lock CUDA packages).
# `make lock` keeps the current pins where they still resolve; LOCK_ARGS=--upgrade takes the
# newest of everything, LOCK_ARGS="-P zarr" one package. pip-tools lives in its own venv, never
# in .venv. The torch pin loses its local label (+cpu) so a CUDA build of the same version fits.
LOCK_TORCH ?= torch==2.13.0
LOCK_ARGS  ?=
LOCK_VENV  := .venv/lock-tools
lock:
	test -x $(LOCK_VENV)/bin/pip-compile || { python3 -m venv $(LOCK_VENV) && \
	    $(LOCK_VENV)/bin/python -m pip install -q pip==26.3 pip-tools==7.6.2; }
	echo "$(LOCK_TORCH)" > $(LOCK_VENV)/torch-pin.txt
	CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_VENV)/bin/pip-compile --quiet --extra dev --strip-extras \
	    --allow-unsafe --no-emit-index-url --no-emit-find-links -c $(LOCK_VENV)/torch-pin.txt \
	    $(LOCK_ARGS) -o constraints.txt pyproject.toml
	sed -i.bak -E 's/^(torch==[^+ ]+)\+[^ ]+/\1/' constraints.txt && rm constraints.txt.bak

# The embedded dataset is built on first use when DATA is the default.
$(DEFAULT_DATA)/labels.json: | setup
	$(PY) -m jobs.data --data $(DEFAULT_DATA)

DATA_DEP := $(if $(filter $(DEFAULT_DATA),$(DATA)),$(DEFAULT_DATA)/labels.json)

data: setup
	$(PY) -m jobs.data --data $(DATA) $(if $(SRC),--src $(SRC)) $(if $(SPLIT),--split $(SPLIT)) $(if $(LABELS),--labels $(LABELS)) $(if $(WORKERS),--workers $(WORKERS)) $(ARGS)

teacher: setup $(DATA_DEP)
	$(TRAIN) jobs.teacher $(TRAIN_SEP) $(COMMON) $(ARGS)

extract-targets: setup $(DATA_DEP)
	$(PY) -m jobs.extract_targets $(COMMON) --teacher $(TEACHER) $(ARGS)

# the dataset index (index.parquet) of each split folder of DATA, for shards made before ingest wrote one
index: setup
	$(PY) -m jobs.index --data $(DATA) $(ARGS)

student: setup $(DATA_DEP)
	$(TRAIN) jobs.student $(TRAIN_SEP) $(COMMON) $(ARGS)

# CONFIG names a sweep file here; left at its default, the demo sweep runs.
SWEEP = $(if $(filter jobs/configs/tiny.yaml,$(CONFIG)),jobs/configs/sweep-demo.yaml,$(CONFIG))
sweep: setup $(DATA_DEP)
	$(PY) -m jobs.sweep --config $(SWEEP) --data $(DATA) --run $(RUN) --store $(STORE) $(ARGS)

# The same jobs on SLURM (docs/cluster.md): a batch script in $(RUN)/slurm/, submitted. NODES nodes of
# GPUS GPUs each (unset: the launcher's 1 x 1, or a sweep file's slurm section); SLURM: more launcher
# flags, e.g. SLURM="--time 2-00:00:00 --partition gpu --cpus-per-node 96 --dry-run".
LAUNCH = $(PY) -m jobs.launch $(if $(NODES),--nodes $(NODES)) $(if $(GPUS),--gpus-per-node $(GPUS)) $(SLURM)
slurm-teacher: setup $(DATA_DEP)
	$(LAUNCH) teacher -- $(COMMON) $(ARGS)
slurm-extract-targets: setup $(DATA_DEP)
	$(LAUNCH) extract-targets -- $(COMMON) --teacher $(TEACHER) $(ARGS)
slurm-student: setup $(DATA_DEP)
	$(LAUNCH) student -- $(COMMON) $(ARGS)
slurm-sweep: setup $(DATA_DEP)
	$(LAUNCH) sweep -- --config $(SWEEP) --data $(DATA) --run $(RUN) --store $(STORE) $(ARGS)

# CKPT: teacher/student run folder (or a snapshot), or random:<size>; TASK: one task of labels.json (default: all)
probe: setup $(DATA_DEP)
	@test -n "$(CKPT)" || { echo "make probe needs CKPT=<teacher or student run folder, or random:SIZE>"; exit 2; }
	$(TRAIN) jobs.probe $(TRAIN_SEP) --ckpt $(CKPT) --config $(CONFIG) --data $(DATA) $(if $(TASK),--task $(TASK)) $(if $(OUT),--out $(OUT)) $(ARGS)

# RUNS: student run folders; every snapshot and final checkpoint is probed, R^2 of accuracy on loss.
select: setup $(DATA_DEP)
	@test -n "$(RUNS)" || { echo "make select needs RUNS=\"<student run folder> ...\""; exit 2; }
	$(PY) -m jobs.select --runs $(RUNS) --config $(CONFIG) --data $(DATA) $(ARGS)

# CKPT: a teacher/student run folder or a snapshot; OUT: where (default <CKPT>/export); formats: docs/export.md
export: setup
	@test -n "$(CKPT)" || { echo "make export needs CKPT=<teacher or student run folder, or a snapshot>"; exit 2; }
	$(PY) -m jobs.export --ckpt $(CKPT) $(if $(OUT),--out $(OUT)) $(ARGS)

# The CPU-scale replication study over 3 seeds (each generates its own data) -> runs/replication, REPLICATION.md.
replicate: setup
	$(PY) -m jobs.replicate --command "make replicate $(ARGS)" $(ARGS)

# the probe's spread over probe seeds and the tasks' margins over data seeds -> docs/YARDSTICK.md
yardstick: setup
	$(PY) -m jobs.yardstick $(ARGS)

# V-Pixel teachers under each stage-1 variant and a learning curve, against random init -> docs/STAGE1.md
stage1-variants: setup
	$(PY) -m jobs.stage1_variants $(ARGS)

inspect: setup
	$(PY) -m jobs.inspect_store $(STORE) $(if $(JSON),--json) $(if $(VERIFY),--verify)

plan: setup
	$(PY) -m jobs.plan $(if $(PRESET),--preset $(PRESET)) $(if $(JSON),--json) $(ARGS)

bench: setup $(DEFAULT_DATA)/labels.json
	$(PY) -m jobs.bench --config $(CONFIG) --data $(DEFAULT_DATA) $(ARGS)

demo: setup
	$(PY) -m jobs.demo --config $(CONFIG) --data $(DATA) --run $(RUN) $(ARGS)

# the whole demo as a test: its control student keeps >= half of its teacher's motion margin (CI runs it after make test)
demo-check: setup
	$(PY) -m pytest -q --run-demo -m demo tests

# make gpu-wheels PY=3.12 (on a machine with a package index): the light wheels a GPU node's Python
# (that version) may miss, the embedded dataset, the tests' dataset and the bench's 360p video, in
# GPU_BUNDLE (<= 40 MB, checked; the wheels take most of it, so the chain's dataset is 128 + 64 clips). PY=3.x names the node's Python version here, not an interpreter.
GPU_BUNDLE ?= gpu-bundle
GPU_PYVER  ?= 3.12
ifneq ($(filter 3.%,$(PY)),)
override GPU_PYVER := $(PY)
override PY := .venv/bin/python
endif
GPU_PLATFORMS = $(foreach p,manylinux1 manylinux2010 manylinux2014 manylinux_2_5 manylinux_2_17 manylinux_2_27 manylinux_2_28,--platform $(p)_x86_64)
gpu-wheels: setup
	rm -rf $(GPU_BUNDLE) && mkdir -p $(GPU_BUNDLE)
	$(PY) -m pip download -q --only-binary=:all: --no-deps -c constraints.txt --python-version $(GPU_PYVER) --implementation cp \
	    $(GPU_PLATFORMS) -d $(GPU_BUNDLE) $$($(PY) -m jobs.gpu_bundle list)
	$(PY) -m jobs.data --data $(GPU_BUNDLE)/data --num-train 128 --num-val 64 --samples-per-shard 32 --no-progress
	$(PY) -c "from tests.conftest import TEST_DIGITS; from pipeline.digits import write_moving_digits as w; \
	    w('$(GPU_BUNDLE)/test-digits', **TEST_DIGITS, progress=False)"
	$(PY) -c "from experiments.bench import real_resolution_video as v; open('$(GPU_BUNDLE)/video-360p.mp4', 'wb').write(v())"
	$(PY) -m jobs.gpu_bundle size $(GPU_BUNDLE)

# make gpu-check [GPU_PY=python3] on a GPU node, offline: the bundle's wheels this Python lacks go to
# a folder of their own (never its site-packages), then jobs/gpu_check.py -> GPU_CHECK.md, GPU_CHECK.json.
GPU_PY   ?= python3
GPU_SITE ?= /tmp/salt-gpu-site
gpu-check:
	test -d $(GPU_BUNDLE) || { echo "no $(GPU_BUNDLE)/: run make gpu-wheels PY=<the node's Python version> where there is a package index, and copy it here"; exit 2; }
	$(GPU_PY) -m jobs.gpu_bundle node
	rm -rf $(GPU_SITE) && mkdir -p $(GPU_SITE)
	missing="$$($(GPU_PY) -m jobs.gpu_bundle missing)"; test -z "$$missing" || \
	    $(GPU_PY) -m pip install -q --no-index --no-deps --find-links $(GPU_BUNDLE) --target $(GPU_SITE) $$missing
	PYTHONPATH=$(CURDIR):$(GPU_SITE) OMP_WAIT_POLICY=$(OMP_WAIT_POLICY) $(GPU_PY) -m jobs.gpu_check --bundle $(GPU_BUNDLE) $(ARGS)

# Two pytest workers, each taking whole test files (--dist loadfile: a file's module fixtures are
# built once); much of the suite waits on subprocesses, Ray and SLURM rather than computing.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

clean:
	rm -rf runs

"""The import graph reads top-down: salt/ never reaches pipeline/, experiments/ or jobs/; pipeline/, the
data and store layer, never reaches an experiment driver or training code; no module reaches itself
(docs/design.md, "Layers")."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("salt", "pipeline", "experiments", "jobs")
EXPERIMENTS = sorted(p.stem for p in Path(ROOT, "experiments").glob("*.py") if p.stem != "__init__")


def module_file(name: str) -> Path | None:
    base = Path(ROOT, *name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache  # the files do not change during a run; each test walks the graph again
def imports_of(name: str) -> frozenset[str]:
    """The repository modules `name` imports, at any depth of its code (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(module_file(name).read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return frozenset(m for m in found if m.split(".")[0] in PACKAGES and module_file(m))


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


# every module under pipeline/ (its packages' too) is the data/store layer; the drivers live in experiments/
DATA_LAYER = sorted(module_name(p).removeprefix("pipeline.") for p in Path(ROOT, "pipeline").rglob("*.py") if p.stem != "__init__")
PROJECT_MODULES = sorted(module_name(p) for top in PACKAGES for p in Path(ROOT, top).rglob("*.py"))


def reachable(name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        for dep in imports_of(todo.pop()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_the_layers_are_the_expected_modules():
    # a module moving between the layers is a decision: this list makes it visible in review
    assert DATA_LAYER == sorted(["cluster", "dataset_index", "deadline_pool", "digits", "export", "extract", "features", "feeding", "fs",
                                  "ingest", "labelled", "labelmap", "loaders", "shards", "store.layout",
                                  "store.parts", "store.pixel_codec", "store.provenance", "store.read", "store.verify",
                                  "store.write", "teacher_cache", "video"])
    assert EXPERIMENTS == sorted(["bench", "bench_ingest", "bench_probe", "bench_report", "bench_scale", "controls", "demo", "planning",
                                  "pool", "probing", "replication", "replication_report", "runs", "selection", "slurm", "stage1",
                                  "stats", "sweep", "yardstick"])


@pytest.mark.parametrize("module", DATA_LAYER)
def test_data_and_store_layer_reaches_no_driver_and_no_training_code(module):
    bad = sorted(m for m in reachable(f"pipeline.{module}")
                 if m.startswith(("salt.train", "jobs", "experiments")))
    assert not bad, f"pipeline.{module} reaches {bad}"


def test_salt_never_imports_pipeline_experiments_or_jobs():
    for name in (m for m in PROJECT_MODULES if m.startswith("salt")):
        assert not [m for m in imports_of(name) if m.startswith(("pipeline", "experiments", "jobs"))], name


@pytest.mark.parametrize("module", PROJECT_MODULES)
def test_no_module_imports_itself_through_others(module):
    # Function-level imports count: a deferred import only hides a cycle until that function runs,
    # and the two modules still cannot be read, tested or moved one without the other.
    back = sorted(dep for dep in imports_of(module) if module in reachable(dep) | {dep})
    assert not back, f"{module} imports {back}, which import {module} back"

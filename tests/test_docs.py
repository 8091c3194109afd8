"""The prose names code that exists: every `path/to/module.py: name`, `package.module: name`,
`package.module.Name` and `tests/test_x.py::test_name` in docs/*.md and README.md resolves to a module of
this repository and a function, class, constant or method in it (read with ast: nothing is imported)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_layers import module_file

DOCS = [*sorted(str(p.relative_to(ROOT)) for p in Path(ROOT, "docs").glob("*.md")), "README.md"]
PACKAGES = r"(?:salt|pipeline|experiments|jobs|tests)"
# inside backticks: a file path or dotted module, ": ", then a (possibly dotted) name; a call's
# arguments and anything after the name are not part of it
PATH_REF = re.compile(rf"`({PACKAGES}(?:/\w+)*\.py|{PACKAGES}(?:\.\w+)+): ([A-Za-z_][\w.]*)")
DOTTED_REF = re.compile(rf"`({PACKAGES}(?:\.\w+)+)`")  # salt.flops.CostInputs, or a module alone
TEST_REF = re.compile(r"`(tests/\w+\.py)::(\w+)")
FILE_REF = re.compile(rf"`({PACKAGES}(?:/\w+)*\.py)`")  # a module alone


def defined_names(body: list[ast.stmt]) -> dict[str, ast.AST]:
    """What a module or class body binds at its top level: defs, classes, assignments, imports."""
    names: dict[str, ast.AST] = {}
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            names |= {t.id: node for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0]: node for a in node.names}
    return names


def resolves(module: str, name: str) -> bool:
    """module (dotted) has `name`, a dotted path through classes (Class.method) allowed."""
    path = module_file(module)
    if path is None:
        return False
    scope: ast.AST = ast.parse(path.read_text())
    for part in filter(None, name.split(".")):
        found = defined_names(getattr(scope, "body", [])).get(part)
        if found is None:
            return False
        scope = found
    return True


def references(text: str) -> list[tuple[str, str]]:
    """(module, name) pairs the text names; name "" for a bare module."""
    refs = [(m.group(1).removesuffix(".py").replace("/", "."), m.group(2)) for m in PATH_REF.finditer(text)]
    refs += [(m.group(1).removesuffix(".py").replace("/", "."), m.group(2)) for m in TEST_REF.finditer(text)]
    refs += [(m.group(1).removesuffix(".py").replace("/", "."), "") for m in FILE_REF.finditer(text)]
    for m in DOTTED_REF.finditer(text):
        parts = m.group(1).split(".")
        # the longest prefix that is a module, the rest a name in it
        cut = next((i for i in range(len(parts), 0, -1) if module_file(".".join(parts[:i]))), len(parts))
        if cut >= 2:  # a name straight under a package is a key, not code: checkpoints' header `salt.meta`
            refs.append((".".join(parts[:cut]), ".".join(parts[cut:])))
    return refs


def test_the_reference_pattern_reads_each_form():
    text = ("`pipeline/video.py: load_clips` and `salt/train/loop.py: train_step(state,\nbatch)`, "
            "`salt.seeds: sample_rng`, `pipeline.store.read.TargetStore.pixels`, `tests/test_docs.py::test_x`, "
            "`model.pixel_norm: false`, `probe: true`, `salt.meta`, `jobs/plan.py`")
    assert references(text) == [("pipeline.video", "load_clips"), ("salt.train.loop", "train_step"),
                                ("salt.seeds", "sample_rng"), ("tests.test_docs", "test_x"), ("jobs.plan", ""),
                                ("pipeline.store.read", "TargetStore.pixels")]
    assert resolves("pipeline.store.read", "TargetStore.pixels") and resolves("pipeline.video", "")
    assert not resolves("pipeline.video", "load_clipz") and not resolves("pipeline.vide", "")


@pytest.mark.parametrize("doc", DOCS)
def test_every_code_reference_in_the_docs_resolves(doc):
    broken = sorted({f"{m}: {n}" for m, n in references(Path(ROOT, doc).read_text()) if not resolves(m, n)})
    assert not broken, f"{doc} names code that does not exist: {broken}"

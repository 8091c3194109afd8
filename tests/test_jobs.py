"""Jobs from the command line: expected bad input ends in one line on stderr and exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.parametrize(
    "argv, says",
    [
        (["jobs.teacher", "--data", "/nonexistent"], "/nonexistent"),
        (["jobs.extract_targets", "--teacher", "hf-videomae:some-org/some-model"], "looks like a hub name"),
        (["jobs.student", "--store", "/nonexistent/store"], "/nonexistent/store is not a target store"),
    ],
)
def test_bad_input_ends_in_one_line(argv, says, digits, tmp_path):
    data = [] if "--data" in argv else ["--data", digits]
    done = subprocess.run([sys.executable, "-m", *argv, *data, "--run", str(tmp_path / "run")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], done.stderr[-2000:]

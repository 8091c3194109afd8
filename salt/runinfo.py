"""What every output folder gets: the resolved config and the code version that wrote it."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

import yaml

from salt.config import Config, to_dict

PACKAGES = ("torch", "numpy", "webdataset", "zarr", "numcodecs", "decord", "ray", "pyarrow", "safetensors")


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def run_info_files(cfg: Config, **extra: str) -> dict[str, str]:
    """File name -> text: the resolved config and the code version that uses it."""
    info = {"git_commit": git_commit(), "packages": package_versions(), **extra}
    return {"config.yaml": yaml.safe_dump(to_dict(cfg), sort_keys=False), "run_info.yaml": yaml.safe_dump(info, sort_keys=False)}


def write_run_info(out_dir: str | Path, cfg: Config, **extra: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in run_info_files(cfg, **extra).items():
        (out / name).write_text(text)

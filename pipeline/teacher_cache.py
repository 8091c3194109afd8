"""Teacher specs whose folder lives at a URL: extraction's driver and actors load them from a local copy."""

from __future__ import annotations

import os
import tempfile

import torch

from pipeline import fs
from salt.config import Config
from salt.models.teachers import FrozenTeacher, load_teacher

# where each machine keeps its copy of a teacher that lives at a URL
TEACHER_CACHE = os.path.join(tempfile.gettempdir(), "salt-teachers")


def local_teacher(spec: str) -> str:
    """The teacher spec with its folder on this machine's disk. A folder at a URL (s3://...,
    gs://..., also behind an adapter: hf-videomae:s3://...) is copied once per machine into
    TEACHER_CACHE; the driver and every actor call this on their own node."""
    spec = str(spec)
    prefix, sep, _ = spec.partition(":")
    adapter = prefix + sep if sep and prefix.startswith("hf-") else ""
    folder = spec[len(adapter):]
    if "://" not in folder:
        return spec
    if not fs.is_remote(folder):  # file://
        return adapter + fs.resolve(folder)[1]
    return adapter + fs.local_copy(folder, TEACHER_CACHE)


def load_any_teacher(spec: str, cfg: Config, device: torch.device | str = "cpu") -> FrozenTeacher:
    """load_teacher for a spec whose folder may be a URL; provenance names the URL."""
    local = local_teacher(spec)
    teacher = load_teacher(local, cfg, device)
    if local != str(spec):
        teacher.source = str(spec)
    return teacher


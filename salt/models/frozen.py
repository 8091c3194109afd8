"""The frozen-teacher seam: a clip in, one token per grid position out.

Extraction, the cached-equals-online test and the benchmark see only `FrozenTeacher`:
`teacher(clips)` takes clips as every stage loads them ([B, 3, T, H, W], normalised
with `data.mean`/`data.std`) and returns [B, N, width] in the (t, h, w) token order of
`salt.models.vit`; `grid` and `width` describe that output; `identity()` is what the
target store records as provenance. Each adapter converts our clips to its model's
input convention itself. The adapters and the spec -> adapter registry are in
`salt.models.teachers` (which imports the adapters; they import only this module).

An optional fixed random projection (`extract.projection`) maps the teacher's width to
`extract.projection_dim`: a seeded matrix, the same in every process that builds it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from salt.config import Config
from salt.models.factory import config_grid


class TeacherSpecError(ValueError):
    """A teacher spec or folder that cannot be used; raised before any data is read."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(files: list[Path]) -> str:
    """One file: its sha256 (what `sha256sum` prints). Several (sharded weights): a digest of their names and digests."""
    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("".join(f"{f.name} {file_sha256(f)}\n" for f in sorted(files)).encode()).hexdigest()


def json_sha256(value: dict) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def projection_matrix(kind: str, width: int, dim: int, seed: int) -> torch.Tensor:
    """[width, dim] float32, a pure function of its arguments (CPU generator, float64 maths).

    orthogonal: orthonormal columns (QR of a Gaussian, signs fixed by R's diagonal), keeps
    distances within the projected subspace; gaussian: N(0, 1/dim) entries (Johnson-Lindenstrauss)."""
    g = torch.randn(width, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if kind == "gaussian":
        return (g / dim**0.5).float()
    if dim > width:
        raise TeacherSpecError(f"extract.projection_dim={dim} exceeds the teacher width {width}: an orthogonal projection cannot widen")
    q, r = torch.linalg.qr(g)
    return (q * torch.sign(torch.diagonal(r))).float()


class FrozenTeacher(nn.Module):
    """The seam. Subclasses set the fields in __init__ and implement `tokens`."""

    adapter: str
    model_class: str
    grid: tuple[int, int, int]
    native_width: int
    input_convention: str
    source: str | None = None  # the URL the weights were copied from, if any (provenance names it)

    def __init__(self):
        super().__init__()
        self.projection_spec: dict | None = None
        self.register_buffer("projection", None, persistent=False)

    def tokens(self, clips: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        x = self.tokens(clips)
        return x if self.projection is None else x @ self.projection.to(x.dtype)

    @property
    def width(self) -> int:
        return self.native_width if self.projection is None else self.projection.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def project(self, kind: str, dim: int, seed: int) -> None:
        matrix = projection_matrix(kind, self.native_width, dim, seed)
        self.projection = matrix
        self.projection_spec = {
            "kind": kind, "dim": dim, "seed": seed, "from_width": self.native_width,
            "sha256": hashlib.sha256(matrix.numpy().tobytes()).hexdigest(),
        }

    def weight_files(self) -> list[Path]:
        raise NotImplementedError

    def model_config(self) -> dict:
        raise NotImplementedError

    def identity(self) -> dict:
        """Provenance: which weights, which architecture, which projection. `sha256` and `width`
        are what a student run compares when it resumes on a store."""
        files = self.weight_files()
        return {
            "adapter": self.adapter,
            "model_class": self.model_class,
            # where the weights came from: the URL a local copy was made of, else the files
            "checkpoint": self.source or (str(files[0].resolve()) if len(files) == 1 else [str(f.resolve()) for f in files]),
            "sha256": weights_sha256(files),
            "config_sha256": json_sha256(self.model_config()),
            "width": self.width,
            "native_width": self.native_width,
            "grid": list(self.grid),
            "input": self.input_convention,
            "projection": self.projection_spec,
        }


def check_grid(spec: str, grid: tuple[int, int, int], cfg: Config) -> None:
    wanted = config_grid(cfg)
    if tuple(grid) != wanted:
        raise TeacherSpecError(
            f"teacher {spec} has token grid {'x'.join(map(str, grid))} but this config's is "
            f"{'x'.join(map(str, wanted))} (data.frames={cfg.data.frames} / model.tubelet={cfg.model.tubelet}, "
            f"data.crop_size={cfg.data.crop_size} / model.patch_size={cfg.model.patch_size}): set those keys to the teacher's"
        )

"""Frozen teachers behind one seam: a clip in, one token per grid position out.

Extraction, the cached-equals-online test and the benchmark see only `FrozenTeacher`:
`teacher(clips)` takes clips as every stage loads them ([B, 3, T, H, W], normalised
with `data.mean`/`data.std`) and returns [B, N, width] in the (t, h, w) token order of
`salt.models.vit`; `grid` and `width` describe that output; `identity()` is what the
target store records as provenance. Each adapter converts our clips to its model's
input convention itself.

A teacher spec picks the adapter (README, "Any frozen teacher"):
- a run folder of this project (`make teacher`): the V-Pixel encoder;
- `hf-videomae:<folder>`: transformers `VideoMAEModel` from a `save_pretrained` folder;
- `hf-vjepa2:<folder>`: transformers `VJEPA2Model`, encoder only.

An optional fixed random projection (`extract.projection`) maps the teacher's width to
`extract.projection_dim`: a seeded matrix, the same in every process that builds it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from salt.checkpoint import WEIGHTS, load_module_weights, read_meta
from salt.config import Config, to_dict
from salt.models.factory import build_encoder, config_grid


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


# what a run folder's teacher must be given as it was trained: the clips' geometry, sampling and
# normalisation (frame_step only matters when clips are not sampled by data.fps)
TRAINED_INPUT = (("data", "frames"), ("data", "crop_size"), ("model", "patch_size"), ("model", "tubelet"),
                 ("data", "fps"), ("data", "mean"), ("data", "std"))


class RunFolderTeacher(FrozenTeacher):
    """A V-Pixel teacher trained by this project: the encoder of a run folder's checkpoint."""

    adapter = "salt-run"
    model_class = "VideoViT"
    input_convention = "[B, 3, T, H, W], normalised with data.mean/std (the project's own)"

    def __init__(self, run_dir: str | Path, cfg: Config):
        super().__init__()
        self.run_dir = Path(run_dir)
        if not (self.run_dir / WEIGHTS).is_file():
            raise TeacherSpecError(
                f"teacher {run_dir}: no {WEIGHTS} (want a teacher run folder, hf-videomae:<folder> or hf-vjepa2:<folder>)"
            )
        self.meta = read_meta(self.run_dir)
        if self.meta.get("role") != "teacher":
            raise TeacherSpecError(f"{run_dir} holds a {self.meta.get('role')!r} checkpoint, not a teacher")
        self.check_trained_input(cfg)
        self.encoder = build_encoder(cfg, self.meta["encoder"]["size"])
        self.encoder.load_state_dict(load_module_weights(self.run_dir, "encoder"))
        self.grid, self.native_width = self.encoder.grid, self.encoder.width

    def check_trained_input(self, cfg: Config) -> None:
        """The config's clips must be the ones the teacher was trained on. The encoder is built
        from the config, and its rotary positions fit any grid, so check_grid cannot catch a
        teacher run on other frames, crops or normalisation: it would write wrong targets."""
        trained, asked, defaults = self.meta["config"], to_dict(cfg), to_dict(Config())
        keys = TRAINED_INPUT if asked["data"]["fps"] else (*TRAINED_INPUT, ("data", "frame_step"))
        for section, name in keys:
            had = trained.get(section, {}).get(name, defaults[section][name])  # a key newer than the checkpoint: its default
            if had != asked[section][name]:
                raise TeacherSpecError(
                    f"teacher {self.run_dir} was trained with {section}.{name}={had!r}, but this config has "
                    f"{section}.{name}={asked[section][name]!r}: set it to the teacher's"
                )

    def tokens(self, clips: torch.Tensor) -> torch.Tensor:
        return self.encoder(clips)

    def weight_files(self) -> list[Path]:
        return [self.run_dir / WEIGHTS]

    def model_config(self) -> dict:
        return self.meta["config"]["model"]

    def identity(self) -> dict:
        return super().identity() | {
            "size": self.meta["encoder"]["size"],
            "step": self.meta["step"],
            "model": self.meta["config"]["model"],
        }


def check_grid(spec: str, grid: tuple[int, int, int], cfg: Config) -> None:
    wanted = config_grid(cfg)
    if tuple(grid) != wanted:
        raise TeacherSpecError(
            f"teacher {spec} has token grid {'x'.join(map(str, grid))} but this config's is "
            f"{'x'.join(map(str, wanted))} (data.frames={cfg.data.frames} / model.tubelet={cfg.model.tubelet}, "
            f"data.crop_size={cfg.data.crop_size} / model.patch_size={cfg.model.patch_size}): set those keys to the teacher's"
        )


def load_teacher(spec: str | Path, cfg: Config, device: torch.device | str = "cpu") -> FrozenTeacher:
    """The teacher a spec names, checked against the config's token grid, projected if the
    config asks, in eval mode with gradients off."""
    from salt.models import hf

    prefix, sep, folder = str(spec).partition(":")
    if sep and prefix in hf.ADAPTERS:
        teacher: FrozenTeacher = hf.ADAPTERS[prefix](folder, cfg)
    elif sep and prefix.startswith("hf-"):
        raise TeacherSpecError(f"teacher spec {spec!r}: unknown adapter {prefix!r}; known: {', '.join(hf.ADAPTERS)}")
    else:
        teacher = RunFolderTeacher(spec, cfg)
    check_grid(str(spec), teacher.grid, cfg)
    if cfg.extract.projection != "none":
        teacher.project(cfg.extract.projection, cfg.extract.projection_dim, cfg.extract.projection_seed)
    return teacher.to(device).eval().requires_grad_(False)

"""Which frozen teacher a spec names: the adapter registry, and the adapter of this project's run folders.

The seam every adapter implements is `salt.models.frozen.FrozenTeacher`. A spec picks the
adapter (README, "Any frozen teacher"):
- a run folder of this project (`make teacher`): the V-Pixel encoder;
- `hf-videomae:<folder>`: transformers `VideoMAEModel` from a `save_pretrained` folder;
- `hf-vjepa2:<folder>`: transformers `VJEPA2Model`, encoder only.
Both HF adapters run at the config's `data.frames` x `data.crop_size` where the model can take it
(`salt.models.hf`: V-JEPA 2 at any, VideoMAE at its own crop); a run folder only at what it was trained on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from salt.checkpoint import WEIGHTS, load_module_weights, read_meta
from salt.config import Config, to_dict
from salt.models.factory import build_encoder
from salt.models.frozen import FrozenTeacher, TeacherSpecError, check_grid
from salt.models.hf import VideoMAETeacher, VJEPA2Teacher

# spec prefix -> adapter; a spec without a known prefix is a run folder (RunFolderTeacher)
ADAPTERS = {cls.adapter: cls for cls in (VideoMAETeacher, VJEPA2Teacher)}


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


def load_teacher(spec: str | Path, cfg: Config, device: torch.device | str = "cpu") -> FrozenTeacher:
    """The teacher a spec names, checked against the config's token grid, projected if the
    config asks, in eval mode with gradients off."""
    prefix, sep, folder = str(spec).partition(":")
    if sep and prefix in ADAPTERS:
        teacher: FrozenTeacher = ADAPTERS[prefix](folder, cfg)
    elif sep and prefix.startswith("hf-"):
        raise TeacherSpecError(f"teacher spec {spec!r}: unknown adapter {prefix!r}; known: {', '.join(ADAPTERS)}")
    else:
        teacher = RunFolderTeacher(spec, cfg)
    check_grid(str(spec), teacher.grid, cfg)
    if cfg.extract.projection != "none":
        teacher.project(cfg.extract.projection, cfg.extract.projection_dim, cfg.extract.projection_seed)
    return teacher.to(device).eval().requires_grad_(False)

"""Hugging Face video encoders as frozen teachers (transformers, imported only when used).

Both adapters read a local `save_pretrained` folder: safetensors weights only (a folder
with only pickled weights is refused: unpickling runs code), never the network
(`local_files_only`). Input convention of both models: [B, T, C, H, W], RGB, normalised
with the folder's preprocessor mean/std (ImageNet's when the folder has no preprocessor
config). Our clips are [B, C, T, H, W] normalised with data.mean/std: the adapter undoes
ours, applies theirs (skipped when they are equal) and moves the channel axis.

Geometry (README, "Any frozen teacher"): the clip's frame count and crop size are the config's
(`data.frames`, `data.crop_size`) wherever the model can take them, and the model is built at
that geometry (`from_pretrained` with the config's keys overridden); `identity()` records it and
the checkpoint's native one, so store.json says both.
- V-JEPA 2 has no position table: RoPE angles are computed from each token's (t, h, w), and
  transformers derives (h, w) from the token index with the *config's* crop_size. Any frame
  count divisible by the tubelet and any crop divisible by the patch size is accepted (V-JEPA
  2's own evaluations run its encoders at other frame counts and resolutions); run without the
  override, transformers would silently give a larger crop's tokens the wrong rows and columns.
- VideoMAE adds a fixed 1-D sinusoid table over the flattened (t, h, w) token index, sized at
  init: another frame count keeps every token's row (t * h * w + ...) for the crop it was built
  for, but another crop would hand tokens the rows of other positions (transformers refuses
  that input too). Frames: any multiple of the tubelet; crop: the checkpoint's only.
Past the checkpoint's frame count (or, for V-JEPA 2, its crop) a model sees positions it never
trained with; that is allowed, and store.json shows it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from salt.config import Config
from salt.models.frozen import FrozenTeacher, TeacherSpecError, check_grid

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")
PREPROCESSOR_FILES = ("video_preprocessor_config.json", "preprocessor_config.json")


def checked_folder(adapter: str, folder: str) -> tuple[Path, list[Path]]:
    """The folder and its safetensors files, or an error that says what to do."""
    path = Path(folder)
    if not path.is_dir():
        if re.fullmatch(r"[\w.-]+/[\w.-]+", folder) and not path.exists():
            raise TeacherSpecError(
                f"{adapter}:{folder}: no such folder. It looks like a hub name, and nothing is downloaded at run time: on a "
                f"machine with internet run `huggingface-cli download {folder} --local-dir <dir>`, copy <dir> here and "
                f"pass {adapter}:<dir>"
            )
        raise TeacherSpecError(f"{adapter}:{folder}: no such folder (want a transformers save_pretrained folder)")
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for pattern in PICKLED for p in path.glob(pattern))
        if pickled:
            raise TeacherSpecError(
                f"{adapter}:{folder} holds only pickled weights ({', '.join(pickled)}), which are never loaded here "
                f"(unpickling can run code). Convert them once, on a machine you trust: python -c \"from transformers import "
                f"AutoModel; AutoModel.from_pretrained('{folder}').save_pretrained('{folder}', safe_serialization=True)\""
            )
        raise TeacherSpecError(f"{adapter}:{folder}: no *.safetensors weights")
    if not (path / "config.json").is_file():
        raise TeacherSpecError(f"{adapter}:{folder}: no config.json (want a transformers save_pretrained folder)")
    return path, weights


def preprocessor_stats(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    for name in PREPROCESSOR_FILES:
        if (folder / name).is_file():
            pre = json.loads((folder / name).read_text())
            if "image_mean" in pre and "image_std" in pre:
                return tuple(pre["image_mean"]), tuple(pre["image_std"])
    return IMAGENET_MEAN, IMAGENET_STD


class HFVideoTeacher(FrozenTeacher):
    """A transformers video encoder; subclasses name the class and the config keys it reads."""

    model_type: str  # config.json's model_type this adapter accepts
    frames_key: str  # config.json keys of the input frames and (square) size
    size_key: str
    input_name: str  # forward()'s argument for the video
    call_kwargs: dict
    positions: str  # how the model encodes token positions (provenance; what limits the geometry)

    def __init__(self, folder: str, cfg: Config):
        super().__init__()
        self.folder, self.weights = checked_folder(self.adapter, folder)
        config = json.loads((self.folder / "config.json").read_text())
        if config.get("model_type") != self.model_type:
            raise TeacherSpecError(
                f"{self.adapter}:{folder} holds a {config.get('model_type')!r} model, not {self.model_type!r}"
            )
        self.config = config
        self.native_geometry = {"frames": int(config[self.frames_key]), "crop_size": int(config[self.size_key])}
        self.geometry = {"frames": cfg.data.frames, "crop_size": cfg.data.crop_size}
        self.check_geometry()  # before the (slow) weights load, as check_grid
        self.grid, self.native_width = self.model_grid(), int(config["hidden_size"])
        check_grid(f"{self.adapter}:{folder}", self.grid, cfg)
        self.model = self.load(str(self.folder))
        mean, std = preprocessor_stats(self.folder)
        self.renormalise = (tuple(cfg.data.mean), tuple(cfg.data.std)) != (mean, std)
        shape = (1, 3, 1, 1, 1)
        self.register_buffer("ours", torch.tensor([cfg.data.mean, cfg.data.std]).view(2, *shape), persistent=False)
        self.register_buffer("theirs", torch.tensor([mean, std]).view(2, *shape), persistent=False)
        self.input_convention = f"[B, T, C, H, W], RGB, normalised with mean {list(mean)} std {list(std)}"

    def in_hf_convention(self, clips: torch.Tensor) -> torch.Tensor:
        """Clips [B, C, T, H, W] normalised with data.mean / data.std -> the checkpoint's own normalisation, [B, T, C, H, W]."""
        if self.renormalise:
            pixels = clips * self.ours[1] + self.ours[0]
            clips = (pixels - self.theirs[0]) / self.theirs[1]
        return clips.transpose(1, 2)  # [B, C, T, H, W] -> [B, T, C, H, W]

    def load(self, folder: str):
        import transformers

        # float32 whatever the weights were saved in: transformers would keep a bf16 checkpoint bf16;
        # the frame count and crop are the config's (check_geometry allowed them), so the model
        # computes its positions for the clips it is given
        return getattr(transformers, self.model_class).from_pretrained(
            folder, local_files_only=True, use_safetensors=True, dtype=torch.float32,
            **{self.frames_key: self.geometry["frames"], self.size_key: self.geometry["crop_size"]},
        )

    def model_grid(self) -> tuple[int, int, int]:
        c, side = self.config, self.geometry["crop_size"] // self.config["patch_size"]
        return self.geometry["frames"] // c["tubelet_size"], side, side

    def tokens(self, clips: torch.Tensor) -> torch.Tensor:
        return self.model(**{self.input_name: self.in_hf_convention(clips)}, **self.call_kwargs).last_hidden_state

    def geometry_problem(self, frames: int, size: int) -> str | None:
        """Why the model cannot take `frames` frames of `size` px (None: it can)."""
        tubelet, patch = self.config["tubelet_size"], self.config["patch_size"]
        if frames % tubelet or size % patch:
            return f"takes a multiple of its tubelet_size={tubelet} frames and of its patch_size={patch} pixels"
        return None

    def check_geometry(self) -> None:
        frames, size = self.geometry["frames"], self.geometry["crop_size"]
        problem = self.geometry_problem(frames, size)
        if problem:
            native = self.native_geometry
            raise TeacherSpecError(
                f"{self.adapter}:{self.folder} cannot run at data.frames={frames}, data.crop_size={size} (its config: "
                f"{native['frames']} frames of {native['crop_size']} px): it {problem}"
            )

    def weight_files(self) -> list[Path]:
        return self.weights

    def model_config(self) -> dict:
        """The checkpoint's config.json as saved (its native geometry): config_sha256 names the checkpoint."""
        return {k: v for k, v in self.config.items() if k != "transformers_version"}

    def identity(self) -> dict:
        return super().identity() | {
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "geometry": dict(self.geometry),  # what it ran at: the store's clips
            "native_geometry": dict(self.native_geometry),  # the checkpoint config's
            "positions": self.positions,
        }


class VideoMAETeacher(HFVideoTeacher):
    """VideoMAE's encoder: the last hidden state (no pooling, no classifier)."""

    adapter, model_class, model_type = "hf-videomae", "VideoMAEModel", "videomae"
    frames_key, size_key, input_name, call_kwargs = "num_frames", "image_size", "pixel_values", {}
    positions = "fixed 1-D sinusoid table over the flattened (t, h, w) token index, sized at init"

    def geometry_problem(self, frames: int, size: int) -> str | None:
        native = self.native_geometry["crop_size"]
        if size != native:
            return (f"takes only its own {native} px crops: its position table is a 1-D sinusoid over the flattened token "
                    f"index, sized for that crop, so another crop would give tokens the rows of other positions")
        return super().geometry_problem(frames, size)


class VJEPA2Teacher(HFVideoTeacher):
    """V-JEPA 2's encoder (its final layer norm included); the predictor is never run."""

    adapter, model_class, model_type = "hf-vjepa2", "VJEPA2Model", "vjepa2"
    frames_key, size_key, input_name, call_kwargs = "frames_per_clip", "crop_size", "pixel_values_videos", {"skip_predictor": True}
    positions = "3-D RoPE from each token's (t, h, w): no position parameters"


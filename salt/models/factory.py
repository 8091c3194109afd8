"""Models from a config: the one place that maps config keys to constructor arguments."""

from __future__ import annotations

from salt.config import Config
from salt.models.predictor import Predictor
from salt.models.vit import VideoViT, token_grid


def config_grid(cfg: Config) -> tuple[int, int, int]:
    """The token grid (t, h, w) a config's clips give: data.frames / model.tubelet, data.crop_size / model.patch_size."""
    return token_grid(cfg.data.frames, cfg.data.crop_size, cfg.model.tubelet, cfg.model.patch_size)


def build_encoder(cfg: Config, size: str) -> VideoViT:
    return VideoViT(
        size,
        frames=cfg.data.frames,
        crop_size=cfg.data.crop_size,
        patch_size=cfg.model.patch_size,
        tubelet=cfg.model.tubelet,
        attention_backend=cfg.model.attention,
        rope_pairing=cfg.model.rope_pairing,
    )


def build_predictor(cfg: Config, encoder: VideoViT, out_dim: int) -> Predictor:
    return Predictor(
        encoder_width=encoder.width,
        out_dim=out_dim,
        grid=encoder.grid,
        width=cfg.model.predictor_width,
        depth=cfg.model.predictor_depth,
        heads=cfg.model.predictor_heads,
        attention_backend=cfg.model.attention,
        rope_pairing=cfg.model.rope_pairing,
    )

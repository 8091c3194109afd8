"""Where models run and at what precision: shared by training, extraction and the benchmark."""

from __future__ import annotations

import contextlib

import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()  # CPU runs in fp32: bf16 matmuls there are slow and lossy

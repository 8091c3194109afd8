"""The memory and speed switches of a training run, both off by default (`<stage>.activation_checkpointing`,
`<stage>.compile`), applied to the encoder and predictor before DDP wraps them.

- Activation checkpointing: every encoder and predictor block keeps only its input and runs again
  in the backward pass (salt/models/vit.py: run_blocks). The forward is unchanged, so losses are
  the same; memory for activations drops to about one block's, for about a third more compute.
- torch.compile: each block is compiled in place (`Module.compile`, so checkpoint names do not
  change), by COMPILE_BACKEND. Compiled blocks use SDPA attention: `model.attention=auto` becomes
  sdpa (xformers' packed path reads sequence lengths on the host, which breaks a graph), and an
  explicit `model.attention=xformers` is refused.
"""

from __future__ import annotations

from torch import nn

from salt.config import TrainConfig

COMPILE_BACKEND = "inductor"  # the tests use aot_eager on a CPU, where inductor's C++ build takes minutes


def block_owners(*modules: nn.Module) -> list[nn.Module]:
    """The modules that run a list of transformer blocks (VideoViT, Predictor)."""
    return [m for m in modules if hasattr(m, "checkpoint_blocks")]


def apply_switches(encoder: nn.Module, predictor: nn.Module, cfg: TrainConfig) -> None:
    owners = block_owners(encoder, predictor)
    if (cfg.activation_checkpointing or cfg.compile) and len(owners) != 2:
        raise ValueError("activation_checkpointing and compile need the project's encoder and predictor (blocks to switch)")
    for owner in owners:
        owner.checkpoint_blocks = cfg.activation_checkpointing
        if cfg.compile:
            for block in owner.blocks:
                if block.attention_backend == "xformers":
                    raise ValueError("compile=true runs SDPA attention: set model.attention=auto or sdpa, not xformers")
                block.attention_backend = "sdpa"
                block.compile(backend=COMPILE_BACKEND)

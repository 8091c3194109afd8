"""This project's VideoViT under V-JEPA 2's names: pure functions of a state dict, no files
(the export that writes them is `pipeline/export.py`; docs/export.md says how to load each).

Two layouts of the same encoder (facts read from transformers' `models/vjepa2/modeling_vjepa2.py`
and facebookresearch/vjepa2's `src/models/vision_transformer.py`, `src/models/utils/modules.py`):

    VideoViT (salt.models.vit)   transformers VJEPA2Model                V-JEPA 2 VisionTransformer
    patch_embed                  encoder.embeddings.patch_embeddings.proj patch_embed.proj
    blocks.i.norm1               encoder.layer.i.norm1                    blocks.i.norm1
    blocks.i.qkv  [3*D, D]       encoder.layer.i.attention.query/key/value  blocks.i.attn.qkv
                                 (the three thirds of qkv's rows)
    blocks.i.proj                encoder.layer.i.attention.proj           blocks.i.attn.proj
    blocks.i.norm2               encoder.layer.i.norm2                    blocks.i.norm2
    blocks.i.mlp.0 / mlp.2       encoder.layer.i.mlp.fc1 / fc2            blocks.i.mlp.fc1 / fc2
    norm                         encoder.layernorm                        norm

What maps exactly (same arithmetic, tensor for tensor): the Conv3d tubelet embedding, pre-norm
blocks with LayerNorm eps 1e-6, the fused qkv rows laid out [3, heads, head_dim], scaled dot-product
attention (head_dim^-0.5), exact-erf GELU MLP, the final LayerNorm, no position parameters, RoPE
over (t, h, w) on three equal slices of 2 * (head_dim // 6) dims each with theta 10,000, the
remaining dims unrotated, token order (t, h, w).

What differs: how RoPE pairs its frequencies. Both rotate the interleaved pairs (2p, 2p+1) of a
slice of D dims, and both use the frequencies w_k = 10000^(-2k/D), k < D/2. VideoViT gives pair p
one angle, pos * w_p (a true rotation: scores depend on relative position). V-JEPA 2 (its own code
and transformers, which ports it) gives dim j the angle pos * w_(j mod D/2), so the two dims of a
pair turn by different angles (w_(2p) and w_(2p+1) for p < D/4); its code keeps this for
compatibility with its checkpoints and names the repeat_interleave fix in a comment. The two agree
only when D <= 2 (head_dim < 12), and no weight mapping can turn one into the other (V-JEPA 2's
scores are not a function of relative position). `rope_difference` compares the two angle tables
on the encoder's own grid; the export refuses both V-JEPA 2 layouts wherever they differ.
"""

from __future__ import annotations

import torch

from salt.models.vit import VideoViT, vit_size

# VideoViT's names inside blocks.i -> V-JEPA 2's (transformers' in HF_BLOCK)
VJEPA2_BLOCK = {"norm1": "norm1", "qkv": "attn.qkv", "proj": "attn.proj", "norm2": "norm2", "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}
HF_BLOCK = {"norm1": "norm1", "proj": "attention.proj", "norm2": "norm2", "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}
# V-JEPA 2's training checkpoints keep the encoder under its DDP and multi-sequence wrappers; its
# evaluation loader strips "module." and "backbone." before load_state_dict
VJEPA2_PREFIX = "module.backbone."
# V-JEPA 2's named encoder builders: (width, depth, heads, mlp_ratio). vit_gigantic's ratio argument
# is misspelt there ("mpl_ratio", swallowed by **kwargs), so its MLP is 4x wide, not 64/13.
VJEPA2_BUILDERS = {
    "vit_base": (768, 12, 12, 4.0),
    "vit_large": (1024, 24, 16, 4.0),
    "vit_huge": (1280, 32, 16, 4.0),
    "vit_giant": (1408, 40, 16, 48 / 11),
    "vit_giant_xformers": (1408, 40, 22, 48 / 11),
    "vit_gigantic": (1664, 48, 16, 4.0),
    "vit_gigantic_xformers": (1664, 48, 26, 4.0),
}
ROPE_THETA = 10_000.0


class LayoutError(ValueError):
    """A tensor or module this mapping does not know: the layout would not be exact."""


def architecture(encoder: VideoViT) -> dict:
    """What a reader needs to rebuild the encoder: sizes, patching and the geometry it was built for."""
    kt, kh, _ = encoder.patch_embed.kernel_size
    spec = vit_size(encoder.size_name)
    return {
        "size": encoder.size_name,
        "width": encoder.width,
        "depth": len(encoder.blocks),
        "heads": encoder.blocks[0].heads,
        "mlp_ratio": spec.mlp_ratio,
        "mlp_hidden": encoder.blocks[0].mlp[0].out_features,
        "patch_size": kh,
        "tubelet": kt,
        "frames": encoder.grid[0] * kt,
        "crop_size": encoder.grid[1] * kh,
        "grid": list(encoder.grid),
        "layer_norm_eps": encoder.norm.eps,
    }


def _split_key(key: str) -> tuple[int | None, str]:
    """'blocks.3.mlp.0.weight' -> (3, 'mlp.0.weight'); 'norm.bias' -> (None, 'norm.bias')."""
    if key.startswith("blocks."):
        _, i, rest = key.split(".", 2)
        return int(i), rest
    return None, key


def _mapped(rest: str, table: dict[str, str], key: str) -> str:
    module, _, param = rest.rpartition(".")
    if module not in table or param not in ("weight", "bias"):
        raise LayoutError(f"encoder tensor {key!r} has no counterpart in V-JEPA 2's layout")
    return f"{table[module]}.{param}"


def to_vjepa2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """VideoViT's state dict -> V-JEPA 2 VisionTransformer's names (without the wrappers' prefix)."""
    out = {}
    for key, value in state.items():
        block, rest = _split_key(key)
        if block is not None:
            out[f"blocks.{block}.{_mapped(rest, VJEPA2_BLOCK, key)}"] = value
        elif rest in ("patch_embed.weight", "patch_embed.bias"):
            out["patch_embed.proj." + rest.split(".")[1]] = value
        elif rest in ("norm.weight", "norm.bias"):
            out[rest] = value
        else:
            raise LayoutError(f"encoder tensor {key!r} has no counterpart in V-JEPA 2's layout")
    return out


def to_hf_vjepa2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """VideoViT's state dict -> transformers VJEPA2Model's encoder names (qkv split in its three thirds)."""
    out = {}
    for key, value in state.items():
        block, rest = _split_key(key)
        if block is not None:
            prefix = f"encoder.layer.{block}."
            if rest.startswith("qkv."):  # rows [q; k; v], each [heads * head_dim]: transformers' three Linears
                param = rest.split(".")[1]
                for name, third in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                    out[f"{prefix}attention.{name}.{param}"] = third.contiguous()
            else:
                out[prefix + _mapped(rest, HF_BLOCK, key)] = value
        elif rest in ("patch_embed.weight", "patch_embed.bias"):
            out["encoder.embeddings.patch_embeddings.proj." + rest.split(".")[1]] = value
        elif rest in ("norm.weight", "norm.bias"):
            out["encoder.layernorm." + rest.split(".")[1]] = value
        else:
            raise LayoutError(f"encoder tensor {key!r} has no counterpart in VJEPA2Model")
    return out


def hf_vjepa2_config(encoder: VideoViT) -> dict:
    """VJEPA2Config keys for the encoder. The predictor keys size a zero-layer placeholder (V-JEPA 2's
    predictor is not this project's; the export writes it zeroed): `skip_predictor=True` reads the encoder."""
    a = architecture(encoder)
    return {
        "patch_size": a["patch_size"], "tubelet_size": a["tubelet"], "crop_size": a["crop_size"],
        "frames_per_clip": a["frames"], "hidden_size": a["width"], "num_attention_heads": a["heads"],
        "num_hidden_layers": a["depth"], "mlp_ratio": a["mlp_ratio"], "layer_norm_eps": a["layer_norm_eps"],
        "qkv_bias": True, "hidden_act": "gelu", "in_chans": 3, "drop_path_rate": 0.0,
        "pred_hidden_size": a["heads"], "pred_num_attention_heads": 1, "pred_num_hidden_layers": 0,
        "pred_num_mask_tokens": 1,
    }


def vjepa2_builder(encoder: VideoViT) -> dict:
    """How V-JEPA 2's code builds this encoder: a named builder where one has the same shape, and
    always the VisionTransformer arguments (with use_rope=True, LayerNorm eps 1e-6)."""
    a = architecture(encoder)
    shape = (a["width"], a["depth"], a["heads"], a["mlp_ratio"])
    named = [name for name, s in VJEPA2_BUILDERS.items() if s[:3] == shape[:3] and abs(s[3] - shape[3]) < 1e-9]
    return {
        "model_name": named[0] if named else None,
        "vision_transformer": {
            "img_size": a["crop_size"], "num_frames": a["frames"], "patch_size": a["patch_size"],
            "tubelet_size": a["tubelet"], "embed_dim": a["width"], "depth": a["depth"], "num_heads": a["heads"],
            "mlp_ratio": a["mlp_ratio"], "qkv_bias": True, "use_rope": True,
            "norm_layer": f"functools.partial(torch.nn.LayerNorm, eps={a['layer_norm_eps']})",
        },
    }


def from_vjepa2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """V-JEPA 2 VisionTransformer names (with or without its wrappers' prefix) -> VideoViT's: the inverse of to_vjepa2."""
    block_names = {v: k for k, v in VJEPA2_BLOCK.items()}
    out = {}
    for key, value in state.items():
        key = key.removeprefix(VJEPA2_PREFIX)
        block, rest = _split_key(key)
        if block is not None:
            out[f"blocks.{block}.{_mapped(rest, block_names, key)}"] = value
        elif rest.startswith("patch_embed.proj."):
            out["patch_embed." + rest.rsplit(".", 1)[1]] = value
        elif rest in ("norm.weight", "norm.bias"):
            out[rest] = value
        else:
            raise LayoutError(f"V-JEPA 2 tensor {key!r} has no counterpart in VideoViT")
    return out


def vjepa2_rope_angles(head_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """V-JEPA 2's rotary angle for every rotated dim: positions [N, 3] (t, h, w) -> [N, 3 * D]
    (D = 2 * (head_dim // 6) dims per axis), dim j of an axis turning by pos * w_(j mod D/2)."""
    d = 2 * ((head_dim // 3) // 2)
    if d == 0:
        return positions.new_zeros(positions.shape[0], 0, dtype=torch.float64)
    k = torch.arange(d, dtype=torch.float64) % (d // 2)
    freq = ROPE_THETA ** (-2 * k / d)  # [D]
    return (positions.double()[:, :, None] * freq).flatten(1)  # [N, 3, D] -> [N, 3 * D]


def rope_difference(encoder: VideoViT, atol: float = 1e-5) -> str | None:
    """None when the encoder's RoPE turns every query/key dim by V-JEPA 2's angle on its whole grid;
    otherwise a sentence naming the difference (checked on the live module, not assumed)."""
    idx = torch.arange(encoder.num_tokens)[None]
    cos, sin = encoder.rope.cos_sin(idx)  # [1, 1, N, rotated dims]
    head_dim = encoder.width // encoder.blocks[0].heads
    theirs = vjepa2_rope_angles(head_dim, encoder.rope.positions(idx)[0])  # [N, rotated dims]
    if cos.shape[-1] != theirs.shape[-1]:
        return f"RoPE rotates {cos.shape[-1]} of {head_dim} head dims here, {theirs.shape[-1]} in V-JEPA 2"
    gap = max((cos[0, 0].double() - theirs.cos()).abs().max().item(), (sin[0, 0].double() - theirs.sin()).abs().max().item())
    if gap <= atol:
        return None
    d = theirs.shape[-1] // 3
    return (f"RoPE frequency pairing: here both dims of a rotated pair share one frequency; V-JEPA 2 (its code and "
            f"transformers) gives dim j of each {d}-dim axis slice frequency j mod {d // 2}, so its pairs turn by two "
            f"different angles (head_dim {head_dim}; largest cos/sin gap on this grid {gap:.2f}); no weight mapping "
            f"reproduces it")

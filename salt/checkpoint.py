"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

`checkpoint.safetensors` holds `encoder.*`, `predictor.*` and `optim.<param>.<state>`
tensors and, in its header, the metadata: step, loader position, optimizer
hyper-parameters and model description. That one file is the checkpoint: it is written
under a temporary name and renamed into place (`durable_replace`: fsync before the rename,
and of the folder after), so weights and the step they belong to change together, and a
kill or a power cut at any point leaves either the previous checkpoint or the new one,
never new weights with an old position. `checkpoint.json` is a readable copy of
the metadata written afterwards; readers take the header, so a stale copy is harmless.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from salt.config import Config, to_dict

WEIGHTS = "checkpoint.safetensors"
META = "checkpoint.json"
HEADER_KEY = "salt.meta"  # the metadata's key in the safetensors header (string values only)


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a folder too: its fsync makes the names in it durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_replace(src: str | Path, dst: str | Path) -> None:
    """os.replace that also survives a power cut, not only a kill: what `src` holds (a file, or a
    folder and everything in it) reaches the disk before the rename makes it `dst`, and the rename
    itself does after (the fsync of the folder that holds `dst`). Local disks only; the target
    store's object-store commits go by their marker instead (pipeline/fs.py)."""
    if os.path.isdir(src):
        for folder, _, files in os.walk(src, topdown=False):  # bottom-up: a folder after what it names
            for name in files:
                _fsync(os.path.join(folder, name))
            _fsync(folder)
    else:
        _fsync(src)
    os.replace(src, dst)
    _fsync(os.path.dirname(os.path.abspath(dst)))


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    durable_replace(tmp, path)


def checkpoint_meta(cfg: Config, role: Literal["teacher", "student"], width: int, **extra) -> dict:
    """What every checkpoint of an encoder says about it (teachers of both kinds, students): its
    role, its size (the config's model.<role>) and width, and the whole config; `extra` adds the
    rest (a student's teacher, a control's step and what it was trained with)."""
    size = getattr(cfg.model, role)
    return {"role": role, "encoder": {"size": size, "width": width}, "config": to_dict(cfg), **extra}


def save_checkpoint(
    run_dir: str | Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer, meta: dict
) -> None:
    run_dir = Path(run_dir)
    tensors = {f"{name}.{k}": v.detach().contiguous().cpu() for name, m in modules.items() for k, v in m.state_dict().items()}
    optim_state = optimizer.state_dict()
    for pid, state in optim_state["state"].items():
        for k, v in state.items():
            tensors[f"optim.{pid}.{k}"] = torch.as_tensor(v).contiguous().cpu()
    groups = [{k: v for k, v in g.items()} for g in optim_state["param_groups"]]
    _commit(run_dir, tensors, meta | {"optimizer_groups": groups})


def _commit(out: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    text = json.dumps(meta, indent=1)
    _atomic_write(out / WEIGHTS, lambda p: save_file(tensors, str(p), metadata={HEADER_KEY: text}))  # the commit
    _atomic_write(out / META, lambda p: p.write_text(text))


def save_snapshot(snapshot_dir: str | Path, encoder: nn.Module, meta: dict) -> None:
    """Encoder weights and metadata only: enough to probe it, not to resume training."""
    out = Path(snapshot_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"encoder.{k}": v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    _commit(out, tensors, meta)


def has_checkpoint(run_dir: str | Path) -> bool:
    return (Path(run_dir) / WEIGHTS).is_file()


def read_meta(run_dir: str | Path) -> dict:
    """The metadata committed with the weights (the header; checkpoint.json only for files without one)."""
    path = Path(run_dir) / WEIGHTS
    try:
        with safe_open(str(path), "pt") as f:
            header = (f.metadata() or {}).get(HEADER_KEY)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a safetensors checkpoint ({e}); pickled checkpoints are refused") from None
    if header is not None:
        return json.loads(header)
    return json.loads((Path(run_dir) / META).read_text())


def load_tensors(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """safetensors only: a pickle (a `torch.save` file renamed, say) is refused, never unpickled."""
    path = Path(run_dir) / WEIGHTS
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise ValueError(f"{path} is not a safetensors checkpoint ({e}); pickled checkpoints are refused") from None


def load_module_weights(run_dir: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix.` (e.g. the encoder), for building a model from a checkpoint."""
    tensors = load_tensors(run_dir)
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def load_checkpoint(
    run_dir: str | Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer
) -> dict:
    meta = read_meta(run_dir)
    tensors = load_tensors(run_dir)
    for name, module in modules.items():
        cut = len(name) + 1
        module.load_state_dict({k[cut:]: v for k, v in tensors.items() if k.startswith(name + ".")})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, field = k.split(".", 2)
            state.setdefault(int(pid), {})[field] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_groups"]})
    return meta

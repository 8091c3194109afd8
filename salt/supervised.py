"""Label-trained encoders: teachers known to carry a task, for measuring stage 2 on its own.

Not the method (a SALT teacher never sees a label). A control: an encoder whose
mean-pooled tokens feed one linear head per task, trained with cross-entropy on
labelled clips. Its student shows how much of a teacher's knowledge stage 2 keeps
(the transfer control), and snapshots at a few step counts give teachers from weak to
strong (the teacher-quality ladder of the replication study).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm


def train_with_labels(
    encoder: nn.Module,
    clips: torch.Tensor,
    labels: dict[str, torch.Tensor],
    num_classes: dict[str, int],
    *,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
    warmup_steps: int = 0,
    cosine: bool = False,
    schedule_steps: int | None = None,
    save_at: Iterable[int] = (),
    on_save: Callable[[int, nn.Module], None] | None = None,
    progress: bool = False,
) -> nn.Module:
    """Trains `encoder` in place on clips [N, 3, T, H, W] with labels {task: [N]} for `steps`
    steps of AdamW; the loss is the mean over tasks of each head's cross-entropy.

    The lr rises linearly over `warmup_steps`, then stays (or, with `cosine`, decays to 0 at
    `schedule_steps`, by default `steps`: a run may stop early in a longer schedule).
    Batches are drawn with replacement from a generator seeded by `seed`, and the heads are
    initialised from it, so a run is a function of (encoder init, clips, labels, seed).
    `on_save(step, encoder)` is called at each step in `save_at`, with the encoder in eval mode.
    """
    schedule_steps = steps if schedule_steps is None else schedule_steps
    if schedule_steps < steps:
        raise ValueError(f"schedule_steps={schedule_steps} is shorter than the run's {steps} steps")
    tasks = sorted(labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = nn.ModuleDict({t: nn.Linear(encoder.width, num_classes[t]) for t in tasks})
    optim = torch.optim.AdamW([*encoder.parameters(), *heads.parameters()], lr=lr, weight_decay=weight_decay)

    def lr_at(step: int) -> float:
        if step <= warmup_steps:
            return lr * step / warmup_steps
        if not cosine:
            return lr
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, schedule_steps - warmup_steps)))

    order = torch.Generator().manual_seed(seed)
    save_at = set(save_at)
    encoder.train()
    bar = tqdm(total=steps, desc="label teacher", disable=not progress, dynamic_ncols=True)
    for step in range(1, steps + 1):
        idx = torch.randint(len(clips), (batch_size,), generator=order)
        pooled = encoder(clips[idx]).mean(1)  # [B, D]
        loss = torch.stack([F.cross_entropy(heads[t](pooled), labels[t][idx]) for t in tasks]).mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        for group in optim.param_groups:
            group["lr"] = lr_at(step)
        optim.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step in save_at and on_save is not None:
            encoder.eval()
            on_save(step, encoder)
            encoder.train()
    bar.close()
    return encoder.eval()

"""store.json: what a store was made from, written when the store is created and compared on every rerun.

It records the teacher's identity, the clips' geometry and preprocessing (`compatibility`: what
a student run must agree with), the storage format, the views, the pixel cache, the decoder,
package versions and every source shard with its sha256 (from the dataset index).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone

import numpy as np

from pipeline import fs
from pipeline.shards import shard_name
from pipeline.store import pixel_codec
from pipeline.store.layout import StoreMismatchError
from pipeline.video import decoder_version
from salt.config import Config, to_dict
from salt.models.factory import config_grid
from salt.runinfo import git_commit, package_versions

FORMAT = "salt-target-store/1"

# store.json's "pixel_cache" entry, present exactly when the store keeps one
PIXEL_CACHE = {
    "layout": "uint8 [frames, h, w, 3] crop box before resize and flip; h, w = manifest crop[2], crop[3]",
    "codec": pixel_codec.CODEC_INFO,
}


def compatibility(cfg: Config) -> dict:
    """What a store and the run reading it must agree on, as recorded in store.json.

    Only what the stored targets depend on: the clips (geometry, sampling, crop,
    normalisation). Masks are not in it: every token is stored, so any masking
    config trains on any store. The teacher, views and dtype are the store's own."""
    d = to_dict(cfg)
    data = d["data"]
    return {
        "geometry": {
            "frames": data["frames"],
            "frame_step": data["frame_step"],
            "fps": data["fps"],
            "crop_size": data["crop_size"],
            "patch_size": d["model"]["patch_size"],
            "tubelet": d["model"]["tubelet"],
        },
        "preprocessing": {k: data[k] for k in ("seed", "crop_area", "crop_aspect", "hflip_prob", "mean", "std")},
    }


def check_compatible(store_meta: dict, cfg: Config, store: str) -> None:
    """Refuse to train on a store made for other clips, naming both values."""
    wanted = compatibility(cfg)
    for section, values in wanted.items():
        for key, value in values.items():
            stored = store_meta.get(section, {}).get(key)
            if stored != value:
                raise StoreMismatchError(
                    f"target store {store} was extracted with {section}.{key}={stored!r} "
                    f"but this run has {section}.{key}={value!r}"
                )


def fingerprint_shards(shards: list[str], index: Mapping[str, dict]) -> list[dict]:
    """name, path, bytes and sha256 of each source shard, from its folder's dataset index
    (pipeline/dataset_index.py): no shard is opened here. The decode task that reads a shard
    checks its bytes against these figures (pipeline/shards.py: read_shard), and stage 2 checks
    each clip's hash against what the teacher saw."""
    out = []
    for s in shards:
        name = shard_name(s)
        entry = index.fingerprint(name) if hasattr(index, "fingerprint") else index[name]
        out.append({"name": shard_name(s), "path": s, "bytes": int(entry["bytes"]), "sha256": str(entry["sha256"])})
    return out


def existing_meta(store: str) -> dict | None:
    """The store.json of a store being resumed; None for a new store."""
    path = fs.join(store, "store.json")
    return json.loads(fs.read_bytes(path)) if fs.exists(path) else None


def provenance(
    cfg: Config, *, data: str, split: str, teacher: dict, shards: list[str], index: Mapping[str, dict] | None = None
) -> dict:
    """store.json of a job (before its store_id, created and git_commit: open_store adds those); `teacher`
    is the frozen teacher's identity(), `index` the shards' dataset index (name -> bytes, sha256).
    Without `index` each shard is read here (for callers with a handful of shards: the bench's)."""
    if index is None:
        index = {shard_name(s): {"bytes": fs.size(s), "sha256": fs.sha256(s)} for s in shards}
    grid = config_grid(cfg)
    compat = compatibility(cfg)
    compat["geometry"] |= {"grid": list(grid), "num_tokens": int(np.prod(grid))}
    return {
        "format": FORMAT,
        "teacher": teacher,
        **compat,
        "storage": cfg.extract.storage.describe(),
        "views_per_clip": cfg.extract.views_per_clip,
        # absent without the cache: stores made before it existed keep their store.json and resume
        **({"pixel_cache": PIXEL_CACHE} if cfg.extract.pixel_cache else {}),
        "decoder": decoder_version(),
        "packages": package_versions(),
        "source": {
            "data": str(data),
            "split": split,
            "shards": fingerprint_shards(shards, index),
        },
    }


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: store has {a!r}, this job has {b!r}")
    return diffs


def open_store(store: str, meta: dict, old: dict | None) -> str:
    """Create store.json, or check that an existing store (`old`, its store.json) was made by an
    identical job.

    Returns the store's id, which every shard records: a store.json copied from another
    store is then caught by verify and by stage 2."""
    if old is not None:
        ignore = ("created", "git_commit", "packages", "store_id")
        diffs = _differences({k: v for k, v in old.items() if k not in ignore}, {k: v for k, v in meta.items() if k not in ignore})
        if diffs:
            raise StoreMismatchError(
                f"{store} holds targets of another job (or of an older version of this pipeline); refusing to mix. "
                "Extract into a new store folder. Differences:\n  " + "\n  ".join(diffs[:10])
            )
        return old["store_id"]
    store_id = uuid.uuid4().hex
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta = meta | {"store_id": store_id, "created": created, "git_commit": git_commit()}
    fs.write_bytes(fs.join(store, "store.json"), json.dumps(meta, indent=1).encode())
    return store_id


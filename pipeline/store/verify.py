"""Verifying a store: every file against its recorded sha256, every row against its crc32, the
store-level manifest against each shard's own (`make inspect VERIFY=1`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors.torch import load as safetensors_load

from pipeline import fs
from pipeline.store.layout import PROJECTION, CorruptStoreError, read_parquet, shard_dir
from pipeline.store.read import TargetStore, check_row

def verify_store(path: str | Path) -> list[str]:
    """Re-read every file and every row; one line per problem, naming the shard and key."""
    path = str(path)
    problems: list[str] = []
    try:
        store = TargetStore(path, listed=True)  # a full check: every marker listed
    except (OSError, ValueError) as e:
        return [f"store.json: {e}"]
    problems += projection_problems(path, store.meta.get("teacher", {}).get("projection"))
    expected = {s["name"] for s in store.meta["source"]["shards"]}
    problems += [f"shard {s}: missing (not committed)" for s in sorted(expected - set(store.shards))]
    problems += [f"shard {s}: not a source shard of this store" for s in sorted(set(store.shards) - expected)]
    for shard in store.shards:
        try:
            store.check_identity(shard)
        except CorruptStoreError as e:
            problems.append(f"shard {shard}: {e}")
        folder = shard_dir(path, shard)
        recorded = json.loads(fs.read_bytes(fs.join(folder, "shard.json")))["sha256"]
        for name, digest in recorded.items():
            f = fs.join(folder, name)
            if not fs.exists(f):
                problems.append(f"shard {shard}: file {name} is missing")
            elif fs.sha256(f) != digest:
                problems.append(f"shard {shard}: file {name} changed since extraction")
        try:
            own = read_parquet(fs.join(folder, "manifest.parquet"))
            entries = {(r["key"], r["view"]): r for r in own.to_pylist()}
        except Exception as e:  # a truncated or overwritten parquet file
            problems.append(f"shard {shard}: manifest.parquet unreadable ({type(e).__name__}: {e})")
            continue
        if shard in store.tables.covered and not store.tables.rows("manifest", shard).equals(own.replace_schema_metadata(None)):
            # stage 2 reads the store-level copy of a shard's rows: it must be the shard's own
            problems.append(f"shard {shard}: its rows in the store-level manifest.parquet differ from its own manifest.parquet")
        for entry in entries.values():
            try:
                check_row(store.latents(shard, entry["row"]), entry, path)
                if store.has_pixels:
                    store.pixels(shard, entry)
            except Exception as e:
                problems.append(f"shard {shard}: key {entry['key']!r} view {entry['view']}: {type(e).__name__}: {e}")
    return problems


def projection_problems(path: str, recorded: dict | None) -> list[str]:
    """The stored projection matrix must be the one store.json describes (shape and digest)."""
    if not recorded:
        return []
    file = fs.join(path, PROJECTION)
    if not fs.exists(file):
        return [f"{PROJECTION}: missing, but store.json records a {recorded['kind']} projection"]
    matrix = safetensors_load(fs.read_bytes(file))["projection"]
    if list(matrix.shape) != [recorded["from_width"], recorded["dim"]] or hashlib.sha256(matrix.numpy().tobytes()).hexdigest() != recorded["sha256"]:
        return [f"{PROJECTION}: differs from the projection store.json records (shape {list(matrix.shape)})"]
    return []


"""The feature store: a frozen encoder's tokens for every (clip, view) of a labelled split, computed
once and kept on disk in the target store's format (pipeline/store/), so a grid of heads, more
epochs, more probe seeds or another readout re-read them instead of running the encoder again: the
targets' compute-once, reuse-many idea, for evaluation.

Layout: `<cache>/<digest>/<split>/` is a target store (pipeline/store/layout.py) in which
- store.json's `teacher` is the frozen encoder the features come from (its identity: the checkpoint
  file's sha256, or for a random init the sha256 of its weights; size, width, attention backend,
  device type), `views` says what each view is (pipeline/labelled.py: ViewPlan), geometry and
  preprocessing are the probe's clips, `sources` fingerprints the source shards, and `format` is
  FORMAT;
- a store shard is a unit (pipeline/labelled.py: up to probe.clips_per_shard consecutive clips of
  one source shard, `<source>-<n:04d>`), and store.json's `source.shards` lists the units, each
  with its source shard's path, bytes and sha256: `make inspect STORE=... VERIFY=1` checks a feature
  store as it checks targets (every file's sha256, every row's crc32);
- rows are float32, so cached features are the encoder's output bit for bit.
The digest is a sha256 over everything the features depend on (encoder identity, data path, split,
source shards' names, sizes and sha256, decoder version, view plan, geometry and preprocessing,
dtype, unit size): another encoder, data set, decoder, geometry or view plan gets its own folder,
and nothing is ever overwritten.

Writing (`extract_units`): rank r of a job extracts the uncommitted units i with i % world == r;
loader workers decode them (`SplitBatches`), each batch is decoded once for every encoder that
needs its unit, and a unit is committed whole (`commit_shard`: temporary name, marker last) once
its last batch is encoded. Memory: a batch of clips, and per unit being filled its features
(clips_per_shard x views x tokens x width x 4 bytes, about three times that while committing):
not the split. A killed job resumes: committed units are kept, the rest extracted again.

Reading (`FeatureSplit`, `StoreRows`): rows are read by index, checked against their crc32, and
grouped into samples (a sample is one or more rows of a clip, their tokens concatenated: segments).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import zarr
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import fs
from pipeline.dataset_index import ensure_index, split_folder
from pipeline.labelled import SplitBatches, Unit, ViewPlan
from pipeline.store.layout import CorruptStoreError, committed_shards, row_crc32, shard_dir
from pipeline.store.provenance import existing_meta, fingerprint_shards, open_store, provenance
from pipeline.store.read import TargetStore, read_tables
from pipeline.store.write import ExtractedRow, commit_shard, rebuild_tables, remove_partial_shards
from pipeline.video import decoder_version
from salt.config import Config, ExtractConfig
from salt.storage import StorageFormat

FORMAT = "salt-feature-store/1"
FEATURE_FORMAT = StorageFormat(dtype="float32")  # exact: cached features are the encoder's output


def tensor_sha256(module: nn.Module) -> str:
    """sha256 over a module's state (names, dtypes, shapes, bytes): a random init's identity."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass(frozen=True)
class SplitStore:
    """Where one encoder's features of one split live, and the store.json they are written under."""

    path: str
    meta: dict
    units: list[Unit]

    @property
    def complete(self) -> bool:
        return fs.exists(fs.join(self.path, "store.json")) and {u.name for u in self.units} <= set(committed_shards(self.path))

    def missing(self) -> set[str]:
        return {u.name for u in self.units} - set(committed_shards(self.path))


def source_fingerprints(units: list[Unit]) -> list[dict]:
    """name, path, bytes and sha256 of the units' source shards, from their folder's dataset index
    (pipeline/store/provenance.py: fingerprint_shards; list_units made sure there is one)."""
    sources = list(dict.fromkeys(u.source for u in units))
    return fingerprint_shards(sources, ensure_index(split_folder(sources[0]), sources))


def split_store(
    cache: str, *, encoder: dict, cfg: Config, data: str, split: str, plan: ViewPlan, units: list[Unit],
    fingerprints: list[dict],
) -> SplitStore:
    """The store of `encoder`'s features of `data/split` under `plan` (its folder named by digest).
    `cfg` gives the token grid (model.patch_size, model.tubelet); the clips are the plan's."""
    clips_per_unit = max((len(u.clips) for u in units), default=0)
    key = {"format": FORMAT, "encoder": encoder, "data": str(data), "split": split, "plan": plan.describe(),
           "sources": [[f["name"], f["bytes"], f["sha256"]] for f in fingerprints], "decoder": decoder_version(),
           "clips_per_unit": clips_per_unit,
           "data_config": json.loads(json.dumps(dataclasses.asdict(plan.data))),
           "grid": [cfg.model.patch_size, cfg.model.tubelet], "storage": FEATURE_FORMAT.describe()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = fs.join(str(cache), digest, split)
    store_cfg = Config(data=plan.data, model=cfg.model,
                       extract=ExtractConfig(views_per_clip=plan.views, dtype=FEATURE_FORMAT.dtype))
    sources = [f["path"] for f in fingerprints]
    meta = provenance(store_cfg, data=data, split=split, teacher=encoder, shards=sources,
                      index={f["name"]: f for f in fingerprints})
    by_path = {f["path"]: f for f in meta["source"]["shards"]}
    meta |= {
        "format": FORMAT,
        "views": plan.describe(),
        "sources": list(by_path.values()),
        "source": {"data": str(data), "split": split, "shards": [
            {"name": u.name, "path": u.source, "bytes": by_path[u.source]["bytes"], "sha256": by_path[u.source]["sha256"],
             "keys": [u.clips[0][0], u.clips[-1][0]] if u.clips else []}
            for u in units]},
    }
    return SplitStore(path=path, meta=meta, units=units)


def open_split(store: SplitStore) -> str:
    """Create the store (or check that the folder holds this very job's features) and clear what a
    killed job left half-written; returns its store_id. One process calls it (rank 0)."""
    fs.makedirs(store.path)
    store_id = open_store(store.path, store.meta, existing_meta(store.path))
    remove_partial_shards(store.path)
    return store_id


def finish_split(store: SplitStore) -> None:
    """The store-level manifest and errors tables, once every unit is committed (rank 0)."""
    rebuild_tables(store.path)


@dataclass(eq=False)
class Extraction:
    """One encoder's share of an extraction pass: the stores it fills (split -> SplitStore, with
    their store ids) and what it encoded (rows and forward batches)."""

    encoder: nn.Module
    stores: dict[str, tuple[SplitStore, str]]
    rows: int = 0
    batches: int = 0


def my_units(units: list[Unit], todo: set[str], rank: int, world: int) -> list[Unit]:
    """This rank's units of those still to extract: unit i of the split goes to rank i % world."""
    return [u for i, u in enumerate(units) if i % world == rank and u.name in todo]


def extract_units(
    jobs: list[Extraction], split: str, units: list[Unit], plan: ViewPlan, *, batch_size: int, num_workers: int,
    device: torch.device | str, rank: int = 0, world: int = 1, progress: bool = True,
) -> None:
    """Decode this rank's share of the units some job still lacks (each batch once) and commit each
    job's rows of a unit when its last batch is encoded (module docstring)."""
    missing = {id(j): j.stores[split][0].missing() if split in j.stores else set() for j in jobs}
    needed = {u.name: [j for j in jobs if u.name in missing[id(j)]] for u in units}
    mine = my_units(units, {name for name, js in needed.items() if js}, rank, world)
    if not mine:
        return
    loader = DataLoader(SplitBatches(mine, plan, batch_size), batch_size=None, num_workers=num_workers,
                        persistent_workers=False, prefetch_factor=2 if num_workers > 0 else None)
    pending: dict[tuple[int, str], tuple[list[ExtractedRow], list]] = {}
    total = sum(len(u.clips) for u in mine) * plan.views
    bar = tqdm(total=total, desc=f"features {split}", unit="view", disable=not progress, leave=False)
    for batch in loader:
        bar.update(len(batch["keys"]) + len(batch["errors"]))
        for j, job in enumerate(jobs):
            if job not in needed[batch["unit"]]:
                continue
            rows, errors = pending.setdefault((j, batch["unit"]), ([], []))
            errors += batch["errors"]
            if batch["clips"] is not None:
                latents = encode(job.encoder, batch["clips"], device)  # [B, tokens, D]
                job.rows += len(latents)
                job.batches += 1
                rows += [ExtractedRow(key=k, view=v, clip_hash=h, frame_indices=tuple(s.frame_indices),
                                      crop=tuple(s.crop), flip=s.flip, latents=x)
                         for k, v, h, s, x in zip(batch["keys"], batch["views"], batch["hashes"], batch["specs"], latents)]
            if batch["last"]:
                store, store_id = job.stores[split]
                commit_shard(store.path, batch["unit"], rows, errors, fmt=FEATURE_FORMAT, store_id=store_id)
                del pending[(j, batch["unit"])]
    bar.close()


def encode(encoder: nn.Module, clips: torch.Tensor, device: torch.device | str) -> np.ndarray:
    with torch.no_grad():
        return encoder(clips.to(device)).float().cpu().numpy()


class FeatureSplit:
    """The read side of one split's features: its clips in store order (units in order, clips in
    tar order; a clip that did not decode is in `errors`, not here) and their rows."""

    def __init__(self, path: str):
        self.path = str(path)
        self.store = TargetStore(self.path)
        meta = self.store.meta
        if meta.get("format") != FORMAT:
            raise ValueError(f"{self.path} is not a feature store (format {meta.get('format')!r}, want {FORMAT})")
        self.views = int(meta["views_per_clip"])
        units = [s["name"] for s in meta["source"]["shards"]]
        missing = sorted(set(units) - set(self.store.shards))
        if missing:
            raise FileNotFoundError(f"feature store {self.path} lacks {len(missing)} unit(s), e.g. {missing[0]}")
        self.units = units
        manifest, errors = read_tables(self.path)[:2]  # every unit's rows, one read where the store-level tables are current
        encoded = manifest.column("shard").combine_chunks().dictionary_encode()
        code_of = {name: i for i, name in enumerate(encoded.dictionary.to_pylist())}
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        rows_col = manifest.column("row").to_numpy()
        views_col = manifest.column("view").to_numpy()
        crc_col = manifest.column("crc32").to_numpy()
        keys_col = manifest.column("key").combine_chunks()
        order = np.lexsort((rows_col, codes))  # grouped by unit, rows in order
        bounds = np.searchsorted(codes[order], np.arange(len(code_of) + 1))
        self.keys: list[str] = []
        unit_of, start_of = [], []
        self.crcs: list[np.ndarray] = []
        for u, unit in enumerate(units):
            self.store.check_identity(unit)
            c = code_of.get(unit)
            at = order[bounds[c] : bounds[c + 1]] if c is not None else np.array([], dtype=np.int64)
            where = f"feature store {self.path}: unit {unit}"
            if not np.array_equal(rows_col[at], np.arange(len(at))) or len(at) % self.views:
                raise CorruptStoreError(f"{where}: its manifest does not list rows 0..{len(at) - 1} of whole clips; "
                                        f"run `make inspect STORE={self.path} VERIFY=1`")
            firsts = at[:: self.views]
            same_clip = keys_col.take(pa.array(np.repeat(firsts, self.views))).equals(keys_col.take(pa.array(at)))
            if not same_clip or not np.array_equal(views_col[at], np.tile(np.arange(self.views), len(firsts))):
                raise CorruptStoreError(f"{where}: its rows are not each clip's {self.views} views in order; "
                                        f"run `make inspect STORE={self.path} VERIFY=1`")
            self.crcs.append(crc_col[at].astype(np.int64))
            self.keys += keys_col.take(pa.array(firsts)).to_pylist()
            unit_of += [u] * len(firsts)
            start_of += list(range(0, len(at), self.views))
        self.unit_of, self.start_of = np.array(unit_of, dtype=np.int64), np.array(start_of, dtype=np.int64)
        self.errors = [{"key": k, "reason": r} for k, r in
                       dict(zip(errors.column("key").to_pylist(), errors.column("reason").to_pylist())).items()]
        self._readers: dict[int, UnitRows] = {}

    @property
    def width(self) -> int:
        return self.store.teacher_width

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def read(self, clips: np.ndarray, views: np.ndarray) -> np.ndarray:
        """Rows (clip i, view v) for the pairs given -> float32 [n, tokens, D], each checked against its crc32.
        The rows are read straight into the one array returned (no buffer per row)."""
        units, rows = self.unit_of[clips], self.start_of[clips] + views
        out = None
        for u in np.unique(units):
            reader = self._reader(int(u))
            if out is None:
                out = np.empty((len(clips), *reader.shape[1:]), dtype=np.float32)
            for i in np.flatnonzero(units == u):
                r = int(rows[i])
                reader.read_into(r, out[i])
                if row_crc32(out[i]) != self.crcs[u][r]:
                    raise CorruptStoreError(
                        f"feature store {self.path}: row {r} (key {self.keys[clips[i]]!r}, view {int(views[i])}) of "
                        f"unit {self.units[u]} does not match its checksum; run `make inspect STORE={self.path} VERIFY=1`")
        return out if out is not None else np.empty((0, 0, 0), dtype=np.float32)

    def _reader(self, u: int) -> UnitRows:
        if u in self._readers:
            self._readers[u] = self._readers.pop(u)  # most recently used last
        else:
            while len(self._readers) >= OPEN_UNITS:  # a few dozen open at once, the least recently used closed first
                self._readers.pop(next(iter(self._readers))).close()
            self._readers[u] = UnitRows(shard_dir(self.path, self.units[u]))
        return self._readers[u]


# units whose shard file a FeatureSplit keeps open (and whose chunk index it keeps) at once
OPEN_UNITS = 64


class UnitRows:
    """One committed unit's rows, read one at a time. The unit's Zarr array is one Zarr shard file
    (pipeline/store/write.py: one file per store shard, one chunk per row); with FEATURE_FORMAT's
    codecs (raw little-endian float32, the shard's chunk index at its end, as the Zarr v3 sharding
    codec writes it) a row is one read at the offset the index gives: one pread on a local disk, one
    ranged GET on an object store. Zarr's own per-chunk read costs milliseconds, which for the small
    rows of a CPU-sized encoder is most of a probe's time. Another layout is read through Zarr."""

    def __init__(self, folder: str):
        self.folder = folder
        meta = json.loads(fs.read_bytes(fs.join(folder, "zarr.json")))
        self.shape = tuple(meta["shape"])
        self.index: np.ndarray | None = None
        self.array: zarr.Array | None = None
        self.fd: int | None = None
        codecs = meta.get("codecs", [])
        conf = codecs[0].get("configuration", {}) if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed" else {}
        raw = (meta.get("data_type") == "float32" and conf.get("index_location") == "end"
               and list(conf.get("chunk_shape", [])) == [1, *self.shape[1:]]
               and [c.get("name") for c in conf.get("codecs", [])] == ["bytes"]
               and conf["codecs"][0].get("configuration", {}).get("endian") == "little"
               and [c.get("name") for c in conf.get("index_codecs", [])] == ["bytes", "crc32c"]
               and meta.get("chunk_key_encoding") == {"name": "default", "configuration": {"separator": "/"}})
        if not raw:
            self.array = zarr.open_array(fs.for_zarr(folder), mode="r")
            return
        self.file = fs.join(folder, "c", *["0"] * len(self.shape))
        size = fs.size(self.file)
        index_bytes = 16 * self.shape[0] + 4  # (offset, nbytes) uint64 per chunk, then a crc32c
        self.index = np.frombuffer(fs.read_range(self.file, size - index_bytes, index_bytes - 4), dtype="<u8").reshape(-1, 2)
        self.row_bytes = 4 * int(np.prod(self.shape[1:]))
        if not fs.is_remote(self.file):
            self.fd = os.open(fs.resolve(self.file)[1], os.O_RDONLY)

    def read_into(self, r: int, out: np.ndarray) -> None:
        """Row r into `out` (float32 [tokens, D])."""
        if self.array is not None:
            out[...] = self.array[r]
            return
        offset, nbytes = (int(v) for v in self.index[r])
        if nbytes != self.row_bytes:
            raise CorruptStoreError(f"{self.file}: chunk {r} holds {nbytes} bytes, a row is {self.row_bytes}")
        if self.fd is not None:
            got = os.preadv(self.fd, [memoryview(out).cast("B")], offset)
            if got != nbytes:
                raise CorruptStoreError(f"{self.file}: chunk {r} is cut short ({got} of {nbytes} bytes)")
        else:
            out[...] = np.frombuffer(fs.read_range(self.file, offset, nbytes), dtype="<f4").reshape(out.shape)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class StoreRows:
    """Samples of a feature split as `salt.readouts.Rows`: sample i is clip clips[i], and its tokens
    at epoch e are those of the views views[i][e % len(views[i])] concatenated (segments) in order."""

    def __init__(self, split: FeatureSplit, clips: list[int] | np.ndarray, views: list[list[list[int]]]):
        if len(clips) != len(views):
            raise ValueError(f"{len(clips)} clips but {len(views)} view lists")
        self.split, self.clips, self.views = split, np.asarray(clips, dtype=np.int64), views

    def __len__(self) -> int:
        return len(self.clips)

    def take(self, idx: torch.Tensor, epoch: int = 0) -> torch.Tensor:
        idx = idx.cpu().numpy()
        chosen = [self.views[i][epoch % len(self.views[i])] for i in idx]
        per = len(chosen[0]) if chosen else 1
        if any(len(c) != per for c in chosen):
            raise ValueError("samples of one batch must have the same number of segments")
        clips = np.repeat(self.clips[idx], per)
        rows = self.split.read(clips, np.array([v for c in chosen for v in c], dtype=np.int64))  # [B * per, tokens, D]
        x = torch.from_numpy(rows)
        return x.view(len(idx), per * x.shape[1], x.shape[2])  # segments' tokens side by side

    def subset(self, idx: torch.Tensor) -> StoreRows:
        keep = idx.cpu().numpy()
        return StoreRows(self.split, self.clips[keep], [self.views[i] for i in keep])


def sample_rows(split: FeatureSplit, plan: ViewPlan, *, epochs_cycle: bool) -> tuple[StoreRows, torch.Tensor]:
    """A split's samples and the clip index of each. epochs_cycle (train): one sample per clip whose
    view changes with the epoch (window e mod windows); else (val) one sample per (clip, window, crop),
    clip-major, as the multi-view protocol averages them."""
    n = len(split.keys)
    if epochs_cycle:
        views = [[plan.sample_views(w, 0) for w in range(plan.windows)]] * n
        return StoreRows(split, np.arange(n), views), torch.arange(n)
    per_clip = [[plan.sample_views(w, c)] for w in range(plan.windows) for c in range(plan.crops)]
    clips = np.repeat(np.arange(n), len(per_clip))
    return StoreRows(split, clips, per_clip * n), torch.from_numpy(clips)


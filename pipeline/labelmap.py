"""One label map per dataset: class name -> index, fixed by the first ingest and kept.

    <dataset root>/labels.json     {"label": [name of class 0, name of class 1, ...]}

The same file and form the probe reads (`pipeline/labelled.py: read_class_names`: task -> class
names; the moving digits write {"appearance": [...], "motion": [...]}). A sample's `label_index`
is its class's position in this list, never its position among one run's decodable videos, so
`train/` and `val/` ingested separately, or a class whose only video fails to decode, do not
renumber anything.

Where the map comes from, in order: the file given (`make data LABELS=...`), else the dataset
root's labels.json written by an earlier split, else it is made from the labels of this run's
sources (every source, decodable or not) and written. A label outside the map is an error that
names it: it is never appended, since that would give the same class two numbers in two splits.
"""

from __future__ import annotations

import json

from pipeline import fs

LABELS_FILE = "labels.json"
TASK = "label"  # the map's one task; samples hold "label" (name) and "label_index" (position)


class LabelMapError(ValueError):
    """A label map that cannot be used, or a label outside it (a ValueError: one line from a job)."""


def natural_order(names: set[str]) -> list[str]:
    """Numbers by value first ("2" before "10"), then the rest in string order."""
    return sorted(names, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))


def new_label_map(labels: list[str]) -> list[str]:
    """The map a first ingest writes. Labels that are all non-negative integers (V-JEPA's CSVs
    number their classes) keep their number as their index: the map is "0" .. the largest, gaps
    included, so a class this split lacks still has its number. Otherwise the names in
    `natural_order`."""
    names = set(labels)
    if names and all(s.isdigit() and s == str(int(s)) for s in names):
        return [str(i) for i in range(max(int(s) for s in names) + 1)]
    return natural_order(names)


def read_label_map(location: str) -> list[str]:
    """A map from a file: {"label": [...]} (labels.json's form) or a bare JSON list of names."""
    if not fs.exists(location):
        raise LabelMapError(f"label map {location}: no such file")
    try:
        data = json.loads(fs.read_bytes(location))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LabelMapError(f"label map {location} is not JSON ({e})") from None
    names = data.get(TASK) if isinstance(data, dict) else data
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        keys = f" (it has {', '.join(map(repr, data))})" if isinstance(data, dict) else ""
        raise LabelMapError(f'label map {location}: want {{"{TASK}": [class names]}} or a list of class names{keys}')
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise LabelMapError(f"label map {location}: class {repeated[0]!r} appears more than once")
    return names


def encode_label_map(names: list[str]) -> bytes:
    return (json.dumps({TASK: names}, indent=1) + "\n").encode()


def settle_label_map(root: str, labels: list[str], *, given: str | None = None) -> tuple[list[str], str]:
    """The dataset's map (and where it lives), written to `root`/labels.json if it was not there.

    Raises LabelMapError naming the first label of `labels` outside the map, or a given map that
    disagrees with the one the dataset already has."""
    location = fs.join(str(root).rstrip("/"), LABELS_FILE)
    existing = read_label_map(location) if fs.exists(location) else None
    if given is not None:
        names = read_label_map(given)
        if existing is not None and existing != names:
            raise LabelMapError(
                f"LABELS={given} differs from the map {location} this dataset already has "
                f"({len(names)} vs {len(existing)} classes); every split must use one map"
            )
    elif existing is not None:
        names = existing
    else:
        names = new_label_map(labels)
    known = set(names)
    outside = sorted({label for label in labels if label not in known})
    if outside:
        more = f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""
        source = given if given is not None else location
        raise LabelMapError(f"label {outside[0]!r}{more} is not in the label map {source} ({len(names)} classes)")
    if existing is None:
        fs.write_bytes(location, encode_label_map(names))
    return names, location

"""The wheels make gpu-wheels bundles for a GPU node, one list for both make targets.

    python -m jobs.gpu_bundle list              every distribution of the bundle
    python -m jobs.gpu_bundle missing           those whose module this Python cannot import
    python -m jobs.gpu_bundle size FOLDER       the folder's bytes; exit 1 over LIMIT_BYTES
    python -m jobs.gpu_bundle node              exit 2 naming what the node's Python must have but lacks

Only light packages: torch, ray and xformers are the node's own (a node without Ray or
xformers skips what needs them). Not bundled either, and required from the node's Python
(NODE_MODULES): numpy (17 MB), pyarrow (55 MB; both come with every ray[data] install) and
matplotlib (25 MB with pillow and fonttools), which would not fit LIMIT_BYTES beside the rest
(measured for Python 3.12 at the lock's versions: 26 MB of wheels, 4 MB of data and video).
The stdlib only, so it runs before anything is installed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

# distribution -> the module it installs; zarr 3 needs numcodecs, google-crc32c, donfig,
# typing-extensions and packaging; webdataset needs braceexpand; pytest (with pluggy, iniconfig
# and pygments) runs the gpu tests.
# make gpu-wheels downloads them at the versions of the lock (constraints.txt).
BUNDLE = {
    "zarr": "zarr", "numcodecs": "numcodecs", "google-crc32c": "google_crc32c", "donfig": "donfig",
    "typing-extensions": "typing_extensions", "packaging": "packaging",
    "decord": "decord", "webdataset": "webdataset", "braceexpand": "braceexpand", "pyyaml": "yaml",
    "safetensors": "safetensors", "tqdm": "tqdm", "fsspec": "fsspec",
    "pytest": "pytest", "pluggy": "pluggy", "iniconfig": "iniconfig", "pygments": "pygments",
}
NODE_MODULES = ("torch", "numpy", "pyarrow", "matplotlib")  # the node's own Python must have these
LIMIT_BYTES = 40_000_000


def missing(modules) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def folder_bytes(folder: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def main(argv: list[str]) -> int:
    command = argv[0] if argv else ""
    if command == "list":
        print(" ".join(BUNDLE))
    elif command == "missing":
        absent = set(missing(BUNDLE.values()))
        print(" ".join(d for d, m in BUNDLE.items() if m in absent))
    elif command == "node":
        absent = missing(NODE_MODULES)
        if absent:
            print(f"this Python lacks {', '.join(absent)}, which make gpu-check needs and does not bundle: "
                  f"install them (pip install {' '.join(absent)}), then rerun", file=sys.stderr)
            return 2
    elif command == "size" and len(argv) == 2:
        size = folder_bytes(argv[1])
        print(f"{argv[1]}: {size / 1e6:.1f} MB (limit {LIMIT_BYTES / 1e6:.0f} MB)")
        return 1 if size > LIMIT_BYTES else 0
    else:
        print("usage: python -m jobs.gpu_bundle list | missing | node | size FOLDER", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

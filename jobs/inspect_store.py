"""make inspect STORE=<dir> [JSON=1] [VERIFY=1]: what a target store holds, and whether it is intact."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from jobs.cli import entry, parser
from pipeline.store.layout import PROJECTION
from pipeline.store.read import summarize
from pipeline.store.verify import verify_store


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, flags=("run",), overrides=False)
    p.add_argument("store", nargs="?", default=None, help="target store (default: $(RUN)/targets)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--verify", action="store_true", help="re-read every file and row; exit 1 on any problem")
    args = p.parse_args(argv)
    args.store = args.store or str(Path(args.run) / "targets")
    if args.verify:
        problems = verify_store(args.store)
        for line in problems:
            print(f"CORRUPT {line}")
        print(f"verify: {len(problems)} problem(s) in {args.store}")
        if problems:
            sys.exit(1)
    s = summarize(args.store)
    if args.json:
        print(json.dumps(s, indent=1))
        return s
    t = s["teacher"]
    print(f"store       {s['store']}")
    print(f"samples     {s['samples']} ({s['clips']} clips x {s['views_per_clip']} views), {s['tokens_per_sample']} tokens each")
    fmt = s["storage"]
    print(f"bytes       {s['bytes']:,} ({s['bytes'] / max(s['samples'], 1) / 1e6:.3f} MB per sample)")
    print(f"storage     {fmt['dtype']}, keepbits {fmt['keepbits'] or 'off'}, codec {fmt['codec']}")
    cache = s.get("pixel_cache")
    print(f"pixels      {cache['bytes_per_sample'] / 1e3:,.1f} kB per sample ({cache['raw_bytes_per_sample'] / 1e3:,.1f} kB raw uint8), "
          f"codec {cache['codec']['id']} (" + ", ".join(f"{k} {v}" for k, v in cache["codec"].items() if k != "id") + ")"
          if cache else "pixels      no pixel cache")
    own = f"{t['size']} step {t['step']}, " if "size" in t else ""  # stores of this project's run folders
    print(f"teacher     {t.get('adapter', 'salt-run')} {t.get('model_class', 'VideoViT')} {own}width {t['width']}, "
          f"weights sha256 {t['sha256'][:16]}..., config sha256 {t.get('config_sha256', '?')[:16]}...")
    p = t.get("projection")
    print(f"projection  {p['kind']} {p['from_width']} -> {p['dim']} (seed {p['seed']}, {PROJECTION})" if p else "projection  none")
    print(f"shards      {s['shards_committed']}/{s['shards_expected']} committed" + (f", missing {s['missing_shards']}" if s["missing_shards"] else ""))
    print(f"decoder     {s['decoder']}")
    print(f"errors      {s['errors']}")
    for e in s["error_reasons"]:
        print(f"  {e['key']}: {e['reason']}")
    return s


if __name__ == "__main__":
    entry(main)

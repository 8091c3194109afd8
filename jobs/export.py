"""make export CKPT=<run folder or snapshot> [OUT=<folder>]: the encoder alone, in this project's
format and, where the mapping is exact, as a transformers VJEPA2Model folder and in V-JEPA 2's
checkpoint layout (docs/export.md). Prints one line per format: written (with the measured
difference from the project's forward) or not written and why."""

from __future__ import annotations

from pathlib import Path

from jobs.cli import entry, parser
from pipeline.export import FORMATS, export


def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__, flags=(), overrides=False)  # the checkpoint carries its own config
    p.add_argument("--ckpt", required=True, help="teacher or student run folder, or a snapshot (snapshots/step-N)")
    p.add_argument("--out", default=None, help="output folder (default: <ckpt>/export)")
    p.add_argument("--format", action="append", choices=FORMATS, default=None,
                   help="write only this format (repeatable); it must map exactly, else nothing is written")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.ckpt) / "export"
    manifest = export(args.ckpt, out, formats=args.format)
    for fmt, info in manifest["written"].items():
        print(f"{fmt:10s} {out / info['folder']}: {', '.join(info['files'])} "
              f"(tokens within {info['max_relative_token_difference']:.1e} of the project's forward)")
    for fmt, why in manifest["refused"].items():
        print(f"{fmt:10s} not written: {why}")
    print(f"export of {args.ckpt} -> {out} ({out / 'export.json'})")
    return manifest


if __name__ == "__main__":
    entry(main)

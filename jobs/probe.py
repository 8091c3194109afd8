"""make probe: the readouts (attentive probe over probe seeds, k-NN, linear) of a frozen checkpoint (teacher or student run folder, or
random:<size> for the untrained floor; `<either>#blocks=K` reads the tokens after its first K blocks) on a
labelled dataset's train/ and val/ splits.

The encoder's features are cached (docs/evaluation.md): a second run on the same encoder, data and
views reads them and does not run the encoder. `probe.protocol=vjepa2`: V-JEPA 2's frozen evaluation.
`torchrun --nproc_per_node N -m jobs.probe ...` (make probe NPROC=N): every rank extracts its share
of the clips and trains its share of each batch; rank 0 writes and prints."""

from __future__ import annotations

from pathlib import Path

from jobs.cli import config_from, entry, parser
from experiments.probing import RANDOM, probe_checkpoint, read_probe_features, split_blocks
from salt.train.distributed import finish, init_distributed


def default_out(ckpt: str) -> Path:
    ckpt, blocks = split_blocks(ckpt)
    part = f"-blocks{blocks}" if blocks is not None else ""
    if ckpt.startswith(RANDOM):
        return Path("runs") / f"probe-random-{ckpt.removeprefix(RANDOM)}{part}"
    return Path(ckpt) / f"probe{part}"


def format_table(results: dict[str, dict]) -> str:
    """Top-1 per task: the linear readout (reported), k-NN, and the attentive probe's mean +- sd
    over probe seeds with the setting the held-out train clips chose for the first seed."""
    rows = [f"{'task':<12} {'linear':>7} {'k-NN':>6} {'chance':>7} {'attentive':>15} {'lr':>8} {'wd':>6}"]
    for task, r in results.items():
        a = r.get("attentive")
        attentive = f"{a['top1']:.3f} ± {a['sd']:.3f} {a['lr']:>8.1e} {a['wd']:>6g}" if a else f"{'(probe.seeds=0)':>15}"
        rows.append(f"{task:<12} {r['top1']:>7.3f} {r['knn_top1']:>6.3f} {r['chance']:>7.3f} {attentive}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    p = parser(__doc__)
    p.add_argument("--ckpt", required=True, help="run folder with checkpoint.safetensors, or random:<size>; "
                   "either with #blocks=K: the tokens after its first K blocks")
    p.add_argument("--task", action="append", default=None, help="task of labels.json (repeatable; default: all)")
    p.add_argument("--out", default=None, help="output folder (default: <ckpt>/probe, runs/probe-random-<size>; -blocksK appended)")
    args = p.parse_args(argv)  # --run is not used: --ckpt and --out say where
    cfg = config_from(args)
    out = Path(args.out) if args.out else default_out(args.ckpt)
    rank = init_distributed()
    try:
        results = probe_checkpoint(
            args.ckpt, cfg, args.data, out, tasks=args.task, progress=not args.no_progress and rank.is_main
        )
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"probe error: {e}") from None
    finish()
    if not rank.is_main:
        return results
    features = read_probe_features(out)
    print(f"probe of {args.ckpt} -> {out}")
    print(f"frozen tokens: width {features['width']}, effective rank (RankMe) {features['effective_rank']}")
    encoded = features["encoded_rows"]
    print(f"features: {'all cached, the encoder was not run' if encoded == 0 else f'{encoded} rows encoded'} "
          f"({features['stores']['train']}, {features['stores']['val']})")
    print(format_table(results))
    return results


if __name__ == "__main__":
    entry(main)

"""make plan [ARGS="key=value ..."] [PRESET=table10] [JSON=1]: FLOPs, store size, GPU-hours of a SALT pipeline.

Keys are the fields of pipeline.feeding.PlanInputs (defaults: the paper's setting), e.g.
`student=vit_h views_per_clip=4 storage.keepbits=5 storage.codec=blosc gpu_flops_per_s=250e12`.
The input-side rates (video decode, the k-views-per-decode and pixel-cache loaders, and the pixel
cache's bytes per view) are this machine's measured ones (--bench, which `make bench` writes)
unless a key=value sets them. The work: experiments/planning.py.
"""

from __future__ import annotations

import sys

from experiments.planning import plan_text
from jobs.cli import entry, parser
from salt.config import ConfigError


def main(argv: list[str] | None = None) -> str:
    p = parser(__doc__, flags=("config",), config=None, help={
        "config": "a training config: plan the run it describes (sizes, geometry, steps, batch, storage) "
                  "instead of the paper's setting",
        "overrides": "PlanInputs fields as key=value, on top of that",
    })
    p.add_argument("--preset", choices=["table10"], help="the paper's table 10 SALT rows instead of one plan")
    p.add_argument("--json", action="store_true")
    p.add_argument("--bench", default="benchmarks.json", help="make bench's results: the measured input-side rates")
    args = p.parse_args(argv)
    if args.preset and (args.overrides or args.config):
        p.error("--preset fixes its inputs; it takes no --config or key=value overrides")
    try:
        text = plan_text(config=args.config, overrides=args.overrides, bench=args.bench, preset=args.preset, as_json=args.json)
    except ConfigError as e:
        sys.exit(f"plan error: {e}")
    print(text)
    return text


if __name__ == "__main__":
    entry(main)

"""Ray: a local instance, or the cluster RAY_ADDRESS names. Extraction, sweeps and the bench share it."""

from __future__ import annotations

import os


def init_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING")
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, logging_level="WARNING")

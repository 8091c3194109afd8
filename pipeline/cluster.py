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


def actor_gpus(resources: dict[str, float] | None = None) -> int:
    """GPUs per teacher actor: one where the cluster has GPUs (on any node), none otherwise.

    Asked of the cluster, not of the driver: a driver on a CPU head node still places its
    actors on the GPU workers, and a driver that sees CUDA on a CPU-only cluster does not
    ask for GPUs no node has (its actors would never be scheduled)."""
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    return 1 if resources.get("GPU", 0) >= 1 else 0

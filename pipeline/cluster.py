"""Ray: a local instance, or the cluster RAY_ADDRESS names. Extraction, sweeps and the bench share it.

On a SLURM allocation (experiments/slurm.py: ray_script starts a head on the first node and a worker
on every other) the driver gets RAY_ADDRESS and SALT_RAY_NODES, the allocation's node count, and waits
until that many nodes have joined: actors sized from the cluster's resources then see all of them.
A local Ray inside a SLURM job takes the CPUs SLURM gave it (SLURM_CPUS_ON_NODE), not the node's.
"""

from __future__ import annotations

import os
import time

NODES_TIMEOUT_S = 300  # how long a driver waits for the allocation's Ray workers to join


def init_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="WARNING")
        wait_for_nodes(int(os.environ.get("SALT_RAY_NODES", "0")))
    else:
        # address="local": a plain ray.init() joins whatever cluster /tmp/ray/ray_current_cluster names
        # (left by any `ray start` on the machine, live or stale) instead of starting our own
        ray.init(address="local", num_cpus=num_cpus or local_cpus(), include_dashboard=False, logging_level="WARNING")


def local_cpus() -> int:
    """The CPUs this process may use: a SLURM job's allocation on this node, else the machine's."""
    return int(os.environ.get("SLURM_CPUS_ON_NODE") or os.cpu_count() or 1)


def wait_for_nodes(nodes: int, timeout_s: float = NODES_TIMEOUT_S) -> None:
    """Block until `nodes` Ray nodes are alive (0: do not wait); OSError naming the shortfall after timeout_s."""
    import ray

    end = time.monotonic() + timeout_s
    while (alive := sum(n["Alive"] for n in ray.nodes())) < nodes:
        if time.monotonic() > end:
            raise OSError(f"only {alive} of SALT_RAY_NODES={nodes} Ray nodes joined within {timeout_s:.0f} s "
                          "(see the ray start lines of the job's log)")
        time.sleep(1)


def actor_gpus(resources: dict[str, float] | None = None) -> int:
    """GPUs per teacher actor: one where the cluster has GPUs (on any node), none otherwise.

    Asked of the cluster, not of the driver: a driver on a CPU head node still places its
    actors on the GPU workers, and a driver that sees CUDA on a CPU-only cluster does not
    ask for GPUs no node has (its actors would never be scheduled)."""
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    return 1 if resources.get("GPU", 0) >= 1 else 0

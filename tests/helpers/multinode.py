"""A real multi-node Ray cluster on 127.0.0.1 for tests and benchmarks (Ray's own harness).

`LocalCluster` starts a head node (driver side, no GPU) and worker nodes that declare GPUs
(`num_gpus=1`) although the machine has no CUDA, so the one-actor-per-GPU path is what runs and
the workers fall back to the CPU. The head shortens Ray's node health checks so a killed node is
declared dead in about `HEALTH["health_check_period_ms"] * failure_threshold` (3 s) rather than
Ray's default of about 15 s; ninebest itself runs with Ray's defaults. Every process listens on
loopback only (`pipeline.cluster.connect.loopback`). Nodes are killed through the harness
(`remove_node(allow_graceful=False)`: the node's raylet and agents, whose workers then exit);
nothing here stops Ray processes it did not start.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from pipeline.cluster.connect import LOOPBACK, loopback

HELPERS = Path(__file__).resolve().parent  # tiny_models and the other test helpers
HEALTH = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 2000,
    "health_check_failure_threshold": 3,
}
NODE = {"node_ip_address": LOOPBACK, "object_store_memory": 80 * 1024**2}


class LocalCluster:
    """A head with `head_cpus` CPUs and GPU worker nodes of one CPU and one GPU each."""

    def __init__(self, env: dict[str, str] | None = None, head_cpus: int = 1):
        with loopback():
            self.cluster = Cluster(
                initialize_head=True,
                head_node_args={
                    **NODE, "num_cpus": head_cpus, "num_gpus": 0, "include_dashboard": False,
                    "_system_config": HEALTH,
                },
            )  # fmt: skip
            paths = os.pathsep.join([str(HELPERS), *sys.path])
            ray.init(
                address=self.cluster.address,
                runtime_env={"env_vars": {"PYTHONPATH": paths, **(env or {})}},
                logging_level=logging.WARNING,
            )

    @property
    def workers(self) -> list:
        return sorted(self.cluster.worker_nodes, key=lambda n: n.node_id)

    def add(self, num_gpus: int = 1, num_cpus: int = 1):
        """Start one more worker node; return Ray's Node (its `node_id` as the runtime gives)."""
        with loopback():
            return self.cluster.add_node(**NODE, num_cpus=num_cpus, num_gpus=num_gpus)

    def kill(self, node) -> None:
        """Kill a node without warning, as a lost machine or a spot preemption would."""
        self.cluster.remove_node(node, allow_graceful=False)

    def resize(self, count: int) -> None:
        """Exactly `count` GPU worker nodes (added, or killed newest first)."""
        while len(self.workers) < count:
            self.add()
        for node in self.workers[count:]:
            self.kill(node)
        self.wait_alive(count)

    def node(self, node_id: str):
        [node] = [n for n in self.workers if n.node_id == node_id]
        return node

    def wait_alive(self, workers: int, timeout: float = 60.0) -> None:
        """Until Ray holds exactly the head and `workers` worker nodes alive."""
        import time

        deadline = time.time() + timeout
        while sum(n["Alive"] for n in ray.nodes()) != workers + 1:
            assert time.time() < deadline, f"the cluster did not settle on {workers} workers"
            time.sleep(0.2)

    def shutdown(self) -> None:
        ray.shutdown()
        self.cluster.shutdown()

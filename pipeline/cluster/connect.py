"""The Ray session of a run: connect to `--address`, or start a local instance on loopback only.

A local instance (no `--address`, no RAY_ADDRESS) must listen on 127.0.0.1 and nowhere else: on a
laptop on a shared network anything else is an open door. Ray replaces `_node_ip_address=
"127.0.0.1"` with the machine's outside address unless its multi-node mode is off
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, read by Ray when it is imported), and then gcs_server,
raylet, workers and the dashboard and runtime-env agents bind every interface or the outside
address. `loopback()` turns that mode off for the processes this instance starts (they inherit
the variable) and for this process (Ray read the variable at import, so its constant is set too),
and restores both afterwards so a later `--address` connection is unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

import ray
import ray._private.ray_constants as ray_constants

from pipeline.errors import ConfigError

LOOPBACK = "127.0.0.1"
CLUSTER_MODE = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR  # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER


@contextlib.contextmanager
def loopback() -> Iterator[None]:
    """Ray processes started inside listen on 127.0.0.1 only (see the module docstring)."""
    before_env = os.environ.get(CLUSTER_MODE)
    before_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[CLUSTER_MODE] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_flag
        if before_env is None:
            os.environ.pop(CLUSTER_MODE, None)
        else:
            os.environ[CLUSTER_MODE] = before_env


def start_local() -> None:
    """A local instance on loopback only; its workers import what the driver can."""
    with loopback():
        ray.init(
            address="local",  # a new instance: never a `ray start` cluster found on the machine
            include_dashboard=False,
            dashboard_host=LOOPBACK,
            _node_ip_address=LOOPBACK,
            object_store_memory=256 * 1024**2,
            logging_level=logging.WARNING,
            runtime_env={
                "env_vars": {
                    "PYTHONPATH": os.pathsep.join(import_paths()),
                    CLUSTER_MODE: "0",  # workers that start more Ray processes keep to loopback
                }
            },
        )


class ray_session:
    """Connect to `address`, or start a local loopback instance; shut down only what we started."""

    def __init__(self, address: str | None):
        self.address = address
        self.started = False

    def __enter__(self) -> ray_session:
        if ray.is_initialized():
            return self
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        if self.address is None and not os.environ.get("RAY_ADDRESS"):
            start_local()
        else:
            try:
                ray.init(address=self.address, logging_level=logging.WARNING)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = self.address or os.environ["RAY_ADDRESS"]
                raise ConfigError(
                    f"cannot connect to the Ray cluster at {where!r}"
                    f" ({str(e).splitlines()[0]}); check --address and that the cluster is up"
                ) from e
        self.started = True
        return self

    def __exit__(self, *exc) -> None:
        if self.started:
            ray.shutdown()


def import_paths() -> list[str]:
    """The driver's import path, so a local instance's workers import what the driver can."""
    cwd = os.getcwd()
    return [cwd] + [p for p in sys.path if p and os.path.isdir(p) and p != cwd]


def ray_version() -> str:
    return ray.__version__

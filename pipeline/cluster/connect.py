"""Connect to a Ray cluster, or start a local instance on loopback for the length of a command."""

from __future__ import annotations

import logging
import os
import sys

import ray

from pipeline.errors import ConfigError


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
            ray.init(
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                object_store_memory=256 * 1024**2,
                logging_level=logging.WARNING,
                runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(_import_paths())}},
            )
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


def _import_paths() -> list[str]:
    """The driver's import path, so a local instance's workers import what the driver can."""
    cwd = os.getcwd()
    return [cwd] + [p for p in sys.path if p and os.path.isdir(p) and p != cwd]


def ray_version() -> str:
    return ray.__version__

"""Shared fixtures: real photographs, seeded weights files, a loopback Ray instance per module."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torchvision

HELPERS = Path(__file__).resolve().parent / "helpers"
sys.path.insert(0, str(HELPERS))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray's dashboard asks cloud metadata services (169.254.169.254, metadata.google.internal) when it
# starts, even with usage stats off. Tests send nothing off this machine: such requests go to a
# closed loopback port instead; loopback itself is reached directly.
for _var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
    os.environ[_var] = "http://127.0.0.1:9"
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost,::1"

from photos import make_photos  # noqa: E402


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """48 real photographs (crops and flips of skimage.data) in five folders, JPEG and PNG."""
    root = tmp_path_factory.mktemp("photos")
    make_photos(root, variants=3)
    return root


def save_seeded(name: str, path: Path, seed: int = 1234) -> Path:
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def alexnet_weights(tmp_path_factory) -> Path:
    return save_seeded("alexnet", tmp_path_factory.mktemp("weights") / "alexnet.pt")


@pytest.fixture(scope="session")
def resnet18_weights(tmp_path_factory) -> Path:
    return save_seeded("resnet18", tmp_path_factory.mktemp("weights") / "resnet18.pt")


@pytest.fixture(scope="module")
def ray_local():
    """One loopback Ray instance for a test module; workers import what the tests import."""
    import ray

    ray.init(
        address="local",  # a new instance, never a `ray start` cluster found on this machine
        num_cpus=2,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        object_store_memory=128 * 1024**2,
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(HELPERS), *sys.path])}},
        logging_level="WARNING",
    )
    yield ray
    ray.shutdown()

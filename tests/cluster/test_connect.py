"""The local instance a run starts without --address listens on loopback only."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import ray  # noqa: F401  (puts Ray's bundled psutil on the path)

import psutil  # noqa: E402  isort: skip

HELPERS = Path(__file__).resolve().parents[1] / "helpers"


def listening(root: psutil.Process) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening inet socket of `root`'s process tree."""
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = proc.name()
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((name, conn.laddr.ip, conn.laddr.port))
        except psutil.NoSuchProcess:  # a worker that finished meanwhile
            continue
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or ip).is_loopback


def test_a_run_without_address_listens_on_loopback_only(photos, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "NINEBEST_FAULTS": "delay=0.2", "PYTHONPATH": str(HELPERS),
           "RAY_ADDRESS": ""}  # fmt: skip
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # Ray's default: multi-node mode on
    argv = [sys.executable, "-m", "pipeline", "index", "--model", "tiny_models:tiny", "--layers",
            "conv2,fc", "--data", str(photos), "--out", str(out), "--batch-size", "2",
            "--shard-size", "8", "--workers", "2"]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob("partials/*/_COMMIT.json")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        sockets = listening(psutil.Process(proc.pid))
        _, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()[-2000:]
    names = {name for name, _, _ in sockets}
    for ray_process in ("gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"):
        assert ray_process in names, f"{ray_process} not found listening: {sorted(names)}"
    assert any(name.startswith("ray::ShardIndexer") for name in names), sorted(names)
    outside = [s for s in sockets if not is_loopback(s[1])]
    assert not outside, f"listening off loopback: {outside}"

"""A real S3-protocol server on loopback for tests: moto's server, plus a trap for stray traffic.

`offline_aws_env` points every HTTP(S) proxy at `ProxyTrap`, a loopback listener that records
and refuses whatever connects to it, and exempts only 127.0.0.1. A request that escapes the
storage options (to real AWS, or to the instance metadata service) therefore never leaves the
machine: it lands in the trap, fails, and the test can assert that the trap stayed empty.
Ray workers inherit the environment of the process that starts the local cluster, so set it
before `ray.init`.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

REGION = "us-east-1"
# Ray's usage_lib probes these cloud metadata endpoints at every cluster start, even with
# RAY_USAGE_STATS_ENABLED=0; the trap keeps them on loopback, and tests tolerate exactly these.
RAY_CLOUD_PROBES = frozenset(
    {
        "GET http://169.254.169.254/metadata/instance?api-version=2021-12-13 HTTP/1.1",
        "GET http://metadata.google.internal/computeMetadata/v1 HTTP/1.1",
        "GET http://169.254.169.254/latest/meta-data/ HTTP/1.1",
    }
)


class ProxyTrap:
    """A loopback TCP listener that records the first line of every connection and closes it."""

    def __init__(self):
        self.hits: list[str] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:  # closed
                return
            with conn:
                conn.settimeout(2)
                try:
                    first = conn.recv(4096).split(b"\r\n", 1)[0]
                except OSError:
                    first = b"?"
                self.hits.append(first.decode(errors="replace"))

    def strays(self) -> list[str]:
        """Requests that tried to leave loopback, except Ray's own cloud probes."""
        return [hit for hit in self.hits if hit not in RAY_CLOUD_PROBES]

    def close(self) -> None:
        self._sock.close()


def offline_aws_env(proxy_port: int, key: str, secret: str) -> dict[str, str | None]:
    """Environment that keeps boto/s3fs on loopback (None means: unset the variable)."""
    proxy = f"http://127.0.0.1:{proxy_port}"
    return {
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_EC2_METADATA_DISABLED": "true",  # no credential lookup on 169.254.169.254
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
        "AWS_PROFILE": None,
        "AWS_SESSION_TOKEN": None,
        "AWS_ENDPOINT_URL": None,  # the endpoint must come from the storage options alone
        "AWS_ENDPOINT_URL_S3": None,
        **{name: proxy for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


class MotoS3:
    """moto's S3 server on 127.0.0.1 and a free port, in a thread of this process."""

    def __init__(self):
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, self.port = self._server.get_host_and_port()
        assert host == "127.0.0.1", host
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def storage_options(self, key: str, secret: str) -> dict[str, Any]:
        """fsspec options for s3fs: explicit credentials and the loopback endpoint."""
        return {
            "key": key,
            "secret": secret,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": REGION},
        }

    def client(self, key: str, secret: str):
        """A boto3 client for checks the tests make behind the pipeline's back."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
        )

    def stop(self) -> None:
        self._server.stop()

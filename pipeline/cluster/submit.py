"""Ray job submission: `ninebest submit`, `jobs`, `status`, `logs`, `stop`.

`submit` sends `python -m jobs.<command> ARGS` to a cluster's job server (the head's dashboard,
`http://HEAD:8265`) through Ray's `JobSubmissionClient`, prints the job id, follows the job's
logs and exits with its outcome. The job's driver runs on the head with RAY_ADDRESS set, so the
`ninebest index` inside it uses the whole cluster; paths in ARGS are read on the cluster.

Token authentication: the dashboard answers `GET /api/authentication_mode` without a token. When
it says "token", every request carries `authorization: Bearer <token>`, the token taken from
--token, --token-file, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, first found
(Ray's own order after the flags). The token is never printed, and never put in the job.

Exit statuses: 0 the job SUCCEEDED (or was submitted, with --no-wait), 1 it FAILED, 2 ninebest
could not do what was asked (bad flags, cluster unreachable, token refused, unknown job),
3 it was STOPPED, 130 interrupted while following (the job keeps running).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, InputNotFoundError, NinebestError, closest

JOB_COMMANDS = ("index", "export", "reindex")  # each runs as `python -m jobs.<command>`
EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 3}
INTERRUPTED = 130
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
TOKEN_HELP = "pass --token-file FILE or set RAY_AUTH_TOKEN (`ray get-auth-token` on the head)"
PROBE_TIMEOUT = 10.0  # seconds to wait for the dashboard to answer at all
QUIET_LOGGERS = (  # Ray's INFO lines about packaging, uploads and websockets, on every call
    "ray.dashboard.modules.job.sdk",
    "ray.dashboard.modules.dashboard_sdk",
    "ray._private.runtime_env.packaging",
)


class ClusterError(NinebestError, ConnectionError):
    """The job server cannot be reached, or answered with an error."""


class TokenError(NinebestError, PermissionError):
    """The cluster wants a token that we do not have, or refused the one we sent."""


def add_commands(sub) -> None:
    """Register `submit`, `jobs`, `status`, `logs` and `stop` on the `ninebest` subparsers."""
    p = sub.add_parser("submit", help="run index/export/reindex as a Ray job on a cluster")
    add_cluster_flags(p)
    p.add_argument("--working-dir", help="local folder uploaded as the job's working directory")
    p.add_argument("--runtime-env", help="YAML or JSON file holding the job's Ray runtime_env")
    p.add_argument("--job-id", help="submission id to use (default: one Ray makes up)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("job", nargs=argparse.REMAINDER, help="-- index|export|reindex ARGS...")
    p.set_defaults(handler=run_submit)
    p = sub.add_parser("jobs", help="list the jobs of a cluster, one a line")
    add_cluster_flags(p)
    p.set_defaults(handler=run_jobs)
    p = sub.add_parser("status", help="a job's status and message")
    add_job_flags(p)
    p.set_defaults(handler=run_status)
    p = sub.add_parser("logs", help="a job's logs")
    add_job_flags(p)
    p.add_argument("--follow", action="store_true", help="follow until the job ends")
    p.set_defaults(handler=run_logs)
    p = sub.add_parser("stop", help="stop a job")
    add_job_flags(p)
    p.set_defaults(handler=run_stop)


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address", help="the head's dashboard, http://HEAD:8265 (default: RAY_ADDRESS)"
    )
    token = p.add_mutually_exclusive_group()
    token.add_argument("--token", help="the cluster's token (prefer --token-file: argv is public)")
    token.add_argument("--token-file", help="file holding the cluster's token")


def add_job_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("id", help="submission id, as `ninebest submit` and `ninebest jobs` print it")
    add_cluster_flags(p)


# -- connecting --------------------------------------------------------------------------------


def dashboard_address(flag: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS (as `ray job` reads them)."""
    address = flag or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("no cluster given: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if address == "auto" or address.startswith("ray://"):
        raise ConfigError(
            f"{address!r} is not a job server address; pass --address http://HEAD:8265"
        )
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


def auth_mode(address: str) -> str | None:
    """The cluster's authentication mode ("token", "disabled"), None when it does not say."""
    import requests

    try:
        r = requests.get(f"{address}/api/authentication_mode", timeout=PROBE_TIMEOUT)
    except requests.RequestException as e:
        raise ClusterError(
            f"cannot reach the Ray dashboard at {address} ({type(e).__name__}); "
            "check --address and that the head runs with a dashboard"
        ) from e
    try:
        return r.json()["authentication_mode"] if r.ok else None
    except (ValueError, KeyError, TypeError):
        return None


def find_token(args: argparse.Namespace) -> tuple[str, str] | None:
    """(token, where it came from), looked up in Ray's order after the flags; None if none."""
    if args.token:
        return args.token.strip(), "--token"
    if args.token_file:
        return read_token(args.token_file, "--token-file"), f"--token-file {args.token_file}"
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if path := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return read_token(path, "RAY_AUTH_TOKEN_PATH"), f"RAY_AUTH_TOKEN_PATH {path}"
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and default.read_text().strip():
        return default.read_text().strip(), str(default)
    return None


def read_token(path: str, source: str) -> str:
    try:
        token = Path(path).expanduser().read_text().strip()
    except FileNotFoundError as e:
        raise InputNotFoundError(f"{source} {path!r} does not exist") from e
    except OSError as e:
        raise ConfigError(f"cannot read {source} {path!r}: {e.strerror}") from e
    if not token:
        raise ConfigError(f"{source} {path!r} is empty; {TOKEN_HELP}")
    return token


class Cluster:
    """A connected JobSubmissionClient plus what error messages need to say."""

    def __init__(self, args: argparse.Namespace):
        self.address = dashboard_address(args.address)
        mode = auth_mode(self.address)
        found = find_token(args) if mode != "disabled" else None
        self.token_source = found[1] if found else None
        if mode == "token" and not found:
            raise TokenError(
                f"the cluster at {self.address} requires a token and none was found; {TOKEN_HELP}"
            )
        headers = {"authorization": f"Bearer {found[0]}"} if found else {}
        with self.errors(), without_env("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
            from ray.job_submission import JobSubmissionClient

            for name in QUIET_LOGGERS:
                logging.getLogger(name).setLevel(logging.WARNING)
            # RAY_ADDRESS would override the address argument (ray/dashboard/utils.py)
            self.client = JobSubmissionClient(self.address, headers=headers)

    @contextlib.contextmanager
    def errors(self, job_id: str | None = None):
        """Turn the Ray client's exceptions into one-line ninebest errors."""
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except NinebestError:
            raise
        except AuthenticationError as e:
            raise self.token_error(str(e)) from None
        except (ConnectionError, requests.RequestException) as e:  # e.g. the head went away
            raise ClusterError(
                f"cannot reach the Ray dashboard at {self.address}; "
                "check --address and that the head runs with a dashboard"
            ) from e
        except RuntimeError as e:
            raise self.server_error(str(e), job_id) from e

    def token_error(self, message: str) -> TokenError:
        if "Authentication failed" in message:  # HTTP 403: a token was sent and refused
            where = f" (from {self.token_source})" if self.token_source else ""
            return TokenError(f"the cluster refused the token{where}; {TOKEN_HELP}")
        if "couldn't find" in message:  # RAY_AUTH_MODE=token here, and no token anywhere
            return TokenError(f"RAY_AUTH_MODE=token is set but no token was found; {TOKEN_HELP}")
        return TokenError(
            f"the cluster at {self.address} requires a token and none was sent; {TOKEN_HELP}"
        )

    def server_error(self, message: str, job_id: str | None) -> NinebestError:
        status = re.search(r"status code (\d+)", message)
        if job_id and status and status.group(1) == "404":
            return ConfigError(
                f"no job {job_id!r} on the cluster at {self.address}; `ninebest jobs` lists them"
            )
        if "already exists" in message:
            return ConfigError(f"--job-id {job_id!r} is taken on {self.address}; choose another")
        return ClusterError(f"the job server at {self.address} answered: {first_line(message)}")

    def info(self, job_id: str):
        with self.errors(job_id):
            return self.client.get_job_info(job_id)


@contextlib.contextmanager
def without_env(*names: str):
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# -- submit ------------------------------------------------------------------------------------


def job_argv(job: list[str]) -> list[str]:
    """The job's command and arguments, after an optional `--`."""
    argv = job[1:] if job[:1] == ["--"] else job
    if not argv:
        raise ConfigError("nothing to submit: add `-- index ARGS...` (or export, reindex)")
    if argv[0] not in JOB_COMMANDS:
        raise ConfigError(
            f"cannot submit {argv[0]!r}; choose one of {closest(argv[0], JOB_COMMANDS)}"
        )
    return argv


def entrypoint(argv: list[str]) -> str:
    """The shell command the cluster runs: `python -m jobs.<command> ARGS`, quoted."""
    return shlex.join(["python", "-m", f"jobs.{argv[0]}", *argv[1:]])


def runtime_env(path: str | None, working_dir: str | None) -> dict[str, Any]:
    """The runtime_env file (YAML or JSON), with --working-dir replacing its working_dir."""
    import yaml

    env: Any = {}
    if path:
        try:
            env = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as e:
            raise InputNotFoundError(f"--runtime-env {path!r} does not exist") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"--runtime-env {path!r} is not YAML or JSON: {e}") from e
        if not isinstance(env, dict):
            raise ConfigError(
                f"--runtime-env {path!r} must hold a mapping, like jobs/runtime_env.yaml"
            )
    if working_dir:
        env["working_dir"] = working_dir
    local = env.get("working_dir")
    if isinstance(local, str) and "://" not in local and not Path(local).is_dir():
        raise InputNotFoundError(f"working_dir {local!r} is not a folder")
    return env


def run_submit(args: argparse.Namespace) -> int:
    argv = job_argv(args.job)
    env = runtime_env(args.runtime_env, args.working_dir)
    cluster = Cluster(args)
    with cluster.errors(args.job_id):
        try:
            job_id = cluster.client.submit_job(
                entrypoint=entrypoint(argv),
                runtime_env=env,
                submission_id=args.job_id,
                metadata={"ninebest_command": argv[0]},
            )
        except (ValueError, TypeError) as e:  # Ray's runtime_env validation
            raise ConfigError(f"the job's runtime_env is invalid: {first_line(str(e))}") from e
    print(f"job: {job_id}  (on {cluster.address})", flush=True)
    if args.no_wait:
        print(f"follow: ninebest logs {job_id} --follow; stop: ninebest stop {job_id}")
        return 0
    return follow(cluster, job_id)


# -- following a job ---------------------------------------------------------------------------


def follow(cluster: Cluster, job_id: str) -> int:
    """Print the job's logs as they come until it ends; return its exit status (see EXIT)."""
    import aiohttp

    printed = [0]  # characters written so far, kept if the websocket breaks
    try:
        try:
            asyncio.run(tail(cluster, job_id, printed))
        except (RuntimeError, OSError, aiohttp.ClientError):
            poll(cluster, job_id, printed[0])  # the websocket broke: poll the rest instead
        wait_until_done(cluster, job_id)
    except KeyboardInterrupt:
        return interrupted(job_id)
    return outcome(cluster, job_id)


async def tail(cluster: Cluster, job_id: str, printed: list[int]) -> None:
    """Stream the job's logs over the job server's websocket; it closes when the job ends."""
    async for chunk in cluster.client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()
        printed[0] += len(chunk)


def poll(cluster: Cluster, job_id: str, printed: int, every: float = 1.0) -> None:
    """Print new log text once a second until the job is in a terminal state."""
    while True:
        done = status_of(cluster.info(job_id)) in TERMINAL
        with cluster.errors(job_id):
            logs = cluster.client.get_job_logs(job_id)
        sys.stdout.write(logs[printed:])
        sys.stdout.flush()
        printed = max(printed, len(logs))
        if done:
            return
        time.sleep(every)


def wait_until_done(cluster: Cluster, job_id: str, timeout: float = 30.0) -> str:
    """The job's status once terminal, or whatever it is after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (status := status_of(cluster.info(job_id))) not in TERMINAL:
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    return status


def status_of(info) -> str:
    """The status's name ("SUCCEEDED", "FAILED", ...); JobDetails.status is a str Enum."""
    return str(getattr(info.status, "value", info.status))


def interrupted(job_id: str) -> int:
    print(
        f"ninebest: stopped following {job_id}; it keeps running "
        f"(ninebest logs {job_id} --follow, or ninebest stop {job_id})",
        file=sys.stderr,
    )
    return INTERRUPTED


def outcome(cluster: Cluster, job_id: str) -> int:
    """Report a finished job in one line; its exit status (see EXIT)."""
    info = cluster.info(job_id)
    status = status_of(info)
    if status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED")
    elif status == "FAILED":
        with cluster.errors(job_id):
            logs = cluster.client.get_job_logs(job_id)
        print(f"ninebest: job {job_id} FAILED: {error_line(logs, info.message)}", file=sys.stderr)
    elif status == "STOPPED":
        print(f"ninebest: job {job_id} was STOPPED", file=sys.stderr)
    else:
        print(f"ninebest: job {job_id} is {status}", file=sys.stderr)
    return EXIT.get(status, 1)


def error_line(logs: str, message: str | None) -> str:
    """The line that says why a job failed: ninebest's own error, a traceback's last line, or
    the last thing the job printed; else Ray's message (a runtime_env that did not install)."""
    lines = [line.strip() for line in (logs or "").splitlines() if line.strip()]
    for pattern in (r"^ninebest: error: ", r"^[\w.]*(Error|Exception|Interrupt)\b"):
        found = [line for line in lines if re.search(pattern, line)]
        if found:
            return re.sub(r"^ninebest: error: ", "", found[-1])[:300]
    if lines:
        return lines[-1][:300]
    return first_line(message or "no message")[:300]


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text.strip())


# -- jobs, status, logs, stop ------------------------------------------------------------------


def run_jobs(args: argparse.Namespace) -> int:
    cluster = Cluster(args)
    with cluster.errors():
        jobs = cluster.client.list_jobs()
    for job in sorted(jobs, key=lambda j: j.start_time or 0):
        print(job_line(job))
    if not jobs:
        print(f"no jobs on {cluster.address}")
    return 0


def job_line(job) -> str:
    """`ID  STATUS  STARTED  DURATION  ENTRYPOINT` for `ninebest jobs`."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((job.start_time or 0) / 1000))
    end = job.end_time or time.time() * 1000
    took = f"{(end - job.start_time) / 1000:.0f}s" if job.start_time else "-"
    status = status_of(job)
    what = job.entrypoint or "(driver)"
    what = what if len(what) <= 100 else what[:99] + "…"
    return f"{job.submission_id or job.job_id:<28}  {status:<9}  {started}  {took:>6}  {what}"


def run_status(args: argparse.Namespace) -> int:
    cluster = Cluster(args)
    info = cluster.info(args.id)
    status = status_of(info)
    print(f"{args.id}  {status}  {first_line(info.message or '')}")
    return 0


def run_logs(args: argparse.Namespace) -> int:
    cluster = Cluster(args)
    cluster.info(args.id)  # an unknown id is one clean line, not a websocket error
    if args.follow:
        return follow(cluster, args.id)
    with cluster.errors(args.id):
        sys.stdout.write(cluster.client.get_job_logs(args.id))
    return 0


def run_stop(args: argparse.Namespace) -> int:
    cluster = Cluster(args)
    cluster.info(args.id)  # Ray's stop_job answers None, not an error, for an unknown id
    with cluster.errors(args.id):
        running = cluster.client.stop_job(args.id)
    if not running:
        print(f"{args.id} is not running ({status_of(cluster.info(args.id))})")
        return 0
    status = wait_until_done(cluster, args.id)
    print(f"{args.id} {status}" if status in TERMINAL else f"{args.id} is stopping")
    return 0

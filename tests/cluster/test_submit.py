"""`ninebest submit`, `jobs`, `status`, `logs`, `stop` against real local Ray clusters.

Each cluster is `ray start --head --block` on 127.0.0.1 with its own temp dir, ports and HOME
(so the machine's ~/.ray/auth_token is never read or written), once with token authentication
(Ray 2.60 turns it on because the head finds a token in ~/.ray/auth_token) and once with it off.
The CLI runs as a subprocess with a clean environment, as a user would run it; the submitted
index is checked against the brute-force oracle.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import requests
import torch

import oracle
from pipeline.cli import main
from pipeline.cluster import submit
from pipeline.net.models import load_model

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests" / "helpers"
VENV_BIN = Path(sys.executable).parent
READY_TIMEOUT = 150  # seconds for a head to answer job requests on a busy 2-core machine
CLI_TIMEOUT = 240  # seconds for one CLI call, a whole index job included
AGENT_PORTS = (
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
    "--ray-client-server-port",
    "--node-manager-port",
    "--object-manager-port",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without any RAY_* (an earlier ray.init sets RAY_AUTH_MODE)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), RAY_USAGE_STATS_ENABLED="0", **extra)
    return env


@dataclass
class Head:
    url: str
    auth: bool
    root: Path
    temp: Path  # Ray's --temp-dir: sessions, logs, sockets
    client_home: Path  # holds .ray/auth_token when the cluster wants a token
    token: str | None
    process: subprocess.Popen

    def cli(self, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run `ninebest ARGV` as a user on this machine would; stdout/stderr captured."""
        return subprocess.run(
            [sys.executable, "-m", "pipeline", *argv],
            cwd=ROOT,
            env=env or clean_env(self.client_home),
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
        )


def start_head(root: Path, auth: bool) -> Head:
    """`ray start --head --block` on loopback only, its own temp dir, ports and HOME."""
    head_home, client_home = root / "head-home", root / "client-home"
    token = secrets.token_hex(32) if auth else None
    for home in (head_home, client_home):
        (home / ".ray").mkdir(parents=True)
        if token:
            (home / ".ray" / "auth_token").write_text(token)
    env = clean_env(
        head_home,
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}",  # the job's `python` is this venv's
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # keep 127.0.0.1 (else Ray picks an outside IP)
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # stop at once on SIGTERM
    )
    if not auth:
        env["RAY_AUTH_MODE"] = "disabled"
    dashboard = free_port()
    # Ray's unix sockets live under the temp dir, and their paths must stay under 108 bytes
    temp = Path(tempfile.mkdtemp(prefix="nbray-", dir="/tmp" if os.path.isdir("/tmp") else None))
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
        "--port", str(free_port()), "--dashboard-port", str(dashboard),
        "--num-cpus", "2", "--object-store-memory", str(200 * 1024**2),
        "--include-dashboard", "true", "--disable-usage-stats",
        "--temp-dir", str(temp),
        *[x for flag in AGENT_PORTS for x in (flag, str(free_port()))],
    ]  # fmt: skip
    log = open(root / "head.log", "w")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    head = Head(f"http://127.0.0.1:{dashboard}", auth, root, temp, client_home, token, process)
    wait_ready(head)
    return head


def wait_ready(head: Head) -> None:
    """Wait until the job server lists jobs; fail with the head's log if it dies or stalls."""
    headers = {"authorization": f"Bearer {head.token}"} if head.token else {}
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if head.process.poll() is not None:
            break
        try:
            if requests.get(f"{head.url}/api/jobs/", headers=headers, timeout=5).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    log = (head.root / "head.log").read_text()[-3000:]
    stop_head(head)
    pytest.fail(f"the Ray head at {head.url} did not come up:\n{log}")


def stop_head(head: Head) -> None:
    """SIGTERM the `ray start --block` process group we started; kill what is left of it."""
    try:
        os.killpg(head.process.pid, signal.SIGTERM)
        head.process.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(head.process.pid, signal.SIGKILL)
        head.process.wait(timeout=10)
    # anything else still naming this cluster's temp dir (nothing, normally) is ours alone
    marker = str(head.temp).encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError, ValueError):
            if marker in cmdline.read_bytes():
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
    shutil.rmtree(head.temp, ignore_errors=True)


@pytest.fixture(scope="module", params=["token", "no-auth"])
def head(request, tmp_path_factory) -> Head:
    root = tmp_path_factory.mktemp(f"ray-{request.param}")
    head = start_head(root, auth=request.param == "token")
    mode = requests.get(f"{head.url}/api/authentication_mode", timeout=5).json()
    assert mode["authentication_mode"] == ("token" if head.auth else "disabled"), mode
    yield head
    stop_head(head)


@pytest.fixture(scope="module")
def job_files(tmp_path_factory) -> tuple[Path, Path]:
    """A working dir holding the tiny model, and a runtime_env file with an env var."""
    root = tmp_path_factory.mktemp("job-files")
    (root / "wd").mkdir()
    shutil.copy(TESTS / "tiny_models.py", root / "wd" / "tiny_models.py")
    (root / "runtime_env.yaml").write_text("env_vars:\n  OMP_NUM_THREADS: '1'\n")
    return root / "wd", root / "runtime_env.yaml"


def index_args(data: Path, out: Path, layers: str = "conv2,fc") -> list[str]:
    return [
        "index", "--model", "tiny_models:tiny", "--layers", layers, "--data", str(data),
        "--out", str(out), "--workers", "1", "--batch-size", "16", "--shard-size", "16",
    ]  # fmt: skip


def submit_args(head: Head, job_files, *flags: str) -> list[str]:
    wd, env_file = job_files
    return ["submit", "--address", head.url, "--working-dir", str(wd), "--runtime-env",
            str(env_file), *flags, "--"]  # fmt: skip


def job_id_of(stdout: str) -> str:
    match = re.match(r"job: (\S+)", stdout)
    assert match, stdout
    return match.group(1)


@pytest.fixture(scope="module")
def index_job(head, job_files, photos, tmp_path_factory):
    """One `index` job of the tiny model on the photographs, submitted and followed to the end."""
    out = tmp_path_factory.mktemp("submitted") / "out"
    done = head.cli(*submit_args(head, job_files), *index_args(photos, out))
    return done, out


def test_index_job_succeeds_and_its_index_equals_the_oracle(index_job, photos):
    done, out = index_job
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Running entrypoint" in done.stdout and "index: " in done.stdout  # the followed logs
    assert done.stdout.rstrip().endswith("SUCCEEDED")
    index = pd.read_parquet(out / "index")
    assert set(index.layer) == {"conv2", "fc"} and len(index) == (6 + 5) * 9
    paths = sorted(photos.rglob("*.*"), key=lambda p: p.relative_to(photos).as_posix())
    ids = [p.relative_to(photos).as_posix() for p in paths]
    model = load_model("tiny_models:tiny").module
    outputs = oracle.activations(
        model, ["conv2", "fc"], torch.stack([oracle.load(p) for p in paths])
    )
    oracle.compare(
        index.to_dict("records"), outputs, ids, k=9, hashes=oracle.content_hashes(photos, ids)
    )


def test_nightly_reindex_jobs_equal_a_from_scratch_index(head, job_files, photos, tmp_path):
    """Submit a reindex, add and remove images, submit another; compare with a fresh index job."""
    if not head.auth:
        pytest.skip("the reindex round trip runs once, on the token-auth cluster")
    data, out = tmp_path / "data", tmp_path / "out"
    shutil.copytree(photos, data)
    one = ["--batch-size", "1"]  # bit-identical activations however shards are cut
    reindex = ["reindex", *index_args(data, out)[1:], *one, "--keep", "2"]
    first = head.cli(*submit_args(head, job_files), *reindex)
    assert first.returncode == 0, first.stdout + first.stderr
    for path in sorted(data.rglob("*.jpg"))[:2]:
        path.unlink()
    (data / "added").mkdir()
    for i, path in enumerate(sorted(photos.rglob("*.png"))[:2]):
        shutil.copy(path, data / "added" / f"{i}.png")
    second = head.cli(*submit_args(head, job_files), *reindex)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "incremental" in second.stdout and "2 new" in second.stdout
    assert "2 removed" in second.stdout
    fresh = head.cli(*submit_args(head, job_files), *index_args(data, tmp_path / "fresh"), *one)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    latest = (out / "LATEST").read_text().strip()
    got = pd.read_parquet(out / "versions" / latest / "index")
    want = pd.read_parquet(tmp_path / "fresh" / "index")
    pd.testing.assert_frame_equal(got, want)


def test_jobs_status_and_logs(head, index_job):
    job_id = job_id_of(index_job[0].stdout)
    listed = head.cli("jobs", "--address", head.url)
    assert listed.returncode == 0, listed.stderr
    line = next(line for line in listed.stdout.splitlines() if line.startswith(job_id))
    assert re.search(r"SUCCEEDED .* python -m jobs\.index --model tiny_models:tiny", line), line
    status = head.cli("status", job_id, "--address", head.url)
    assert status.returncode == 0 and status.stdout.split()[:2] == [job_id, "SUCCEEDED"]
    logs = head.cli("logs", job_id, "--address", head.url)
    assert logs.returncode == 0 and "index: " in logs.stdout and "99 rows" in logs.stdout


def test_failing_job_exits_1_with_its_error_line(head, job_files, photos, tmp_path):
    argv = index_args(photos, tmp_path / "out", layers="conv3")
    done = head.cli(*submit_args(head, job_files), *argv)
    assert done.returncode == submit.EXIT["FAILED"] == 1, done.stdout + done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"ninebest: job \S+ FAILED: unknown layer 'conv3'.*'conv2'.*", last), last
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_stopped_job_exits_3(head, job_files, photos, tmp_path):
    job_id = f"ninebest-stop-{secrets.token_hex(3)}"
    flags = ("--no-wait", "--job-id", job_id)
    done = head.cli(*submit_args(head, job_files, *flags), *index_args(photos, tmp_path / "o"))
    assert done.returncode == 0 and job_id_of(done.stdout) == job_id, done.stderr
    stopped = head.cli("stop", job_id, "--address", head.url)
    assert stopped.returncode == 0 and stopped.stdout.strip() == f"{job_id} STOPPED", stopped
    followed = head.cli("logs", job_id, "--follow", "--address", head.url)
    assert followed.returncode == submit.EXIT["STOPPED"] == 3, followed.stderr
    assert followed.stderr.strip().endswith(f"job {job_id} was STOPPED")
    again = head.cli(*submit_args(head, job_files, *flags), *index_args(photos, tmp_path / "o"))
    assert one_line_error(again, f"--job-id '{job_id}' is taken")


def test_unknown_job_id(head):
    done = head.cli("status", "raysubmit_nope", "--address", head.url)
    assert one_line_error(done, "no job 'raysubmit_nope' on the cluster at")


def test_tokens(head, tmp_path):
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token-" + secrets.token_hex(8))
    refused = head.cli("jobs", "--address", head.url, "--token-file", str(wrong))
    none = head.cli("jobs", "--address", head.url, env=clean_env(tmp_path))  # empty HOME
    if head.auth:
        assert one_line_error(
            refused, rf"the cluster refused the token \(from --token-file {wrong}\)"
        )
        assert one_line_error(none, "the cluster at .* requires a token and none was found; pass")
        for done in (refused, none):
            assert wrong.read_text() not in done.stdout + done.stderr
            assert head.token not in done.stdout + done.stderr
        by_env = clean_env(tmp_path, RAY_AUTH_TOKEN=head.token)
        assert head.cli("jobs", "--address", head.url, env=by_env).returncode == 0
    else:  # no token needed, none sent
        assert refused.returncode == 0 and none.returncode == 0, refused.stderr + none.stderr


def one_line_error(done: subprocess.CompletedProcess, pattern: str) -> bool:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert re.match(rf"ninebest: error: {pattern}", lines[0]), lines[0]
    return True


# -- without a cluster -------------------------------------------------------------------------


def test_unreachable_address_is_one_line(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    for argv in (["jobs", "--address", closed], ["submit", "--address", closed, "--", "index"]):
        done = subprocess.run(
            [sys.executable, "-m", "pipeline", *argv],
            cwd=ROOT, env=clean_env(tmp_path), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert one_line_error(done, f"cannot reach the Ray dashboard at {closed}.*check --address")


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--"], "nothing to submit"),
        (["--", "indx"], r"cannot submit 'indx'; choose one of 'index'"),
        (["--runtime-env", "/nonexistent.yaml", "--", "index"], "--runtime-env .* does not exist"),
        (["--working-dir", "/nonexistent", "--", "index"], "working_dir '/nonexistent' is not"),
    ],
)
def test_bad_submit_flags_fail_before_connecting(capsys, argv, pattern):
    # port 9 (discard) is closed: reaching the network would be "cannot reach", not `pattern`
    assert main(["submit", "--address", "http://127.0.0.1:9", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(rf"ninebest: error: {pattern}", err[0]), err


def test_no_address(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert main(["jobs"]) == 2
    assert "pass --address http://HEAD:8265 or set RAY_ADDRESS" in capsys.readouterr().err


def test_address_resolution(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:8265")
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert submit.dashboard_address(None) == "http://127.0.0.1:8265"
    assert submit.dashboard_address("http://127.0.0.1:1/") == "http://127.0.0.1:1"
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    with pytest.raises(submit.ConfigError, match="not a job server address"):
        submit.dashboard_address(None)


def test_entrypoint_quotes_arguments():
    argv = submit.job_argv(["--", "index", "--data", "/d/with space", "--layers", "a;rm -rf /"])
    assert submit.entrypoint(argv) == (
        "python -m jobs.index --data '/d/with space' --layers 'a;rm -rf /'"
    )


def test_error_line_prefers_ninebest_error_then_traceback():
    logs = "noise\nninebest: error: unknown layer 'x'\nmore noise\n"
    assert submit.error_line(logs, None) == "unknown layer 'x'"
    trace = "Traceback (most recent call last):\n  File ...\nValueError: boom\nbye\n"
    assert submit.error_line(trace, None) == "ValueError: boom"
    assert submit.error_line("", "runtime_env setup failed\nrest") == "runtime_env setup failed"


def test_find_token_order(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    flags = submit.argparse.Namespace(token=None, token_file=None)
    assert submit.find_token(flags) is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert submit.find_token(flags)[0] == "from-home"
    (tmp_path / "t").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert submit.find_token(flags) == ("from-path", f"RAY_AUTH_TOKEN_PATH {tmp_path / 't'}")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submit.find_token(flags)[0] == "from-env"
    flags.token = "from-flag"
    assert submit.find_token(flags) == ("from-flag", "--token")


def test_example_runtime_env_and_nightly_spec():
    from ray._private.runtime_env.packaging import create_package
    from ray.runtime_env import RuntimeEnv

    from pipeline.config import build_index_config, load_spec

    env = submit.runtime_env(str(ROOT / "jobs" / "runtime_env.yaml"), None)
    RuntimeEnv(**env)  # Ray's own validation
    package = Path(tempfile.mkdtemp()) / "package.zip"
    create_package(str(ROOT), package, include_gitignore=True, excludes=env["excludes"])
    with zipfile.ZipFile(package) as z:
        tops = {name.split("/")[0] for name in z.namelist()}
    shutil.rmtree(package.parent)
    assert {"pipeline", "jobs", "schemas"} <= tops and not tops & {"tests", ".venv", ".git"}
    spec = load_spec(str(ROOT / "jobs" / "specs" / "nightly.yaml"))
    assert build_index_config(spec, {}).layers == ("features.3", "features.10", "classifier.4")


class BrokenSocketClient:
    """A job client whose log websocket breaks after one chunk; the job then fails."""

    def __init__(self):
        self.infos = 0

    async def tail_job_logs(self, job_id):
        yield "line 1\n"
        raise RuntimeError("WebSocket connection closed unexpectedly with close code 1006")

    def get_job_info(self, job_id):
        self.infos += 1
        return SimpleNamespace(status="RUNNING" if self.infos < 3 else "FAILED", message="failed")

    def get_job_logs(self, job_id):
        return "line 1\nline 2\n" + ("ninebest: error: boom\n" if self.infos >= 3 else "")


def test_follow_falls_back_to_polling_without_repeating_lines(monkeypatch, capsys):
    monkeypatch.setattr(submit.time, "sleep", lambda seconds: None)
    cluster = submit.Cluster.__new__(submit.Cluster)  # no connection: a fake client
    cluster.address, cluster.token_source = "http://127.0.0.1:9", None
    cluster.client = BrokenSocketClient()
    assert submit.follow(cluster, "job1") == submit.EXIT["FAILED"]
    out, err = capsys.readouterr()
    assert out == "line 1\nline 2\nninebest: error: boom\n"
    assert err == "ninebest: job job1 FAILED: boom\n"

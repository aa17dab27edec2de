"""infra/: every manifest parses and has the structure KubeRay, Kubernetes and Ray's launcher
expect, names the image the Dockerfile builds, and its command runs on a local Ray instance.

Commands are taken from the manifests (RayJob and RayCronJob entrypoints, container commands) and
run in-process through `pipeline.cli.main`, with each `/specs/NAME` swapped for a copy of
`jobs/specs/NAME` whose model, weights, data, layers and output point at test files; the other
keys of the real spec are kept, so they are checked too. `ninebest submit` is parsed and checked
against the cluster's head service; the command it would send runs like the others (the
transport itself is tested in tests/test_submit.py). The Dockerfile's COPY set is installed with
pip into a scratch folder and the installed CLI is run, as the image build does.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zoneinfo
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray
import torch
import yaml

import tiny_models
from pipeline.cli import build_parser, main
from pipeline.cluster import submit
from pipeline.config import build_index_config, load_spec

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
SPECS = ROOT / "jobs" / "specs"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
RAY_PIN = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("ray"))
RAY_VERSION = RAY_PIN.split("==")[1]
TEST_OVERRIDES = {"model": "tiny_models:tiny", "layers": ["conv2", "fc"], "gpus": 0}
# + weights, data, out; `gpus: 0` because a local instance has no GPU nodes to scale up
API_VERSIONS = {
    "CronJob": "batch/v1",
    **dict.fromkeys(("RayCluster", "RayJob", "RayCronJob"), "ray.io/v1"),
}


def yaml_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))


def documents() -> list[tuple[Path, dict]]:
    """Every YAML document under infra/, with its file."""
    docs = []
    for path in yaml_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path, doc))
    return docs


def manifests(kind: str | None = None) -> list[tuple[Path, dict]]:
    found = [(p, d) for p, d in documents() if "apiVersion" in d]
    return [(p, d) for p, d in found if kind is None or d["kind"] == kind]


def launcher_configs() -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in documents() if "provider" in d and "cluster_name" in d]


def cluster_specs() -> list[tuple[str, dict]]:
    """Every RayCluster spec: standing clusters, and those a RayJob or RayCronJob creates."""
    specs = [(d["metadata"]["name"], d["spec"]) for _, d in manifests("RayCluster")]
    for _, d in manifests("RayJob"):
        if "rayClusterSpec" in d["spec"]:
            specs.append((d["metadata"]["name"], d["spec"]["rayClusterSpec"]))
    for _, d in manifests("RayCronJob"):
        if "rayClusterSpec" in d["spec"]["jobTemplate"]:
            specs.append((d["metadata"]["name"], d["spec"]["jobTemplate"]["rayClusterSpec"]))
    return specs


def walk(node):
    """Every dict inside a parsed YAML document, depth first."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def pod_containers(doc: dict) -> list[dict]:
    """The containers of every pod template in a manifest."""
    lists = [node["containers"] for node in walk(doc) if isinstance(node.get("containers"), list)]
    return [c for found in lists for c in found]


def containers() -> list[tuple[str, dict]]:
    """(file:container, container) across all manifests."""
    return [
        (f"{path.relative_to(INFRA)}:{c['name']}", c)
        for path, doc in manifests()
        for c in pod_containers(doc)
    ]


@dataclass(frozen=True)
class Command:
    where: str  # file:Kind/name, for test ids and messages
    argv: tuple[str, ...]  # as the manifest writes it, "ninebest" first


def commands() -> list[Command]:
    """Entrypoints of RayJobs and RayCronJobs, and every container's command + args."""
    found = []
    for path, doc in manifests():
        where = f"{path.relative_to(INFRA)}:{doc['kind']}/{doc['metadata']['name']}"
        for node in walk(doc):
            if isinstance(node.get("entrypoint"), str):
                found.append(Command(where, tuple(shlex.split(node["entrypoint"]))))
        for c in pod_containers(doc):
            argv = [*c.get("command", []), *c.get("args", [])]
            if argv:
                found.append(Command(f"{where}:{c['name']}", tuple(str(a) for a in argv)))
    return found


COMMANDS = commands()


def spec_names(argv) -> list[str]:
    return [a.removeprefix("/specs/") for a in argv if a.startswith("/specs/")]


def subcommands() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


def parse(argv) -> argparse.Namespace:
    """Parse `ninebest ARGV` as the CLI would; a usage error fails the test with its message."""
    name = argv[0] if argv else ""
    if name not in subcommands():
        pytest.skip(f"`ninebest {name}` does not exist yet; this check starts when it lands")
    try:
        return build_parser().parse_args(list(argv))
    except SystemExit as e:
        pytest.fail(f"`ninebest {shlex.join(argv)}` does not parse (exit {e.code})")


def job_payload(argv: tuple[str, ...]) -> list[str]:
    """What runs on the cluster: the command itself, or what `ninebest submit` sends."""
    assert argv[0] == "ninebest", f"manifest commands must be `ninebest ...`, got {argv}"
    cli = list(argv[1:])
    if cli[0] == "submit":
        return submit.job_argv(parse(cli).job)
    return cli


# -- structure ---------------------------------------------------------------------------------


def test_every_yaml_under_infra_is_a_manifest_or_a_launcher_config():
    docs = documents()
    assert docs, "no YAML under infra/"
    for path, doc in docs:
        if "apiVersion" in doc:
            assert doc.get("kind") and doc.get("metadata", {}).get("name"), path
            assert isinstance(doc.get("spec"), dict), f"{path}: {doc['kind']} has no spec"
        else:
            assert "provider" in doc and "cluster_name" in doc, f"{path}: not a manifest"
    kinds = {doc["kind"] for _, doc in manifests()}
    assert {"RayCluster", "RayJob", "CronJob", "RayCronJob"} <= kinds, kinds
    assert launcher_configs(), "no Ray cluster launcher config under infra/"


def test_api_versions_are_the_ones_the_operators_serve():
    for path, doc in manifests():
        expected = API_VERSIONS.get(doc["kind"])
        assert expected, f"{path}: unexpected kind {doc['kind']}"
        assert doc["apiVersion"] == expected, f"{path}: {doc['kind']} is {expected}"


def test_ray_clusters_run_this_ray_with_tokens_a_cpu_head_and_gpu_workers():
    specs = cluster_specs()
    assert specs
    assert RAY_VERSION == ray.__version__
    for name, spec in specs:
        assert spec["rayVersion"] == RAY_VERSION, name
        assert spec["authOptions"]["mode"] == "token", name
        head = spec["headGroupSpec"]
        assert head["rayStartParams"].get("num-cpus") == "0", f"{name}: actors on the head"
        mounts = [m["mountPath"] for c in head["template"]["spec"]["containers"] for m in
                  c.get("volumeMounts", [])]  # fmt: skip
        assert "/specs" in mounts, f"{name}: the head reads /specs/... but does not mount it"
        gpu_groups = [g for g in spec["workerGroupSpecs"] if gpus(g) >= 1]
        assert gpu_groups, f"{name}: no worker group with nvidia.com/gpu"
        for group in gpu_groups:
            if group["minReplicas"] == 0:  # scales from zero: pending GPU actors ask for pods
                assert spec.get("enableInTreeAutoscaling") is True, f"{name}: no autoscaler"
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name


def test_specs_ask_for_the_gpu_actors_the_autoscaler_can_add():
    """With GPU pods scaling from zero, a job with `gpus: 0` would find no GPU at start and run
    CPU actors; every spec asks for at most the GPUs the clusters can reach."""
    most = min(sum(g["maxReplicas"] * gpus(g) for g in spec["workerGroupSpecs"])
               for _, spec in cluster_specs())  # fmt: skip
    for path in sorted(SPECS.glob("*.y*ml")):
        asked = load_spec(str(path)).get("gpus", 0)
        assert 1 <= asked <= most, f"jobs/specs/{path.name}: gpus {asked}, clusters reach {most}"


def gpus(group: dict) -> int:
    """GPUs per pod of a worker group; requests, when given, must equal limits."""
    count = 0
    for c in group["template"]["spec"]["containers"]:
        resources = c.get("resources", {})
        limit = int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
        request = resources.get("requests", {}).get("nvidia.com/gpu")
        assert request is None or int(request) == limit, f"{c['name']}: GPU request != limit"
        count += limit
    return count


def test_nightly_schedules_forbid_overlap_and_name_their_time_zone():
    [(path, cron)] = manifests("CronJob")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid", path
    zoneinfo.ZoneInfo(spec["timeZone"])  # a real IANA zone
    assert len(spec["schedule"].split()) == 5
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert spec["jobTemplate"]["spec"]["backoffLimit"] == 0, "a retry would submit twice"
    for _, ray_cron in manifests("RayCronJob"):
        assert ray_cron["spec"]["schedule"] == spec["schedule"]
        assert ray_cron["spec"]["timeZone"] == spec["timeZone"]
        template = ray_cron["spec"]["jobTemplate"]
        assert template["shutdownAfterJobFinishes"] is True and "rayClusterSpec" in template
        assert "concurrencyPolicy" not in ray_cron["spec"], "RayCronJob has no such field"


def test_one_token_secret_is_mounted_never_written_out():
    secrets = {spec["authOptions"]["secretName"] for _, spec in cluster_specs()}
    for where, c in containers():
        for env in c.get("env", []):
            assert not (env["name"] == "RAY_AUTH_TOKEN" and "value" in env), f"{where}: literal"
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] == "auth_token", where
                secrets.add(ref["name"])
        assert not any("token" in str(a).lower() for a in c.get("command", [])), where
    [(_, cron)] = manifests("CronJob")
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    [submitter] = pod["containers"]
    path = next(e["value"] for e in submitter["env"] if e["name"] == "RAY_AUTH_TOKEN_PATH")
    mount = next(m for m in submitter["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    secret = volumes[mount["name"]]["secret"]
    assert [i["key"] for i in secret["items"]] == ["auth_token"]
    assert path == f"{mount['mountPath']}/{secret['items'][0]['path']}"
    secrets.add(secret["secretName"])
    assert len(secrets) == 1, f"one token Secret for cluster and clients, found {secrets}"


def test_every_image_is_the_one_the_dockerfile_builds():
    label = dockerfile_label("org.opencontainers.image.version")
    assert label == VERSION, "bump the Dockerfile's version label with pyproject.toml"
    images = {c["image"] for _, c in containers()}
    images |= {cfg["docker"]["image"] for _, cfg in launcher_configs()}
    assert len(images) == 1, f"manifests name several images: {sorted(images)}"
    [image] = images
    repository, tag = image.rsplit(":", 1)
    assert repository.rsplit("/", 1)[-1] == "ninebest" and tag == VERSION, image


# -- the Dockerfile ------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of infra/Dockerfile, continuation lines joined."""
    lines, current = [], ""
    for raw in (INFRA / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        current += " " + line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            instruction, _, rest = current.strip().partition(" ")
            lines.append((instruction.upper(), rest.strip()))
            current = ""
    return lines


def dockerfile_label(key: str) -> str | None:
    labels = " ".join(rest for ins, rest in dockerfile() if ins == "LABEL")
    found = re.search(rf'{re.escape(key)}="([^"]*)"', labels)
    return found.group(1) if found else None


def copied() -> list[str]:
    """Sources of every COPY (flags dropped, trailing slashes removed)."""
    sources = []
    for ins, rest in dockerfile():
        if ins == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            sources += [p.rstrip("/") for p in parts[:-1]]
    return sources


def test_dockerfile_builds_on_this_ray_and_installs_the_package():
    steps = dockerfile()
    [base] = [rest for ins, rest in steps if ins == "FROM"]
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert base == f"rayproject/ray:{RAY_VERSION}-{py}-gpu", base
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"]}
    find = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    needed |= {name.split(".")[0] for name in find}  # pipeline, jobs, schemas
    assert needed <= set(copied()), f"the image misses {sorted(needed - set(copied()))}"
    installs = [rest for ins, rest in steps if ins == "RUN" and "pip install" in rest]
    assert any(re.search(r'pip install [^&]*"?\.(\[[\w,]+\])?"?(\s|$)', r) for r in installs)
    [cmd] = [json.loads(rest) for ins, rest in steps if ins in ("CMD", "ENTRYPOINT")]
    assert cmd[0] == "ninebest"
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(cmd[1:])
    assert done.value.code == 0, f"CMD {cmd} is not a valid ninebest command"


def test_dockerfile_copy_set_installs_a_working_cli(tmp_path):
    """`pip install .` of exactly what the Dockerfile copies gives `ninebest`, `python -m
    pipeline`, the jobs entrypoints and the schemas (what the image's RUN step checks)."""
    pytest.importorskip("setuptools")  # the build backend, used without build isolation
    stage, site = tmp_path / "src", tmp_path / "site"
    stage.mkdir()
    for source in copied():
        src, dst = ROOT / source, stage / source
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dst)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    pip += ["--no-index", "--no-cache-dir", "--target", str(site), str(stage)]
    subprocess.run(pip, check=True, capture_output=True, timeout=120)
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = (
        "import pipeline, jobs.reindex, jobs.index; from pipeline.store.schemas import schema; "
        f"schema('index'); assert pipeline.__file__.startswith({str(site)!r}), pipeline.__file__"
    )
    for argv in (
        [str(site / "bin" / "ninebest"), "--help"],
        [sys.executable, "-m", "pipeline", "index", "--help"],
        [sys.executable, "-c", probe],
    ):
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode == 0, f"{argv}: {done.stderr[-2000:]}"


# -- the Ray cluster launcher --------------------------------------------------------------------


def test_launcher_config_follows_rays_schema_with_gpu_workers_and_tokens():
    import jsonschema

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    for path, cfg in launcher_configs():
        jsonschema.validate(cfg, schema)
        types = cfg["available_node_types"]
        assert cfg["head_node_type"] in types, path
        gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
        assert gpu and all(t.get("min_workers", 0) >= 1 for t in gpu), path
        for key in ("head_start_ray_commands", "worker_start_ray_commands"):
            starts = [c for c in cfg[key] if "ray start" in c]
            assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), f"{path}: {key}"
        mounts = cfg["file_mounts"]
        assert "~/.ray/auth_token" in mounts, "nodes need the token at Ray's default path"
        assert (ROOT / mounts["/specs"]).resolve() == SPECS, "/specs must be jobs/specs"


# -- commands ------------------------------------------------------------------------------------


def test_manifests_hold_commands_and_every_spec_they_name_exists():
    kinds = {c.where.split(":")[1].split("/")[0] for c in COMMANDS}
    assert {"RayJob", "CronJob", "RayCronJob"} <= kinds, kinds
    for command in COMMANDS:
        payload = job_payload(command.argv)
        for name in spec_names(payload):
            assert (SPECS / name).is_file(), f"{command.where}: no jobs/specs/{name}"
            spec = load_spec(str(SPECS / name))
            assert "storage_options" not in spec, f"jobs/specs/{name}: credentials in a spec"
            build_index_config(spec, {})  # every key is a setting ninebest knows


def test_submit_commands_target_the_clusters_head_service():
    [(_, cluster)] = manifests("RayCluster")
    service = f"http://{cluster['metadata']['name']}-head-svc:8265"  # KubeRay's naming
    submits = [c for c in COMMANDS if c.argv[1:2] == ("submit",)]
    assert submits, "the CronJob should submit the nightly reindex"
    for command in submits:
        args = parse(command.argv[1:])
        assert args.address == service, f"{command.where}: {args.address} != {service}"
        assert not args.token, f"{command.where}: a token in argv is visible to everyone"
        payload = job_payload(command.argv)
        assert payload[0] in submit.JOB_COMMANDS
        parse(payload)


def test_readme_commands_parse():
    text = (INFRA / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    lines = [ln for b in blocks for ln in b.replace("\\\n", " ").splitlines()]
    found = [shlex.split(ln, comments=True) for ln in lines if ln.startswith("ninebest ")]
    assert found
    for argv in found:
        args = parse(argv[1:])
        if argv[1] == "submit":
            parse(submit.job_argv(args.job))


@pytest.fixture(scope="module")
def local_specs(photos, tmp_path_factory) -> dict[str, Path]:
    """jobs/specs/NAME with model, weights, data, layers and out swapped for test ones."""
    folder = tmp_path_factory.mktemp("specs")
    torch.manual_seed(0)
    weights = folder / "tiny.pt"
    torch.save(tiny_models.tiny().state_dict(), weights)
    specs = {}
    for path in sorted(SPECS.glob("*.y*ml")):
        spec = yaml.safe_load(path.read_text())
        spec.update(TEST_OVERRIDES, weights=str(weights), data=str(photos))
        spec["out"] = str(folder / f"{path.stem}-out")
        specs[path.name] = folder / path.name
        specs[path.name].write_text(yaml.safe_dump(spec))
    return specs


@pytest.mark.parametrize("command", COMMANDS, ids=[c.where for c in COMMANDS])
def test_manifest_command_runs_on_a_local_cluster(command, local_specs, ray_local, capsys):
    """What the cluster would run, with /specs/NAME swapped for the local test spec: the
    entrypoint through the CLI, or for `ninebest submit` the job module it sends
    (`python -m jobs.<command> ARGS`)."""
    payload = job_payload(command.argv)
    parse(payload)
    argv = [str(local_specs[a.removeprefix("/specs/")]) if a.startswith("/specs/") else a
            for a in payload]  # fmt: skip
    if command.argv[1] == "submit":
        assert submit.entrypoint(payload).startswith(f"python -m jobs.{payload[0]} ")
        status = importlib.import_module(f"jobs.{payload[0]}").main(argv[1:])
    else:
        status = main(argv)
    err = capsys.readouterr().err[-2000:]
    assert status == 0, f"{command.where}: `ninebest {shlex.join(argv)}` exited {status}: {err}"
    [spec] = [local_specs[n] for n in spec_names(payload)]
    out = Path(yaml.safe_load(spec.read_text())["out"])
    assert (out / "manifest.json").is_file() or (out / "LATEST").is_file(), sorted(out.iterdir())

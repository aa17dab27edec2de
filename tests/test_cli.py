"""The `ninebest` command: bad input is one line and exit 2 with nothing written; the demo runs;
README's pandas example runs against the demo's index; job specs merge with flags."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.cli import DEMO_EXPORT, main

ROOT = Path(__file__).resolve().parents[1]


def fails_cleanly(capsys, argv: list[str], out: Path, pattern: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists(), "a failed command wrote to --out"
    return lines[0]


def args(data, out, **kw) -> list[str]:
    base = {"model": "tiny_models:tiny", "layers": "conv2,fc", "data": str(data), "out": str(out)}
    base.update(kw)
    return ["index", *[x for k, v in base.items() for x in (f"--{k.replace('_', '-')}", str(v))]]


def test_unknown_layer_lists_close_names(capsys, photos, tmp_path):
    line = fails_cleanly(
        capsys,
        args(photos, tmp_path / "o", layers="conv3"),
        tmp_path / "o",
        "unknown layer 'conv3'",
    )
    assert "'conv2'" in line


def test_missing_data_path(capsys, tmp_path):
    fails_cleanly(capsys, args(tmp_path / "nope", tmp_path / "o"), tmp_path / "o", "does not exist")


def test_k_below_one(capsys, photos, tmp_path):
    fails_cleanly(capsys, args(photos, tmp_path / "o", k=0), tmp_path / "o", "--k must be")


def test_weights_of_another_architecture(capsys, photos, tmp_path, resnet18_weights):
    argv = args(
        photos,
        tmp_path / "o",
        model="torchvision:alexnet",
        layers="features.10",
        weights=resnet18_weights,
    )
    fails_cleanly(capsys, argv, tmp_path / "o", "do not fit torchvision:alexnet")


class Payload:
    """Unpickling this runs a shell command: what a hostile weights file would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_refused(capsys, photos, tmp_path):
    evil, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    torch.save({"conv1.weight": torch.zeros(1), "x": Payload(marker)}, evil)
    argv = args(photos, tmp_path / "o", weights=evil)
    fails_cleanly(capsys, argv, tmp_path / "o", "weights_only=True")
    assert not marker.exists()


def test_empty_dataset(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    fails_cleanly(
        capsys, args(tmp_path / "empty", tmp_path / "o"), tmp_path / "o", "holds no images"
    )


def test_unknown_model_and_bad_shape_layer(capsys, photos, tmp_path):
    fails_cleanly(
        capsys,
        args(photos, tmp_path / "o", model="torchvision:alexnett"),
        tmp_path / "o",
        "'alexnet'",
    )
    argv = args(photos, tmp_path / "o", model="tiny_models:seq3d", layers="lift")
    fails_cleanly(capsys, argv, tmp_path / "o", r"outputs \(1, 2, 1, 222, 222\)")


def test_reused_module_is_refused(capsys, photos, tmp_path):
    argv = args(photos, tmp_path / "o", model="torchvision:resnet18", layers="layer1.0.relu")
    fails_cleanly(capsys, argv, tmp_path / "o", "runs 2 times per forward pass")


def test_job_spec_with_flag_override(capsys, photos, tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(
        f"model: tiny_models:tiny\ndata: {photos}\nlayers: [conv2, fc]\n"
        f"out: {tmp_path / 'o'}\nk: 0\n"
    )
    fails_cleanly(capsys, ["index", "--config", str(spec)], tmp_path / "o", "--k must be")
    toml = tmp_path / "job.toml"
    toml.write_text(
        f'model = "tiny_models:tiny"\ndata = "{photos}"\nlayers = "conv2"\n'
        f'out = "{tmp_path / "o"}"\nkk = 3\n'
    )
    fails_cleanly(
        capsys, ["index", "--config", str(toml)], tmp_path / "o", "unknown setting 'kk'.*'k'"
    )


def test_usage_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "index", "--model", "torchvision:alexnet", "--layers",
         "features.10", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "does not exist" in proc.stderr and not (tmp_path / "o").exists()


@pytest.mark.usefixtures("ray_local")
def test_demo_and_readme_pandas_example(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached ImageNet weights
    assert main(["demo"]) == 0
    printed = capsys.readouterr().out
    assert "ninebest-demo/index" in printed and "read_parquet" in printed
    assert "randomly initialised" in printed and "weights='DEFAULT'" in printed  # empty cache
    atlas = (tmp_path / "ninebest-demo/export/atlas/index.html").resolve()
    assert f"atlas: {atlas.as_uri()}" in printed.splitlines()
    html = atlas.read_text()
    for layer in DEMO_EXPORT:
        assert f"layer-{layer}.html" in html
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    blocks = [b for b in blocks if "ninebest-demo" in b]  # the examples that read the demo's output
    assert blocks, "README has no python example on the demo's output"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    shown = capsys.readouterr().out
    assert "activation" in shown and "image_id" in shown and "Name: count" in shown

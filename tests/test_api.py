"""`pipeline.open`: the notebook API against a real index (ResNet-18 on the test photographs),
read back with plain pandas as the oracle; README's example run as written."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
from PIL import Image

import pipeline
from pipeline.api import patch_grid
from pipeline.config import IndexConfig
from pipeline.errors import ConfigError, DataError, InputNotFoundError
from pipeline.export.render import PANEL_GAP
from pipeline.export.run import export
from pipeline.index.run import index
from pipeline.progress import Progress
from pipeline.store import versions
from pipeline.store.storage import Store

pytestmark = pytest.mark.usefixtures("ray_local")

README = Path(__file__).resolve().parents[1] / "README.md"
HOSTILE = """<img src=x onerror="window.pwned=1">&'.png"""  # an image id that is markup
LAYERS = ("layer3", "layer4")
EXPORTED = 7  # the one unit of layer4 the fixture exports


@pytest.fixture(scope="module")
def data(photos, tmp_path_factory) -> Path:
    """The photographs plus one more (its own bytes) whose name is markup."""
    root = tmp_path_factory.mktemp("api-data")
    shutil.copytree(photos, root, dirs_exist_ok=True)
    source = Image.open(next(photos.rglob("*.jpg"))).convert("RGB")
    source.crop((5, 7, source.width - 11, source.height - 3)).save(root / HOSTILE)
    return root


@pytest.fixture(scope="module")
def out(data, resnet18_weights, tmp_path_factory) -> Path:
    """One index with statistics, samples and a bottom, and an export of layer4 unit 7."""
    out = tmp_path_factory.mktemp("api") / "run"
    cfg = IndexConfig(
        model="torchvision:resnet18", weights=str(resnet18_weights), data=str(data),
        layers=LAYERS, out=str(out), workers=1, batch_size=8, shard_size=25, bottom=3,
    )  # fmt: skip
    index(cfg, Progress(quiet=True))
    export(
        str(out), layers=("layer4",), units=(EXPORTED,), workers=1, progress=Progress(quiet=True)
    )
    return out


@pytest.fixture(scope="module")
def run(out):
    return pipeline.open(out)


def rows_of(out: Path, folder: str, layer: str, unit: int) -> pd.DataFrame:
    table = pd.read_parquet(out / folder / f"{layer}.parquet")
    return table[table.unit == unit]


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def copy_index(out: Path, to: Path) -> Path:
    shutil.copytree(out, to, ignore=shutil.ignore_patterns("partials"))
    return to


def test_import_pipeline_loads_neither_torch_nor_ray():
    code = (
        "import sys, pipeline\n"
        "heavy = {'torch', 'ray', 'pandas', 'pyarrow', 'pipeline.api'} & set(sys.modules)\n"
        "assert not heavy, sorted(heavy)\n"
        "assert 'open' in dir(pipeline)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert pipeline.open is pipeline.api.open_run  # resolved on first use
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pipeline.nope  # noqa: B018


def readme_example() -> str:
    text = README.read_text()
    block = re.search(
        r"<!-- api-example -->\s*```python\n(.*?)```\s*<!-- /api-example -->", text, re.S
    )
    assert block, "README.md has no ```python block between <!-- api-example --> markers"
    return block.group(1)


def test_readme_example_runs_against_a_real_index(out, tmp_path, monkeypatch):
    code = readme_example()
    assert '"ninebest-demo"' in code
    monkeypatch.chdir(tmp_path)  # the example saves a PNG in the working folder
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(
            compile(code.replace('"ninebest-demo"', repr(str(out))), "README.md", "exec"), namespace
        )
    expected = rows_of(out, "index", "layer4", 7).sort_values("rank", ignore_index=True)
    pd.testing.assert_frame_equal(namespace["top"], expected)
    assert list(namespace["top"]["rank"]) == list(range(1, 10))
    expected = rows_of(out, "bottom", "layer4", 7).sort_values("rank", ignore_index=True)
    pd.testing.assert_frame_equal(namespace["bottom"], expected)
    stats = namespace["stats"]
    assert (stats["count"] == manifest(out)["counts"]["indexed"]).all()
    assert stats.loc[7, "unit"] == 7 and "q0.99" in stats.columns
    assert set(namespace["samples"]["band"]) <= {"p50", "p90", "p99", "p99.9"}
    assert "image_id" in printed.getvalue() and "q0.99" in printed.getvalue()
    saved = np.asarray(Image.open(tmp_path / "layer4-7.png"))
    exported = np.asarray(Image.open(out / "export" / "grids" / "layer4" / "7.png"))
    np.testing.assert_array_equal(saved, exported)
    assert '<img src="data:image/png;base64,' in namespace["run"].unit("layer4", 7)._repr_html_()


@pytest.mark.parametrize("layer, unit", [("layer3", 0), ("layer3", 255), ("layer4", 300)])
def test_top_and_bottom_are_the_units_rows_in_rank_order(run, out, layer, unit):
    for folder, method in (("index", run.top), ("bottom", run.bottom)):
        expected = rows_of(out, folder, layer, unit).sort_values("rank", ignore_index=True)
        got = method(layer, unit)
        pd.testing.assert_frame_equal(got, expected)
        assert len(got) == (9 if folder == "index" else 3)
    top, bottom = run.top(layer, unit), run.bottom(layer, unit)
    assert (
        top["activation"].is_monotonic_decreasing and bottom["activation"].is_monotonic_increasing
    )
    assert bottom["activation"].iloc[0] == run.stats(layer, unit)["min"].iloc[0]
    assert top["activation"].iloc[0] == run.stats(layer, unit)["max"].iloc[0]


def test_stats_name_each_quantile_by_its_probability(run, out):
    stats = run.stats("layer3")
    raw = pd.read_parquet(out / "stats" / "layer3.parquet").sort_values("unit", ignore_index=True)
    probabilities = manifest(out)["stats"]["probabilities"]
    names = [f"q{p}" for p in probabilities]
    assert {"q0.01", "q0.1", "q0.5", "q0.9", "q0.99", "q0.999"} <= set(names)
    assert list(stats["unit"]) == list(range(256))
    np.testing.assert_array_equal(stats[names].to_numpy(), np.stack(raw["quantiles"]))
    for name in ("count", "mean", "std", "min", "max", "fire_rate"):
        np.testing.assert_array_equal(stats[name], raw[name])
    assert (stats["count"] == manifest(out)["counts"]["indexed"]).all()
    assert (stats["histogram"].map(sum) == stats["count"]).all()  # the histogram is kept
    assert (stats["q0.5"] <= stats["q0.99"]).all() and (stats["q0.99"] <= stats["max"]).all()
    one = run.stats("layer3", np.int64(17))  # a unit as a DataFrame gives it
    pd.testing.assert_frame_equal(one, stats[stats.unit == 17].reset_index(drop=True))


def test_samples_come_by_band_in_manifest_order(run, out):
    bands = manifest(out)["samples"]["bands"]
    for unit in (0, 100, 511):
        samples = run.samples("layer4", unit)
        raw = rows_of(out, "samples", "layer4", unit)
        order = {name: i for i, name in enumerate(bands)}
        raw = raw.sort_values("band", key=lambda b: b.map(order), kind="stable", ignore_index=True)
        got = samples.drop(columns=["band_low", "band_high"]).astype({"band": str})
        pd.testing.assert_frame_equal(got, raw)
        assert list(samples["band"].cat.categories) == list(bands)
        for row in samples.itertuples():
            assert [row.band_low, row.band_high] == bands[row.band]
    assert len(run.samples("layer4", 0)) > 0


def test_grid_is_the_exports_png_when_exported_else_cut_from_the_originals(run, out):
    exported = Image.open(out / "export" / "grids" / "layer4" / f"{EXPORTED}.png")
    np.testing.assert_array_equal(np.asarray(run.grid("layer4", EXPORTED)), np.asarray(exported))
    # composed on the fly, the patches are pixel for pixel the export's patch panel
    composed = patch_grid(run, "layer4", EXPORTED)
    panel = exported.crop((0, 0, (exported.width - PANEL_GAP) // 2, exported.height))
    np.testing.assert_array_equal(np.asarray(composed), np.asarray(panel.convert("RGB")))
    other = run.grid("layer4", np.int32(3))  # not exported: composed
    np.testing.assert_array_equal(np.asarray(other), np.asarray(patch_grid(run, "layer4", 3)))
    assert other.size == composed.size and np.asarray(other).std() > 0  # layer4's boxes: 224 px
    small = run.grid("layer3", 5)
    assert small.width < other.width and np.asarray(small).std() > 0


def test_unit_html_embeds_the_grid_and_escapes_every_string(run, out):
    table = pd.read_parquet(out / "index" / "layer4.parquet")
    unit = int(table[table.image_id == HOSTILE].unit.iloc[0])
    page = run.unit("layer4", unit)._repr_html_()
    assert HOSTILE not in page and "<img src=x" not in page and 'onerror="' not in page
    assert "&lt;img src=x onerror=&quot;window.pwned=1&quot;&gt;&amp;&#x27;.png" in page
    encoded = re.search(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert encoded
    shown = Image.open(io.BytesIO(base64.b64decode(encoded.group(1))))
    np.testing.assert_array_equal(np.asarray(shown), np.asarray(run.grid("layer4", unit)))
    assert "fire rate" in page and "q0.99" in page and page.count("<tr>") == 1 + 9
    images = manifest(out)["counts"]["indexed"]
    assert images == 49  # the photographs and the one named as markup
    text = repr(run.unit("layer4", unit))
    assert text.startswith(f"layer4 unit {unit}: {images} images, mean ") and HOSTILE in text
    assert repr(run).endswith(f"{images} images; layers layer3 (256), layer4 (512))")
    summary = run._repr_html_()
    assert "torchvision:resnet18" in summary and "layer3" in summary and ">512<" in summary
    assert f"{manifest(out)['counts']['indexed']} images" in summary
    assert "stats, samples, bottom, export" in summary


def test_run_html_escapes_its_location(out, tmp_path):
    hostile = copy_index(out, tmp_path / "<b>&'runs\"")
    summary = pipeline.open(hostile)._repr_html_()
    assert "<b>&" not in summary and "&lt;b&gt;&amp;&#x27;runs&quot;" in summary


def test_open_follows_latest_after_a_reindex(out, tmp_path):
    root = tmp_path / "versioned"
    run_id = "20260101T000000Z-abcdef"
    copy_index(out, root / "versions" / run_id)
    versions.set_latest(Store(str(root)), run_id)  # OUT itself holds no manifest.json
    opened = pipeline.open(str(root))
    assert opened.store.url.endswith(f"versions/{run_id}")
    pd.testing.assert_frame_equal(opened.top("layer4", 2), pipeline.open(out).top("layer4", 2))


def test_a_url_reads_only_the_layer_file_asked_for(out, monkeypatch):
    memory = fsspec.filesystem("memory")
    root = "/api-test-run"
    for path in out.rglob("*.parquet"):
        if "partials" not in path.parts and "export" not in path.parts:
            memory.pipe(f"{root}/{path.relative_to(out).as_posix()}", path.read_bytes())
    memory.pipe(f"{root}/manifest.json", (out / "manifest.json").read_bytes())
    opened: list[str] = []
    original = type(memory)._open

    def spy(self, path, *args, **kwargs):
        opened.append(path)
        return original(self, path, *args, **kwargs)

    try:
        run = pipeline.open(f"memory://{root}", storage_options={})
        monkeypatch.setattr(type(memory), "_open", spy)
        top = run.top("layer4", 9)
        assert {p.rsplit(root, 1)[-1] for p in opened} == {"/index/layer4.parquet"}
        pd.testing.assert_frame_equal(top, pipeline.open(out).top("layer4", 9))
        assert (run.stats("layer4", 9)["count"] == manifest(out)["counts"]["indexed"]).all()
    finally:
        memory.rm(root, recursive=True)


def test_bad_input_is_one_line_naming_the_fix(run, out, tmp_path):
    cases = [
        (
            lambda: run.top("layer5", 0),
            ConfigError,
            "'layer5' is not in the index; indexed: layer3, layer4",
        ),
        (lambda: run.top("layer4", 512), ConfigError, "valid units: 0..511"),
        (lambda: run.samples("layer3", -1), ConfigError, "valid units: 0..255"),
        (lambda: run.grid("layer4", "7"), ConfigError, "whole numbers"),
        (lambda: run.stats("fc"), ConfigError, "indexed: layer3, layer4"),
        (lambda: pipeline.open(tmp_path / "nowhere"), InputNotFoundError, "does not exist"),
        (lambda: pipeline.open(tmp_path), DataError, "manifest.json, so it is not a finished"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=re.escape(message)) as caught:
            call()
        assert "\n" not in str(caught.value)


def test_outputs_the_run_did_not_write_name_the_flag(out, tmp_path):
    bare = copy_index(out, tmp_path / "bare")
    spec = manifest(bare)
    for folder in ("stats", "samples", "bottom"):
        del spec["outputs"][folder]
        shutil.rmtree(bare / folder)
    (bare / "manifest.json").write_text(json.dumps(spec))  # as `--stats off` writes it
    run = pipeline.open(bare)
    for call, flag in (
        (run.stats, "--stats on"),
        (run.samples, "--samples N"),
        (run.bottom, "--bottom K"),
    ):
        with pytest.raises(DataError, match=re.escape(f"with {flag}")):
            call("layer4", 1)
    page = run.unit("layer4", 1)._repr_html_()  # a unit still shows, without a stats line
    assert "no statistics: index with --stats on" in page and page.count("<tr>") == 10
    assert "stats" not in run._repr_html_().split("outputs:")[1].split("<table>")[0]

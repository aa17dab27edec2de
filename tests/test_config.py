"""Job specs (YAML, TOML, JSON) merged with flags into a validated, frozen IndexConfig."""

from __future__ import annotations

import dataclasses
import os

import pytest

from pipeline.config import build_index_config, load_spec
from pipeline.errors import ConfigError, InputNotFoundError

BASE = {"model": "torchvision:alexnet", "data": "/d", "layers": "features.10", "out": "/o"}


def test_flags_override_spec_and_none_means_not_given(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(
        "model: torchvision:alexnet\ndata: /d\nlayers: [a, b]\nout: /o\nk: 5\ncrop: 200\n"
    )
    cfg = build_index_config(load_spec(str(spec)), {"k": 3, "workers": None})
    assert (cfg.k, cfg.workers, cfg.layers, cfg.preprocess.crop) == (3, 2, ("a", "b"), 200)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.k = 4


def test_toml_and_json_specs_with_dashed_keys(tmp_path):
    (tmp_path / "job.toml").write_text(
        'model = "m:f"\ndata = "/d"\nlayers = "x"\nout = "/o"\nbatch-size = 7\n'
    )
    assert build_index_config(load_spec(str(tmp_path / "job.toml")), {}).batch_size == 7
    (tmp_path / "job.json").write_text(
        '{"model": "m:f", "data": "/d", "layers": ["x"], "out": "/o"}'
    )
    assert build_index_config(load_spec(str(tmp_path / "job.json")), {}).layers == ("x",)


def test_relative_paths_become_absolute_but_weights_names_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = build_index_config({}, {**BASE, "data": "imgs", "out": "run", "weights": "DEFAULT"})
    assert cfg.data == os.path.join(tmp_path, "imgs") and cfg.out == os.path.join(tmp_path, "run")
    assert cfg.weights == "DEFAULT"
    assert build_index_config({}, {**BASE, "out": "s3://b/o"}).out == "s3://b/o"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"k": 0}, "--k must be a whole number of at least 1"),
        ({"batch_size": -1}, "--batch-size must be"),
        ({"layers": "a,a"}, "names a layer twice"),
        ({"layers": " , "}, "no layers given"),
        ({"crop": 300}, "--crop 300 must be between 1 and --resize 256"),
        ({"max_bad_fraction": 2.0}, "between 0 and 1"),
        ({"out": None}, "--out is required"),
        ({"storage_options": "[1]"}, "must be a JSON object"),
        ({"kay": 3}, "unknown setting 'kay'"),
        ({"max_bad_fraction": "5%"}, "--max-bad-fraction must be a number, got '5%'"),
        ({"resize": "big"}, "--resize must be a whole number"),
        ({"precision": "half"}, "--precision 'half' is not one of auto, float32, bfloat16"),
        ({"worker_wait": 0}, "--worker-wait must be a number of seconds above 0"),
        ({"worker_wait": "soon"}, "--worker-wait must be a number, got 'soon'"),
        ({"gpus": -1}, "--gpus must be a whole number of at least 0"),
        ({"decode": "gpu"}, "--decode 'gpu' is not one of auto, pil, device"),
        ({"draft": "yes"}, "--draft must be true or false, got 'yes'"),
    ],
)
def test_invalid_settings_name_the_flag(change, message):
    with pytest.raises(ConfigError, match=message):
        build_index_config(
            {}, {**BASE, **change, **({"out": None} if change.get("out", 1) is None else {})}
        )


def test_decode_settings_from_spec_and_flags(tmp_path):
    from pipeline.cli import build_parser, index_config

    spec = tmp_path / "job.yaml"
    spec.write_text("decode: device\ndraft: true\n")
    cfg = build_index_config(load_spec(str(spec)), BASE)
    assert (cfg.decode, cfg.draft) == ("device", True)
    assert (build_index_config({}, BASE).decode, build_index_config({}, BASE).draft) == (
        "auto",
        False,
    )
    argv = ["index", "--model", "m", "--data", "d", "--layers", "fc", "--out", "o"]
    args = build_parser().parse_args([*argv, "--decode", "pil", "--draft"])
    assert (index_config(args).decode, index_config(args).draft) == ("pil", True)
    args = build_parser().parse_args([*argv, "--config", str(spec), "--decode", "pil"])
    assert (index_config(args).decode, index_config(args).draft) == ("pil", True)


def test_decode_settings_enter_the_fingerprint_only_when_not_the_defaults():
    from pipeline.index.plan import run_fingerprint

    def fingerprint(**kw):
        return run_fingerprint(build_index_config({}, {**BASE, **kw}), "weights")

    default = fingerprint()
    assert fingerprint(decode="auto", draft=False) == default  # runs before --decode resume
    variants = {fingerprint(decode="pil"), fingerprint(decode="device"), fingerprint(draft=True)}
    assert len(variants) == 3 and default not in variants


def test_spec_file_errors(tmp_path):
    with pytest.raises(InputNotFoundError):
        load_spec(str(tmp_path / "missing.yaml"))
    (tmp_path / "job.ini").write_text("x")
    with pytest.raises(ConfigError, match="must end in .yaml"):
        load_spec(str(tmp_path / "job.ini"))
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid"):
        load_spec(str(tmp_path / "bad.yaml"))


def test_storage_options_never_reach_the_manifest_json():
    cfg = build_index_config({}, {**BASE, "storage_options": '{"secret": "hunter2"}'})
    assert cfg.storage_options == {"secret": "hunter2"}
    assert "hunter2" not in str(cfg.to_json()) and "storage_options" not in cfg.to_json()


def test_every_number_setting_converts_from_a_spec_string():
    """The settings a spec may give as strings come from the dataclasses' own field types."""
    from pipeline.config import NUMBERS, _typed

    assert {"k", "buffer", "shard_size", "resize", "crop", "max_pixels"} <= set(NUMBERS)
    assert NUMBERS["max_bad_fraction"] is float and NUMBERS["k"] is int
    assert "mean" not in NUMBERS and "model" not in NUMBERS  # tuples and strings stay as given
    for name, kind in NUMBERS.items():
        assert _typed(name, "3") == kind(3) and type(_typed(name, "3")) is kind


def test_distinct_stats_and_bottom_settings(tmp_path):
    cfg = build_index_config({}, BASE)
    assert (cfg.distinct, cfg.near, cfg.stats, cfg.bottom, cfg.samples) == (
        "content", 8, True, 0, 4
    )  # fmt: skip
    assert cfg.new_features() == {"distinct": "content", "stats": True, "samples": 4}
    legacy = build_index_config({}, {**BASE, "distinct": "id", "stats": "off"})
    assert legacy.stats is False and legacy.samples == 0 and legacy.new_features() == {}
    assert build_index_config({}, {**BASE, "stats": "off", "samples": 2}).samples == 2
    spec = tmp_path / "job.yaml"
    spec.write_text("stats: off\nbottom: 5\ndistinct: perceptual\nnear: 4\n")  # YAML: off is False
    cfg = build_index_config(load_spec(str(spec)), BASE)
    assert (cfg.stats, cfg.bottom, cfg.distinct, cfg.near) == (False, 5, "perceptual", 4)
    for flags, message in (
        ({"distinct": "pixels"}, "--distinct 'pixels' is not one of content, id, perceptual"),
        ({"stats": "maybe"}, "--stats must be on or off, got 'maybe'"),
        ({"bottom": -1}, "--bottom must be between 0 and 10000"),
        ({"near": 65}, "--near must be a whole number from 0 to 64"),
    ):
        with pytest.raises(ConfigError, match=message):
            build_index_config({}, {**BASE, **flags})

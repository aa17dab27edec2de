"""Model specs, weights loading and fingerprints, layer names."""

from __future__ import annotations

import pytest
import torch
import torchvision

from pipeline.errors import ConfigError, InputNotFoundError
from pipeline.net.models import cached_weights, fingerprint, load_expected, load_model


def tiny_state(seed: int) -> dict:
    torch.manual_seed(seed)
    from tiny_models import Tiny

    return Tiny().state_dict()


def test_factory_model_with_weights_file_and_fingerprint(tmp_path):
    torch.save(tiny_state(1), tmp_path / "w.pt")
    a = load_model("tiny_models:tiny", str(tmp_path / "w.pt"))
    b = load_model("tiny_models:tiny", str(tmp_path / "w.pt"))
    assert not a.module.training and a.fingerprint == b.fingerprint
    torch.save(tiny_state(2), tmp_path / "v.pt")
    assert load_model("tiny_models:tiny", str(tmp_path / "v.pt")).fingerprint != a.fingerprint


def test_a_worker_refuses_weights_other_than_the_drivers(tmp_path):
    torch.save(tiny_state(1), tmp_path / "w.pt")
    expected = load_model("tiny_models:tiny", str(tmp_path / "w.pt")).fingerprint
    module = load_expected("tiny_models:tiny", str(tmp_path / "w.pt"), {}, expected)
    assert fingerprint(module) == expected
    torch.save(tiny_state(2), tmp_path / "w.pt")  # the same path, other bytes on this node
    with pytest.raises(ConfigError, match="different weights .* same file for every node"):
        load_expected("tiny_models:tiny", str(tmp_path / "w.pt"), {}, expected)


def test_no_weights_means_a_seeded_initialisation():
    assert load_model("tiny_models:tiny").fingerprint == load_model("tiny_models:tiny").fingerprint
    state = torch.random.get_rng_state()
    load_model("tiny_models:tiny")
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG must not move"


def test_checkpoint_wrappers_are_accepted(tmp_path):
    state = tiny_state(3)
    wrapped = {"epoch": 4, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    torch.save(wrapped, tmp_path / "ckpt.pt")
    torch.save(state, tmp_path / "plain.pt")
    assert (
        load_model("tiny_models:tiny", str(tmp_path / "ckpt.pt")).fingerprint
        == load_model("tiny_models:tiny", str(tmp_path / "plain.pt")).fingerprint
    )


def test_weights_errors(tmp_path):
    with pytest.raises(InputNotFoundError, match="does not exist"):
        load_model("tiny_models:tiny", str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="not a torch state dict"):
        load_model("tiny_models:tiny", str(tmp_path / "junk.pt"))
    state = tiny_state(0)
    state["fc.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(ConfigError, match=r"1 of another shape \(e.g. fc.weight"):
        load_model("tiny_models:tiny", str(tmp_path / "shape.pt"))


def test_spec_errors_list_valid_options():
    with pytest.raises(ConfigError, match="not a model spec"):
        load_model("alexnet")
    with pytest.raises(ConfigError, match="'resnet18'"):
        load_model("torchvision:resnet81")
    with pytest.raises(ConfigError, match="cannot import 'no_such_pkg.mod'"):
        load_model("no_such_pkg.mod:make")
    with pytest.raises(ConfigError, match="no callable 'tinny'.*'tiny'"):
        load_model("tiny_models:tinny")
    with pytest.raises(ConfigError, match="valid names: DEFAULT, IMAGENET1K_V1"):
        load_model("torchvision:alexnet", "IMAGENET9K")


def test_fingerprint_covers_buffers():
    model = load_model("torchvision:resnet18").module
    before = fingerprint(model)
    model.bn1.running_mean += 1
    assert fingerprint(model) != before


def test_cached_weights_are_found_where_a_torchvision_download_puts_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert cached_weights("resnet18") is None
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    target = tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1]
    target.parent.mkdir(parents=True)
    saved = torchvision.models.resnet18(weights=None)  # stands in for the downloaded weights
    torch.save(saved.state_dict(), target)
    found = cached_weights("resnet18")
    assert found == str(target)
    assert load_model("torchvision:resnet18", found).fingerprint == fingerprint(saved.eval())

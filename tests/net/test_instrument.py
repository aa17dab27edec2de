"""The shared instrumentation: eval mode restored, forwards stopped, layers found, sizes paired."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.errors import ConfigError
from pipeline.net.instrument import (
    StopForward,
    eval_mode,
    find_layer,
    find_layers,
    pair,
    stop_after,
)
from pipeline.net.models import load_model


def test_find_layers_suggests_close_names():
    model = load_model("tiny_models:tiny").module
    assert list(find_layers(model, ("conv1", "fc"))) == ["conv1", "fc"]
    assert find_layer(model, "conv2") is model.conv2
    with pytest.raises(
        ConfigError, match="unknown layer 'conv'; closest valid names: 'conv2', 'conv1'"
    ):
        find_layers(model, ("conv",))
    with pytest.raises(ConfigError, match="unknown layer ''"):
        find_layers(model, ("",))


def test_eval_mode_restores_each_modules_own_flag():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2), nn.Dropout())
    model.train()
    model[2].eval()  # a module the user froze on purpose
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, True, False]
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("restored on errors too")
    assert [m.training for m in model.modules()] == [True, True, True, False]


def test_stop_after_collects_the_output_and_skips_the_rest():
    ran = []
    model = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), nn.Flatten())
    model[2].register_forward_hook(lambda *args: ran.append("flatten"))
    x = torch.randn(1, 3, 4, 4)  # (1, 3, 4, 4)
    with stop_after(model[0]) as outputs, pytest.raises(StopForward):
        model(x)
    assert ran == [] and len(outputs) == 1
    torch.testing.assert_close(outputs[0], model[0](x))
    assert not model[0]._forward_hooks  # the hook is gone


@pytest.mark.parametrize(
    ("value", "expected"),
    [(3, (3, 3)), ((2, 5), (2, 5)), ([4], (4, 4)), (torch.Size([1, 7]), (1, 7))],
)
def test_pair(value, expected):
    assert pair(value) == expected


def test_pair_refuses_sizes_that_are_not_2d():
    with pytest.raises(ConfigError, match="expected a 2-D size"):
        pair((1, 2, 3))

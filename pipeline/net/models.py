"""Model loading: a model spec plus weights become an eval-mode `nn.Module` and its fingerprint.

Specs: `torchvision:NAME` (any torchvision classification model) or `pkg.module:factory` (a callable
that returns an `nn.Module`). Weights: a local path or fsspec URL to a state dict (loaded with
`weights_only=True`, so a pickle payload is refused), a torchvision weights name such as `DEFAULT`
(downloads, for users with internet), or None: the architecture's own initialisation under a
fixed seed, so every worker builds the same model. The fingerprint hashes every parameter and
buffer, so two workers or two runs can prove they used the same weights.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import pickle
import posixpath
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from pipeline.errors import ConfigError, InputNotFoundError, closest

INIT_SEED = 0  # seed for models indexed without weights
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")


@dataclass(frozen=True)
class LoadedModel:
    module: nn.Module  # in eval mode, on CPU
    fingerprint: str  # sha256 over names, dtypes, shapes and bytes of the state dict


def load_model(spec: str, weights: str | None = None, storage_options: dict | None = None):
    """Build the model named by `spec`, load `weights`; return it in eval mode, fingerprinted."""
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise ConfigError(
            f"--model {spec!r} is not a model spec; use 'torchvision:NAME' (torchvision:alexnet) "
            "or 'pkg.module:factory'"
        )
    tv_weights = _torchvision_weights_name(weights)
    if kind == "torchvision":
        model = _build_torchvision(name, tv_weights)
    else:
        if tv_weights is not None:
            raise ConfigError(
                f"--weights {weights!r} is neither a file nor a URL; torchvision weights names "
                "only apply to torchvision:NAME models"
            )
        model = _build_factory(kind, name)
    if weights is not None and tv_weights is None:
        load_weights(model, weights, spec, storage_options or {})
    model.eval()
    return LoadedModel(module=model, fingerprint=fingerprint(model))


def load_expected(spec: str, weights: str | None, storage_options: dict, expected: str):
    """`load_model` on a worker: the module, refusing weights other than those the driver
    fingerprinted (a weights path that means different files on different nodes)."""
    loaded = load_model(spec, weights, storage_options)
    if loaded.fingerprint != expected:
        raise ConfigError(
            f"a worker loaded different weights for {spec} than the driver expects "
            f"({loaded.fingerprint[:12]} vs {expected[:12]}); make --weights the same file for "
            "every node (a shared path or URL)"
        )
    return loaded.module


def _torchvision_weights_name(weights: str | None) -> str | None:
    """Return `weights` when it names torchvision weights (no path separator, no file suffix)."""
    if weights is None or "/" in weights or "\\" in weights or "://" in weights:
        return None
    if weights.endswith(WEIGHT_SUFFIXES) or "." in weights:
        return None
    return weights


def _build_torchvision(name: str, weights_name: str | None) -> nn.Module:
    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise ConfigError(
            f"torchvision has no classification model {name!r}; closest: {closest(name, available)}"
        )
    if weights_name is None:
        with torch.random.fork_rng():
            torch.manual_seed(INIT_SEED)
            return torchvision.models.get_model(name, weights=None)
    enum = torchvision.models.get_model_weights(name)
    valid = ["DEFAULT", *enum.__members__]
    if weights_name not in valid:
        raise ConfigError(
            f"--weights {weights_name!r} is not a file and not a weights name of {name}; "
            f"valid names: {', '.join(valid)}; or pass a state-dict file"
        )
    try:
        return torchvision.models.get_model(name, weights=weights_name)
    except OSError as e:  # urllib errors derive from OSError: offline machines land here
        raise ConfigError(
            f"could not download torchvision weights {name}/{weights_name} ({e}); "
            "without internet, save a state dict and pass its path as --weights"
        ) from e


def cached_weights(name: str) -> str | None:
    """The file of torchvision's DEFAULT weights for model `name` in the local torch cache
    (`torch.hub.get_dir()/checkpoints`, where a download puts it), or None if not downloaded."""
    url = torchvision.models.get_model_weights(name).DEFAULT.url
    path = (
        Path(torch.hub.get_dir())
        / "checkpoints"
        / posixpath.basename(urllib.parse.urlparse(url).path)
    )
    return str(path) if path.is_file() else None


def _build_factory(module_name: str, attr: str) -> nn.Module:
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"cannot import {module_name!r} for --model {module_name}:{attr} ({e}); "
            "make it importable (installed, or on PYTHONPATH / the job's working_dir)"
        ) from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        names = [n for n in dir(module) if callable(getattr(module, n)) and not n.startswith("_")]
        raise ConfigError(
            f"{module_name} has no callable {attr!r}; closest: {closest(attr, names)}"
        )
    with torch.random.fork_rng():
        torch.manual_seed(INIT_SEED)
        model = factory()
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"{module_name}:{attr}() returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def load_weights(model: nn.Module, path: str, spec: str, storage_options: dict) -> None:
    """Load a state-dict file or URL into `model` strictly; explain every way it can fail."""
    import fsspec  # local import: keep this module importable without touching storage

    try:
        with fsspec.open(path, "rb", **storage_options) as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise InputNotFoundError(
            f"weights file {path!r} does not exist; pass a state-dict file saved with "
            "torch.save(model.state_dict(), path)"
        ) from e
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "unsupported global" not in str(e).lower():  # garbage, not a pickled object
            raise ConfigError(f"weights file {path!r} is not a torch state dict") from e
        raise ConfigError(
            f"weights file {path!r} holds Python objects beyond tensors and was refused "
            "(loaded with weights_only=True); save only torch.save(model.state_dict(), path)"
        ) from e
    except (RuntimeError, EOFError, ValueError) as e:
        raise ConfigError(f"weights file {path!r} is not a torch state dict ({e})") from e
    state = _unwrap_checkpoint(state, path)
    _load_strict(model, state, path, spec)


def _unwrap_checkpoint(state: object, path: str) -> dict[str, torch.Tensor]:
    """Accept a bare state dict, or a checkpoint holding one under 'state_dict' or 'model'."""
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"weights file {path!r} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _load_strict(model: nn.Module, state: dict, path: str, spec: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = [
            f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
            f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
            f"{len(wrong)} of another shape (e.g. {wrong[0]}: file {tuple(state[wrong[0]].shape)}"
            f" vs model {tuple(own[wrong[0]].shape)})"
            if wrong
            else "",
        ]
        raise ConfigError(
            f"weights {path!r} do not fit {spec}: "
            + ", ".join(p for p in parts if p)
            + f"; pass weights saved from {spec}"
        )
    model.load_state_dict(state, strict=True)


def fingerprint(model: nn.Module) -> str:
    """sha256 over every state-dict entry's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

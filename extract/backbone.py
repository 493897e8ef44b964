"""The frozen ResNet50 feature extractor and its weights.

`--weights` takes: `imagenet` (torchvision's IMAGENET1K_V2), `IMAGENET1K_V1`/`IMAGENET1K_V2`
(through torchvision's own download and cache, $TORCH_HOME/hub/checkpoints), a PATH to a
local state dict (for offline clusters), or `none` (seeded random weights, for tests only).
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torchvision
from torch.nn.utils.fusion import fuse_conv_bn_eval

from extract.images import IMAGENET_MEAN, IMAGENET_STD

BACKBONE = "resnet50"
FEATURE_DIM = 2048
# Random weights must be the same in every process, or a resumed or sharded extraction
# would mix features from two different networks.
RANDOM_WEIGHTS_SEED = 0


class WeightsError(Exception):
    """Weights that cannot be found, fetched or loaded."""


def describe_weights(spec: str) -> dict:
    """What the cache records about `spec` (cheap: reads no weights)."""
    if spec.lower() == "none":
        return {"weights": f"random(seed={RANDOM_WEIGHTS_SEED})", "weights_sha256": ""}
    if spec.lower() == "imagenet" or spec.upper() in ("IMAGENET1K_V1", "IMAGENET1K_V2"):
        name = "IMAGENET1K_V2" if spec.lower() == "imagenet" else spec.upper()
        return {"weights": f"torchvision:{name}", "weights_sha256": ""}
    path = Path(spec)
    if not path.is_file():
        raise WeightsError(f"--weights {spec}: no such file; use imagenet, IMAGENET1K_V1, "
                           f"IMAGENET1K_V2, none, or the path of a ResNet50 state dict")
    from extract.nih import file_sha256
    return {"weights": f"file:{path.name}", "weights_sha256": file_sha256(path)}


def build_backbone(spec: str, *, device: torch.device) -> torch.nn.Module:
    """ResNet50 with its classifier removed: the output is the 2048-d pooled feature.
    Frozen: eval mode and no gradients."""
    if spec.lower() == "none":
        warnings.warn("--weights none: RANDOM backbone weights; features are meaningless "
                      "beyond testing the pipeline", stacklevel=2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            model = torchvision.models.resnet50(weights=None)
    elif spec.lower() == "imagenet" or spec.upper() in ("IMAGENET1K_V1", "IMAGENET1K_V2"):
        model = _torchvision_pretrained(describe_weights(spec)["weights"].split(":")[1])
    else:
        model = torchvision.models.resnet50(weights=None)
        _load_state_dict_file(model, Path(spec))
    model.fc = torch.nn.Identity()
    model.eval().requires_grad_(False)
    fold_batchnorm(model)
    return model.to(device=device, memory_format=torch.channels_last)


def fold_batchnorm(model: torch.nn.Module) -> None:
    """Fold each frozen BatchNorm into the convolution before it: the same function with one
    op fewer per layer (measured 8% faster on CPU; the features agree to float rounding)."""
    pairs = [(model, "conv1", "bn1")]
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            pairs += [(block, f"conv{i}", f"bn{i}") for i in (1, 2, 3)]
            if block.downsample is not None:
                pairs.append((block.downsample, "0", "1"))
    for parent, conv_name, bn_name in pairs:
        conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
        setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
        setattr(parent, bn_name, torch.nn.Identity())


def _torchvision_pretrained(name: str) -> torch.nn.Module:
    weights = torchvision.models.ResNet50_Weights[name]
    try:
        return torchvision.models.resnet50(weights=weights)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        filename = weights.url.rsplit("/", 1)[-1]
        raise WeightsError(
            f"cannot fetch ResNet50 {name} weights ({err}). Offline, download {weights.url} "
            f"elsewhere and either put it in {Path(torch.hub.get_dir()) / 'checkpoints' / filename} "
            f"or pass --weights /path/to/{filename}"
        ) from err


def _load_state_dict_file(model: torch.nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad file
        raise WeightsError(f"--weights {path}: not a loadable state dict ({err})") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {key: value for key, value in state.items() if not key.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.startswith("fc.")]
    if missing or unexpected:
        raise WeightsError(f"--weights {path}: not a ResNet50 state dict (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")


def normalization(spec: str) -> tuple[tuple, tuple]:
    """The mean/std the weights were trained with (ImageNet for all supported weights)."""
    return IMAGENET_MEAN, IMAGENET_STD

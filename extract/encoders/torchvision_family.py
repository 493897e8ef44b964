"""torchvision's classification models: --backbone resnet50, densenet121, convnext_tiny, ..."""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import torch
import torchvision

from extract.encoders.base import Encoder, EncoderError, PooledLayers, Preprocessing
from extract.encoders.registry import register
from extract.encoders.weights import Weights, load_state_dict_file, random_init, seeded, weights_tag


@register("", example="resnet18")
def build(name, *, weights: Weights, image_size, layers, pooling) -> Encoder:
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise EncoderError(f"--backbone {name}: not a torchvision classification model; e.g. resnet50, "
                           f"densenet121, convnext_tiny, vit_b_16, efficientnet_b0, or timm:NAME, "
                           f"hf:REPO, xrv:NAME") from None
    # ViTs embed positions for one size only; the others pool whatever size they get.
    if name.startswith(("vit", "swin", "maxvit")) and image_size and image_size != 224:
        raise EncoderError(f"--image-size {image_size}: torchvision's {name} accepts only 224")
    chosen = None
    if weights.kind == "pretrained":
        chosen = enum.DEFAULT
    elif weights.kind != "random" and weights.spec.upper() in enum.__members__:
        chosen = enum[weights.spec.upper()]
    record = (weights.record("") if chosen is None
              else {"weights": f"torchvision:{chosen.name}", "weights_sha256": ""})
    if weights.kind == "random":
        net = random_init(lambda: torchvision.models.get_model(name, weights=None))
    elif chosen is not None:
        net = _torchvision_pretrained(name, chosen)
    else:
        net = seeded(lambda: torchvision.models.get_model(name, weights=None))
        load_state_dict_file(net, weights.path, what=name, optional_prefixes=("fc.", "classifier.", "heads.", "head."))
    if not layers:
        _drop_last_linear(net)
    return Encoder(backbone=name, model=PooledLayers(net, layers, pooling), preprocessing=Preprocessing(image_size or 224),
                   layers=layers, blocks=layers or ("pooled",), pooling=pooling, weights=record,
                   weights_tag=weights_tag(record, family_default=chosen is enum.DEFAULT))


def _torchvision_pretrained(name: str, weights) -> torch.nn.Module:
    # torch.hub prints 'Downloading: URL to PATH' before it tries: shown when the fetch works,
    # held back when it fails, where it would read as a download under way beside the error.
    announced = io.StringIO()
    try:
        with contextlib.redirect_stdout(announced):
            net = torchvision.models.get_model(name, weights=weights)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        filename = weights.url.rsplit("/", 1)[-1]
        raise EncoderError(
            f"cannot fetch {name} {weights.name} weights ({err}). Offline, download {weights.url} "
            f"elsewhere and either put it in {Path(torch.hub.get_dir()) / 'checkpoints' / filename} "
            f"or pass --weights /path/to/{filename}"
        ) from err
    sys.stdout.write(announced.getvalue())
    return net


def _drop_last_linear(net: torch.nn.Module) -> None:
    """Replace the classifier (the last Linear) by Identity: the output is the pooled feature."""
    name = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, torch.nn.Identity())

"""The registry of encoder families, and the entry points that build from it.

A family is one file in this package: a build function registered under its --backbone prefix
with `@register`. `build_encoder` parses --weights once and hands the family a `Weights`;
the family returns an `Encoder` on the CPU, which `build_encoder` freezes, folds and measures.
Tests iterate FAMILIES, so a registered family is tested by being registered.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Callable

import torch

from extract.encoders.base import DEFAULT_BACKBONE, POOLINGS, Encoder, EncoderError, fold_batchnorm
from extract.encoders.weights import Weights


@dataclasses.dataclass(frozen=True)
class Family:
    """One entry of the registry: how to build a model of this family and what it expects."""

    prefix: str                     # --backbone PREFIX:NAME ("" for torchvision's bare names)
    extra: str | None               # pip extra that installs it (None: core install)
    module: str | None              # import name checked before building
    build: Callable                 # (name, *, weights: Weights, image_size, layers, pooling) -> Encoder (CPU)
    example: str                    # a small model the tests build with random weights ("": needs a folder)


FAMILIES: dict[str, Family] = {}


def register(prefix: str, *, extra: str | None = None, module: str | None = None, example: str = ""):
    """Decorator: the build function of the family behind --backbone PREFIX:NAME."""
    def add(build: Callable) -> Callable:
        FAMILIES[prefix] = Family(prefix=prefix, extra=extra, module=module, build=build, example=example)
        return build
    return add


def _require(module: str, extra: str, backbone: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError:
        raise EncoderError(f"--backbone {backbone} needs the {module} package: "
                           f"pip install -e .[{extra}]") from None


def split_backbone(backbone: str) -> tuple[str, str]:
    """'timm:vit_small' -> ('timm', 'vit_small'); 'resnet50' -> ('', 'resnet50')."""
    family, sep, name = backbone.partition(":")
    if not sep:
        return "", backbone
    if family not in FAMILIES or not family:
        prefixes = ", ".join(f"{prefix}:NAME" for prefix in sorted(FAMILIES) if prefix)
        raise EncoderError(f"--backbone {backbone}: unknown family {family!r}; use a torchvision name or "
                           f"{prefixes}")
    if not name:
        raise EncoderError(f"--backbone {backbone}: name the model after the colon")
    return family, name


def parse_layers(text: str | None) -> tuple:
    """'layer3,layer4' -> ('layer3', 'layer4'); None or '' -> () (the encoder's pooled output)."""
    layers = tuple(part.strip() for part in (text or "").split(",") if part.strip())
    repeated = sorted({name for name in layers if layers.count(name) > 1})
    if repeated:  # the same block twice only doubles the feature, it adds nothing
        raise EncoderError(f"--layers {text}: {', '.join(repeated)} named twice; name each block once")
    return layers


def build_encoder(backbone: str = DEFAULT_BACKBONE, *, weights: str = "pretrained", image_size: int | None = None,
                  layers=(), pooling: str = "cls", device: torch.device = torch.device("cpu")) -> Encoder:
    """The frozen encoder (eval mode, no gradients, BatchNorm folded, channels_last) on `device`,
    with its per-block feature dims measured by one forward pass."""
    if pooling not in POOLINGS:
        raise EncoderError(f"--pooling {pooling}: use one of {', '.join(POOLINGS)}")
    family, name = split_backbone(backbone)
    if FAMILIES[family].module:
        _require(FAMILIES[family].module, FAMILIES[family].extra, backbone)
    encoder = FAMILIES[family].build(name, weights=Weights.parse(weights), image_size=image_size,
                                     layers=tuple(layers), pooling=pooling)
    encoder.model.eval().requires_grad_(False)
    fold_batchnorm(encoder.model, keep=getattr(encoder.model, "hooked", ()))
    encoder.model.to(device=device, memory_format=torch.channels_last)
    encoder.block_dims = _measure_block_dims(encoder, device)
    return encoder


def _measure_block_dims(encoder: Encoder, device: torch.device) -> tuple:
    prep = encoder.preprocessing
    probe = prep.to_inputs(torch.full((1, prep.size, prep.size), 0.5, device=device))
    try:
        with torch.inference_mode():
            blocks = encoder.model(probe)
    except (RuntimeError, ValueError) as err:  # transformers' ViTs raise ValueError for a size
        raise EncoderError(f"--backbone {encoder.backbone} does not run at --image-size {prep.size} "
                           f"({str(err).splitlines()[0]}); leave --image-size out for its own size") from None
    if len(blocks) != len(encoder.blocks):  # a family's model must give each block it names
        raise EncoderError(f"--layers {','.join(encoder.layers)}: not every layer runs in the forward pass")
    return tuple(int(block.flatten(1).shape[1]) for block in blocks)


def default_cache_path(backbone: str, *, image_size: int, layers=(), weights_tag: str = "") -> str:
    """outputs/cache/<backbone>-<size>[-<layers>][-<weights>].h5, so that variants sit side by
    side: the weights are named unless they are the family's pretrained default."""
    parts = [backbone, str(image_size)] + (["+".join(layers)] if layers else []) + ([weights_tag] if weights_tag else [])
    name = "-".join(re.sub(r"[^A-Za-z0-9_.+]+", "-", part).strip("-") for part in parts)
    return f"outputs/cache/{name}.h5"

"""What every encoder is: its preprocessing, the frozen model with its pooled blocks, and the
recipe the cache records; the pooling and BatchNorm folding all families share."""
from __future__ import annotations

import dataclasses
import functools

import torch
import torchvision
from torch.nn.utils.fusion import fuse_conv_bn_eval

IMAGENET_MEAN = (0.485, 0.456, 0.406)

IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_BACKBONE = "resnet50"

POOLINGS = ("cls", "mean", "cls+mean")


class EncoderError(Exception):
    """A --backbone, --weights, --layers or --pooling that cannot be built as asked."""


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a gray image in [0, 1] becomes an encoder input: resized whole (never cropped) to
    size x size, scaled to value_range, normalized, 1 or 3 (replicated) channels."""

    size: int
    channels: int = 3
    interpolation: str = "bilinear"
    value_range: tuple = (0.0, 1.0)
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def to_inputs(self, gray: torch.Tensor) -> torch.Tensor:
        """(B, S, S) float gray in [0, 1] -> (B, C, S, S) normalized, channels_last."""
        low, high = self.value_range
        scaled = gray * (high - low) + low if (low, high) != (0.0, 1.0) else gray
        mean = torch.tensor(self.mean, device=gray.device, dtype=gray.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=gray.device, dtype=gray.dtype).view(1, -1, 1, 1)
        stacked = scaled[:, None].expand(-1, self.channels, -1, -1)
        return ((stacked - mean) / std).contiguous(memory_format=torch.channels_last)

    def record(self) -> dict:
        """The recipe as the cache's `preprocessing` attribute holds it (see `cache`)."""
        return {
            "decode": "gray in [0,1]; RGB/RGBA by luminance (alpha dropped); 16-bit / 257",
            "resize": f"whole image to {self.size}x{self.size}, {self.interpolation}, antialias, no crop",
            "channels": "gray replicated to 3" if self.channels == 3 else "1 (gray)",
            "value_range": list(self.value_range),
            "normalize_mean": list(self.mean),
            "normalize_std": list(self.std),
        }


@dataclasses.dataclass
class Encoder:
    """A frozen feature model and everything needed to feed it and to describe it."""

    backbone: str
    model: torch.nn.Module          # inputs -> list of (B, d_i) pooled blocks
    preprocessing: Preprocessing
    layers: tuple                   # --layers as asked; () = the encoder's pooled output
    blocks: tuple                   # what each concatenated block is, in output order
    pooling: str
    weights: dict                   # {"weights": ..., "weights_sha256": ...}
    warning: str = ""
    block_dims: tuple = ()
    weights_tag: str = ""           # in the default cache name: "" for the family's pretrained default

    @property
    def feature_dim(self) -> int:
        return sum(self.block_dims)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S) prepared inputs -> (B, D): the pooled blocks concatenated."""
        return torch.cat([block.flatten(1) for block in self.model(inputs)], dim=1)

    def recipe(self) -> dict:
        """The image-to-feature recipe the cache records (and its fingerprint covers)."""
        return {**self.preprocessing.record(), "layers": list(self.layers), "blocks": list(self.blocks),
                "pooling": self.pooling, "block_dims": list(self.block_dims)}


def pool_tokens(tokens: torch.Tensor, pooling: str, *, prefix_tokens: int = 1) -> torch.Tensor:
    """(B, T, D) tokens -> (B, D) or (B, 2D): the CLS token, the mean of the patch tokens, or both."""
    cls, patches = tokens[:, 0], tokens[:, prefix_tokens:]
    if pooling == "cls":
        return cls
    if pooling == "mean":
        return patches.mean(dim=1)
    return torch.cat([cls, patches.mean(dim=1)], dim=1)


def pool_block(output, pooling: str, *, layer: str = "") -> torch.Tensor:
    """A module's output pooled to (B, d): feature maps averaged over space, tokens by `pooling`."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor) or output.dim() < 2:
        kind = type(output).__name__ if not isinstance(output, torch.Tensor) else f"{output.dim()}-d tensor"
        raise EncoderError(f"--layers {layer}: its output is a {kind}, not a feature map or tokens per "
                           f"image; name a module that outputs one")
    if output.dim() == 4:
        return output.float().mean(dim=(2, 3))
    if output.dim() == 3:
        return pool_tokens(output, pooling)
    return output.flatten(1)


class PooledLayers(torch.nn.Module):
    """Runs `net` and returns the pooled outputs of the named submodules (forward hooks), or
    net's own output when no layers are named."""

    def __init__(self, net: torch.nn.Module, layers: tuple, pooling: str):
        super().__init__()
        self.net, self.layers, self.pooling = net, layers, pooling
        self._captured = {}
        known = dict(net.named_modules())
        for name in layers:
            if name not in known or not name:
                top = [n for n, _ in net.named_children()]
                raise EncoderError(f"--layers {name}: no such module in this encoder; its top-level "
                                   f"modules are {', '.join(top[:12])} (nested names use dots)")
            known[name].register_forward_hook(functools.partial(self._capture, name))
        self.hooked = tuple(known[name] for name in layers)

    def _capture(self, name, module, args, output):
        # pooled at once: a later in-place op (ResNet's ReLU after bn1) would change the tensor
        self._captured[name] = pool_block(output, self.pooling, layer=name)

    def forward(self, inputs):
        output = self.net(inputs)
        if not self.layers:
            return [pool_block(output, self.pooling)]
        captured, self._captured = self._captured, {}
        silent = [name for name in self.layers if name not in captured]
        if silent:
            raise EncoderError(f"--layers {','.join(silent)}: not run in this encoder's forward pass, so "
                               f"it gives no feature; name modules that run (e.g. a ResNet's layer1..layer4)")
        return [captured[name] for name in self.layers]


def fold_batchnorm(model: torch.nn.Module, *, keep=()) -> None:
    """Fold each frozen BatchNorm into the convolution right before it: the same function with
    one op fewer per layer (features agree to float rounding). Folds ResNet blocks
    (convN -> bnN) and Conv2d -> BatchNorm2d in Sequentials; norm-before-conv designs
    (DenseNet) have nothing to fold. A pair with a module in `keep` (one that --layers reads)
    stays as it is: folding would compute its output no more."""
    kept = {id(module) for module in keep}
    foldable = lambda conv, bn: (isinstance(conv, torch.nn.Conv2d) and type(bn) is torch.nn.BatchNorm2d  # noqa: E731
                                 and id(conv) not in kept and id(bn) not in kept)
    resnet_parts = (torchvision.models.ResNet, torchvision.models.resnet.BasicBlock,
                    torchvision.models.resnet.Bottleneck)
    for parent in list(model.modules()):
        if isinstance(parent, resnet_parts):
            for index in (1, 2, 3):
                conv, bn = getattr(parent, f"conv{index}", None), getattr(parent, f"bn{index}", None)
                if foldable(conv, bn):
                    setattr(parent, f"conv{index}", fuse_conv_bn_eval(conv, bn))
                    setattr(parent, f"bn{index}", torch.nn.Identity())
        if isinstance(parent, torch.nn.Sequential):
            children = list(parent.named_children())
            for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
                # exact type: timm's BatchNormAct2d also applies an activation
                if foldable(conv, bn):
                    setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                    setattr(parent, bn_name, torch.nn.Identity())

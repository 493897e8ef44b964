"""Frozen image encoders and the preprocessing each expects: the one registry `extract`,
`heads.predict` and the benchmarks build their feature models from.

`--backbone` names an encoder; a prefix picks its family, each one entry of FAMILIES:

    resnet50, densenet121, convnext_tiny, vit_b_16, ...   torchvision (core install)
    timm:NAME                                             timm         (pip install -e .[timm])
    hf:REPO_OR_DIR                                        transformers (pip install -e .[hf])
    xrv:NAME                                              torchxrayvision (pip install -e .[xrv])

`--weights`: `pretrained` (the family's own pretrained weights, through its own download and
cache; `imagenet` is an alias), a torchvision weights enum name (IMAGENET1K_V1 ...), a local
file or folder (offline clusters; its sha256 is recorded), or `none` (seeded random
initialisation, for tests only).

Every encoder turns a batch of gray images in [0, 1] at its input size into one (B, D)
float feature: `Encoder.embed`. What it did to get there (channels, size, resize rule, value
range, mean/std, layers, pooling, per-layer dims) is `Encoder.recipe()`, which the cache
records and its fingerprint covers.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import re
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch.nn.utils.fusion import fuse_conv_bn_eval

from cache.runtime import cpu_has_native_bf16  # noqa: F401 (extract's precision reads it here)
from extract.images import IMAGENET_MEAN, IMAGENET_STD
from extract.nih import file_sha256

DEFAULT_BACKBONE = "resnet50"
POOLINGS = ("cls", "mean", "cls+mean")
# Random weights must be the same in every process, or a resumed or sharded extraction
# would mix features from two different networks.
RANDOM_WEIGHTS_SEED = 0
PRETRAINED = ("pretrained", "imagenet", "default")
# torchxrayvision's weights were trained on NIH ChestX-ray14 under a random image split that
# includes the official test images (mlmed/torchxrayvision issue tracker).
XRV_WARNING = ("torchxrayvision weights were trained on NIH ChestX-ray14 images including the "
               "official TEST images: test AUC on these features is NOT a clean held-out result")


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


@dataclasses.dataclass(frozen=True)
class Family:
    """One entry of the registry: how to build a model of this family and what it expects."""

    extra: str | None               # pip extra that installs it (None: core install)
    module: str | None              # import name checked before building
    build: Callable                 # (name, *, weights, image_size, layers, pooling) -> Encoder (CPU)


# ---------------------------------------------------------------------------------------------
# Shared pieces: pooling, hooks, weights files, BatchNorm folding


def pool_tokens(tokens: torch.Tensor, pooling: str, *, prefix_tokens: int = 1) -> torch.Tensor:
    """(B, T, D) tokens -> (B, D) or (B, 2D): the CLS token, the mean of the patch tokens, or both."""
    cls, patches = tokens[:, 0], tokens[:, prefix_tokens:]
    if pooling == "cls":
        return cls
    if pooling == "mean":
        return patches.mean(dim=1)
    return torch.cat([cls, patches.mean(dim=1)], dim=1)


def pool_block(output, pooling: str) -> torch.Tensor:
    """A module's output pooled to (B, d): feature maps averaged over space, tokens by `pooling`."""
    if isinstance(output, (tuple, list)):
        output = output[0]
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
            if name not in known:
                top = [n for n, _ in net.named_children()]
                raise EncoderError(f"--layers {name}: no such module in this encoder; its top-level "
                                   f"modules are {', '.join(top[:12])} (nested names use dots)")
            known[name].register_forward_hook(functools.partial(self._capture, name))

    def _capture(self, name, module, args, output):
        self._captured[name] = output

    def forward(self, inputs):
        output = self.net(inputs)
        if not self.layers:
            return [pool_block(output, self.pooling)]
        captured, self._captured = self._captured, {}
        return [pool_block(captured[name], self.pooling) for name in self.layers]


def _folder_sha256(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def _random_init(build: Callable) -> torch.nn.Module:
    warnings.warn("--weights none: RANDOM encoder weights; features are meaningless beyond "
                  "testing the pipeline", stacklevel=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        return build()


def _local_weights(spec: str) -> Path:
    path = Path(spec)
    if not path.exists():
        raise EncoderError(f"--weights {spec}: no such file or folder; use pretrained, none, or the "
                           f"path of local weights")
    return path


def describe_local_weights(spec: str) -> dict:
    """What the cache records about a local weights file or folder: its name and sha256."""
    path = _local_weights(spec)
    sha = _folder_sha256(path) if path.is_dir() else file_sha256(path)
    return {"weights": f"file:{path.name}", "weights_sha256": sha}


def _weights_record(spec: str, pretrained_name: str) -> dict:
    if spec.lower() == "none":
        return {"weights": f"random(seed={RANDOM_WEIGHTS_SEED})", "weights_sha256": ""}
    if spec.lower() in PRETRAINED:
        return {"weights": pretrained_name, "weights_sha256": ""}
    return describe_local_weights(spec)


def load_state_dict_file(model: torch.nn.Module, path: Path, *, what: str, ignore_prefixes=()) -> None:
    """Load a local state dict (weights_only: nothing is unpickled), ignoring classifier keys."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a bad file
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EncoderError(f"--weights {path}: not a loadable state dict ({reason}); pass a .pth/.pt "
                           f"state dict saved with torch.save") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise EncoderError(f"--weights {path}: not a state dict (a {type(state).__name__})")
    ignored = lambda key: any(key.startswith(p) for p in ignore_prefixes)  # noqa: E731
    state = {key: value for key, value in state.items() if not ignored(key)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if not ignored(key)]
    if missing or unexpected:
        raise EncoderError(f"--weights {path}: not a {what} state dict (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")


def fold_batchnorm(model: torch.nn.Module) -> None:
    """Fold each frozen BatchNorm into the convolution right before it: the same function with
    one op fewer per layer (measured 8% faster on CPU for ResNet50; features agree to float
    rounding). Folds ResNet blocks (convN -> bnN) and Conv2d -> BatchNorm2d in Sequentials;
    norm-before-conv designs (DenseNet) have nothing to fold."""
    resnet_parts = (torchvision.models.ResNet, torchvision.models.resnet.BasicBlock,
                    torchvision.models.resnet.Bottleneck)
    for parent in list(model.modules()):
        if isinstance(parent, resnet_parts):
            for index in (1, 2, 3):
                conv, bn = getattr(parent, f"conv{index}", None), getattr(parent, f"bn{index}", None)
                if isinstance(conv, torch.nn.Conv2d) and type(bn) is torch.nn.BatchNorm2d:
                    setattr(parent, f"conv{index}", fuse_conv_bn_eval(conv, bn))
                    setattr(parent, f"bn{index}", torch.nn.Identity())
        if isinstance(parent, torch.nn.Sequential):
            children = list(parent.named_children())
            for (conv_name, conv), (bn_name, bn) in zip(children, children[1:]):
                # exact type: timm's BatchNormAct2d also applies an activation
                if isinstance(conv, torch.nn.Conv2d) and type(bn) is torch.nn.BatchNorm2d:
                    setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
                    setattr(parent, bn_name, torch.nn.Identity())


def _drop_last_linear(net: torch.nn.Module) -> None:
    """Replace the classifier (the last Linear) by Identity: the output is the pooled feature."""
    name = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, torch.nn.Identity())


def _require(module: str, extra: str, backbone: str) -> None:
    try:
        importlib.import_module(module)
    except ImportError:
        raise EncoderError(f"--backbone {backbone} needs the {module} package: "
                           f"pip install -e .[{extra}]") from None


# ---------------------------------------------------------------------------------------------
# The families


def _torchvision(name, *, weights, image_size, layers, pooling) -> Encoder:
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
    if weights.lower() in PRETRAINED:
        chosen = enum.DEFAULT
    elif weights.upper() in enum.__members__:
        chosen = enum[weights.upper()]
    record = (_weights_record(weights, "") if chosen is None
              else {"weights": f"torchvision:{chosen.name}", "weights_sha256": ""})
    if weights.lower() == "none":
        net = _random_init(lambda: torchvision.models.get_model(name, weights=None))
    elif chosen is not None:
        net = _torchvision_pretrained(name, chosen)
    else:
        net = torchvision.models.get_model(name, weights=None)
        load_state_dict_file(net, _local_weights(weights), what=name,
                             ignore_prefixes=("fc.", "classifier.", "heads.", "head."))
    if not layers:
        _drop_last_linear(net)
    return Encoder(backbone=name, model=PooledLayers(net, layers, pooling), preprocessing=Preprocessing(image_size or 224),
                   layers=layers, blocks=layers or ("pooled",), pooling=pooling, weights=record)


def _torchvision_pretrained(name: str, weights) -> torch.nn.Module:
    try:
        return torchvision.models.get_model(name, weights=weights)
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        filename = weights.url.rsplit("/", 1)[-1]
        raise EncoderError(
            f"cannot fetch {name} {weights.name} weights ({err}). Offline, download {weights.url} "
            f"elsewhere and either put it in {Path(torch.hub.get_dir()) / 'checkpoints' / filename} "
            f"or pass --weights /path/to/{filename}"
        ) from err


def _timm(name, *, weights, image_size, layers, pooling) -> Encoder:
    import timm
    options = {"num_classes": 0}
    if weights.lower() not in PRETRAINED + ("none",):
        options["pretrained_cfg_overlay"] = {"file": str(_local_weights(weights))}
    if image_size:
        options["img_size"] = image_size  # ViTs resample their position embeddings
    pretrained = weights.lower() != "none"

    def create():
        net_builder = lambda: timm.create_model(name, pretrained=pretrained, **options)  # noqa: E731
        return net_builder() if pretrained else _random_init(net_builder)

    try:
        try:
            net = create()
        except TypeError:  # CNNs take no img_size: they pool any size
            options.pop("img_size", None)
            net = create()
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise EncoderError(f"--backbone timm:{name}: timm has no such model ({err})") from None
        raise EncoderError(f"--backbone timm:{name}: cannot load its weights ({err})") from err
    except OSError as err:
        raise EncoderError(f"cannot fetch timm:{name} weights ({err}); offline, pass --weights with a "
                           f"local weights file") from err
    config = timm.data.resolve_data_config({}, model=net)
    interpolation = config.get("interpolation", "bilinear")
    preprocessing = Preprocessing(size=image_size or int(config["input_size"][-1]),
                                  interpolation="bicubic" if interpolation == "bicubic" else "bilinear",
                                  mean=tuple(config["mean"]), std=tuple(config["std"]))
    tag = getattr(net, "pretrained_cfg", {}).get("tag") or "default"
    record = _weights_record(weights, f"timm:{name}.{tag}")
    return Encoder(backbone=f"timm:{name}", model=PooledLayers(net, layers, pooling), preprocessing=preprocessing,
                   layers=layers, blocks=layers or ("pooled",), pooling=pooling, weights=record)


class _HFEncoder(torch.nn.Module):
    """A transformers vision model: CLS / patch-mean of the last hidden state, or of the last
    k blocks (each through the model's final norm, as DINOv2's linear evaluation does)."""

    def __init__(self, net, *, last_blocks: int, pooling: str):
        super().__init__()
        self.net, self.last_blocks, self.pooling = net, last_blocks, pooling
        self.norm = getattr(net, "layernorm", None)
        self.prefix = 1 + int(getattr(net.config, "num_register_tokens", 0) or 0)

    def forward(self, inputs):
        out = self.net(pixel_values=inputs, output_hidden_states=self.last_blocks > 0)
        if not self.last_blocks:
            return [pool_tokens(out.last_hidden_state, self.pooling, prefix_tokens=self.prefix)]
        blocks = out.hidden_states[-self.last_blocks:]
        if self.norm is not None:
            blocks = [self.norm(block) for block in blocks]
        return [pool_tokens(block, self.pooling, prefix_tokens=self.prefix) for block in blocks]


def _hf(name, *, weights, image_size, layers, pooling) -> Encoder:
    import transformers
    last_blocks = _last_blocks(layers, backbone=f"hf:{name}")
    source = name
    if weights.lower() not in PRETRAINED + ("none",):
        source = str(_local_weights(weights))
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(source)
        if weights.lower() == "none":
            config = transformers.AutoConfig.from_pretrained(source)
            net = _random_init(lambda: transformers.AutoModel.from_config(config))
        else:
            net = transformers.AutoModel.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise EncoderError(f"--backbone hf:{name}: cannot load it ({str(err).splitlines()[0]}); offline, "
                           f"use hf:/path/to/a/folder saved with save_pretrained, or set HF_HOME to a "
                           f"filled cache") from None
    depth = getattr(net.config, "num_hidden_layers", None)
    if depth and last_blocks > depth:
        raise EncoderError(f"--layers last:{last_blocks}: hf:{name} has {depth} blocks; use last:1 .. last:{depth}")
    net.eval()
    size = image_size or _processor_size(processor)
    preprocessing = Preprocessing(size=size, interpolation="bicubic" if getattr(processor, "resample", 2) == 3
                                  else "bilinear",
                                  mean=tuple(processor.image_mean), std=tuple(processor.image_std))
    commit = getattr(net.config, "_commit_hash", None)
    record = _weights_record(weights, f"hf:{name}" + (f"@{commit}" if commit else ""))
    if weights.lower() in PRETRAINED and Path(name).is_dir():
        record["weights_sha256"] = _folder_sha256(Path(name))
    names = tuple(f"block{-k}" for k in range(last_blocks, 0, -1)) if last_blocks else ("last_hidden_state",)
    return Encoder(backbone=f"hf:{name}", model=_HFEncoder(net, last_blocks=last_blocks, pooling=pooling),
                   preprocessing=preprocessing, layers=layers, blocks=names, pooling=pooling, weights=record)


def _processor_size(processor) -> int:
    """The side the processor feeds the model: its crop if it crops, else its resize."""
    size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
    size = size or {}
    return int(size.get("height") or size.get("shortest_edge") or 224)


def _last_blocks(layers: tuple, *, backbone: str) -> int:
    if not layers:
        return 0
    match = re.fullmatch(r"last:(\d+)", ",".join(layers))
    if not match or int(match.group(1)) < 1:
        raise EncoderError(f"--layers {','.join(layers)}: {backbone} takes last:K (the CLS token of "
                           f"each of the last K blocks)")
    return int(match.group(1))


class _XRVEncoder(torch.nn.Module):
    """torchxrayvision's pooled feature, computed as its features2()/features() do but without
    their fix_resolution step, which would silently resize away an --image-size."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, inputs):
        if hasattr(self.net, "model"):  # xrv.models.ResNet wraps a torchvision ResNet
            resnet = self.net.model
            x = resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(inputs))))
            x = resnet.layer4(resnet.layer3(resnet.layer2(resnet.layer1(x))))
        else:
            x = F.relu(self.net.features(inputs))
        return [x.float().mean(dim=(2, 3))]


def _xrv(name, *, weights, image_size, layers, pooling) -> Encoder:
    import torchxrayvision as xrv
    if layers:
        raise EncoderError(f"--layers: xrv:{name} gives its pooled feature only")
    known = [key for key in xrv.models.model_urls if key.startswith(("densenet", "resnet"))]
    if name not in known:
        raise EncoderError(f"--backbone xrv:{name}: torchxrayvision has {', '.join(known)}")
    try:
        if weights.lower() == "none":
            net = _random_init(lambda: _xrv_architecture(xrv, name))
        elif weights.lower() in PRETRAINED:
            # its own loader and download cache (~/.torchxrayvision); the DenseNet files are
            # pickled whole models, so this trusts torchxrayvision's download
            net = xrv.models.get_model(name)
        else:
            net = _xrv_architecture(xrv, name)
            load_state_dict_file(net.model if name.startswith("resnet") else net, _local_weights(weights),
                                 what=f"xrv:{name}", ignore_prefixes=("op_threshs",))
    except EncoderError:
        raise
    except Exception as err:  # torchxrayvision raises bare Exceptions for downloads and files
        raise EncoderError(f"--backbone xrv:{name}: cannot load its weights ({err}); offline, put its weights "
                           f"file in ~/.torchxrayvision/models_data/ or pass --weights PATH") from None
    named_resolution = re.search(r"res(\d+)", name)  # e.g. densenet121-res224-all, resnet50-res512-all
    resolution = int(named_resolution.group(1)) if named_resolution else 224
    # torchxrayvision's convention: one channel, values in [-1024, 1024], no further normalization
    preprocessing = Preprocessing(size=image_size or resolution, channels=1, value_range=(-1024.0, 1024.0),
                                  mean=(0.0,), std=(1.0,))
    return Encoder(backbone=f"xrv:{name}", model=_XRVEncoder(net), preprocessing=preprocessing,
                   layers=(), blocks=("features",), pooling="mean", weights=_weights_record(weights, f"xrv:{name}"),
                   warning=XRV_WARNING)


def _xrv_architecture(xrv, name: str) -> torch.nn.Module:
    """The untrained network of a torchxrayvision model (its ResNet class insists on weights)."""
    if name.startswith("densenet"):
        return xrv.models.DenseNet(weights=None)
    holder = torch.nn.Module()
    holder.model = torchvision.models.resnet50(num_classes=len(xrv.models.model_urls[name]["labels"]))
    holder.model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return holder


FAMILIES = {
    "": Family(extra=None, module=None, build=_torchvision),
    "timm": Family(extra="timm", module="timm", build=_timm),
    "hf": Family(extra="hf", module="transformers", build=_hf),
    "xrv": Family(extra="xrv", module="torchxrayvision", build=_xrv),
}


# ---------------------------------------------------------------------------------------------
# The entry points


def split_backbone(backbone: str) -> tuple[str, str]:
    """'timm:vit_small' -> ('timm', 'vit_small'); 'resnet50' -> ('', 'resnet50')."""
    family, sep, name = backbone.partition(":")
    if not sep:
        return "", backbone
    if family not in FAMILIES or not family:
        raise EncoderError(f"--backbone {backbone}: unknown family {family!r}; use a torchvision name, "
                           f"timm:NAME, hf:REPO_OR_DIR or xrv:NAME")
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
    encoder = FAMILIES[family].build(name, weights=weights, image_size=image_size, layers=tuple(layers),
                                     pooling=pooling)
    encoder.model.eval().requires_grad_(False)
    fold_batchnorm(encoder.model)
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
    if len(blocks) != len(encoder.blocks):  # hooks of a module that never runs
        raise EncoderError(f"--layers {','.join(encoder.layers)}: not every layer runs in the forward pass")
    return tuple(int(block.flatten(1).shape[1]) for block in blocks)


def default_cache_path(backbone: str, *, image_size: int, layers=()) -> str:
    """outputs/cache/<backbone>-<size>[-<layers>].h5, so that variants sit side by side."""
    parts = [backbone, str(image_size)] + (["+".join(layers)] if layers else [])
    name = "-".join(re.sub(r"[^A-Za-z0-9_.+]+", "-", part).strip("-") for part in parts)
    return f"outputs/cache/{name}.h5"


def resize_gray(gray: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """(H, W) or (B, H, W) uint8 -> float32 in [0, 1] at (size, size), antialiased, whole image."""
    batch = gray if gray.dim() == 3 else gray[None]
    scaled = batch[:, None].float().div_(255.0)
    resized = F.interpolate(scaled, size=(size, size), mode=interpolation, antialias=True, align_corners=False)[:, 0]
    if interpolation == "bicubic":
        resized = resized.clamp_(0.0, 1.0)  # bicubic overshoots at edges
    return resized if gray.dim() == 3 else resized[0]

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
initialisation, for tests only). Local weights are checked before they are trusted: a file
that is no state dict, or whose parameter names or shapes do not fit the architecture, is
refused (`read_state_dict`, `load_checked`), never loaded into a half-random network. Where
the Hugging Face hub cannot be reached (or HF_HUB_OFFLINE is set), timm and hf: encoders use
only what is cached on this machine and say where to put what is missing.

Every encoder turns a batch of gray images in [0, 1] at its input size into one (B, D)
float feature: `Encoder.embed`. What it did to get there (channels, size, resize rule, value
range, mean/std, layers, pooling, per-layer dims) is `Encoder.recipe()`, which the cache
records and its fingerprint covers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import inspect
import json
import math
import os
import re
import socket
import sys
import urllib.parse
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import torchvision
from torch.nn.utils.fusion import fuse_conv_bn_eval

from extract.nih import file_sha256

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_BACKBONE = "resnet50"
POOLINGS = ("cls", "mean", "cls+mean")
# Random weights must be the same in every process, or a resumed or sharded extraction
# would mix features from two different networks.
RANDOM_WEIGHTS_SEED = 0
PRETRAINED = ("pretrained", "imagenet", "default")
# Seconds to wait for the Hugging Face hub to accept a connection before working offline:
# without this check, an unreachable hub costs a long series of retries before the error.
HUB_PROBE_SECONDS = 3.0
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


def weights_sha256(path) -> str:
    """The sha256 a cache records for local weights: of the file, or for a folder (a Hugging
    Face save_pretrained folder) of every file in it that can decide the features: config,
    processor config and weights, each by its relative name and content. Model cards,
    licences and hidden folders (download metadata) are left out."""
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in _feature_deciding_files(path):
        digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def _feature_deciding_files(folder: Path) -> list:
    files = []
    for file in sorted(folder.rglob("*")):
        relative = file.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts) or not file.is_file():
            continue
        if file.suffix.lower() == ".md" or file.name.upper().startswith(("LICENSE", "NOTICE")):
            continue
        files.append(file)
    return files


def _seeded(build: Callable) -> torch.nn.Module:
    """build() with the random generator fixed: whatever a build leaves initialised at random
    is the same network in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        return build()


def _random_init(build: Callable) -> torch.nn.Module:
    warnings.warn("--weights none: RANDOM encoder weights; features are meaningless beyond "
                  "testing the pipeline", stacklevel=3)
    return _seeded(build)


def _local_weights(spec: str) -> Path:
    path = Path(spec)
    if not path.exists():
        raise EncoderError(f"--weights {spec}: no such file or folder; use pretrained, none, or the "
                           f"path of local weights")
    return path


def describe_local_weights(spec: str) -> dict:
    """What the cache records about a local weights file or folder: its name and sha256."""
    path = _local_weights(spec)
    return {"weights": f"file:{path.name}", "weights_sha256": weights_sha256(path)}


def _weights_record(spec: str, pretrained_name: str) -> dict:
    if spec.lower() == "none":
        return {"weights": f"random(seed={RANDOM_WEIGHTS_SEED})", "weights_sha256": ""}
    if spec.lower() in PRETRAINED:
        return {"weights": pretrained_name, "weights_sha256": ""}
    return describe_local_weights(spec)


def weights_tag(record: dict, *, family_default: bool) -> str:
    """How a cache's default name tells these weights apart: nothing for the family's
    pretrained default, `random` for --weights none, else the file's stem and a short sha256."""
    if family_default:
        return ""
    if record["weights"].startswith("random("):
        return "random"
    if record["weights"].startswith("file:"):
        return f"{Path(record['weights'][5:]).stem}-{record['weights_sha256'][:8]}"
    return record["weights"].rpartition(":")[2].lower()


def _first_line(err: Exception, limit: int = 200) -> str:
    """An exception as one short line: its type and its message's words."""
    text = " ".join(str(err).split())
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def read_state_dict(path: Path) -> dict:
    """A local weights file as {name: tensor}, checked before it is trusted: torch.load with
    weights_only (nothing is unpickled) or safetensors; a training checkpoint's `state_dict`
    or `model` entry; DataParallel's `module.` prefix dropped."""
    if path.is_dir():
        raise EncoderError(f"--weights {path}: a folder; this encoder takes one weights file (.pth, .pt, "
                           f".safetensors)")
    if path.stat().st_size == 0:
        raise EncoderError(f"--weights {path}: the file is empty; pass a state dict saved with torch.save")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise many types for a bad file
        raise EncoderError(f"--weights {path}: not a loadable state dict ({_first_line(err)}); pass a "
                           f".pth/.pt state dict saved with torch.save") from None
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        kind = "an empty dict" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise EncoderError(f"--weights {path}: not a state dict of named tensors (it holds {kind}); pass "
                           f"model.state_dict() saved with torch.save")
    foreign = [repr(key) for key, value in state.items()
               if not isinstance(key, str) or not isinstance(value, torch.Tensor)]
    if foreign:
        raise EncoderError(f"--weights {path}: not a state dict of named tensors ({_few(foreign)} are not "
                           f"tensors); pass model.state_dict() saved with torch.save")
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def _few(names, shown: int = 3) -> str:
    names = list(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(map(str, names[:shown])) + more


def refuse_mismatched_keys(*, source: str, what: str, missing=(), unexpected=(), wrong_shape=()) -> None:
    """One EncoderError naming a few keys when the weights do not fit the architecture: a
    model loaded from them would keep random parameters and still be recorded as trained."""
    found = [(label, sorted(keys)) for label, keys in
             (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong_shape)) if keys]
    if found:
        detail = "; ".join(f"{label}: {_few(keys)}" for label, keys in found)
        raise EncoderError(f"{source}: its parameter names do not match {what} ({detail}); pass weights "
                           f"saved from this architecture")


def load_checked(model: torch.nn.Module, state: dict, *, path, what: str, optional_prefixes=()) -> None:
    """Load `state` into `model`, refusing any missing, unexpected or reshaped parameter except
    those under `optional_prefixes` (a classifier the encoder does not use)."""
    optional = lambda key: key.startswith(tuple(optional_prefixes))  # noqa: E731
    expected = model.state_dict()
    refuse_mismatched_keys(
        source=f"--weights {path}", what=what,
        missing=[key for key in expected if key not in state and not optional(key)],
        unexpected=[key for key in state if key not in expected and not optional(key)],
        wrong_shape=[key for key in state if key in expected and state[key].shape != expected[key].shape])
    model.load_state_dict({key: value for key, value in state.items() if key in expected}, strict=False)


def load_state_dict_file(model: torch.nn.Module, path: Path, *, what: str, optional_prefixes=()) -> None:
    """Load a local weights file into `model` (see `read_state_dict` and `load_checked`)."""
    load_checked(model, read_state_dict(path), path=path, what=what, optional_prefixes=optional_prefixes)


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
        net = _seeded(lambda: torchvision.models.get_model(name, weights=None))
        load_state_dict_file(net, _local_weights(weights), what=name,
                             optional_prefixes=("fc.", "classifier.", "heads.", "head."))
    if not layers:
        _drop_last_linear(net)
    return Encoder(backbone=name, model=PooledLayers(net, layers, pooling), preprocessing=Preprocessing(image_size or 224),
                   layers=layers, blocks=layers or ("pooled",), pooling=pooling, weights=record,
                   weights_tag=weights_tag(record, family_default=chosen is enum.DEFAULT))


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


def hub_unreachable() -> str:
    """Why the Hugging Face hub cannot be used now ('' when it can): HF_HUB_OFFLINE (or
    TRANSFORMERS_OFFLINE) set, or its endpoint (or the proxy in the way) refusing a connection
    within HUB_PROBE_SECONDS."""
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{variable} is set"
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    proxy = next((os.environ[name] for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
                  if os.environ.get(name)), "")
    target = urllib.parse.urlsplit(proxy or endpoint)
    try:
        port = target.port or (443 if target.scheme == "https" else 80)
        with socket.create_connection((target.hostname, port), timeout=HUB_PROBE_SECONDS):
            return ""
    except (OSError, ValueError) as err:
        return f"{proxy or endpoint} does not answer ({getattr(err, 'strerror', None) or err})"


def _timm(name, *, weights, image_size, layers, pooling) -> Encoder:
    import timm
    options = {"num_classes": 0}
    if image_size:
        options["img_size"] = image_size  # ViTs resample their position embeddings
    local = weights.lower() not in PRETRAINED + ("none",)
    if weights.lower() in PRETRAINED:
        offline = hub_unreachable()
        if offline:  # only what is already on this machine, found without asking the network
            options["pretrained_cfg_overlay"] = {"file": str(_timm_cached_weights(timm, name, offline))}

    def create():
        if weights.lower() in PRETRAINED:
            return timm.create_model(name, pretrained=True, **options)
        build = lambda: timm.create_model(name, pretrained=False, **options)  # noqa: E731
        return _seeded(build) if local else _random_init(build)

    try:
        try:
            net = create()
        except TypeError:  # CNNs take no img_size: they pool any size
            options.pop("img_size", None)
            net = create()
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise EncoderError(f"--backbone timm:{name}: timm has no such model ({err})") from None
        raise EncoderError(f"--backbone timm:{name}: cannot load its weights ({_first_line(err)})") from None
    except OSError as err:
        raise EncoderError(f"cannot fetch timm:{name} weights ({_first_line(err)}); offline, pass --weights with "
                           f"a local weights file") from None
    if local:
        _load_timm_file(net, _local_weights(weights), what=f"timm:{name}")
    config = timm.data.resolve_data_config({}, model=net)
    interpolation = config.get("interpolation", "bilinear")
    preprocessing = Preprocessing(size=image_size or int(config["input_size"][-1]),
                                  interpolation="bicubic" if interpolation == "bicubic" else "bilinear",
                                  mean=tuple(config["mean"]), std=tuple(config["std"]))
    tag = getattr(net, "pretrained_cfg", {}).get("tag") or "default"
    record = _weights_record(weights, f"timm:{name}.{tag}")
    return Encoder(backbone=f"timm:{name}", model=PooledLayers(net, layers, pooling), preprocessing=preprocessing,
                   layers=layers, blocks=layers or ("pooled",), pooling=pooling, weights=record,
                   weights_tag=weights_tag(record, family_default=weights.lower() in PRETRAINED))


def _load_timm_file(net: torch.nn.Module, path: Path, *, what: str) -> None:
    """A local file into a timm model, as timm's own loader would (its model's checkpoint
    filter first: original-format checkpoints, position embeddings at another size), but
    refusing weights that do not fit, where timm's loader skips them silently when the
    classifier differs."""
    state = read_state_dict(path)
    model_module = sys.modules.get(type(net).__module__)
    checkpoint_filter = getattr(model_module, "checkpoint_filter_fn", None)
    if checkpoint_filter is not None:
        try:
            state = checkpoint_filter(dict(state), net)
        except Exception:  # a foreign checkpoint: the key check below names what is wrong
            pass
    classifiers = getattr(net, "pretrained_cfg", {}).get("classifier") or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    load_checked(net, state, path=path, what=what, optional_prefixes=tuple(f"{c}." for c in classifiers))


def _timm_cached_weights(timm, name: str, offline: str) -> Path:
    """Where timm keeps `name`'s pretrained file on this machine; an EncoderError saying where
    to put it when it is not there."""
    cfg = timm.models.get_pretrained_cfg(name)
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
    if cfg.get("hf_hub_id"):
        import huggingface_hub
        repo, _, revision = cfg["hf_hub_id"].partition("@")
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            found = huggingface_hub.try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str):
                return Path(found)
        where = (f"the Hugging Face cache {huggingface_hub.constants.HF_HUB_CACHE} "
                 f"(`hf download {repo}` on a connected machine, then copy that folder)")
    elif cfg.get("url"):
        filename = cfg["url"].rsplit("/", 1)[-1]
        found = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if found.is_file():
            return found
        where = f"{found} (downloaded from {cfg['url']})"
    else:
        raise EncoderError(f"--backbone timm:{name}: timm knows no pretrained weights for it; pass --weights "
                           f"with a local weights file")
    raise EncoderError(f"timm:{name}: pretrained weights are not on this machine and the hub cannot be reached "
                       f"({offline}); put them in {where}, or pass --weights /path/to/weights-file")


class _HFEncoder(torch.nn.Module):
    """A transformers vision model: CLS / patch-mean of the last hidden state, or of the last
    k blocks (each through the model's final norm, as DINOv2's linear evaluation does). Models
    whose forward can resample their position embeddings (ViT, DeiT, ...) are asked to, so
    that they run at any --image-size, as DINOv2 always does."""

    def __init__(self, net, *, last_blocks: int, pooling: str):
        super().__init__()
        self.net, self.last_blocks, self.pooling = net, last_blocks, pooling
        self.norm = getattr(net, "layernorm", None)
        self.prefix = 1 + int(getattr(net.config, "num_register_tokens", 0) or 0)
        accepted = inspect.signature(net.forward).parameters
        self.options = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in accepted else {}

    def forward(self, inputs):
        out = self.net(pixel_values=inputs, output_hidden_states=self.last_blocks > 0, **self.options)
        if not self.last_blocks:
            return [pool_tokens(out.last_hidden_state, self.pooling, prefix_tokens=self.prefix)]
        blocks = out.hidden_states[-self.last_blocks:]
        if self.norm is not None:
            blocks = [self.norm(block) for block in blocks]
        return [pool_tokens(block, self.pooling, prefix_tokens=self.prefix) for block in blocks]


# Parameters an encoder never uses, so weights may lack them (pooler) or carry them (the
# classifier of a *ForImageClassification checkpoint).
HF_OPTIONAL_PREFIXES = ("pooler.", "classifier.", "head.", "heads.", "fc.")


def _hf(name, *, weights, image_size, layers, pooling) -> Encoder:
    last_blocks = _last_blocks(layers, backbone=f"hf:{name}")
    local = weights.lower() not in PRETRAINED + ("none",)
    source = str(_local_weights(weights)) if local else name
    folder = Path(source) if Path(source).is_dir() else None
    if folder is not None:
        _check_hf_folder(folder)
    offline = "" if folder is not None else hub_unreachable()
    processor, net = _hf_load(name, source=source, folder=folder, random=weights.lower() == "none",
                              offline=offline)
    depth = getattr(net.config, "num_hidden_layers", None)
    if depth and last_blocks > depth:
        raise EncoderError(f"--layers last:{last_blocks}: hf:{name} has {depth} blocks; use last:1 .. last:{depth}")
    net.eval()
    preprocessing = _hf_preprocessing(processor, image_size=image_size,
                                      where=f"{folder / 'preprocessor_config.json'}" if folder else f"hf:{name}")
    commit = getattr(net.config, "_commit_hash", None)
    record = _weights_record(weights, f"hf:{name}" + (f"@{commit}" if commit else ""))
    if weights.lower() in PRETRAINED and folder is not None:
        record["weights_sha256"] = weights_sha256(folder)
    names = tuple(f"block{-k}" for k in range(last_blocks, 0, -1)) if last_blocks else ("last_hidden_state",)
    return Encoder(backbone=f"hf:{name}", model=_HFEncoder(net, last_blocks=last_blocks, pooling=pooling),
                   preprocessing=preprocessing, layers=layers, blocks=names, pooling=pooling, weights=record,
                   weights_tag=weights_tag(record, family_default=weights.lower() in PRETRAINED))


def _check_hf_folder(folder: Path) -> None:
    """A local folder must hold what save_pretrained writes, each file a JSON object where
    JSON is expected: checked before transformers reads it."""
    if not (folder / "config.json").is_file():
        raise EncoderError(f"{folder}: no config.json; pass a folder written by save_pretrained")
    for name in ("config.json", "preprocessor_config.json", "processor_config.json"):
        path = folder / name
        if not path.exists():
            continue
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise EncoderError(f"{path}: not readable JSON ({_first_line(err)})") from None
        if not isinstance(loaded, dict):
            raise EncoderError(f"{path}: not a JSON object (a {type(loaded).__name__})")


def _hf_load(name: str, *, source: str, folder, random: bool, offline: str):
    """(image processor, model) from a folder or the hub; refuses weights that leave any used
    parameter untrained (transformers would initialise it at random and only log it)."""
    import transformers
    options = {"local_files_only": True} if offline else {}
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(source, **options)
        config = transformers.AutoConfig.from_pretrained(source, **options)
        if random:
            return processor, _random_init(lambda: transformers.AutoModel.from_config(config))
        with _transformers_quiet(transformers):  # its loading report is checked below, not printed
            net, info = transformers.AutoModel.from_pretrained(source, config=config, output_loading_info=True,
                                                               **options)
    except EncoderError:
        raise
    except Exception as err:  # transformers raises many types for files it cannot use
        if offline:
            import huggingface_hub
            raise EncoderError(
                f"hf:{name}: not in the Hugging Face cache {huggingface_hub.constants.HF_HUB_CACHE} and the hub "
                f"cannot be reached ({offline}); run `hf download {name}` on a connected machine and "
                f"copy the cache here, or save the model with save_pretrained and pass --backbone "
                f"hf:/path/to/folder") from None
        if folder is None:
            raise EncoderError(f"--backbone hf:{name}: cannot load it ({_first_line(err)}); offline, use "
                               f"hf:/path/to/a/folder saved with save_pretrained, or set HF_HOME to a filled "
                               f"cache") from None
        raise EncoderError(f"{folder}: cannot build the model from it ({_first_line(err)}); check its config.json, "
                           f"preprocessor_config.json and weights files, or save it again with "
                           f"save_pretrained") from None
    optional = lambda key: key.startswith(HF_OPTIONAL_PREFIXES)  # noqa: E731
    refuse_mismatched_keys(source=str(folder or f"hf:{name}"), what=type(net).__name__,
                           missing=[key for key in info.get("missing_keys", ()) if not optional(key)],
                           unexpected=[key for key in info.get("unexpected_keys", ()) if not optional(key)],
                           wrong_shape=[entry[0] for entry in info.get("mismatched_keys", ())])
    errors = info.get("error_msgs") or info.get("conversion_errors")
    if errors:
        first = next(iter(errors.values() if isinstance(errors, dict) else errors))
        raise EncoderError(f"{folder or f'hf:{name}'}: its weights do not load ({str(first).splitlines()[0]})")
    return processor, net


@contextlib.contextmanager
def _transformers_quiet(transformers):
    """No progress bar and no log table while loading: the kit reports what matters itself."""
    logging, verbosity = transformers.utils.logging, transformers.utils.logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _hf_preprocessing(processor, *, image_size, where: str) -> Preprocessing:
    """The processor's resize rule, size and mean/std, checked: 3 finite values each, std > 0."""
    stats = {}
    for key in ("image_mean", "image_std"):
        values = getattr(processor, key, None)
        if isinstance(values, (int, float)) and not isinstance(values, bool):
            values = [values] * 3  # a scalar applies to every channel
        numbers = isinstance(values, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        if not numbers or len(values) != 3 or (key == "image_std" and min(values) <= 0):
            raise EncoderError(f"{where}: {key} is {values!r}; it must be 3 finite numbers (one per RGB channel)"
                               f"{', each above 0' if key == 'image_std' else ''}")
        stats[key] = tuple(float(v) for v in values)
    size = image_size or _processor_size(processor, where=where)
    return Preprocessing(size=size, interpolation="bicubic" if getattr(processor, "resample", 2) == 3 else "bilinear",
                         mean=stats["image_mean"], std=stats["image_std"])


def _processor_size(processor, *, where: str) -> int:
    """The side the processor feeds the model: its crop if it crops, else its resize."""
    size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
    size = size or {}
    if not isinstance(size, dict):  # transformers 5 holds sizes in a SizeDict
        size = {key: getattr(size, key, None) for key in ("height", "width", "shortest_edge")}
    side = size.get("height") or size.get("shortest_edge") or 224
    if not isinstance(side, int) or isinstance(side, bool) or not 1 <= side <= 4096:
        raise EncoderError(f"{where}: size {side!r} is not a side in pixels (1..4096); fix it or pass --image-size")
    return side


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
            net = _seeded(lambda: _xrv_architecture(xrv, name))
            load_state_dict_file(net.model if name.startswith("resnet") else net, _local_weights(weights),
                                 what=f"xrv:{name}", optional_prefixes=("op_threshs",))
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
    record = _weights_record(weights, f"xrv:{name}")
    return Encoder(backbone=f"xrv:{name}", model=_XRVEncoder(net), preprocessing=preprocessing,
                   layers=(), blocks=("features",), pooling="mean", weights=record, warning=XRV_WARNING,
                   weights_tag=weights_tag(record, family_default=weights.lower() in PRETRAINED))


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
    if len(blocks) != len(encoder.blocks):  # hooks of a module that never runs
        raise EncoderError(f"--layers {','.join(encoder.layers)}: not every layer runs in the forward pass")
    return tuple(int(block.flatten(1).shape[1]) for block in blocks)


def default_cache_path(backbone: str, *, image_size: int, layers=(), weights_tag: str = "") -> str:
    """outputs/cache/<backbone>-<size>[-<layers>][-<weights>].h5, so that variants sit side by
    side: the weights are named unless they are the family's pretrained default."""
    parts = [backbone, str(image_size)] + (["+".join(layers)] if layers else []) + ([weights_tag] if weights_tag else [])
    name = "-".join(re.sub(r"[^A-Za-z0-9_.+]+", "-", part).strip("-") for part in parts)
    return f"outputs/cache/{name}.h5"

"""--weights, parsed once, and everything about local weights: reading a file without
unpickling, refusing weights that do not fit, the sha256 a cache records, the tag in a default
cache name; and whether the Hugging Face hub can be reached."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import urllib.parse
import warnings
from pathlib import Path
from typing import Callable

import torch

from extract.encoders.base import EncoderError
from extract.nih import file_sha256

# Random weights must be the same in every process, or a resumed or sharded extraction
# would mix features from two different networks.
RANDOM_WEIGHTS_SEED = 0

PRETRAINED = ("pretrained", "imagenet", "default")

# Seconds to wait for the Hugging Face hub to accept a connection before working offline:
# without this check, an unreachable hub costs a long series of retries before the error.
HUB_PROBE_SECONDS = 3.0


@dataclasses.dataclass(frozen=True)
class Weights:
    """--weights, parsed once: `pretrained` (or an alias), `none` (seeded random), a local file
    or folder, or a name only a family can resolve (a torchvision enum such as IMAGENET1K_V1)."""

    spec: str
    kind: str  # "pretrained", "random", "local" or "named"

    @classmethod
    def parse(cls, spec) -> "Weights":
        text = str(spec)
        if text.lower() in PRETRAINED:
            return cls(text, "pretrained")
        if text.lower() == "none":
            return cls(text, "random")
        return cls(text, "local" if Path(text).exists() else "named")

    @property
    def path(self) -> Path:
        """The local file or folder; EncoderError when --weights names none."""
        if self.kind != "local":
            raise EncoderError(f"--weights {self.spec}: no such file or folder; use pretrained, none, or the "
                               f"path of local weights")
        return Path(self.spec)

    def record(self, pretrained_name: str) -> dict:
        """What the cache records: {"weights": ..., "weights_sha256": ...}."""
        if self.kind == "random":
            return {"weights": f"random(seed={RANDOM_WEIGHTS_SEED})", "weights_sha256": ""}
        if self.kind == "pretrained":
            return {"weights": pretrained_name, "weights_sha256": ""}
        return describe_local_weights(self.path)


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


def seeded(build: Callable) -> torch.nn.Module:
    """build() with the random generator fixed: whatever a build leaves initialised at random
    is the same network in every process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        return build()


def random_init(build: Callable) -> torch.nn.Module:
    warnings.warn("--weights none: RANDOM encoder weights; features are meaningless beyond "
                  "testing the pipeline", stacklevel=3)
    return seeded(build)


def describe_local_weights(spec) -> dict:
    """What the cache records about a local weights file or folder: its name and sha256."""
    path = Weights.parse(spec).path
    return {"weights": f"file:{path.name}", "weights_sha256": weights_sha256(path)}


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


def first_line(err: Exception, limit: int = 200) -> str:
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
        raise EncoderError(f"--weights {path}: not a loadable state dict ({first_line(err)}); pass a "
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
        raise EncoderError(f"--weights {path}: not a state dict of named tensors ({few(foreign)} are not "
                           f"tensors); pass model.state_dict() saved with torch.save")
    if all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def few(names, shown: int = 3) -> str:
    names = list(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(map(str, names[:shown])) + more


def refuse_mismatched_keys(*, source: str, what: str, missing=(), unexpected=(), wrong_shape=()) -> None:
    """One EncoderError naming a few keys when the weights do not fit the architecture: a
    model loaded from them would keep random parameters and still be recorded as trained."""
    found = [(label, sorted(keys)) for label, keys in
             (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong_shape)) if keys]
    if found:
        detail = "; ".join(f"{label}: {few(keys)}" for label, keys in found)
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

"""Hugging Face transformers vision models: --backbone hf:REPO_OR_FOLDER (pip install -e .[hf])."""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import re
import warnings
from pathlib import Path

import torch

from extract.encoders.base import Encoder, EncoderError, Preprocessing, pool_tokens
from extract.encoders.registry import register
from extract.encoders.weights import (Weights, first_line, hub_unreachable, random_init, refuse_mismatched_keys,
                                      weights_sha256, weights_tag)


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


@register("hf", extra="hf", module="transformers")
def build(name, *, weights: Weights, image_size, layers, pooling) -> Encoder:
    last_blocks = _last_blocks(layers, backbone=f"hf:{name}")
    source = str(weights.path) if weights.kind in ("local", "named") else name
    folder = Path(source) if Path(source).is_dir() else None
    if folder is not None:
        _check_hf_folder(folder)
    offline = "" if folder is not None else hub_unreachable()
    processor, net = _hf_load(name, source=source, folder=folder, random=weights.kind == "random",
                              offline=offline)
    depth = getattr(net.config, "num_hidden_layers", None)
    if depth and last_blocks > depth:
        raise EncoderError(f"--layers last:{last_blocks}: hf:{name} has {depth} blocks; use last:1 .. last:{depth}")
    net.eval()
    preprocessing = _hf_preprocessing(processor, image_size=image_size,
                                      where=f"{folder / 'preprocessor_config.json'}" if folder else f"hf:{name}")
    commit = getattr(net.config, "_commit_hash", None)
    record = weights.record(f"hf:{name}" + (f"@{commit}" if commit else ""))
    if weights.kind == "pretrained" and folder is not None:
        record["weights_sha256"] = weights_sha256(folder)
    names = tuple(f"block{-k}" for k in range(last_blocks, 0, -1)) if last_blocks else ("last_hidden_state",)
    return Encoder(backbone=f"hf:{name}", model=_HFEncoder(net, last_blocks=last_blocks, pooling=pooling),
                   preprocessing=preprocessing, layers=layers, blocks=names, pooling=pooling, weights=record,
                   weights_tag=weights_tag(record, family_default=weights.kind == "pretrained"))


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
            raise EncoderError(f"{path}: not readable JSON ({first_line(err)})") from None
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
            return processor, random_init(lambda: transformers.AutoModel.from_config(config))
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
            raise EncoderError(f"--backbone hf:{name}: cannot load it ({first_line(err)}); offline, use "
                               f"hf:/path/to/a/folder saved with save_pretrained, or set HF_HOME to a filled "
                               f"cache") from None
        raise EncoderError(f"{folder}: cannot build the model from it ({first_line(err)}); check its config.json, "
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

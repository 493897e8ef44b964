"""timm's models: --backbone timm:NAME (pip install -e .[timm])."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from extract.encoders.base import Encoder, EncoderError, PooledLayers, Preprocessing
from extract.encoders.registry import register
from extract.encoders.weights import (Weights, first_line, hub_unreachable, load_checked, random_init,
                                      read_state_dict, seeded, weights_tag)


@register("timm", extra="timm", module="timm", example="timm:test_vit")
def build(name, *, weights: Weights, image_size, layers, pooling) -> Encoder:
    import timm
    options = {"num_classes": 0}
    if image_size:
        options["img_size"] = image_size  # ViTs resample their position embeddings
    local = weights.path if weights.kind in ("local", "named") else None
    if weights.kind == "pretrained":
        offline = hub_unreachable()
        if offline:  # only what is already on this machine, found without asking the network
            options["pretrained_cfg_overlay"] = {"file": str(_timm_cached_weights(timm, name, offline))}

    def create():
        if weights.kind == "pretrained":
            return timm.create_model(name, pretrained=True, **options)
        build = lambda: timm.create_model(name, pretrained=False, **options)  # noqa: E731
        return seeded(build) if local else random_init(build)

    try:
        try:
            net = create()
        except TypeError:  # CNNs take no img_size: they pool any size
            options.pop("img_size", None)
            net = create()
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise EncoderError(f"--backbone timm:{name}: timm has no such model ({err})") from None
        raise EncoderError(f"--backbone timm:{name}: cannot load its weights ({first_line(err)})") from None
    except OSError as err:
        raise EncoderError(f"cannot fetch timm:{name} weights ({first_line(err)}); offline, pass --weights with "
                           f"a local weights file") from None
    if local:
        _load_timm_file(net, local, what=f"timm:{name}")
    config = timm.data.resolve_data_config({}, model=net)
    interpolation = config.get("interpolation", "bilinear")
    preprocessing = Preprocessing(size=image_size or int(config["input_size"][-1]),
                                  interpolation="bicubic" if interpolation == "bicubic" else "bilinear",
                                  mean=tuple(config["mean"]), std=tuple(config["std"]))
    tag = getattr(net, "pretrained_cfg", {}).get("tag") or "default"
    record = weights.record(f"timm:{name}.{tag}")
    return Encoder(backbone=f"timm:{name}", model=PooledLayers(net, layers, pooling), preprocessing=preprocessing,
                   layers=layers, blocks=layers or ("pooled",), pooling=pooling, weights=record,
                   weights_tag=weights_tag(record, family_default=weights.kind == "pretrained"))


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

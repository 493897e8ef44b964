"""Frozen image encoders and the preprocessing each expects: the one registry `extract`,
`heads.predict` and the benchmarks build their feature models from.

`--backbone` names an encoder; a prefix picks its family, one small file of this package each,
registered in `registry.FAMILIES`:

    resnet50, densenet121, convnext_tiny, vit_b_16, ...   torchvision_family.py (core install)
    timm:NAME                                             timm_family.py (pip install -e .[timm])
    hf:REPO_OR_DIR                                        hf_family.py   (pip install -e .[hf])
    xrv:NAME                                              xrv_family.py  (pip install -e .[xrv])

A new family is one more file: a build function decorated with `@register(PREFIX, ...)`, and
its import below; the tests build every registered family.

`--weights`: `pretrained` (the family's own pretrained weights, through its own download and
cache; `imagenet` is an alias), a torchvision weights enum name (IMAGENET1K_V1 ...), a local
file or folder (offline clusters; its sha256 is recorded), or `none` (seeded random
initialisation, for tests only); parsed once into a `Weights`. Local weights are checked before
they are trusted: a file that is no state dict, or whose parameter names or shapes do not fit
the architecture, is refused (`read_state_dict`, `load_checked`), never loaded into a
half-random network. Where the Hugging Face hub cannot be reached (or HF_HUB_OFFLINE is set),
timm and hf: encoders use only what is cached on this machine and say where to put what is
missing.

Every encoder turns a batch of gray images in [0, 1] at its input size into one (B, D)
float feature: `Encoder.embed`. What it did to get there (channels, size, resize rule, value
range, mean/std, layers, pooling, per-layer dims) is `Encoder.recipe()`, which the cache
records and its fingerprint covers.
"""
from extract.encoders.base import (DEFAULT_BACKBONE, IMAGENET_MEAN, IMAGENET_STD, POOLINGS, Encoder, EncoderError,
                                   PooledLayers, Preprocessing, fold_batchnorm, pool_block, pool_tokens)
from extract.encoders.registry import (FAMILIES, Family, build_encoder, default_cache_path, parse_layers, register,
                                       split_backbone)
from extract.encoders.weights import (PRETRAINED, RANDOM_WEIGHTS_SEED, Weights, describe_local_weights,
                                      hub_unreachable, load_checked, read_state_dict, weights_sha256, weights_tag)
# Each family registers itself on import; this is the list of families.
from extract.encoders import torchvision_family, timm_family, hf_family, xrv_family  # noqa: E402,F401  isort: skip

__all__ = ["DEFAULT_BACKBONE", "FAMILIES", "IMAGENET_MEAN", "IMAGENET_STD", "POOLINGS", "PRETRAINED",
           "RANDOM_WEIGHTS_SEED", "Encoder", "EncoderError", "Family", "PooledLayers", "Preprocessing", "Weights",
           "build_encoder", "default_cache_path", "describe_local_weights", "fold_batchnorm", "hub_unreachable",
           "load_checked", "parse_layers", "pool_block", "pool_tokens", "read_state_dict", "register",
           "split_backbone", "weights_sha256", "weights_tag"]

"""torchxrayvision's chest X-ray models: --backbone xrv:NAME (pip install -e .[xrv])."""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
import torchvision

from extract.encoders.base import Encoder, EncoderError, Preprocessing
from extract.encoders.registry import register
from extract.encoders.weights import Weights, load_state_dict_file, random_init, seeded, weights_tag

# torchxrayvision's weights were trained on NIH ChestX-ray14 under a random image split that
# includes the official test images (mlmed/torchxrayvision issue tracker).
XRV_WARNING = ("torchxrayvision weights were trained on NIH ChestX-ray14 images including the "
               "official TEST images: test AUC on these features is NOT a clean held-out result")


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


@register("xrv", extra="xrv", module="torchxrayvision", example="xrv:densenet121-res224-all")
def build(name, *, weights: Weights, image_size, layers, pooling) -> Encoder:
    import torchxrayvision as xrv
    if layers:
        raise EncoderError(f"--layers: xrv:{name} gives its pooled feature only")
    known = [key for key in xrv.models.model_urls if key.startswith(("densenet", "resnet"))]
    if name not in known:
        raise EncoderError(f"--backbone xrv:{name}: torchxrayvision has {', '.join(known)}")
    try:
        if weights.kind == "random":
            net = random_init(lambda: _xrv_architecture(xrv, name))
        elif weights.kind == "pretrained":
            # its own loader and download cache (~/.torchxrayvision); the DenseNet files are
            # pickled whole models, so this trusts torchxrayvision's download
            net = xrv.models.get_model(name)
        else:
            net = seeded(lambda: _xrv_architecture(xrv, name))
            load_state_dict_file(net.model if name.startswith("resnet") else net, weights.path,
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
    record = weights.record(f"xrv:{name}")
    return Encoder(backbone=f"xrv:{name}", model=_XRVEncoder(net), preprocessing=preprocessing,
                   layers=(), blocks=("features",), pooling="mean", weights=record, warning=XRV_WARNING,
                   weights_tag=weights_tag(record, family_default=weights.kind == "pretrained"))


def _xrv_architecture(xrv, name: str) -> torch.nn.Module:
    """The untrained network of a torchxrayvision model (its ResNet class insists on weights)."""
    if name.startswith("densenet"):
        return xrv.models.DenseNet(weights=None)
    holder = torch.nn.Module()
    holder.model = torchvision.models.resnet50(num_classes=len(xrv.models.model_urls[name]["labels"]))
    holder.model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return holder

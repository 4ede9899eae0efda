"""timm models adapted to 32x32 images (CIFAR, ImageNet32), registered in timm's model registry.

The papers train ImageNet architectures on 32x32 inputs with a CIFAR stem: the
first convolution becomes 3x3 with stride 1 and the stem's max-pool goes
(ResNet, Wide-ResNet, DenseNet); MobileNetV3's stem keeps its 3x3 convolution
with stride 1; Swin-Tiny uses 2x2 patches and 4x4 windows. Importing this
module registers ``<timm name>_cifar`` models, so ``timm.create_model("resnet18_cifar",
num_classes=10)`` builds one and ``timm.create_model("hf-hub:<id>", pretrained=True)``
rebuilds a pushed one (``import koala_hf.vision`` first).
"""

from __future__ import annotations

import timm
import torch
from timm.models import load_pretrained, register_model
from torch import nn

# Normalisation of the papers' CIFAR protocol (spec, last section), and ImageNet's.
CIFAR_MEAN = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR_STD = (63.0 / 255, 62.1 / 255, 66.7 / 255)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _small_conv(conv: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=3, stride=1, padding=1, bias=conv.bias is not None)


def _resnet_stem(model):
    model.conv1 = _small_conv(model.conv1)
    model.maxpool = nn.Identity()


def _densenet_stem(model):
    model.features.conv0 = _small_conv(model.features.conv0)
    model.features.pool0 = nn.Identity()


def _mobilenet_stem(model):
    model.conv_stem.stride = (1, 1)


# name -> (timm architecture, its constructor arguments, stem adaptation)
ARCHITECTURES = {
    "resnet18_cifar": ("resnet18", {}, _resnet_stem),
    "resnet50_cifar": ("resnet50", {}, _resnet_stem),
    "resnet101_cifar": ("resnet101", {}, _resnet_stem),
    "wide_resnet50_2_cifar": ("wide_resnet50_2", {}, _resnet_stem),
    "densenet121_cifar": ("densenet121", {}, _densenet_stem),
    "mobilenetv3_large_100_cifar": ("mobilenetv3_large_100", {}, _mobilenet_stem),
    "swin_tiny_cifar": ("swin_tiny_patch4_window7_224", {"img_size": 32, "patch_size": 2, "window_size": 4}, None),
}


def _entrypoint(name: str):
    base, base_kwargs, adapt = ARCHITECTURES[name]

    def create(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, **kwargs):
        model = timm.create_model(base, pretrained=False, **{**base_kwargs, **kwargs})
        if adapt is not None:
            adapt(model)
        cfg = dict(model.pretrained_cfg)
        for key in ("url", "hf_hub_id", "tag", "test_input_size", "test_crop_pct", "paper_ids", "origin_url"):
            cfg.pop(key, None)
        cfg.update(architecture=name, input_size=(3, 32, 32), crop_pct=1.0, mean=CIFAR_MEAN, std=CIFAR_STD,
                   num_classes=model.num_classes, pool_size=None, fixed_input_size=name.startswith("swin"))
        for given in (pretrained_cfg, pretrained_cfg_overlay):
            if given is not None:
                cfg.update(given.to_dict() if hasattr(given, "to_dict") else dict(given))
        cfg["architecture"] = name
        model.pretrained_cfg = model.default_cfg = cfg
        if pretrained:
            load_pretrained(model, pretrained_cfg=cfg, num_classes=model.num_classes, in_chans=kwargs.get("in_chans", 3))
        return model

    create.__name__ = name
    create.__qualname__ = name
    create.__doc__ = f"timm's {base} for 32x32 inputs (see koala_hf.vision)."
    create.__module__ = __name__
    return create


for _name in ARCHITECTURES:
    if _name not in timm.list_models(_name):
        globals()[_name] = register_model(_entrypoint(_name))


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    """A 32x32 model by its registered name (``resnet18_cifar``) or its timm base name (``resnet18``)."""
    if name not in ARCHITECTURES:
        by_base = {base: key for key, (base, _, _) in ARCHITECTURES.items()}
        if name not in by_base:
            raise ValueError(f"Unknown 32x32 architecture {name!r}; choose one of: {', '.join(ARCHITECTURES)}")
        name = by_base[name]
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


class ImageClassifier(nn.Module):
    """A timm model with the Trainer's interface: ``forward(pixel_values, labels)`` -> ``{"loss", "logits"}``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.model(pixel_values)
        outputs = {"logits": logits}
        if labels is not None:
            outputs = {"loss": nn.functional.cross_entropy(logits, labels), **outputs}
        return outputs

"""VGG family from torchvision's definitions.

Hierarchical features: the 13 conv ReLUs of VGG-16 plus the 2 ReLUs of its fully connected
layers = 15 (docs/PROTOCOL.md §4). VGG keeps its own dropouts in the classifier.
"""
from __future__ import annotations

import torch.nn as nn
import torchvision

VGGS = {
    "vgg16": torchvision.models.vgg16,
    # With batch norm after every conv: the same 15 taps (the ReLUs), and it trains from scratch
    # where plain VGG-16 may not on a few hundred images.
    "vgg16_bn": torchvision.models.vgg16_bn,
    "vgg11": torchvision.models.vgg11,  # a smaller member of the family, for quick CPU runs
}


def build_vgg(arch: str, num_classes: int) -> nn.Module:
    net = VGGS[arch](weights=None)
    net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, num_classes)
    return net


def feature_nodes(net: nn.Module) -> list[str]:
    """Graph nodes of every ReLU that closes a convolution or a hidden linear layer."""
    convs = [f"features.{i}" for i, m in enumerate(net.features) if isinstance(m, nn.ReLU)]
    fcs = [f"classifier.{i}" for i, m in enumerate(net.classifier) if isinstance(m, nn.ReLU)]
    return convs + fcs


def head_modules(net: nn.Module) -> tuple[nn.Module, ...]:
    """Modules run after the first FC ReLU: dropout, FC, ReLU, dropout, FC."""
    return tuple(net.classifier[2:])


def load_imagenet_state(net: nn.Module, state: dict) -> list[str]:
    last = f"classifier.{len(net.classifier) - 1}."
    state = {k: v for k, v in state.items() if not k.startswith(last)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    return sorted(set(missing) | set(unexpected))

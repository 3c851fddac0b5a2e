"""ResNet family from torchvision's definitions, with the dropout (p = 0.3) the BU detector needs.

The hierarchical features of a ResNet are the ReLU outputs inside every residual block
(ResNet-50: 3 per bottleneck x 16 bottlenecks = 48) plus the globally pooled vector
(docs/PROTOCOL.md §4). Their graph-node names are picked in ``network.py``.
"""
from __future__ import annotations

import torch.nn as nn
import torchvision

RESNET_DROPOUT = 0.3

RESNETS = {
    "resnet50": torchvision.models.resnet50,
    "resnet18": torchvision.models.resnet18,  # a smaller member of the family, for quick CPU runs
}


def build_resnet(arch: str, num_classes: int) -> nn.Module:
    net = RESNETS[arch](weights=None)
    # Dropout before the last linear layer: index 0 of ``fc``, the linear layer is ``fc.1``.
    net.fc = nn.Sequential(nn.Dropout(RESNET_DROPOUT), nn.Linear(net.fc.in_features, num_classes))
    return net


def feature_nodes(node_names: list[str]) -> list[str]:
    """Graph nodes whose outputs are the hierarchical features, in forward order."""
    in_blocks = [n for n in node_names if n.startswith("layer") and n.split(".")[-1].startswith("relu")]
    return in_blocks + ["flatten"]


def head_modules(net: nn.Module) -> tuple[nn.Module, ...]:
    """Modules run after the last hierarchical feature: dropout, then the classifier."""
    return tuple(net.fc)


def load_imagenet_state(net: nn.Module, state: dict) -> list[str]:
    """Copy ImageNet weights into ``net`` (all but the classifier); returns the keys left out."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    return sorted(set(missing) | set(unexpected))

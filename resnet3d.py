"""3D ResNet for volumes: torchvision's video ResNet ``r3d_18``, adapted to one-channel 32³ volumes.

torchvision's definition (Tran et al., "A closer look at spatiotemporal convolutions", CVPR
2018) is kept as it is, block for block; three things change, all at the ends:

- the stem reads one channel (a CT/MR volume), not three;
- the stem strides 2 along every axis and is followed by a 3×3×3 max-pool of stride 2, the
  geometry of the 2D ResNet stem: the video stem strides (1, 2, 2) and has no pool, which on a
  32³ volume leaves layer1 with 32×16×16 positions, about 12 times the cost per volume (a
  training step: 0.36 s against 0.03 s per volume on one CPU core);
- the classifier gets the dropout (p = 0.3) the BU detector needs, like ``resnet.py``.

Hierarchical features (docs/PROTOCOL.md §4, "every ReLU that closes a convolution"): the two
ReLUs of each basic block (``layerK.B.conv1.2`` after the first convolution, ``layerK.B.relu``
after the residual sum) = 16, plus the globally pooled vector (``flatten``) = 17 taps.
"""
from __future__ import annotations

import torch.nn as nn
import torchvision

from utils import UserError

RESNET3D_DROPOUT = 0.3
RESNETS3D = {"r3d18": torchvision.models.video.r3d_18}
# Volumes are grey values in [0, 1]; no ImageNet statistics apply.
INPUT_MEAN = (0.5,)
INPUT_STD = (0.25,)


def build_resnet3d(arch: str, num_classes: int) -> nn.Module:
    net = RESNETS3D[arch](weights=None)
    stem_conv = net.stem[0]
    net.stem = nn.Sequential(
        nn.Conv3d(1, stem_conv.out_channels, kernel_size=stem_conv.kernel_size, stride=2,
                  padding=stem_conv.padding, bias=False),
        nn.BatchNorm3d(stem_conv.out_channels), nn.ReLU(),
        nn.MaxPool3d(kernel_size=3, stride=2, padding=1))
    net.fc = nn.Sequential(nn.Dropout(RESNET3D_DROPOUT), nn.Linear(net.fc.in_features, num_classes))
    return net


def feature_nodes(node_names: list[str]) -> list[str]:
    """Graph nodes whose outputs are the hierarchical features, in forward order."""
    in_blocks = [n for n in node_names if n.startswith("layer")
                 and n.endswith((".relu", ".conv1.2"))]
    return in_blocks + ["flatten"]


def head_modules(net: nn.Module) -> tuple[nn.Module, ...]:
    """Modules run after the last hierarchical feature: dropout, then the classifier."""
    return tuple(net.fc)


def load_imagenet_state(net: nn.Module, state: dict) -> list[str]:
    raise UserError("--pretrained: there are no ImageNet weights for a one-channel 3D ResNet; train from scratch")

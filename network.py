"""One interface for every classifier: logits, pooled hierarchical features, feature maps.

Inputs are images in [0, 1]; ImageNet normalisation is the first module inside the model, so
attacks and budgets live in pixel space (docs/PROTOCOL.md §2). The hierarchical features are
read with torchvision's feature-extraction utility (graph-node names are unique, whereas a
forward hook on ResNet's shared ReLU module would fire three times per block).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import resnet
import resnet3d
import vgg
from utils import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ARCHS = tuple(resnet.RESNETS) + tuple(vgg.VGGS) + tuple(resnet3d.RESNETS3D)


class Normalize(nn.Module):
    """Per-channel standardisation of N×C×(spatial) inputs (``spatial_dims`` = 2 or 3)."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, spatial_dims: int = 2):
        super().__init__()
        shape = (1, len(mean)) + (1,) * spatial_dims
        self.register_buffer("mean", torch.tensor(mean).view(shape))
        self.register_buffer("std", torch.tensor(std).view(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class _Backbone(nn.Module):
    def __init__(self, net: nn.Module, mean, std, spatial_dims: int):
        super().__init__()
        self.normalize = Normalize(mean, std, spatial_dims)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def _no_inplace_relu(module: nn.Module) -> None:
    # Returned feature tensors must not be overwritten by a later in-place op.
    for child in module.modules():
        if isinstance(child, nn.ReLU):
            child.inplace = False


class HierarchicalNet(nn.Module):
    """A classifier with its hierarchical feature taps.

    Attributes: ``arch``, ``num_classes``, ``layer_names`` (one per feature, forward order),
    ``layer_channels``, ``conv_layers`` (indices of the features that come from a conv map),
    ``stage_end_layers`` (the conv taps that close a stage, where Lee et al. take their
    features), ``pooled_copy_layers`` (non-conv taps that merely repeat the pooled tap before
    them), ``head_input_index`` (the feature that feeds the stochastic head, for BU). The
    structure is probed once, at construction; ``forward_to(x, index)`` runs the network only
    as far as one tap.
    """

    def __init__(self, arch: str, num_classes: int):
        super().__init__()
        if arch not in ARCHS:
            raise UserError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
        self.arch = arch
        self.num_classes = num_classes
        if arch in resnet.RESNETS:
            family, net = resnet, resnet.build_resnet(arch, num_classes)
        elif arch in resnet3d.RESNETS3D:
            family, net = resnet3d, resnet3d.build_resnet3d(arch, num_classes)
        else:
            family, net = vgg, vgg.build_vgg(arch, num_classes)
        self._family = family
        # What the model reads: 3-channel images (ImageNet statistics) or 1-channel volumes.
        volumetric = is_volumetric(arch)
        self.input_channels = 1 if volumetric else 3
        self.spatial_dims = 3 if volumetric else 2
        _no_inplace_relu(net)
        self.backbone = _Backbone(net, *((resnet3d.INPUT_MEAN, resnet3d.INPUT_STD) if volumetric
                                         else (IMAGENET_MEAN, IMAGENET_STD)), self.spatial_dims)
        train_nodes, eval_nodes = get_graph_node_names(self.backbone)
        nodes = ["net." + n for n in
                 (vgg.feature_nodes(net) if family is vgg
                  else family.feature_nodes([n[4:] for n in eval_nodes if n.startswith("net.")]))]
        output_node = eval_nodes[-1]
        self._nodes = nodes
        self._output_node = output_node
        self.layer_names = [n[4:] for n in nodes]
        # The extractor shares every module (and so every parameter) with ``backbone``; it is
        # kept out of the module tree so that the state dict holds each weight once.
        extractor = create_feature_extractor(
            self.backbone, return_nodes={**{n: n for n in nodes}, output_node: "logits"},
            tracer_kwargs={"leaf_modules": [Normalize]})
        object.__setattr__(self, "_extractor", extractor)
        object.__setattr__(self, "_tap_extractors", {})  # forward_to's, built on first use
        self.layer_channels, self.conv_layers, self.stage_end_layers, self.pooled_copy_layers = \
            self._probe_structure()
        self.head_input_index = len(self.layer_names) - (2 if family is vgg else 1)
        self._head = nn.Sequential(*family.head_modules(net))

    @torch.no_grad()
    def _probe_structure(self) -> tuple[list[int], list[int], list[int], list[int]]:
        """One eval-mode forward of a zero input (64×64 image, 32³ volume): every tap's
        channels, the conv taps, the stage-end taps and the pooled-copy taps (all fixed by the
        architecture, not the weights)."""
        was_training = self.training
        self.eval()
        side = 64 if self.spatial_dims == 2 else 32
        _, maps = self.forward_maps(torch.zeros(1, self.input_channels, *(side,) * self.spatial_dims))
        self.train(was_training)
        conv = [i for i, m in enumerate(maps) if m.dim() > 2]
        # Stage ends: the last tap of each residual stage (ResNet: the name prefix ``layerK``),
        # or, when all conv taps share one prefix (VGG), the last tap before the spatial size
        # drops (the ReLU before each max-pool).
        prefixes = [self.layer_names[i].split(".")[0] for i in conv]
        keys = prefixes if len(set(prefixes)) > 1 else [tuple(maps[i].shape[2:]) for i in conv]
        stage_ends = [index for position, index in enumerate(conv)
                      if position == len(conv) - 1 or keys[position + 1] != keys[position]]
        # Pooled copies: a non-conv tap right after a conv tap that equals its global pooling
        # (ResNet's ``flatten``): detectors can skip them.
        copies = [i for i in range(1, len(maps))
                  if i not in conv and i - 1 in conv and maps[i].shape == pooled(maps[i - 1]).shape
                  and torch.allclose(maps[i], pooled(maps[i - 1]), rtol=1e-5, atol=1e-6)]
        return [m.shape[1] for m in maps], conv, stage_ends, copies

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and the un-pooled outputs of every tap (N×C×h×w, or N×C for FC layers)."""
        out = self._extractor(x)
        return out["logits"], [out[n] for n in self._nodes]

    def forward_to(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """The (un-pooled) output of tap ``index``, running the network only that far.

        Built once per tap with torchvision's feature extractor (unused graph nodes are dropped,
        so the layers after the tap are not run) and cached; it shares the backbone's modules.
        """
        extractor = self._tap_extractors.get(index)
        if extractor is None:
            # The extractor takes its mode from the model's at creation: build it in eval mode.
            was_training = self.training
            self.eval()
            extractor = create_feature_extractor(self.backbone, return_nodes={self._nodes[index]: "out"},
                                                 tracer_kwargs={"leaf_modules": [Normalize]})
            self.train(was_training)
            self._tap_extractors[index] = extractor
        return extractor(x)["out"]

    def forward_features(self, x: torch.Tensor, layers=None) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Logits and the pooled hierarchical features (a spatial mean per channel: N×C each).

        With ``layers`` (indices) only those are pooled and the others are None: an attack's
        term that reads a few layers then pays nothing for the rest."""
        logits, maps = self.forward_maps(x)
        if layers is None:
            return logits, [pooled(m) for m in maps]
        wanted = set(layers)
        return logits, [pooled(m) if i in wanted else None for i, m in enumerate(maps)]

    def stochastic_head(self, feature: torch.Tensor) -> torch.Tensor:
        """Logits from the feature at ``head_input_index`` with every dropout on (for BU)."""
        out = feature
        for module in self._head:
            out = F.dropout(out, module.p, training=True) if isinstance(module, nn.Dropout) else module(out)
        return out

    def load_imagenet(self, source: str) -> list[str]:
        """Load ImageNet weights (a local state-dict file, or 'imagenet' to download)."""
        if self._family is resnet3d:
            return resnet3d.load_imagenet_state(self.backbone.net, {})
        if source == "imagenet":
            import torchvision
            ctor = {**resnet.RESNETS, **vgg.VGGS}[self.arch]
            weights = torchvision.models.get_model_weights(ctor).DEFAULT
            state = weights.get_state_dict(progress=True)
        else:
            path = Path(source)
            if not path.is_file():
                raise UserError(f"--pretrained: no weights file at {path} (a torchvision state dict, or 'imagenet')")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input
                raise UserError(f"--pretrained: cannot read {path}: {err}") from None
        return self._family.load_imagenet_state(self.backbone.net, state)


class _GlobalMean(torch.autograd.Function):
    """The spatial mean whose backward hands back a broadcast view of grad/(h·w) instead of a
    materialised N×C×h×w tensor: autograd then adds it into the map's gradient in one pass.
    (An attack's term on many taps otherwise writes and reads every tap's size twice more.)"""

    @staticmethod
    def forward(ctx, feature_map):
        ctx.shape = feature_map.shape
        return feature_map.mean(dim=tuple(range(2, feature_map.dim())))

    @staticmethod
    def backward(ctx, grad):
        positions = ctx.shape[2:].numel()
        return (grad / positions)[(...,) + (None,) * (len(ctx.shape) - 2)].expand(ctx.shape)


def pooled(feature_map: torch.Tensor) -> torch.Tensor:
    """Global average pooling of a conv map (N×C×h×w or N×C×d×h×w -> N×C); FC features pass
    unchanged."""
    if feature_map.dim() <= 2:
        return feature_map
    if feature_map.requires_grad:
        return _GlobalMean.apply(feature_map)
    return feature_map.mean(dim=tuple(range(2, feature_map.dim())))


def is_volumetric(arch: str) -> bool:
    """True for an arch that reads 1-channel volumes (N×1×D×H×W), False for 3-channel images."""
    return arch in resnet3d.RESNETS3D


def build_model(arch: str, num_classes: int, pretrained: str | None = None) -> HierarchicalNet:
    model = HierarchicalNet(arch, num_classes)
    if pretrained:
        model.load_imagenet(pretrained)
    return model

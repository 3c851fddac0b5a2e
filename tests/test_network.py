"""Feature taps, normalisation and checkpoints of the model interface (network.py, saver.py)."""
import pytest
import torch

import network
from saver import load_model, save_checkpoint
from utils import UserError

EXPECTED = {
    # arch: (number of taps, number of conv taps, channels of the last three taps)
    "resnet50": (49, 48, [512, 2048, 2048]),
    "vgg16": (15, 13, [512, 4096, 4096]),
    "resnet18": (17, 16, [512, 512, 512]),
}
STRUCTURE = {
    # arch: (stage-end taps: the last tap of layer1..layer4 / the ReLU before each max-pool,
    #        taps that only repeat the pooled tap before them)
    "resnet50": (["layer1.2.relu_2", "layer2.3.relu_2", "layer3.5.relu_2", "layer4.2.relu_2"], ["flatten"]),
    "vgg16": (["features.3", "features.8", "features.15", "features.22", "features.29"], []),
    "resnet18": (["layer1.1.relu_1", "layer2.1.relu_1", "layer3.1.relu_1", "layer4.1.relu_1"], ["flatten"]),
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_feature_taps(arch):
    torch.manual_seed(0)
    model = network.build_model(arch, num_classes=3).eval()
    n_taps, n_conv, last_channels = EXPECTED[arch]
    assert len(model.layer_names) == len(set(model.layer_names)) == n_taps
    assert model.conv_layers == list(range(n_conv))
    assert model.layer_channels[-3:] == last_channels
    stage_ends, copies = STRUCTURE[arch]
    assert [model.layer_names[i] for i in model.stage_end_layers] == stage_ends
    assert [model.layer_names[i] for i in model.pooled_copy_layers] == copies
    if arch.startswith("vgg"):  # the ReLU right before each max-pool
        pools = [i for i, m in enumerate(model.backbone.net.features) if isinstance(m, torch.nn.MaxPool2d)]
        assert stage_ends == [f"features.{i - 1}" for i in pools]
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        logits, feats = model.forward_features(x)
        _, maps = model.forward_maps(x)
    assert logits.shape == (2, 3)
    torch.testing.assert_close(logits, model(x))
    assert [f.shape[1] for f in feats] == model.layer_channels
    assert all(f.dim() == 2 and f.shape[0] == 2 for f in feats)
    assert all(m.dim() == 4 for m in maps[:n_conv]) and all(m.dim() == 2 for m in maps[n_conv:])
    # ReLU outputs are non-negative, and pooled = spatial mean of the map
    assert all((f >= 0).all() for f in feats)
    torch.testing.assert_close(feats[0], maps[0].mean(dim=(2, 3)))
    # pooling's gradient is the mean's: grad/(h·w) everywhere
    fmap = maps[0].clone().requires_grad_(True)
    weights = torch.randn(2, fmap.shape[1])
    (grad,) = torch.autograd.grad((network.pooled(fmap) * weights).sum(), fmap)
    (expected,) = torch.autograd.grad((fmap.mean(dim=(2, 3)) * weights).sum(), fmap)
    torch.testing.assert_close(grad, expected)
    # only the requested layers are pooled, with the same values
    some = [0, len(feats) - 1]
    with torch.no_grad():
        _, chosen = model.forward_features(x, layers=some)
    assert [i for i, f in enumerate(chosen) if f is not None] == some
    for i in some:
        torch.testing.assert_close(chosen[i], feats[i])
    # a forward cut at one tap gives that tap's map; its extractor is built once and kept
    tap = model.stage_end_layers[1]
    with torch.no_grad():
        torch.testing.assert_close(model.forward_to(x, tap), maps[tap])
    cached = model._tap_extractors[tap]
    model.forward_to(x, tap)
    assert model._tap_extractors[tap] is cached and list(model._tap_extractors) == [tap]
    assert not any("_tap_extractors" in key for key in model.state_dict())


def test_resnet50_taps_are_bottleneck_relus():
    model = network.build_model("resnet50", 2)
    names = model.layer_names
    assert names[:3] == ["layer1.0.relu", "layer1.0.relu_1", "layer1.0.relu_2"]
    assert names[-1] == "flatten"
    assert sum(name.startswith("layer") for name in names) == 48


def test_stochastic_head_matches_eval_path_without_dropout():
    torch.manual_seed(0)
    model = network.build_model("resnet18", 2).eval()
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        logits, feats = model.forward_features(x)
        head_in = feats[model.head_input_index]
        draws = torch.stack([model.stochastic_head(head_in) for _ in range(20)])
    # dropout is on: the draws differ, and they scatter around the deterministic logits
    assert draws.std(dim=0).max() > 0
    assert (draws.mean(dim=0) - logits).abs().max() < draws.std(dim=0).max() * 3 + 1e-3


def test_normalisation_is_inside_the_model():
    model = network.build_model("resnet18", 2)
    first = next(iter(model.backbone.children()))
    assert isinstance(first, network.Normalize)


def test_unknown_arch_is_a_user_error():
    with pytest.raises(UserError, match="expected one of"):
        network.build_model("alexnet", 2)


def test_checkpoint_round_trip_and_wrong_arch(tmp_path):
    torch.manual_seed(1)
    model = network.build_model("resnet18", 2).eval()
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, model, {"dataset": "synthetic", "image_size": 32})
    loaded, meta = load_model(tmp_path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    assert meta["layer_names"] == model.layer_names and meta["image_size"] == 32
    with pytest.raises(UserError, match="holds a resnet18 model, not resnet50"):
        load_model(path, arch="resnet50")
    with pytest.raises(UserError, match="run train.py first"):
        load_model(tmp_path / "missing.pt")
    # a truncated file is a one-line error, and writing happened atomically (no temp files left)
    (tmp_path / "broken.pt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_model(tmp_path / "broken.pt")
    assert not list(tmp_path.glob("*.tmp"))

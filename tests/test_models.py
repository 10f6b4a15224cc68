"""Classifiers: shapes, feature dimensions, normalisation inside the model, the [-1, 1]
feature adapter, the name factory and the DeepMind WRN layout (parameter count, names)."""
import pytest
import torch

from cdp_fast.models import CIFAR10_MEAN, CIFAR10_STD, FeatureExtractor, PreActResNet, SmallCNN, WideResNet, as_feature_extractor, get_model


def test_wrn_28_10_shapes_features_and_param_count():
    m = get_model("wrn-28-10-swish").eval()
    # Zagoruyko & Komodakis / Gowal et al.: WRN-28-10 has 36.5M parameters.
    n = sum(p.numel() for p in m.parameters())
    assert 36.4e6 < n < 36.6e6
    assert isinstance(m.relu, torch.nn.SiLU)
    assert m.layer[2].block[0].batchnorm_0.momentum == 0.01
    # DeepMind / DM-Improves-AT checkpoint names (mean/std are not in the state dict).
    keys = set(m.state_dict())
    assert {"init_conv.weight", "layer.0.block.0.conv_0.weight",
            "layer.2.block.3.batchnorm_1.running_var", "batchnorm.weight",
            "logits.weight", "logits.bias", "layer.1.block.0.shortcut.weight"} <= keys
    assert not any("mean" in k and "running" not in k for k in keys)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        f = m.features(x)
        logits = m(x)
    assert f.shape == (2, 640)
    assert logits.shape == (2, 10)
    torch.testing.assert_close(logits, m.logits(f))


def test_small_wrn_and_preact_shapes():
    w = WideResNet(num_classes=7, depth=10, width=1).eval()
    x = torch.rand(3, 3, 32, 32)
    assert w(x).shape == (3, 7) and w.features(x).shape == (3, 64)
    p = get_model("preact-resnet18", num_classes=5).eval()
    assert isinstance(p, PreActResNet)
    assert p(x).shape == (3, 5) and p.features(x).shape == (3, 512)
    # 11.17M parameters for PreAct-ResNet-18 with a 5-way head.
    assert 11.1e6 < sum(q.numel() for q in p.parameters()) < 11.2e6


@pytest.mark.parametrize("hw", [8, 28, 13])
def test_small_cnn_sizes(hw):
    m = get_model("small-cnn").eval()
    x = torch.rand(4, 1, hw, hw)
    assert m(x).shape == (4, 10)
    assert m.features(x).shape == (4, 128)


def test_normalisation_is_inside_the_model():
    """model(x) == the same network applied to (x - mean) / std by hand."""
    m = WideResNet(depth=10, width=1).eval()
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        h = m.init_conv((x - mean) / std)
        h = m.relu(m.batchnorm(m.layer(h))).mean(dim=(2, 3))
        torch.testing.assert_close(m(x), m.logits(h))
    s = SmallCNN(mean=0.25, std=0.5).eval()
    xs = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(s(xs), s.head(s.body((xs - 0.25) / 0.5)))


def test_feature_adapter_takes_minus_one_one():
    m = SmallCNN().eval()
    f = as_feature_extractor(m)
    assert isinstance(f, FeatureExtractor)
    x01 = torch.rand(5, 1, 8, 8)
    xpm = x01 * 2 - 1
    torch.testing.assert_close(f(xpm), m.features(x01))
    # Differentiable w.r.t. the input, also outside [-1, 1] (no clamp).
    xo = (xpm * 1.5).requires_grad_(True)
    f(xo).sum().backward()
    assert xo.grad is not None and xo.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="features"):
        as_feature_extractor(torch.nn.Linear(2, 2))


def test_factory_and_bad_arguments():
    assert isinstance(get_model("WRN_16_2"), WideResNet)
    assert get_model("wrn-16-2-relu").relu.__class__ is torch.nn.ReLU
    for bad, arg in [(lambda: get_model("resnet50"), "name"),
                     (lambda: WideResNet(depth=27), "depth"),
                     (lambda: WideResNet(width=0), "width"),
                     (lambda: SmallCNN(activation="tanh"), "activation"),
                     (lambda: SmallCNN(std=0.0), "std")]:
        with pytest.raises(ValueError, match=arg):
            bad()
    with pytest.raises(ValueError, match="x must"):
        SmallCNN()(torch.rand(2, 3, 8, 8))

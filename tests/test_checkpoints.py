"""Published checkpoints as they are (issue 23, item 5): DM-Improves-AT / RobustBench WRN
checkpoints in the layouts the anchors write (written here by the test), ``.pt`` and
``.safetensors``, into cdp_fast's WideResNet; safetensors in and out of `cdp-fast train` /
`eval`; ``robustbench:NAME[:dataset[:threat]]`` specs (RobustBench itself only when installed).

Layout facts (module docstring of cdp_fast.models.checkpoints): DM-Improves-AT saves
``{"model_state_dict": DataParallel(Sequential(wrn)).state_dict()}`` (keys ``module.0.``), no
mean/std; RobustBench checkpoints are ``{"state_dict": ...}`` or bare with ``module.``, and older
``DMWideResNet`` releases store ``mean`` / ``std`` (C, 1, 1) buffers."""
import sys
import types

import numpy as np
import pytest
import torch

from cdp_fast import cli
from cdp_fast.models import WideResNet, get_model, load_checkpoint_into, load_wrn_checkpoint, published_state_dict
from cdp_fast.models.checkpoints import wrn_config, wrn_from_dm
from cdp_fast.utils.checkpoint import read_weights, write_weights

safetensors_torch = pytest.importorskip("safetensors.torch")

CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
CIFAR10_STATS = dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616))   # _wrn's normalisation


def _wrn(depth=10, width=1, num_classes=7, in_channels=3, activation="swish", seed=0):
    """A small WRN with every parameter and BatchNorm statistic drawn (so a load that leaves
    anything at its init value is caught)."""
    torch.manual_seed(seed)
    m = WideResNet(num_classes=num_classes, depth=depth, width=width, in_channels=in_channels,
                   activation=activation, mean=0.5 if in_channels != 3 else (0.4914, 0.4822, 0.4465),
                   std=0.25 if in_channels != 3 else (0.2471, 0.2435, 0.2616))
    with torch.no_grad():
        for k, v in m.state_dict().items():
            if v.is_floating_point():
                v.copy_(torch.rand_like(v) + 0.5 if "running_var" in k else torch.randn_like(v) * 0.3)
            else:
                v.fill_(7)
    return m.eval()


def _layouts(state):
    """name -> (object as the anchor writes it, whether safetensors can hold it: a flat dict)."""
    old_rb = {**state, "mean": torch.tensor(CIFAR100_MEAN).view(3, 1, 1),
              "std": torch.tensor(CIFAR100_STD).view(3, 1, 1)}
    return {
        "bare": (state, True),
        "dm-improves-at": ({"model_state_dict": {f"module.0.{k}": v for k, v in state.items()}}, False),
        "dm-improves-at-flat": ({f"module.0.{k}": v for k, v in state.items()}, True),
        "robustbench": ({"state_dict": {f"module.{k}": v for k, v in state.items()}}, False),
        "robustbench-flat": ({f"module.{k}": v for k, v in state.items()}, True),
        "robustbench-old-buffers": ({"state_dict": {f"module.{k}": v for k, v in old_rb.items()}}, False),
    }


@pytest.mark.parametrize("layout,suffix", [(name, suffix) for name, (_, flat) in _layouts({}).items()
                                           for suffix in (".pt", ".safetensors") if flat or suffix == ".pt"])
@pytest.mark.parametrize("shape", [(10, 1, 7, 3), (16, 2, 10, 3)], ids=lambda s: "wrn-{}-{}-k{}-c{}".format(*s))
def test_published_layouts_load_with_equal_values(tmp_path, layout, suffix, shape):
    depth, width, k, c = shape
    ref = _wrn(depth, width, k, c)
    obj, _ = _layouts(ref.state_dict())[layout]
    path = tmp_path / f"ckpt{suffix}"
    if suffix == ".pt":
        torch.save(obj, path)
    else:
        safetensors_torch.save_file({k2: v.contiguous() for k2, v in obj.items()}, str(path))
    if k != 10 and layout != "robustbench-old-buffers":
        with pytest.raises(ValueError, match=rf"a {k}-class checkpoint without its input mean / std .*pass mean= and "
                                             r"std=.*CIFAR-100 models use mean=\(0\.5071, 0\.4865, 0\.4409\)"):
            load_wrn_checkpoint(path)
    m = load_wrn_checkpoint(path, **({} if k == 10 or layout == "robustbench-old-buffers" else CIFAR10_STATS))
    assert (m.num_features, m.logits.out_features, m.in_channels) == (16 * width * 4, k, c)
    assert not m.training
    for key, v in ref.state_dict().items():
        assert torch.equal(m.state_dict()[key], v), key
    x = torch.rand(2, c, 32, 32, generator=torch.Generator().manual_seed(1))
    if layout == "robustbench-old-buffers":      # the checkpoint's mean/std become the normalisation
        torch.testing.assert_close(m.normalize.mean.flatten(), torch.tensor(CIFAR100_MEAN))
        torch.testing.assert_close(m.normalize.std.flatten(), torch.tensor(CIFAR100_STD))
        ref.normalize.mean.copy_(m.normalize.mean)
        ref.normalize.std.copy_(m.normalize.std)
    assert torch.equal(m(x), ref(x))


def test_explicit_mean_std_and_activation():
    ref = _wrn(activation="relu")
    ref.normalize.mean.copy_(torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1))
    ref.normalize.std.copy_(torch.tensor(CIFAR100_STD).view(1, 3, 1, 1))
    ckpt = {"model_state_dict": {f"module.0.{k}": v for k, v in ref.state_dict().items()}}
    m = load_wrn_checkpoint(ckpt, activation="relu", mean=CIFAR100_MEAN, std=CIFAR100_STD)
    assert isinstance(m.relu, torch.nn.ReLU)
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(m(x), ref(x))
    assert not torch.equal(load_wrn_checkpoint(ckpt, **CIFAR10_STATS)(x), ref(x))   # swish / CIFAR-10 stats
    assert wrn_config(published_state_dict(ckpt)) == {"depth": 10, "width": 1, "num_classes": 7, "in_channels": 3}


def test_a_non_10_class_checkpoint_without_mean_std_is_refused():
    """A 100-class DM-Improves-AT checkpoint (no mean/std stored) used to load silently with
    CIFAR-10's normalisation; now a ValueError giving DM-Improves-AT's CIFAR-100 values (read
    from its core/models/wideresnetwithswish.py), unless mean= and std= are given (both: one
    alone still leaves the other unknown) or the checkpoint stores them; 10 classes load."""
    ref = _wrn(num_classes=100)
    ckpt = {"model_state_dict": {f"module.0.{k}": v for k, v in ref.state_dict().items()}}
    with pytest.raises(ValueError, match=r"100-class checkpoint without its input mean / std \(DM-Improves-AT's do "
                                         r"not store them\).*mean=\(0\.5071, 0\.4865, 0\.4409\), std=\(0\.2673, "
                                         r"0\.2564, 0\.2762\)"):
        load_wrn_checkpoint(ckpt)
    with pytest.raises(ValueError, match=r"without its input std"):
        load_wrn_checkpoint(ckpt, mean=CIFAR100_MEAN)
    m = load_wrn_checkpoint(ckpt, mean=CIFAR100_MEAN, std=CIFAR100_STD)
    torch.testing.assert_close(m.normalize.std.flatten(), torch.tensor(CIFAR100_STD))
    stored = {**ref.state_dict(), "mean": torch.tensor(CIFAR100_MEAN).view(3, 1, 1),
              "std": torch.tensor(CIFAR100_STD).view(3, 1, 1)}
    torch.testing.assert_close(load_wrn_checkpoint(stored).normalize.mean.flatten(), torch.tensor(CIFAR100_MEAN))
    assert load_wrn_checkpoint(_wrn(num_classes=10).state_dict()).logits.out_features == 10


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = _wrn().state_dict()
    short = {k: v for k, v in state.items() if k != "logits.bias"}
    with pytest.raises(ValueError, match=r"does not fit WideResNet \(missing keys: logits.bias\)"):
        load_wrn_checkpoint({"model_state_dict": short})
    extra = {**state, "head.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"unexpected keys: head.weight"):
        load_wrn_checkpoint(extra)
    # another architecture: its keys named (first few and the count)
    with pytest.raises(ValueError, match=r"ckpt: does not fit SmallCNN \(missing keys: .*in all\); unexpected"):
        load_checkpoint_into(get_model("small-cnn"), state, what="ckpt")
    with pytest.raises(ValueError, match=r"shapes differ from WideResNet's \(logits.weight \(7, 64\) vs \(10, 64\)"):
        load_checkpoint_into(WideResNet(num_classes=10, depth=10, width=1), state)
    # DM-Improves-AT --normalize True: Sequential(Normalization, WRN) normalises twice
    with pytest.raises(ValueError, match=r"entry 1 of a Sequential .*normalises the input twice"):
        load_wrn_checkpoint({f"module.1.{k}": v for k, v in state.items()})
    with pytest.raises(ValueError, match="not a state dict of tensors .*training checkpoint"):
        load_wrn_checkpoint({"epoch": 3, "model": state})
    with pytest.raises(ValueError, match="not a WideResNet state dict: no 'layer.0.block.0.conv_0.weight'"):
        load_wrn_checkpoint(get_model("small-cnn").state_dict())


class Payload:
    """A pickled object a weights-only load must refuse."""


def test_unreadable_files_are_one_line_errors(tmp_path):
    torch.save({"logits.weight": torch.zeros(1), "x": Payload()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match=r"pickled.pt is not .*pickled Python objects"):
        load_wrn_checkpoint(tmp_path / "pickled.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match=r"bad.safetensors is not .*not a readable safetensors file"):
        load_wrn_checkpoint(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="is not a file"):
        load_wrn_checkpoint(tmp_path / "absent.pt")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_write_and_read_weights_round_trip(tmp_path, suffix):
    state = _wrn().state_dict()
    write_weights(tmp_path / f"w{suffix}", state)
    back = read_weights(tmp_path / f"w{suffix}", "weights:", "a state dict")
    assert list(back) == list(state) if suffix == ".pt" else sorted(back) == sorted(state)
    for k, v in state.items():
        assert torch.equal(back[k], v) and back[k].dtype == v.dtype, k
    if suffix == ".safetensors":     # really safetensors (no pickle), readable by the library itself
        assert set(safetensors_torch.load_file(str(tmp_path / "w.safetensors"))) == set(state)
    with pytest.raises(ValueError, match="tensors only"):
        write_weights(tmp_path / f"x{suffix}", {"a": 1})


def test_cli_train_out_and_eval_weights_take_safetensors_and_published_layouts(tmp_path, monkeypatch, capsys):
    import cdp_fast

    monkeypatch.setattr(cdp_fast, "train_trades", lambda model, data, **kw: model)     # the file, not training
    out = tmp_path / "clf.safetensors"
    assert cli.main(["train", "--data", "digits", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0, \
        capsys.readouterr().err
    state = safetensors_torch.load_file(str(out))
    assert set(state) == set(get_model("small-cnn").state_dict())
    ev = ["eval", "--arch", "small-cnn", "--n", "16", "--attacks", "clean", "--no-progress"]
    assert cli.main(ev + ["--weights", str(out)]) == 0, capsys.readouterr().err
    # the same weights in DM-Improves-AT's layout, as published
    torch.save({"model_state_dict": {f"module.0.{k}": v for k, v in state.items()}}, tmp_path / "dm.pt")
    assert cli.main(ev + ["--weights", str(tmp_path / "dm.pt")]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert cli.main(["eval", "--arch", "wrn-10-1", "--n", "4", "--attacks", "clean", "--no-progress",
                     "--weights", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit WideResNet (missing keys:" in err and "--arch wrn-10-1" in err


def _samples_npz(path, n=6):
    rng = np.random.default_rng(0)
    np.savez(path, image=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    return path


def test_robustbench_spec_without_robustbench_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "robustbench", None)        # import robustbench -> ImportError
    monkeypatch.setitem(sys.modules, "robustbench.utils", None)
    s = _samples_npz(tmp_path / "s.npz")
    rc = cli.main(["label", str(s), "--classifier", "robustbench:Wang2023Better_WRN-28-10", "--out",
                   str(tmp_path / "l.npz"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "robustbench:Wang2023Better_WRN-28-10 needs RobustBench" in err and "cdp_fast[robustbench]" in err
    assert cli.main(["label", str(s), "--classifier", "robustbench:A:b:c:d", "--out", str(tmp_path / "l.npz")]) == 2
    assert "is not robustbench:NAME[:dataset[:threat]]" in capsys.readouterr().err


@pytest.fixture
def fake_robustbench(monkeypatch, tmp_path):
    """A stand-in ``robustbench.utils.load_model`` (no download, no RobustBench code): returns a
    small WRN under RobustBench's class name, and records its arguments."""
    calls = []

    class DMWideResNet(WideResNet):
        pass

    def load_model(model_name, model_dir, dataset, threat_model):
        calls.append((model_name, str(model_dir), dataset, threat_model))
        if model_name == "Nope":
            raise KeyError(model_name)
        net = DMWideResNet(num_classes=10, depth=10, width=1)
        net.load_state_dict(_wrn(num_classes=10).state_dict())
        return net.eval()

    rb = types.ModuleType("robustbench")
    rb.utils = types.ModuleType("robustbench.utils")
    rb.utils.load_model = load_model
    monkeypatch.setitem(sys.modules, "robustbench", rb)
    monkeypatch.setitem(sys.modules, "robustbench.utils", rb.utils)
    monkeypatch.setenv("CDP_FAST_ROBUSTBENCH_DIR", str(tmp_path / "zoo"))
    return calls


def test_robustbench_specs_serve_each_flag_in_its_range(fake_robustbench, tmp_path, capsys):
    from cdp_fast.cli import specs

    ref = _wrn(num_classes=10)
    x01 = torch.rand(3, 3, 32, 32)
    clf = specs.load_classifier("robustbench:Wang2023Better_WRN-28-10:cifar10:Linf", None)
    assert type(clf) is WideResNet and torch.equal(clf(x01), ref(x01))           # [0, 1], as the model
    lab = specs.load_labeler("robustbench:M:cifar100", {}, None)
    torch.testing.assert_close(lab(x01 * 2 - 1), ref(x01))                       # the sampler's [-1, 1]
    f = specs.load_features("robustbench:M", {}, None)
    torch.testing.assert_close(f(x01 * 2 - 1), ref.features(x01))
    g, _ = specs.load_inspect_features("robustbench:M:cifar10:L2")
    torch.testing.assert_close(g(x01), ref.features(x01))
    zoo = str(tmp_path / "zoo")
    assert fake_robustbench == [("Wang2023Better_WRN-28-10", zoo, "cifar10", "Linf"), ("M", zoo, "cifar100", "Linf"),
                                ("M", zoo, "cifar10", "Linf"), ("M", zoo, "cifar10", "L2")]
    with pytest.raises(ValueError, match="classifier: robustbench:Nope: RobustBench has no such model"):
        specs.load_classifier("robustbench:Nope", None)
    s = _samples_npz(tmp_path / "s.npz")
    assert cli.main(["label", str(s), "--classifier", "robustbench:M", "--out", str(tmp_path / "l.npz"),
                     "--no-progress"]) == 0, capsys.readouterr().err
    with np.load(tmp_path / "l.npz") as z:
        expect = ref(torch.as_tensor(z["image"]).permute(0, 3, 1, 2).float() / 255).argmax(1).numpy()
        np.testing.assert_array_equal(z["label"], expect)


def test_robustbench_dmwideresnet_converts_exactly():
    """RobustBench's own DMWideResNet (built locally, nothing downloaded), Swish and SiLU, with
    CIFAR-100 statistics: the converted WideResNet gives its logits and its pooled features."""
    arch = pytest.importorskip("robustbench.model_zoo.architectures.dm_wide_resnet")
    for act in (arch.Swish, torch.nn.SiLU):
        torch.manual_seed(0)
        net = arch.DMWideResNet(num_classes=100, depth=16, width=2, activation_fn=act, mean=CIFAR100_MEAN,
                                std=CIFAR100_STD)
        with torch.no_grad():
            for k, v in net.state_dict().items():
                if v.is_floating_point() and k not in ("mean", "std"):
                    v.copy_(torch.rand_like(v) + 0.5 if "running_var" in k else torch.randn_like(v) * 0.3)
        net.eval()
        ours = wrn_from_dm(net)
        x = torch.rand(4, 3, 32, 32)
        # same operations in another order (SiLU vs x·σ(x), mean vs avg_pool2d): float32 rounding
        torch.testing.assert_close(ours(x), net(x), rtol=1e-5, atol=1e-5)
        ckpt = {"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}
        m = load_wrn_checkpoint(ckpt, mean=CIFAR100_MEAN, std=CIFAR100_STD)
        torch.testing.assert_close(m(x), net(x), rtol=1e-5, atol=1e-5)

"""`cdp-fast export` / cdp_fast.data.export.export_png: PNGs that round-trip bit-exactly, EDM's
dataset.json, lazy chunked reads, resume (verified files kept, broken ones rewritten), atomic
zip; and the folder read by clean-fid's and torch-fidelity's own folder code with a small test
feature network, giving the FID that cdp_fast.metrics.frechet computes on the source arrays.
(The last two run where clean-fid / torch-fidelity import: they need torchvision.)"""
import io
import json
import zipfile

import numpy as np
import pytest
import torch

from cdp_fast.cli import main
from cdp_fast.data import Samples
from cdp_fast.data import export as E

PIL = pytest.importorskip("PIL.Image")


def _images(n, seed, c=3):
    return np.random.default_rng(seed).integers(0, 256, (n, 7, 5, c)).astype(np.uint8)


def _read(path):
    with PIL.open(path) as im:
        return np.asarray(im)


@pytest.mark.parametrize("c", [1, 3])
def test_folder_round_trips_bit_exactly_with_edm_labels(tmp_path, c):
    x, y = _images(23, 0, c), np.arange(23) % 4
    Samples(x, y).save_npz(tmp_path / "s.npz")
    res = E.export_png(str(tmp_path / "s.npz"), tmp_path / "png", chunk=5)
    assert res == {"n": 23, "written": 23, "skipped": 0, "removed": 0, "out": str(tmp_path / "png"), "labels": True}
    files = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert files == [f"{i:06d}.png" for i in range(23)] + ["dataset.json"]
    for i in range(23):
        assert np.array_equal(_read(tmp_path / "png" / f"{i:06d}.png").reshape(x[i].shape), x[i])
    labels = json.loads((tmp_path / "png" / "dataset.json").read_text())["labels"]
    assert labels == [[f"{i:06d}.png", int(y[i])] for i in range(23)]   # EDM: {"labels": [[fname, label]]}


def test_float_sources_use_the_package_conversions(tmp_path):
    """Model-space floats are stored as to_uint8_nhwc stores them; [0, 1] NCHW as round(255 x)."""
    from cdp_fast.data import to_uint8_nhwc

    xm = torch.linspace(-1, 1, 2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    E.export_png(Samples(xm.numpy()), tmp_path / "m", labels=False)
    want = to_uint8_nhwc(xm).numpy()
    assert all(np.array_equal(_read(tmp_path / "m" / f"{i:06d}.png"), want[i]) for i in range(2))
    x01 = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    E.export_png(x01, tmp_path / "u")
    u = (x01 * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert all(np.array_equal(_read(tmp_path / "u" / f"{i:06d}.png"), u[i]) for i in range(3))
    assert not (tmp_path / "u" / "dataset.json").exists()


def test_reads_lazily_chunk_by_chunk(tmp_path, monkeypatch):
    x = _images(50, 1)
    Samples(x).save_npz(tmp_path / "s.npz")
    spans, orig = [], E._uint8_rows
    monkeypatch.setattr(E, "_uint8_rows", lambda src, lo, hi: (spans.append(hi - lo), orig(src, lo, hi))[1])
    E.export_png(str(tmp_path / "s.npz"), tmp_path / "png", chunk=8)
    assert max(spans) == 8 and sum(spans) == 50


def test_resume_keeps_verified_files_and_rewrites_broken_ones(tmp_path, monkeypatch):
    x = _images(12, 2)
    out = tmp_path / "png"
    E.export_png(x, out)
    (out / "000003.png").write_bytes(b"\x89PNG truncated")               # a crash mid-file (not atomic)
    (out / "000007.png").unlink()
    E.export_png(_images(1, 9), tmp_path / "other")
    (out / "000005.png").write_bytes((tmp_path / "other" / "000000.png").read_bytes())   # a valid PNG, wrong pixels
    res = E.export_png(x, out)
    assert (res["written"], res["skipped"]) == (3, 9)
    assert all(np.array_equal(_read(out / f"{i:06d}.png"), x[i]) for i in range(12))
    assert sorted(p.name for p in out.iterdir()) == [f"{i:06d}.png" for i in range(12)]   # no temp files left


def test_zip_is_atomic_complete_and_resumable(tmp_path, monkeypatch):
    x, y = _images(9, 3), np.arange(9) % 2
    z = tmp_path / "s.zip"
    calls, orig = [], E._png_bytes

    def failing(img):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk full")
        return orig(img)

    monkeypatch.setattr(E, "_png_bytes", failing)
    with pytest.raises(OSError):
        E.export_png(Samples(x, y), z, zip=True)
    assert list(tmp_path.iterdir()) == []      # nothing half-written left behind
    monkeypatch.setattr(E, "_png_bytes", orig)
    assert E.export_png(Samples(x, y), z, zip=True, chunk=4)["written"] == 9
    with zipfile.ZipFile(z) as zf:
        assert sorted(zf.namelist()) == sorted([f"{i:06d}.png" for i in range(9)] + ["dataset.json", E._RECORD])
        for i in range(9):
            with zf.open(f"{i:06d}.png") as f:
                assert np.array_equal(_read(f), x[i])
        assert json.loads(zf.read("dataset.json"))["labels"][4] == ["000004.png", 0]
    assert E.export_png(Samples(x, y), z, zip=True)["skipped"] == 9


def _zip_pixels(z):
    with zipfile.ZipFile(z) as zf:
        names = sorted(m for m in zf.namelist() if m.endswith(".png"))
        return names, [np.asarray(PIL.open(zf.open(m))) for m in names]


def test_zip_of_another_source_is_rewritten(tmp_path):
    """The zip is kept only for the same pixels and labels (its record's sha256), not for the
    same member names: other images or other labels to the same path rewrite it."""
    z = tmp_path / "z.zip"
    zeros, full = np.zeros((20, 4, 4, 3), np.uint8), np.full((20, 4, 4, 3), 255, np.uint8)
    assert E.export_png(zeros, z, zip=True)["written"] == 20
    res = E.export_png(full, z, zip=True, chunk=6)
    assert (res["written"], res["skipped"]) == (20, 0)
    names, imgs = _zip_pixels(z)
    assert names == [f"{i:06d}.png" for i in range(20)] and all((a == 255).all() for a in imgs)
    assert E.export_png(full, z, zip=True)["skipped"] == 20                    # the same: kept
    y = np.arange(20) % 3
    assert E.export_png(Samples(full, y), z, zip=True)["written"] == 20       # labels added
    assert E.export_png(Samples(full, (y + 1) % 3), z, zip=True)["written"] == 20   # other labels
    with zipfile.ZipFile(z) as zf:
        assert json.loads(zf.read("dataset.json"))["labels"][0] == ["000000.png", 1]
    assert E.export_png(Samples(full, (y + 1) % 3), z, zip=True)["skipped"] == 20
    assert E.export_png(full[:19], z, zip=True)["written"] == 19
    assert len(_zip_pixels(z)[0]) == 19


def test_folder_holds_exactly_the_last_export(tmp_path):
    """A smaller export into the folder of a larger one deletes the earlier export's extra
    PNGs (FID tools read every *.png) and its dataset.json when this export has no labels."""
    d = tmp_path / "d"
    E.export_png(Samples(_images(20, 1), np.arange(20) % 5), d)
    (d / ".000003.png.999.tmp").write_bytes(b"half")                # a crashed write's temp file
    (d / "notes.txt").write_text("kept")
    x = _images(10, 2)
    res = E.export_png(x, d)
    assert (res["written"], res["removed"]) == (10, 10 + 1 + 1)
    assert sorted(p.name for p in d.iterdir()) == [f"{i:06d}.png" for i in range(10)] + ["notes.txt"]
    assert all(np.array_equal(_read(d / f"{i:06d}.png"), x[i]) for i in range(10))
    # a user's labels file (not EDM's {"labels": ...}) is not ours to delete
    (d / "dataset.json").write_text("[1, 2]")
    assert E.export_png(x, d)["removed"] == 0 and (d / "dataset.json").exists()


def test_folder_drops_the_other_name_width(tmp_path, monkeypatch):
    """Past 10^6 images the names widen (0000000.png): a re-export of the other size leaves no
    PNG of the old width. (The width threshold made small here: 10 images, 2 digits.)"""
    monkeypatch.setattr(E, "_MIN_DIGITS", 1)
    d = tmp_path / "d"
    E.export_png(_images(12, 3), d)
    assert sorted(p.name for p in d.iterdir())[:2] == ["00.png", "01.png"]
    x = _images(5, 4)
    res = E.export_png(x, d)
    assert res["removed"] == 12
    assert sorted(p.name for p in d.iterdir()) == [f"{i}.png" for i in range(5)]
    assert all(np.array_equal(_read(d / f"{i}.png"), x[i]) for i in range(5))
    res = E.export_png(_images(12, 3), d)
    assert (res["written"], res["removed"]) == (12, 5)


@pytest.mark.parametrize("foreign", ["cat.png", "IMG_1.JPG", "12.png", "sub/000000.png"])
def test_folder_with_foreign_images_is_refused_untouched(tmp_path, foreign):
    d = tmp_path / "d"
    E.export_png(_images(8, 5), d)
    (d / foreign).parent.mkdir(exist_ok=True)
    (d / foreign).write_bytes(b"not ours")
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=f"no export wrote.*{foreign}"):
        E.export_png(_images(3, 6), d)
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == before


def test_names_and_labels_are_made_per_chunk(tmp_path, monkeypatch):
    """No list of N names or N label entries: png_names is not called, dataset.json is written
    in parts and equals json.dumps of EDM's list."""
    monkeypatch.setattr(E, "png_names", None)
    x, y = _images(25, 7), np.arange(25) % 7
    E.export_png(Samples(x, y), tmp_path / "d", chunk=4)
    E.export_png(Samples(x, y), tmp_path / "z.zip", zip=True, chunk=4)
    want = json.dumps({"labels": [[f"{i:06d}.png", int(y[i])] for i in range(25)]})
    assert (tmp_path / "d" / "dataset.json").read_text() == want
    assert zipfile.ZipFile(tmp_path / "z.zip").read("dataset.json").decode() == want
    buf = io.BytesIO()          # several parts: the joins between them
    E._Job(None, 25, 6, y, 4, None).write_labels(buf, per=7)
    assert buf.getvalue().decode() == want


def test_png_names_widen_past_a_million():
    assert E.png_names(3) == ["000000.png", "000001.png", "000002.png"]
    assert E.png_name(1_000_000, 1_000_001) == "1000000.png" and E.png_name(0, 1_000_001) == "0000000.png"
    assert E.png_name(999_999, 1_000_000) == "999999.png"


def test_cli_export(tmp_path, capsys):
    x = _images(6, 4)
    Samples(x, np.arange(6)).save_npz(tmp_path / "s.npz")
    assert main(["export", str(tmp_path / "s.npz"), "--png", str(tmp_path / "png")]) == 0
    assert "exported 6 images" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "s.npz"), "--png", str(tmp_path / "a.zip"), "--zip"]) == 0
    assert zipfile.ZipFile(tmp_path / "a.zip").testzip() is None
    rc = main(["export", str(tmp_path / "s.npz"), "--png", str(tmp_path / "no" / "png")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "does not exist" in err


# ----------------------------------------------------------------------------- external readers
class _Net(torch.nn.Module):
    """float (B, 3, H, W) in [0, 1] -> (B, 10): a fixed random conv net."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 10, 3)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3

    def forward(self, x):
        return torch.tanh(self.conv(x.float())).mean((2, 3))


def _two_folders(tmp_path):
    a, b = _images(40, 5), np.clip(_images(40, 6).astype(int) + 30, 0, 255).astype(np.uint8)
    E.export_png(a, tmp_path / "a")
    E.export_png(b, tmp_path / "b")
    from cdp_fast.metrics.frechet import feature_stats, frechet_distance

    sa, sb = feature_stats(a, _Net()), feature_stats(b, _Net())      # the arrays, not the files
    return tmp_path / "a", tmp_path / "b", frechet_distance(sb.mu, sb.sigma, sa.mu, sa.sigma)


def test_clean_fid_reads_the_export(tmp_path):
    cleanfid = pytest.importorskip("cleanfid.fid")
    fa, fb, want = _two_folders(tmp_path)
    net = _Net()
    # mode legacy_tensorflow: clean-fid does not resize; it hands the model float 0..255
    got = cleanfid.compute_fid(str(fa), str(fb), mode="legacy_tensorflow", custom_feat_extractor=lambda t: net(t / 255),
                               device=torch.device("cpu"), num_workers=0, batch_size=16, verbose=False)
    assert got == pytest.approx(want, rel=1e-4)


def test_torch_fidelity_reads_the_export(tmp_path):
    tf = pytest.importorskip("torch_fidelity")

    class Extractor(tf.FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            self.net = _Net()

        @staticmethod
        def get_provided_features_list():
            return ("f",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "f"

        @staticmethod
        def can_be_compiled():
            return False

        def forward(self, x):   # torch-fidelity hands uint8 (B, 3, H, W) read from the PNGs
            return (self.net(x.float() / 255),)

    tf.register_feature_extractor("cdp-fast-test-net", Extractor)
    fa, fb, want = _two_folders(tmp_path)
    got = tf.calculate_metrics(input1=str(fb), input2=str(fa), fid=True, feature_extractor="cdp-fast-test-net",
                               cuda=False, cache=False, verbose=False, batch_size=16)["frechet_inception_distance"]
    assert got == pytest.approx(want, rel=1e-6)

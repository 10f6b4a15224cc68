"""Sets at the anchors' scale (issue 23, item 6): several npz parts (DM-Improves-AT's 20M / 50M
sets) and folders of per-class ``{k}.npy`` files (EDM / DM-Improves-AT generate.py), read
lazily by ``Samples.load`` / ``as_source`` / ``open_images``, compared with the same arrays
concatenated in memory; the refusals; the chunked npz writer; row reads that leave no memory
map behind."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from cdp_fast.data import Samples, as_source, open_images, write_npz
from cdp_fast.data.lazy import LazyConcat, read_rows
from cdp_fast.data.npz import read_member, stream_npz
from cdp_fast.data.parts import part_paths


@pytest.fixture()
def parts(tmp_path):
    """100 uint8 NHWC images in 3 parts (stored, compressed, stored) and the arrays."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (100, 5, 4, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 100)
    cuts = [(0, 30), (30, 71), (71, 100)]
    paths = [tmp_path / f"set_part{i + 1}.npz" for i in range(3)]
    np.savez(paths[0], image=x[:30], label=y[:30])
    np.savez_compressed(paths[1], image=x[30:71], label=y[30:71])
    write_npz(paths[2], {"image": x[71:], "label": y[71:]})
    return paths, x, y, cuts


def test_npz_parts_read_like_their_concatenation(parts, tmp_path):
    paths, x, y, _ = parts
    for spec in (paths, [str(p) for p in paths], str(tmp_path / "set_part*.npz"),
                 ",".join(map(str, paths)), f"{paths[0]}, {tmp_path / 'set_part[23].npz'}"):
        s = Samples.load(spec)
        assert isinstance(s.images, LazyConcat) and s.images.shape == x.shape and s.images.dtype == np.uint8
        np.testing.assert_array_equal(s.labels, y)
        assert s.meta["parts"] == [str(p) for p in paths]
    idx = np.random.default_rng(1).permutation(100)
    np.testing.assert_array_equal(s.images[idx], x[idx])                    # scattered, every part
    for sl in (slice(None), slice(25, 75), slice(29, 31), slice(70, 71), slice(90, 200), slice(5, 5)):
        np.testing.assert_array_equal(s.images[sl], x[sl])
    np.testing.assert_array_equal(s.images[-1], x[-1])
    np.testing.assert_array_equal(s.images[::7], x[::7])
    np.testing.assert_array_equal(np.asarray(s.images), x)
    # the other front doors
    src = as_source(paths)
    xb, yb = src.get(idx[:17])
    torch.testing.assert_close(xb, torch.from_numpy(x[idx[:17]]).permute(0, 3, 1, 2).float() / 255)
    np.testing.assert_array_equal(yb.numpy(), y[idx[:17]])
    assert len(as_source(str(tmp_path / "set_part*.npz"))) == 100
    im = open_images(paths)
    assert len(im) == 100 and im.labels is not None
    torch.testing.assert_close(im.read(slice(20, 40)), torch.from_numpy(x[20:40]).permute(0, 3, 1, 2) / 255)


def test_class_folder_labels_are_the_file_names(tmp_path):
    """k.npy holds class k's images; classes in numeric order (10 after 9, not after 1)."""
    rng = np.random.default_rng(2)
    per = {k: rng.integers(0, 256, (k % 3 + 2, 4, 4, 3), dtype=np.uint8) for k in range(12)}
    for k, a in per.items():
        np.save(tmp_path / f"{k}.npy", a)
    (tmp_path / "notes.txt").write_text("other files are ignored")
    s = Samples.load(tmp_path)
    want_x = np.concatenate([per[k] for k in range(12)])
    want_y = np.concatenate([[k] * len(per[k]) for k in range(12)])
    np.testing.assert_array_equal(np.asarray(s.images), want_x)
    np.testing.assert_array_equal(s.labels, want_y)
    assert s.meta["classes"] == list(range(12))
    idx = np.array([len(want_x) - 1, 0, 7, 3])
    np.testing.assert_array_equal(s.images[idx], want_x[idx])
    x, yb = as_source(str(tmp_path)).get(idx)
    np.testing.assert_array_equal(yb.numpy(), want_y[idx])
    # a missing class below the largest: loaded, with a warning
    os.remove(tmp_path / "4.npy")
    with pytest.warns(UserWarning, match=r"no file for class\(es\) \[4\]"):
        s = Samples.load(tmp_path)
    assert 4 not in set(s.labels.tolist()) and len(s) == len(want_x) - len(per[4])


def test_refusals(parts, tmp_path):
    paths, x, y, _ = parts
    with pytest.raises(ValueError, match="matches no file"):
        Samples.load(str(tmp_path / "nothing*.npz"))
    with pytest.raises(ValueError, match="does not exist"):
        Samples.load([paths[0], tmp_path / "gone.npz"])
    with pytest.raises(ValueError, match="listed twice"):
        Samples.load([paths[0], paths[1], paths[0]])
    with pytest.raises(ValueError, match="an empty list of parts"):
        Samples.load([])
    with pytest.raises(ValueError, match="an empty item between commas"):
        Samples.load(f"{paths[0]},,{paths[1]}")
    odd = tmp_path / "odd"
    odd.mkdir()
    np.savez(odd / "a.npz", image=x[:5], label=y[:5])
    np.savez(odd / "b.npz", image=x[:5, :, :, :1], label=y[:5])             # another row shape
    with pytest.raises(ValueError, match=r"b.npz: rows of uint8 \(5, 4, 1\), but .*a.npz holds uint8 \(5, 4, 3\)"):
        Samples.load([odd / "a.npz", odd / "b.npz"])
    np.savez(odd / "c.npz", image=x[:5])                                   # no labels
    with pytest.raises(ValueError, match="c.npz: lacks labels, unlike .*a.npz"):
        Samples.load([odd / "a.npz", odd / "c.npz"])
    np.savez(odd / "d.npz", image=x[:5], label=y[:4])
    with pytest.raises(ValueError, match="d.npz: 4 labels .* for 5 images"):
        Samples.load([odd / "a.npz", odd / "d.npz"])
    with pytest.raises(ValueError, match="must be an npz file"):
        Samples.load([odd / "a.npz", tmp_path])
    # class folders
    cls = tmp_path / "cls"
    cls.mkdir()
    with pytest.raises(ValueError, match="no manifest.json and no per-class"):
        Samples.load(cls)
    np.save(cls / "0.npy", x[:3])
    np.save(cls / "0_1.npy", x[:3])                      # DM-Improves-AT's per-(class, ce) variant
    with pytest.raises(ValueError, match="0_1.npy is not a class file"):
        Samples.load(cls)
    os.remove(cls / "0_1.npy")
    np.save(cls / "00.npy", x[:3])
    with pytest.raises(ValueError, match="class 0 is in both"):
        Samples.load(cls)
    os.remove(cls / "00.npy")
    np.save(cls / "1.npy", np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="Python objects; refusing to unpickle"):
        Samples.load(cls)
    np.save(cls / "1.npy", x[:3].astype(np.float32))
    with pytest.raises(ValueError, match="1.npy: rows of float32"):
        Samples.load(cls)
    # a .npy file truncated after its header is refused by name when read
    np.save(cls / "1.npy", x[:3])
    data = (cls / "1.npy").read_bytes()
    (cls / "1.npy").write_bytes(data[:-20])
    with pytest.raises(ValueError, match="1.npy"):
        np.asarray(Samples.load(cls).images[:])


def test_existing_path_with_a_comma_is_one_file(tmp_path):
    p = tmp_path / "a,b.npz"
    np.savez(p, image=np.zeros((2, 2, 2, 3), np.uint8))
    assert part_paths(str(p)) == [p] and len(Samples.load(str(p))) == 2


def test_compressed_parts_are_decompressed_one_at_a_time_in_a_pass(tmp_path):
    """Consecutive reads hold one decompressed part at a time; scattered reads keep the parts
    they decompressed (random batches must not decompress a part per batch)."""
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (90, 4), dtype=np.uint8)
    paths = [tmp_path / f"c{i}.npz" for i in range(3)]
    for i, p in enumerate(paths):
        np.savez_compressed(p, image=x[30 * i:30 * (i + 1)])
    lc = LazyConcat([(str(p), None) for p in paths], "image")
    for s in range(0, 90, 7):
        np.testing.assert_array_equal(lc[s:s + 7], x[s:s + 7])
        assert len(lc._loaded) == 1                        # never two decompressed parts at once
    np.testing.assert_array_equal(lc[[5, 35, 65, 6]], x[[5, 35, 65, 6]])
    assert sorted(lc._loaded) == [0, 1, 2]


def test_read_rows_leaves_no_memory_map(tmp_path):
    a = np.arange(6000, dtype=np.uint8).reshape(200, 30) % 251
    write_npz(tmp_path / "m.npz", {"image": a})
    m = read_member(tmp_path / "m.npz", "image")
    assert isinstance(m, np.memmap)
    got = read_rows(m, 17, 93)
    assert type(got) is np.ndarray and not isinstance(got.base, np.memmap)
    np.testing.assert_array_equal(got, a[17:93])
    np.testing.assert_array_equal(read_rows(m, 190, 400), a[190:])
    np.testing.assert_array_equal(read_rows(a, 3, 5), a[3:5])                 # plain arrays: a slice


def test_stream_npz_writes_what_write_npz_would(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (50, 3, 3, 1), dtype=np.uint8)
    lab, conf = rng.integers(0, 5, 50), rng.random(50).astype(np.float32)

    def chunks():
        for i in range(0, 50, 16):
            yield x[i:i + 16], {"label": lab[i:i + 16], "confidence": conf[i:i + 16]}
    n = stream_npz(tmp_path / "s.npz", "image", np.uint8, x.shape, chunks(),
                   {"label": np.int64, "confidence": np.float32})
    assert n == 50
    with np.load(tmp_path / "s.npz") as z:
        assert list(z.keys()) == ["image", "label", "confidence"]
        np.testing.assert_array_equal(z["image"], x)
        np.testing.assert_array_equal(z["label"], lab)
        np.testing.assert_array_equal(z["confidence"], conf)
    assert [f.name for f in tmp_path.iterdir()] == ["s.npz"]                  # no spill left behind
    with pytest.raises(ValueError, match="rows written"):                      # too few rows: no file
        stream_npz(tmp_path / "t.npz", "image", np.uint8, (60, 3, 3, 1), chunks(),
                   {"label": np.int64, "confidence": np.float32})
    assert not (tmp_path / "t.npz").exists() and len(list(tmp_path.iterdir())) == 1


def test_cli_label_on_parts_matches_pseudo_label(parts, tmp_path, capsys):
    """`cdp-fast label 'parts*.npz'` (streamed) writes what pseudo_label + Samples.save_npz gave."""
    from cdp_fast import cli
    from cdp_fast.label import pseudo_label
    from cdp_fast.models import digits

    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (70, 8, 8, 1), dtype=np.uint8)
    d = tmp_path / "dg"
    d.mkdir()
    np.savez(d / "p1.npz", image=x[:33])
    np.savez_compressed(d / "p2.npz", image=x[33:])
    out = tmp_path / "lab.npz"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cli.main(["label", str(d / "p*.npz"), "--out", str(out), "--no-progress", "--batch-size", "16"]) == 0
    ref = pseudo_label(digits.load_digits_classifier(), Samples(x))
    got = Samples.load(out)
    np.testing.assert_array_equal(np.asarray(got.images), x)
    np.testing.assert_array_equal(got.labels, ref["label"])
    np.testing.assert_allclose(got.confidence, ref["confidence"], rtol=1e-6)
    assert f"class histogram {np.bincount(ref['label'], minlength=10).tolist()}" in capsys.readouterr().out
    assert cli.main(["label", str(d / "nothing*.npz"), "--out", str(out)]) == 2
    assert "matches no file" in capsys.readouterr().err

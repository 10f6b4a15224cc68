"""The README's first lines are the two install commands, .ci/run runs the test one, and
the Python quickstart runs as written."""
import re
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_first_lines_are_the_two_commands_and_ci_runs_the_test_one():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert README.startswith("```bash\n")
    assert block[0].endswith("cdp-fast demo") and block[0].startswith("pip install torch==2.13.0 && ")
    assert block[1].startswith("pip install torch==2.13.0 && ")
    assert block[1] in (REPO / ".ci" / "run").read_text()


@pytest.mark.slow
def test_quickstart_runs_as_written(tmp_path, monkeypatch):
    code = re.search(r"<!-- quickstart[^>]*-->\n```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    ns = {}
    exec(compile(code, "README.md:quickstart", "exec"), ns)
    s = ns["s"]
    assert len(s) == 256 and s.labels.dtype == np.int64
    with np.load(tmp_path / "digits_cdp.npz", allow_pickle=False) as z:
        assert z["image"].shape == (256, 8, 8, 1) and z["image"].dtype == np.uint8
    assert (tmp_path / "gen_digits" / "manifest.json").exists()


def test_cli_reads_cifar10_folders(tmp_path):
    from cdp_fast.cli.specs import load_train_data

    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rec = np.concatenate([rng.integers(0, 10, (2, 1)), rng.integers(0, 256, (2, 3072))], 1)
        rec.astype(np.uint8).tofile(root / f"{name}.bin")
    x, y = load_train_data(f"cifar10:{tmp_path}", "train")
    assert x.shape == (10, 3, 32, 32)
    xt, _ = load_train_data(f"cifar10:{tmp_path}", "test")
    assert xt.shape == (2, 3, 32, 32)


def test_robustbench_wrn_block_runs_as_written(tmp_path, monkeypatch):
    """The README's RobustBench block (issue 23): a RobustBench-architecture WRN (RobustBench's
    own DMWideResNet when installed, else the same architecture built locally — nothing is
    downloaded; WRN-10-1 for speed) as guidance features through a layer= hook, as labeller
    with its [0, 1] range, and as evaluate's classifier. Only n, the batch and the steps are
    made small; the labels are the WRN's own on (x̂₀ + 1)/2."""
    import torch

    from tests.test_adapters import dm_wrn

    block = re.search(r"<!-- robustbench[^>]*-->\n```python\n(.*?)```", README, re.S).group(1)
    small = {"10_000": "4", "batch_size=256": "batch_size=4, steps=2, progress=False"}
    for old, new in small.items():
        assert block.count(old) == 1, old
        block = block.replace(old, new)
    wrn = dm_wrn()
    g = torch.Generator().manual_seed(0)
    ns = {"wrn": wrn, "unet": lambda x, t: 0.1 * x, "x_test": torch.rand(4, 3, 32, 32, generator=g),
          "y_test": torch.tensor([0, 1, 2, 3])}
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md:robustbench", "exec"), ns)
    s, acc = ns["s"], ns["acc"]
    assert len(s) == 4 and set(acc) == {"clean", "pgd"}
    x01 = torch.as_tensor(np.asarray(s.images[:])).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        want = wrn(x01).argmax(1).numpy()
    # the labels come from float x̂₀, the check from the uint8 images: agree up to rounding
    assert (np.asarray(s.labels) == want).mean() >= 0.75
    assert (tmp_path / "gen_rb" / "manifest.json").exists()

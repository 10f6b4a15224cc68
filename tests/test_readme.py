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

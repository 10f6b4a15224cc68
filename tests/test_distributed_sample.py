"""Sampling under torchrun (gloo, 2 CPU processes): byte-identical to one process, and a run
killed under one world size resumes under another."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import sys, time, torch, cdp_fast, cdp_fast.utils.distributed
class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(3, 3, 1, 1, generator=g) * 0.3)
    def forward(self, x, t):
        time.sleep(float(sys.argv[2]))
        return torch.nn.functional.conv2d(x, self.w) + 0.1 * x
s = cdp_fast.sample(M(), 42, loss="hnm", lam=5.0, tau=0.5, features="pixels", image_shape=(3, 4, 4), batch_size=3,
                    shard_size=6, steps=5, eta=0.3, out=sys.argv[1], progress=False)
if cdp_fast.utils.distributed.is_main():
    print("STATS", [round(r["images_per_s"], 1) for r in s.meta["throughput"]])
'''


def _launch(tmp_path, out, nproc, delay="0"):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(script), str(out), delay]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), str(out), delay]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _bytes(out):
    return {p.name: p.read_bytes() for p in sorted(Path(out).glob("shard-*.npz"))}


@pytest.mark.slow
def test_two_processes_match_one_and_resume_across_world_sizes(tmp_path):
    one = _launch(tmp_path, tmp_path / "one", 1)
    two = _launch(tmp_path, tmp_path / "two", 2)
    o1, _ = one.communicate(timeout=300)
    o2, _ = two.communicate(timeout=300)
    assert one.returncode == 0, o1
    assert two.returncode == 0, o2
    assert "STATS" in o2 and o2.count("STATS") == 1  # only rank 0 reports
    ref = _bytes(tmp_path / "one")
    assert len(ref) == 7 and _bytes(tmp_path / "two") == ref
    m2 = json.loads((tmp_path / "two" / "manifest.json").read_text())
    m1 = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert m2["complete"] and m2["shards"] == m1["shards"]
    assert not list((tmp_path / "two").glob("shard-*.json"))

    # start on 2 processes, kill the whole job once some shards exist, finish on 1
    out = tmp_path / "killed"
    job = _launch(tmp_path, out, 2, delay="0.05")
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("shard-*.json"))) < 2:
        time.sleep(0.02)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert len(list(out.glob("shard-*.npz"))) < 7
    fin = _launch(tmp_path, out, 1)
    of, _ = fin.communicate(timeout=300)
    assert fin.returncode == 0, of
    assert _bytes(out) == ref
    assert json.loads((out / "manifest.json").read_text())["complete"]


@pytest.mark.slow
def test_torchrun_cli_sample_reports_throughput_once(tmp_path):
    out = tmp_path / "gen"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cdp_fast",
           "sample", "--model", "digits", "-n", "16", "--steps", "3", "--batch-size", "4", "--loss", "hnm",
           "--out", str(out), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("throughput:") == 1 and "over 2 process(es)" in res.stdout
    assert json.loads((out / "manifest.json").read_text())["complete"]

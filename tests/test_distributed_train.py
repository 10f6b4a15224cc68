"""Training and evaluation under torchrun (gloo, 2 CPU processes): DistributedDataParallel
TRADES on scikit-learn's 8x8 digits follows the single-process loss trajectory of the same
global batches, the EMA is identical on both ranks, a checkpoint resumes under another world
size, and evaluate under 2 processes returns the single-process accuracies (clean, PGD,
AutoAttack). Plus in-process checks of the mixing sampler.

The 1-vs-2-process comparison runs the default recipe ("gowal") on the small CNN, which has no
BatchNorm: its train-mode attack then does not depend on how the global batch is split. A
BatchNorm model normalises with each rank's local batch (training forwards, and the gowal
attack), so for it the test asserts what holds under either recipe: the EMA is bitwise the
same on both ranks, even from different initial weights per rank."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cdp_fast.robust.batches import MixedBatchSampler, epoch_indices

REPO = Path(__file__).resolve().parents[1]

WORKER = r'''
import shutil, sys, torch, cdp_fast, cdp_fast.utils.distributed
from cdp_fast.models import SmallCNN
from sklearn.datasets import load_digits
torch.set_num_threads(1)
out, ckpt, mid, evaluate_from = sys.argv[1:5]
d = load_digits()
x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
y = torch.tensor(d.target, dtype=torch.int64)
rank, world = cdp_fast.utils.distributed.maybe_init(torch.device("cpu"))

def copy_mid(info):   # keep the checkpoint of epoch 3 to resume from it elsewhere
    if info["epoch"] == 3 and mid != "-" and rank == 0:
        shutil.copy(ckpt, mid)

torch.manual_seed(0)
model = SmallCNN(width=8, feature_dim=16)
# one update per "epoch", so history[i]["loss"] is the loss of update i (a per-step
# trajectory); 50 % of each global batch of 32 from the "synthetic" set.
kw = dict(synthetic=(x[400:800], y[400:800]), real_fraction=0.5, epochs=6, steps_per_epoch=1,
          eps=0.1, step_size=0.04, steps=3, batch_size=32, lr=0.1, ema=0.9, augment=True,
          pad=1, flip=True, seed=3, progress=False)
model = cdp_fast.train_trades(model, (x[:400], y[:400]), checkpoint=ckpt, callback=copy_mid, **kw)
res = {"rank": rank, "world": world, "ema": model.state_dict(),
       "loss": [h["loss"] for h in model.history], "throughput": model.throughput}
if evaluate_from != "-":
    ev = SmallCNN(width=8, feature_dim=16)
    ev.load_state_dict(torch.load(evaluate_from, weights_only=True)["ema"])
    res["eval"] = cdp_fast.evaluate(ev, x[1400:1440], y[1400:1440], eps=0.1, pgd_steps=5,
                                    pgd_step_size=0.025, batch_size=16, version="custom",
                                    aa_attacks=("apgd-ce",), seed=1)
if evaluate_from != "-":   # (the resume runs) PGD-AT too, 3 updates
    torch.manual_seed(0)
    pgd = cdp_fast.train_pgd_at(SmallCNN(width=8, feature_dim=16), (x[:400], y[:400]),
                                **{**kw, "epochs": 3})
    res["pgd_at_loss"] = [h["loss"] for h in pgd.history]
if world > 1:
    # BatchNorm under DDP: local batch statistics (with recipe="gowal" in the attack too), rank
    # 0's running statistics broadcast after every update, so the EMA (weights and running
    # statistics) is the same on both ranks. Each rank builds the model from its own seed: DDP
    # starts every rank from rank 0's weights, and the EMA must start from them too.
    for recipe in ("gowal", "zhang"):
        torch.manual_seed(rank)
        bn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4),
                                 torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 10))
        copied = []   # per epoch: are the EMA's buffers the model's (gowal's update_bn)?

        def check(info):
            copied.append(all(torch.equal(a, b) for a, b in
                              zip(info["ema_model"].buffers(), info["model"].buffers())))

        bn = cdp_fast.train_trades(bn, (x[:400], y[:400]),
                                   **{**kw, "epochs": 3, "recipe": recipe, "callback": check})
        res[f"bn_ema_{recipe}"] = bn.state_dict()
        res[f"bn_copied_{recipe}"] = copied
    try:
        cdp_fast.train_trades(SmallCNN(width=8, feature_dim=16), (x[:400], y[:400]),
                              sync_bn=True, **kw)
        res["sync_bn_error"] = None
    except ValueError as e:
        res["sync_bn_error"] = str(e)
torch.save(res, f"{out}.rank{rank}.pt")
'''


def _launch(tmp_path, nproc, name, ckpt, mid="-", evaluate_from="-"):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [str(script), str(tmp_path / name), str(ckpt), str(mid), str(evaluate_from)]
    if nproc == 1:
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        cmd = [sys.executable] + args
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}"] + args
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait(*procs):
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-4000:]


def _load(tmp_path, name, rank=0):
    return torch.load(tmp_path / f"{name}.rank{rank}.pt", weights_only=True)


def _digits_classifier(path):
    """A digits classifier for the evaluation comparison (plain cross-entropy, Adam, 150
    updates on images 0..1199; evaluated on 1400..1439), saved where the workers load it."""
    sklearn = pytest.importorskip("sklearn.datasets")
    from cdp_fast.models import SmallCNN

    d = sklearn.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    torch.manual_seed(0)
    m = SmallCNN(width=8, feature_dim=16)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        i = torch.randint(0, 1200, (64,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x[i]), y[i]).backward()
        opt.step()
    torch.save({"ema": m.state_dict()}, path)
    return path


# Tolerance of the 1-vs-2-process comparison. The two runs compute the same global batch
# with the same per-image randomness, but not in the same order: DDP averages two 16-image
# means where one process takes one 32-image mean, and the convolutions run on batches of
# 16 instead of 32, so fp32 sums are rounded differently (~1e-7 relative per operation).
# Six SGD updates and the sign() of the inner attack's gradient carry these differences
# into the losses; measured on this machine: relative differences of the losses 2.3e-7,
# EMA weights 1.9e-7 apart (bound 1e-4: a margin for a rare sign flip of a near-zero attack
# gradient component on other CPUs; still 1000x below the change of the loss over the six
# updates, ~2).
RTOL = 1e-4


@pytest.mark.slow
def test_ddp_trades_matches_one_process_resumes_across_world_sizes_and_evaluates(tmp_path):
    two = _launch(tmp_path, 2, "two", tmp_path / "two.pt", mid=tmp_path / "two-mid.pt")
    one = _launch(tmp_path, 1, "one", tmp_path / "one.pt", mid=tmp_path / "one-mid.pt")
    _wait(two, one)
    r0, r1, ref = _load(tmp_path, "two", 0), _load(tmp_path, "two", 1), _load(tmp_path, "one")

    # EMA (the returned weights) bitwise identical on both ranks.
    assert r0["world"] == 2 and r1["world"] == 2 and ref["world"] == 1
    for k, v in r0["ema"].items():
        assert torch.equal(v, r1["ema"][k]), k
    # Loss trajectory (one update per epoch) of 2 processes = 1 process within RTOL.
    assert len(ref["loss"]) == 6 and r0["loss"] == r1["loss"]
    np.testing.assert_allclose(r0["loss"], ref["loss"], rtol=RTOL)
    assert abs(ref["loss"][0] - ref["loss"][-1]) > 100 * RTOL * ref["loss"][0]   # it trains
    torch.testing.assert_close(r0["ema"], ref["ema"], rtol=RTOL, atol=RTOL)
    # Per-rank throughput gathered on every rank: 6 updates x 16 images each.
    assert [t["rank"] for t in r0["throughput"]] == [0, 1]
    assert all(t["images"] == 96 and t["images_per_s"] > 0 for t in r0["throughput"])
    assert ref["throughput"][0]["images"] == 192
    assert not list(tmp_path.glob(".*.tmp"))

    # Resume under another world size: 2 -> 1 and 1 -> 2 from the epoch-3 checkpoints; the
    # 2-process resume also evaluates the 1-process model on 2 processes.
    shutil.copy(tmp_path / "two-mid.pt", tmp_path / "c.pt")
    shutil.copy(tmp_path / "one-mid.pt", tmp_path / "d.pt")
    assert torch.load(tmp_path / "c.pt", weights_only=True)["epoch"] == 3
    clf = _digits_classifier(tmp_path / "clf.pt")
    c = _launch(tmp_path, 1, "c", tmp_path / "c.pt", evaluate_from=clf)
    d = _launch(tmp_path, 2, "d", tmp_path / "d.pt", evaluate_from=clf)
    _wait(c, d)
    rc, rd0, rd1 = _load(tmp_path, "c"), _load(tmp_path, "d", 0), _load(tmp_path, "d", 1)
    for run in (rc, rd0):
        np.testing.assert_allclose(run["loss"], ref["loss"], rtol=RTOL)
        torch.testing.assert_close(run["ema"], ref["ema"], rtol=RTOL, atol=RTOL)
        assert run["loss"][:3] == (r0 if run is rc else ref)["loss"][:3]   # from the checkpoint
    # A resumed run trains only the remaining 3 epochs.
    assert rd0["throughput"][0]["images"] == 3 * 16

    # evaluate: 2 processes (blocks of 16 points split over the ranks, counts all-reduced)
    # return exactly the 1-process accuracies, on both ranks.
    ev1, ev2a, ev2b = rc["eval"], rd0["eval"], rd1["eval"]
    assert ev2a == ev1 and ev2b == ev1, (ev1, ev2a, ev2b)
    assert set(ev1) == {"clean", "pgd", "autoattack"}
    assert ev1["autoattack"] <= ev1["pgd"] + 0.05 and ev1["pgd"] <= ev1["clean"]
    assert ev1["clean"] > 0.8 and ev1["pgd"] < ev1["clean"], ev1   # the attacks matter
    np.testing.assert_allclose(rd0["pgd_at_loss"], rc["pgd_at_loss"], rtol=RTOL)
    assert rd0["pgd_at_loss"] == rd1["pgd_at_loss"]
    for a, b in ((r0, r1), (rd0, rd1)):
        for recipe in ("gowal", "zhang"):
            for k, v in a[f"bn_ema_{recipe}"].items():
                assert torch.equal(v, b[f"bn_ema_{recipe}"][k]), (recipe, k)
            assert a[f"bn_ema_{recipe}"]["1.num_batches_tracked"] > 0
        assert a["bn_copied_gowal"] == [True] * 3          # update_bn at every epoch end
        assert a["bn_copied_zhang"] == [False] * 3         # averaged instead
    # SyncBatchNorm has no CPU implementation in torch: a clear ValueError, not a crash.
    assert "sync_bn" in (rd0["sync_bn_error"] or "")


# ----------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sampler_shares_are_disjoint_and_make_the_global_batch(world):
    n_real, n_syn, b = 23, 50, 12
    samplers = [MixedBatchSampler(n_real, n_syn, b, 0.25, 5, seed=7, rank=r, world_size=world)
                for r in range(world)]
    for epoch in (0, 1, 4):
        for s in samplers:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in samplers]
        ridx, sidx = epoch_indices(7, epoch, 5, n_real, n_syn, (3, 9))
        assert all(len(p) == 5 for p in per_rank)
        for i in range(5):
            shares = [p[i] for p in per_rank]
            assert all(len(sh) == b // world for sh in shares)
            merged = sorted(j for sh in shares for j in sh)
            assert merged == sorted(ridx[i].tolist() + (sidx[i] + n_real).tolist())
            glob = samplers[0].global_batches()[i]
            for r, sh in enumerate(shares):
                assert sh == glob[r::world].tolist()
    s = samplers[0]
    s.set_epoch(0)
    e0 = s.global_batches()
    s.set_epoch(1)
    assert not np.array_equal(e0, s.global_batches())          # a new order each epoch
    assert len(s) == 5


def test_sampler_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        MixedBatchSampler(10, 10, 10, 0.5, rank=0, world_size=4)
    with pytest.raises(ValueError, match="rank"):
        MixedBatchSampler(10, 10, 8, 0.5, rank=2, world_size=2)
    with pytest.raises(ValueError, match="real_fraction"):
        MixedBatchSampler(10, 0, 8, 0.0, rank=0, world_size=1)
    with pytest.raises(ValueError, match="epoch"):
        MixedBatchSampler(10, 0, 8, rank=0, world_size=1).set_epoch(-1)
    s = MixedBatchSampler(10, 0, 4, rank=0, world_size=1)     # real only: ceil(10 / 4) steps
    assert len(s) == 3 and all(max(b) < 10 for b in s)

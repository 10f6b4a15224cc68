"""benchmarks/throughput.py's FLOP count (the numerator of MFU) counts what ran: FLOPs of eager,
uncaptured runs extrapolated per step, so steps that a CUDA graph replays count as well. On CPU
a replay is simulated by an ε-model whose forward hides from dispatch modes (what a graph replay
is to ``FlopCounterMode``: one C++ call that never reaches the dispatcher)."""
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.flop_counter import FlopCounterMode

import cdp_fast
from cdp_fast.models import digits

ROOT = Path(__file__).resolve().parents[1]
STEPS, BATCH = 5, 4


@pytest.fixture(scope="module")
def tp():
    spec = importlib.util.spec_from_file_location("_throughput_mfu", ROOT / "benchmarks" / "throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sample(model, loss, steps, setup):
    kw = {}
    if loss is not None:
        kw = dict(setup[loss], features=setup["features"], form="anchors", guide_window=None, embedding=None)
    return cdp_fast.sample(model, BATCH, loss=loss, steps=steps, skip="uniform", image_shape=digits.IMAGE_SHAPE,
                           batch_size=BATCH, output="float", seed=0, device="cpu", compile=False, progress=False,
                           **kw)


class ReplayedAfterTwo(torch.nn.Module):
    """The digits ε-model as a captured run sees it: unless CDP_FAST_STEP_GRAPH=0 (uncaptured),
    every forward after the first two of a run (t rises again when a new run starts) is
    invisible to dispatch modes, as a CUDA-graph replay is."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls, self.last_t = 0, None

    def forward(self, x, t):
        t0 = float(t.reshape(-1)[0])
        if self.last_t is None or t0 > self.last_t:
            self.calls = 0
        self.calls, self.last_t = self.calls + 1, t0
        if os.environ.get("CDP_FAST_STEP_GRAPH") != "0" and self.calls > 2:
            with _disable_current_modes():
                return self.inner(x, t)
        return self.inner(x, t)


@pytest.mark.parametrize("loss", [None, "hnm"])
def test_counted_flops_equal_flop_counter_mode_on_the_uncaptured_run(tp, loss):
    """run_flops (counts at 2 and 3 steps, extrapolated) == the count of the whole 5-step eager
    run. The guided run is counted by FlopCounterMode without its module tracker: with it,
    torch.autograd.grad w.r.t. the guidance's leaf input raises (pytorch#131753); unguided the
    two modes agree."""
    setup = tp.build_digits(torch.device("cpu"))
    with tp.flop_counter() as fc:
        _sample(setup["model"], loss, STEPS, setup)
    whole = fc.get_total_flops()
    if loss is None:
        with FlopCounterMode(display=False) as plain:
            _sample(setup["model"], loss, STEPS, setup)
        assert plain.get_total_flops() == whole
    got = tp.run_flops(lambda k: (lambda: _sample(setup["model"], loss, k, setup)), STEPS)
    assert got["flops"] == whole > 0
    assert got["flops_counted_at_steps"] == [2, 3]


@pytest.mark.parametrize("method", ["ddim", "hnm"])
def test_benchmark_flops_do_not_depend_on_replayed_steps(tp, method, tmp_path, monkeypatch):
    """throughput.py --flops through warm_up on an ε-model whose later steps are 'replayed':
    the recorded FLOPs equal an uncaptured run's count, although a count of the timed run
    itself (what the benchmark did before) sees only two of the five steps' ε-model work."""
    real = tp.build_digits

    def build(device):
        s = real(device)
        s["model"] = ReplayedAfterTwo(s["model"])
        return s
    monkeypatch.setattr(tp, "build_digits", build)
    monkeypatch.delenv("CDP_FAST_STEP_GRAPH", raising=False)
    out = tmp_path / "tp.json"
    rc = tp.main(["--config", "digits", "--batch", str(BATCH), "--steps", str(STEPS), "--repeats", "1",
                  "--methods", method, "--compile", "false", "--flops", "--out", str(out)])
    assert rc == 0
    rec = json.loads(out.read_text())
    assert rec["complete"] and rec["flops_counting"]
    counted = rec["results"][method]["flops"]

    setup = build(torch.device("cpu"))
    loss = None if method == "ddim" else "hnm"
    monkeypatch.setenv("CDP_FAST_STEP_GRAPH", "0")          # uncaptured: every step visible
    with tp.flop_counter() as fc:
        _sample(setup["model"], loss, STEPS, setup)
    assert counted == fc.get_total_flops()
    monkeypatch.delenv("CDP_FAST_STEP_GRAPH")               # "captured": steps 3-5 hidden
    with tp.flop_counter() as seen:
        _sample(setup["model"], loss, STEPS, setup)
    assert seen.get_total_flops() < counted                  # the old way reads low


def test_flop_count_of_a_short_run_is_the_run_itself(tp):
    calls = []

    def make(k):
        def run():
            calls.append(k)
            a = torch.ones(3, 5)
            for _ in range(k):
                a @ torch.ones(5, 7)
        return run
    got = tp.run_flops(make, 3)
    assert calls == [3] and got["flops"] == 3 * 2 * 3 * 5 * 7 and got["flops_counted_at_steps"] == [3]

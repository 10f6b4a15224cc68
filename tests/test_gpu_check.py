"""scripts/gpu_check.sh (the project's one-command GPU validation) and its phase runner
scripts/gpu_phases.py, on CPU: without a CUDA device the script stops at once with exit status 2
and one line; the runner records every phase's status and key numbers as it goes, stops an
overrunning phase with SIGINT so pytest still writes its JUnit XML, and the summary reads
whatever partial results exist; the benchmarks keep a partial JSON when stopped mid-way; the
dry run walks every phase with stand-ins and times one out on purpose."""
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
FAST_PYTEST = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod          # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def gp():
    return _load("_gpu_phases_under_test", ROOT / "scripts" / "gpu_phases.py")


def _runner(gp, tmp_path, budget=60.0):
    return gp.Runner(tmp_path / "out", tmp_path / "work", budget, tag="t", dry_run=False)


def test_gpu_check_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU machine: the script would run")
def test_gpu_check_without_a_gpu_fails_clearly(tmp_path):
    res = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                         cwd=str(SCRIPT.parents[1]), timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], res.stderr


def test_phase_runner_records_each_phase_and_rewrites_the_summary(gp, tmp_path):
    r = _runner(gp, tmp_path)
    py = sys.executable
    phases = [gp.Phase("first", "exits 0", [py, "-c", "print('hello')"], cap_s=20),
              gp.Phase("second", "exits 3", [py, "-c", "import sys; sys.exit(3)"], cap_s=20),
              gp.Phase("third", "not wanted", lambda run: "a reason to skip", cap_s=20),
              gp.Phase("fourth", "needs more than the budget", [py, "-c", "pass"], cap_s=20, min_s=500),
              gp.Phase("fifth", "never reached", [py, "-c", "pass"], cap_s=20)]
    r.plan = [p.name for p in phases]
    seen = []
    for ph in phases[:4]:
        r.run(ph)
        seen.append(json.loads((r.out / "summary.json").read_text()))   # rewritten after every phase
    assert [s["timeline"][-1]["status"] for s in seen] == ["ok", "failed", "skipped", "skipped"]
    s = seen[-1]
    assert s["ran"] == ["first", "second"] and s["failed"] == ["second"] and s["not_reached"] == ["fifth"]
    assert s["phases"][2]["reason"] == "a reason to skip" and "budget" in s["phases"][3]["reason"]
    first = s["phases"][0]
    assert first["rc"] == 0 and first["wall_s"] >= 0 and first["start_s"] <= first["end_s"]
    assert "hello" in (r.out / "run.log").read_text()
    text = (r.out / "summary.txt").read_text()
    assert "not reached: fifth" in text and re.search(r"second\s.*failed", text)


def test_a_timed_out_pytest_phase_gets_sigint_and_writes_its_junit_xml(gp, tmp_path):
    """The phase overruns its cap: SIGINT first (even when the runner itself ignores SIGINT, as
    a background job does), pytest stops the hanging test and writes the XML with the test
    that passed; nothing is left running in the phase's process group."""
    tests = tmp_path / "t"
    tests.mkdir()
    (tests / "pytest.ini").write_text("[pytest]\n")
    (tests / "test_hang.py").write_text("import time\n\ndef test_quick():\n    pass\n\n"
                                        "def test_hangs():\n    time.sleep(600)\n")
    r = _runner(gp, tmp_path)
    junit = r.out / "tests.xml"
    cmd = gp._pytest([str(tests / "test_hang.py")], junit, ["--rootdir", str(tests), "-c", str(tests / "pytest.ini")])
    ph = gp.Phase("tests", "hangs", cmd, cap_s=4, min_s=1, grace_s=20, log="tests.log", kind="pytest", results=junit,
                  env=FAST_PYTEST)
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rec = r.run(ph)
    finally:
        signal.signal(signal.SIGINT, old)
    assert rec["status"] == "timeout" and rec["stopped_by"] == "SIGINT", rec
    assert rec["wall_s"] < 4 + 20
    assert junit.is_file()
    key = rec["key"]
    assert key["source"] == "junit" and key["passed"] == 1 and key["interrupted"] == 1 and key["failed"] == 0
    assert "test_quick PASSED" in (r.out / "tests.log").read_text()
    with pytest.raises(ProcessLookupError):
        os.killpg(rec["pgid"], 0)


def test_pytest_counts_from_the_verbose_log_when_no_xml_came(gp, tmp_path):
    log = tmp_path / "tests.log"
    log.write_text("noise\n"
                   "tests/a.py::test_x PASSED                                [ 25%]\n"
                   "[gw1] [ 50%] FAILED tests/b.py::test_y[1-2]\n"
                   "[gw0] [ 75%] SKIPPED tests/c.py::test_z\n"
                   "tests/d.py::test_w ERROR\n"
                   "FAILED tests/b.py::test_y[1-2] - assert 1 == 2\n")
    got = gp.log_counts(log, [0, log.stat().st_size])
    assert (got["passed"], got["failed"], got["skipped"], got["error"]) == (1, 1, 1, 1)
    ph = gp.Phase("tests", "", [], 1, kind="pytest", results=tmp_path / "missing.xml")
    assert gp.key_numbers(ph, {"log_path": str(log), "log_span": [0, log.stat().st_size]})["tests"] == 4


def test_the_summary_reads_partial_results(gp, tmp_path):
    """The runner was killed during the kernel phase: `summarize` re-reads the partial JSONs,
    names the phase that was running and those never reached, and states the goals it can."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "throughput-cifar-h100.json").write_text(json.dumps({
        "complete": False, "stage": "rounds of group 2/2", "config": {"name": "cifar"},
        "results": {"hnm": {"warmup_s": 80.0, "times_s": [1.0, 1.1], "median_s": 1.05, "images_per_s": 487.6,
                            "flops": 9e14, "mfu": 0.41, "mfu_peak": "bf16", "mfu_met": False},
                    "ref-hnm": {"warmup_s": 6.0, "times_s": [4.0, 4.2], "median_s": 4.1, "images_per_s": 124.9},
                    "ddim": {"warmup_s": 40.0, "times_s": []}},
        "ratios": [{"method": "hnm", "yardstick": "ref-hnm", "speedup": 3.9, "speedup_min": 3.8, "speedup_max": 4.0,
                    "goal": 3.0, "met": True, "max_abs_diff": 0.01}]}))
    (out / "kernels-h100.json").write_text(json.dumps({
        "complete": False, "ceilings": {"matmul_bfloat16_TFLOPs": 700.0},
        "results": [{"op": "hnm_loss", "provider": "fused", "m": 65536, "N": 65536, "d": 640, "bank": False,
                     "dtype": "bfloat16", "median_ms": 40.0, "TFLOPs": 412.0, "fraction_of_matmul_ceiling": 0.59}]}))
    recs = [{"name": "env", "kind": "json", "status": "ok", "start_s": 0, "end_s": 9},
            {"name": "throughput", "kind": "throughput", "status": "timeout", "start_s": 9, "end_s": 180,
             "results_file": str(out / "throughput-cifar-h100.json")},
            {"name": "kernels_goal", "kind": "kernels", "status": "running", "start_s": 180, "rows_before": 0,
             "results_file": str(out / "kernels-h100.json")}]
    (out / "summary.json").write_text(json.dumps({"budget_s": 465, "tag": "h100", "dry_run": False, "elapsed_s": 200,
                                                  "plan": ["env", "throughput", "kernels_goal", "probe"],
                                                  "phases": recs, "finished": False}))
    assert gp.main(["summarize", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["timed_out"] == ["throughput"] and s["running"] == ["kernels_goal"] and s["not_reached"] == ["probe"]
    tp = s["phases"][1]["key"]
    assert tp["complete"] is False and tp["methods"]["hnm"]["rounds"] == 2 and tp["methods"]["ddim"]["rounds"] == 0
    assert s["phases"][2]["key"]["rows"][0]["median_ms"] == 40.0
    text = (out / "summary.txt").read_text()
    assert "PARTIAL" in text and "NOT finished" in text
    assert "GOAL hnm/ref-hnm >= 3.0x: 3.90x -> met" in text
    assert "GOAL hnm MFU >= 60% of the bf16 peak: 41.0% -> MISSED" in text
    assert "within 2x of the matmul roofline: 59.0% of ceiling -> met" in text


@pytest.mark.slow
def test_kernel_benchmark_killed_mid_way_leaves_its_rows(tmp_path):
    """benchmarks/kernels.py rewrites its JSON after every row: SIGKILL after the first row
    leaves a valid JSON with that row, marked incomplete."""
    out = tmp_path / "k.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--only", "loss",
                             "--providers", "eager", "--threads", "1", "--shapes", ",".join(["16:-:8"] * 40),
                             "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        rows = []
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                rows = json.loads(out.read_text())["results"]
            except (OSError, ValueError, KeyError):
                rows = []
            if rows:
                break
            time.sleep(0.05)
        assert rows, proc.stderr.read().decode() if proc.poll() is not None else "no row within 90 s"
    finally:
        proc.kill()
        proc.wait()
    rec = json.loads(out.read_text())
    assert rec["complete"] is False and 1 <= len(rec["results"]) < 40
    row = rec["results"][0]
    assert row["op"] == "hnm_loss" and row["m"] == 16 and row["N"] == 16 and row["median_ms"] > 0
    assert "fraction_of_matmul_ceiling" in row and rec["ceilings"]["bandwidth_GBps"] > 0


def test_kernel_benchmark_appends_to_one_file(tmp_path, monkeypatch):
    kb = _load("_kernels_under_test", ROOT / "benchmarks" / "kernels.py")
    # the timing itself is not under test here (the kill test above runs it for real)
    monkeypatch.setattr(kb.harness, "measure_ceilings",
                        lambda device, quick=True: {"bandwidth_GBps": 10.0, "matmul_float32_TFLOPs": 0.1})
    monkeypatch.setattr(kb.harness, "bench", lambda fn, **kw: (fn(), {"median_ms": 1.0, "peak_mem_bytes": 0})[1])
    out = tmp_path / "k.json"
    assert kb.main(["--only", "loss", "--providers", "eager", "--threads", "1", "--shapes", "8:-:4",
                    "--out", str(out)]) == 0
    assert kb.main(["--only", "loss", "--providers", "eager", "--threads", "1", "--shapes", "8:12:4",
                    "--out", str(out), "--append"]) == 0
    rec = json.loads(out.read_text())
    assert [r["N"] for r in rec["results"]] == [8, 12] and len(rec["runs"]) == 2 and rec["complete"]
    assert kb.parse_shapes("65536:-:640,4096:1000000:640") == [(65536, None, 640), (4096, 1000000, 640)]
    with pytest.raises(ValueError):
        kb.parse_shapes("1:2")


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_throughput_stopped_mid_way_keeps_what_it_measured(tmp_path, monkeypatch, how):
    """benchmarks/throughput.py writes its JSON after every warm-up and round; stopped during
    the second group's warm-up (KeyboardInterrupt, or SIGTERM turned into one) it keeps the
    first group's timings and ratio and says where it stopped."""
    tp = _load("_throughput_under_test_gc", ROOT / "benchmarks" / "throughput.py")
    import torch

    def warm_up(method, setup, args, device, x_T):
        if method == "diffusers":
            if how == "SIGINT":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)     # the handler raises here
        x0 = torch.zeros(2, 3) + (0.5 if method == "hnm" else 0.0)
        return (lambda: None), {"warmup_s": 1.0, "peak_mem_mib": 1.0, "x0": x0, "times_s": []}
    monkeypatch.setattr(tp, "warm_up", warm_up)
    out = tmp_path / "tp.json"
    rc = tp.main(["--config", "digits", "--batch", "2", "--steps", "2", "--repeats", "2", "--no-flops",
                  "--methods", "hnm,ref-hnm;ddim,diffusers", "--out", str(out)])
    assert rc == 130
    rec = json.loads(out.read_text())
    assert rec["complete"] is False and rec["interrupted"] is True and rec["stage"] == "warm-up diffusers"
    assert len(rec["results"]["hnm"]["times_s"]) == 2 and rec["results"]["ddim"]["times_s"] == []
    (q,) = rec["ratios"]
    assert (q["method"], q["yardstick"], q["rounds"], q["max_abs_diff"]) == ("hnm", "ref-hnm", 2, 0.5)
    assert signal.getsignal(signal.SIGTERM) is not tp._raise_stopped      # restored


def test_real_plan_orders_phases_by_value(gp, tmp_path):
    r = _runner(gp, tmp_path)
    phases = gp.real_plan(r)
    names = [p.name for p in phases]
    assert names[:6] == ["env", "build", "ext_check", "tests", "throughput", "kernels_goal"]
    assert names.index("tests_autotune") > names.index("kernels_goal")
    by = {p.name: p for p in phases}
    assert by["build"].cmd[-2:] == ["build_ext", "--inplace"] and by["build"].cap_s <= 150
    assert "ext-check" in by["ext_check"].cmd                # imports _C, never load_extension()
    (r.work / "ext.json").write_text(json.dumps({"ext_loaded": False}))
    cmd = by["tests"].cmd(r)
    assert "tests/ops/test_pgd_step.py" not in cmd and r.extra_env["CDP_FAST_PGD_IMPL"] == "composite"
    assert "-v" in cmd and "--durations=25" in cmd and any(c.startswith("--junitxml=") for c in cmd)
    assert cmd[cmd.index("-k") + 1] == f"not ({gp.AUTOTUNE_K})"
    # the cheap phases' minimum times fit the budget with room for the throughput phase
    assert sum(p.min_s for p in phases[:4]) + by["throughput"].cap_s < 465


@pytest.mark.slow
def test_the_split_of_the_gpu_tests_keeps_the_autotune_sweep_apart(gp):
    """The -k expressions of the tests and tests_autotune phases, as pytest reads them."""
    def collect(k):
        res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              "-m", "gpu", "-k", k, *gp.GPU_TEST_FILES], capture_output=True, text=True,
                             cwd=str(ROOT), timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        return [ln for ln in res.stdout.splitlines() if "::" in ln]
    fast = collect(f"not ({gp.AUTOTUNE_K})")
    assert {ln.split("::")[0] for ln in fast} == set(gp.GPU_TEST_FILES)
    assert not [ln for ln in fast if "autotune" in ln or ("test_contrastive" in ln and ln.endswith("-1]"))]
    assert any(ln.endswith("-0]") for ln in fast)


@pytest.mark.slow
def test_dry_run_walks_every_phase_and_keeps_what_came_before_the_timeout(tmp_path):
    out = tmp_path / "out"
    t = time.monotonic()
    res = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True,
                         cwd=str(ROOT), timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert time.monotonic() - t < 120
    s = json.loads((out / "summary.json").read_text())
    assert s["dry_run"] and s["finished"] and s["timed_out"] == ["throughput"] and s["not_reached"] == []
    plan = s["plan"]
    assert plan[:6] == ["env", "build", "ext_check", "tests", "throughput", "kernels_goal"]
    by = {p["name"]: p for p in s["phases"]}
    for name in plan[:plan.index("throughput")]:
        assert by[name]["status"] == "ok" and by[name]["end_s"] <= by["throughput"]["start_s"]
    assert by["tests"]["key"]["passed"] == 2 and by["tests_autotune"]["status"] == "failed"
    tp = by["throughput"]["key"]
    assert by["throughput"]["stopped_by"] == "SIGINT" and tp["complete"] is False and list(tp["methods"]) == ["hnm"]
    assert json.loads((out / "throughput-dry-dry.json").read_text())["interrupted"] is True
    assert len(by["kernels_autotune"]["key"]["rows"]) == 1 and by["kernels_autotune"]["status"] == "ok"
    text = (out / "summary.txt").read_text()
    assert "timed out: throughput" in text and "DRY RUN" in text and "timed out: throughput" in res.stdout
    # what the device tool returns: <= 8 files, names of letters, digits, '.', '_', '-', <= 2 folders down
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) and len(p.relative_to(out).parts) <= 3 for p in files)


def test_first_phase_risk_checks_run_on_the_cpu_stand_ins(gp):
    """The env phase's checks of what reading could not settle (issue 25, item 5), run here
    through the Triton interpreter and the step graph's CPU stand-in: each line says "ok" —
    the NaN rule agrees between the kernels and the torch path, a lowered GRID_Y_MAX gives
    bitwise the same gradients, and three sample() calls capture the step once (the check
    turns the step graph on itself: without it, "auto" never captures when not compiling)."""
    import torch

    from cdp_fast.sampling import graphs

    graphs.clear_cache()
    try:
        res = gp._risk_checks(torch, "cpu")
    finally:
        graphs.clear_cache()
    for key in ("contrastive_nan_rule", "grid_y_split", "step_graph_captures_3_calls"):
        assert res[key].startswith("ok"), (key, res[key])
    assert "captured per call [1, 0, 0]" in res["step_graph_captures_3_calls"]

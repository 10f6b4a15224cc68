"""benchmarks/million.py end to end at toy size: the run streams to shards, records its wall time,
timeline and peak RSS, and the JSON says which solver / NFE / spacing it used."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_million_script_at_toy_size(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("million", ROOT / "benchmarks" / "million.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(mod, "CHUNK", 16)
    out, js = tmp_path / "gen", tmp_path / "m.json"
    mod.main(["--n", "384", "--nfe", "5", "--out", str(out), "--json", str(js), "--no-reference"])
    rec = json.loads(js.read_text())
    assert rec["written"] == 384 and rec["shards"] >= 1 and rec["nfe_recorded"] == 5
    assert (rec["solver"], rec["skip"]) == ("dpmpp_2m", "logsnr")
    assert rec["wall_s"] > 0 and rec["peak_rss_mb"] > 0 and rec["timeline"][-1]["rows"] == 384
    with pytest.raises(SystemExit):
        mod.main(["--n", "10", "--out", str(out), "--json", str(js)])

"""tools/census.py: one forked child per model type, every outcome recorded (a timeout too), and the report."""

import importlib.util
import json
import time
from pathlib import Path

_spec = importlib.util.spec_from_file_location("census", Path(__file__).resolve().parents[1] / "tools" / "census.py")
census = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(census)


def test_census_records_verified_partial_and_not_built_and_writes_the_report(tmp_path):
    work, docs = tmp_path / "work", tmp_path / "docs"
    only = ["llama", "gpt_oss", "mpt", "no_such_type"]
    assert census.main(["--only", *only, "--work", str(work), "--docs", str(docs)]) == 0
    results = {r["model_type"]: r for r in json.loads((docs / "census.json").read_text())["results"]}
    llama, gpt_oss, mpt = results["llama"], results["gpt_oss"], results["mpt"]
    assert llama["status"] == "verified" and llama["round_trip_rel"] <= 1e-5 and llama["trainable"] > 0
    assert gpt_oss["status"] == "verified" and len(gpt_oss["ratios"]) == 4  # its experts train too
    assert mpt["status"] == "partial" and set(mpt["ratios"]) == {"u_ratio", "d_ratio"}
    assert [f["name"] for f in mpt["frozen"]] == ["transformer.blocks.0.attn", "transformer.blocks.1.attn"]
    assert results["no_such_type"]["status"] == "not built"
    text = (docs / "CENSUS.md").read_text()
    assert "| verified | 2 |" in text and "| partial | 1 |" in text and "ALiBi / relative position bias" in text
    # resumable: a second run does not redo finished types
    before = (work / "llama.json").stat().st_mtime_ns
    census.main(["--only", "llama", "--work", str(work), "--docs", str(docs)])
    assert (work / "llama.json").stat().st_mtime_ns == before


def test_a_child_that_runs_out_of_time_is_recorded_as_a_crash(tmp_path, monkeypatch):
    def stuck(model_type, progress=None):
        progress("train")
        time.sleep(60)

    monkeypatch.setattr(census, "census_one", stuck)
    result = census.run_one("llama", tmp_path, timeout=3, memory_gb=8)
    assert {k: v for k, v in result.items() if k != "code"} == {
        "model_type": "llama",
        "status": "crash",
        "stage": "train",
        "reason": "timeout after 3s",
    }
    assert json.loads((tmp_path / "llama.json").read_text()) == result

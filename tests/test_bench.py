"""Smoke tests of the benchmark harness: mode construction, matched LoRA rank, JSON schema, targets, plots.

No wall-time assertions: timings are measured by tools/bench.py, never judged inside pytest.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # benchmarks/ is a repo folder, not an installed package

from benchmarks import plots  # noqa: E402
from benchmarks import report as rp  # noqa: E402
from benchmarks import step_profile as pf  # noqa: E402
from benchmarks import train_suite as ts  # noqa: E402


@pytest.fixture(scope="module")
def cfg():
    return ts.get_config("tiny", steps=1, warmup=1)


def _expected_s2ft_count(c: dict) -> int:
    m = c["model"]
    head_dim = m["hidden_size"] // m["num_attention_heads"]
    k_heads = max(1, round(c["o_ratio"] * m["num_attention_heads"]))
    k_ch = max(1, round(c["d_ratio"] * m["intermediate_size"]))
    return m["num_hidden_layers"] * m["hidden_size"] * (k_heads * head_dim + k_ch)


def test_frozen_mode_has_no_trainable_params_but_input_grads(cfg):
    b = ts.setup_mode("frozen", cfg, "cpu")
    assert b.params == [] and b.info["trainable_params"] == 0
    assert not any(p.requires_grad for p in b.model.parameters())
    seen = {}

    def hook(module, inputs, output):
        seen["rg"] = output.requires_grad

    b.model.get_input_embeddings().register_forward_hook(hook)
    ids = torch.randint(0, cfg["model"]["vocab_size"], (1, 8))
    loss = b.model(input_ids=ids, labels=ids).loss
    assert seen["rg"] and loss.requires_grad  # the full input-gradient backward will run
    before = {n: p.clone() for n, p in b.model.named_parameters()}
    ts.make_step(b, ids)()
    for n, p in b.model.named_parameters():
        assert p.grad is None and torch.equal(p, before[n])


@pytest.mark.parametrize("slices", ["planner", "hand"])
def test_s2ft_and_full_trainable_counts(cfg, slices):
    s2 = ts.setup_mode("s2ft", {**cfg, "slices": slices}, "cpu")
    assert s2.info["slices"] == slices
    assert s2.info["trainable_params"] == _expected_s2ft_count(cfg)  # the same budget either way
    if slices == "planner":  # real surgery: the model is permuted by a verified plan
        from surgery.planner import applied_plan

        assert applied_plan(s2.model).certificate["passed"]
    with pytest.raises(ValueError, match="use 'planner' or 'hand'"):
        ts.setup_mode("s2ft", {**cfg, "slices": "auto"}, "cpu")
    full = ts.setup_mode("full", cfg, "cpu")
    assert full.info["trainable_params"] == full.info["total_params"]


@pytest.mark.parametrize("mode", ["lora", "lora_all"])
def test_lora_rank_matched_to_s2ft_count(cfg, mode):
    b = ts.setup_mode(mode, cfg, "cpu")
    info = b.info
    target = _expected_s2ft_count(cfg)
    assert info["s2ft_count_matched"] == target
    assert info["trainable_params"] == info["lora_rank"] * info["lora_params_per_rank"]
    # The rank is the nearest to the S²FT count (or 1 when even rank 1 trains more).
    assert abs(info["trainable_params"] - target) <= info["lora_params_per_rank"] / 2 or info["lora_rank"] == 1
    names = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in b.model.named_parameters() if p.requires_grad}
    expected = set(ts.LORA_TARGETS) | ({"o_proj", "gate_proj"} if mode == "lora_all" else set())
    assert names == expected


def test_inplace_baseline_trains_exactly_like_s2ft(cfg):
    """The reference code's design (blocks trained inside W) must train the same function as our delta layers,
    so the step benchmark compares two implementations of one computation."""
    from s2ft_lightning.layers import uninstall

    ours, theirs = ts.setup_mode("s2ft", cfg, "cpu"), ts.setup_mode("inplace", cfg, "cpu")
    assert theirs.info["trainable_params"] == ours.info["trainable_params"] == _expected_s2ft_count(cfg)
    frozen = {n: p.detach().clone() for n, p in theirs.model.named_parameters() if not p.requires_grad}
    ids = torch.randint(0, cfg["model"]["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))
    steps = [ts.make_step(b, ids) for b in (ours, theirs)]
    for _ in range(3):
        a, b = (float(s()) for s in steps)
        assert a == pytest.approx(b, rel=1e-5)
    uninstall(ours.model, merge=True)  # our deltas folded into the weights: the trained stock model
    trained = {n: p for n, p in ours.model.named_parameters()}
    moved = 0
    for n, before in frozen.items():
        now = theirs.model.get_parameter(n).detach()
        assert torch.allclose(now, trained[n].detach(), rtol=1e-5, atol=1e-6), n
        moved += int(not torch.equal(now, before))  # the optimizer wrote the blocks into the frozen weights
    assert moved == 2 * cfg["model"]["num_hidden_layers"]  # every o_proj and down_proj


def test_moe_config_trains_the_same_expert_weights_in_s2ft_and_lora():
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                 intermediate_size=48, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
                 vocab_size=128)  # fmt: skip
    c = ts.get_config("moe-small", model=small, seqs=[8], steps=1, warmup=1)
    s2 = ts.setup_mode("s2ft", c, "cpu")
    k = max(1, round(c["d_ratio"] * 64))
    assert s2.info["trainable_params"] == 2 * 4 * k * 32  # Down columns of every expert of both layers
    lora = ts.setup_mode("lora", c, "cpu")
    info = lora.info
    assert info["lora_params_per_rank"] == 2 * 4 * (64 + 32) and info["s2ft_count_matched"] == 2 * 4 * k * 32
    assert info["trainable_params"] == info["lora_rank"] * info["lora_params_per_rank"]
    trained = {n for n, p in lora.model.named_parameters() if p.requires_grad}
    assert trained and all(".mlp.experts.lora_" in n for n in trained)
    ids = torch.randint(0, 128, (1, 8))
    for b in (s2, lora):
        assert torch.isfinite(torch.tensor(ts.make_step(b, ids)()))


def test_suite_writes_json_table_and_plot(cfg, tmp_path):
    c = dict(cfg, modes=["frozen", "s2ft", "lora"], seqs=[8, 16])
    seen = []
    runs = ts.run_suite(c, isolate=False, on_result=lambda r: seen.append(len(r)), log=lambda s: None)
    assert seen == [2, 4, 6]  # partial results are offered after each mode
    assert [(r["mode"], r["seq"]) for r in runs] == [(m, s) for m in c["modes"] for s in (8, 16)]
    path = rp.write_json(rp.result_document(c, runs, "off"), tmp_path / "train-tiny.json")
    doc = json.loads(path.read_text())
    assert doc["suite"] == "train" and doc["schema_version"] == rp.SCHEMA_VERSION
    assert doc["machine"]["cpu"] and doc["machine"]["cpu_count"] >= 1
    assert {"torch", "transformers", "peft", "triton"} <= set(doc["versions"])
    assert doc["git"]["commit"]
    assert doc["config"]["name"] == "tiny"
    for r in doc["runs"]:
        assert r["status"] == "ok", r.get("error")
        for k in (
            "mode",
            "compiled",
            "seq",
            "step_ms",
            "step_ms_all",
            "tokens_per_s",
            "peak_mib",
            "trainable_params",
        ):
            assert k in r
        assert len(r["step_ms_all"]) == len(r["cpu_ms_all"]) == c["steps"] and r["cpu_ms"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / (r["step_ms"] / 1e3), rel=1e-2)
    assert all({"target", "value", "limit", "passed"} <= set(t) for t in doc["targets"])
    table = rp.markdown_table(doc["runs"]).splitlines()
    assert len(table) == 2 + len(runs) and "x frozen" in table[0]
    pngs = plots.plot_file(path, tmp_path / "png")
    assert [p.name for p in pngs] == ["train-tiny.png", "train-tiny-growth.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_harness_runs_at_the_configs_threads_and_restores_the_callers(cfg, monkeypatch):
    """A config's thread count applies to its own run only; what runs next in the process keeps the caller's."""
    assert cfg["threads"] == 1
    torch.set_num_threads(3)  # the autouse fixture in conftest.py restores pytest's count afterwards
    seen = []
    setup = ts.setup_mode
    monkeypatch.setattr(ts, "setup_mode", lambda *a, **k: seen.append(torch.get_num_threads()) or setup(*a, **k))
    assert ts.measure("frozen", cfg, False, [8], "cpu")[0]["status"] == "ok"
    assert torch.get_num_threads() == 3
    pf.profile_mode("frozen", dict(cfg, seqs=[8]), steps=1, warmup=1)
    assert torch.get_num_threads() == 3 and seen == [1, 1]


def test_isolated_run_reports_fresh_process_rss(cfg):
    r = ts.run_isolated("frozen", cfg, False, 8, "cpu", timeout_s=240)
    assert r["status"] == "ok", r.get("error")
    assert r["peak_mib"] >= r["rss_after_build_mib"] >= r["rss_start_mib"] > 0
    assert r["peak_over_build_mib"] == pytest.approx(r["peak_mib"] - r["rss_after_build_mib"], abs=0.2)


def _run(mode, ms, peak, compiled=False, seq=512, **kw):
    return dict(mode=mode, compiled=compiled, seq=seq, tokens=seq, status="ok", step_ms=ms, peak_mib=peak, **kw)


def test_targets_are_data_with_pass_fail_and_missing():
    cpu = ts.get_config("cpu-small")
    runs = [
        _run(m, 9, peak, cpu_ms=ms)
        for m, ms, peak in (("frozen", 100, 1000), ("s2ft", 105, 700), ("lora", 200, 1000), ("full", 150, 2000))
    ]
    t = {x["target"]: x for x in rp.evaluate_targets(cpu, runs)}
    assert t["s2ft step CPU time / frozen's (eager)"]["value"] == pytest.approx(1.05)
    assert t["s2ft step CPU time / frozen's (eager)"]["passed"] is True
    assert t["s2ft step CPU time / full's (eager)"]["passed"] is False  # 0.7 > 0.6
    assert t["s2ft step wall time / full's (eager)"]["value"] == 1.0  # wall ratios: info only
    assert t["s2ft step wall time / full's (eager)"]["passed"] is None
    assert t["s2ft peak RSS / lora peak RSS (eager)"]["passed"] is True
    gpu = ts.get_config("gpu-7b")
    runs = [_run("frozen", 90, 15000), _run("s2ft", 95, 15400, trainable_bytes=60 * 2**20)]
    runs += [_run("frozen", 36, 14000, True), _run("s2ft", 40, 14500, True)]  # no compiled LoRA run
    t = {x["target"]: x for x in rp.evaluate_targets(gpu, runs)}
    assert t["s2ft step / frozen step (compiled)"]["passed"] is True
    assert t["s2ft step / lora step (compiled)"]["passed"] is None
    mem = next(v for k, v in t.items() if k.startswith("s2ft peak <="))
    assert mem["passed"] is True and mem["limit"] == "<= 15496"  # 15000 + 4*60 + 256


def test_sweep_target_compares_memory_slopes():
    sweep = ts.get_config("sweep")
    runs = [_run("frozen", 1, 1000 + 2 * s, seq=s) for s in (512, 1024, 2048)]
    runs += [_run("s2ft", 1, 1200 + 2.04 * s, seq=s) for s in (512, 1024, 2048)]
    runs += [_run("lora", 1, 1300 + 3 * s, seq=s) for s in (512, 1024, 2048)]
    t = rp.evaluate_targets(sweep, runs)
    assert t[0]["value"] == pytest.approx(1.02) and t[0]["passed"] is True
    assert t[1]["value"] == pytest.approx(0.68)


def test_combine_rounds_keeps_fastest_and_median_peak():
    rounds = [_run("s2ft", 12, 700), _run("s2ft", 10, 720), dict(_run("s2ft", 1, 1), status="error")]
    best = ts.combine_rounds(rounds)
    assert best["step_ms"] == 10 and best["peak_mib"] == 710 and best["rounds"] == 3
    by_cpu = ts.combine_rounds([_run("s2ft", 12, 700, cpu_ms=5), _run("s2ft", 10, 720, cpu_ms=6)])
    assert by_cpu["cpu_ms"] == 5 and by_cpu["step_ms"] == 10  # each time from its least disturbed round
    assert by_cpu["tokens_per_s"] == pytest.approx(by_cpu["tokens"] / 0.010)


def test_bad_inputs_raise_clear_errors(cfg, monkeypatch):
    with pytest.raises(ValueError, match="unknown benchmark config 'nope'"):
        ts.get_config("nope")
    with pytest.raises(ValueError, match="unknown mode"):
        ts.get_config("tiny", modes=["frozen", "dora"])
    with pytest.raises(ValueError, match="unknown config override"):
        ts.get_config("tiny", stepz=3)
    with pytest.raises(ValueError, match="unknown mode"):
        ts.setup_mode("dora", cfg, "cpu")
    with pytest.raises(ValueError, match="compile_mode"):
        ts.run_suite(cfg, "sometimes")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        ts.run_suite(ts.get_config("gpu-7b"))


def test_cli_rejects_unknown_config_and_empty_plot(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import bench
    finally:
        sys.path.remove(str(REPO / "tools"))
    with pytest.raises(SystemExit):
        bench.main(["train", "--config", "nope"])
    assert "invalid choice" in capsys.readouterr().err
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"suite": "serve"}))
    with pytest.raises(ValueError, match="not a train result"):
        bench.main(["plot", str(bad)])


def test_adapter_targets_from_bench_adapters_results():
    sys.path.insert(0, str(REPO / "tools"))
    try:
        import bench
    finally:
        sys.path.remove(str(REPO / "tools"))
    (sw,) = bench.adapter_targets("switch", {"s2ft_switch_ms": 2.0, "peft_switch_ms": 12.0})
    assert sw["value"] == 6.0 and sw["passed"] is True
    serve = {"serving": {"seq": 128, "s2ft_over_base": 1.2, "peft_over_base": 1.5}}
    got = bench.adapter_targets("serve", serve)
    assert [t["passed"] for t in got] == [False, None] and got[0]["value"] == 1.2


def test_profile_breaks_steps_into_phases_and_memory_parts(cfg, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_cli", REPO / "tools" / "bench.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = tmp_path / "profile.json"
    assert cli.main(["profile", "--config", "tiny", "--modes", "frozen", "s2ft", "full", "lora", "--steps", "1",
                     "--out", str(out)]) == 0  # fmt: skip
    doc = json.loads(out.read_text())
    rows = {r["mode"]: r for r in doc["results"]}
    assert doc["suite"] == "profile" and set(rows) == {"frozen", "s2ft", "full", "lora"} and "machine" in doc
    for r in rows.values():
        assert set(r["ms"]) == set(pf.PHASES) and all(set(k) == set(pf.KINDS) for k in r["ms"].values())
        assert r["ms"]["forward"]["matmul"] > 0 and r["ms"]["backward"]["matmul"] > 0  # ops charged to phases
        assert r["top_ops_ms"] and r["saved_activations_mib"] > 0
    ops = ("matmul", "attention", "other")  # "python" is the phase's own overhead, present even with no optimizer
    assert sum(rows["frozen"]["ms"]["optimizer"][k] for k in ops) == 0 < rows["s2ft"]["ms"]["optimizer"]["other"]
    full = rows["full"]
    assert full["trainable_mib"] == pytest.approx(full["trainable_params"] * 4 / 2**20, abs=0.01)
    for r in rows.values():  # AdamW keeps two fp32 moments per trainable weight
        assert r["adamw_state_mib"] == pytest.approx(2 * r["trainable_mib"], abs=0.02)
    # LoRA saves its adapters' inputs and rank-r intermediates on top of what the frozen floor saves
    assert rows["lora"]["saved_activations_mib"] > rows["frozen"]["saved_activations_mib"]


def test_profile_charges_other_thread_ops_by_time():
    from types import SimpleNamespace as NS

    marks = [(0.0, 10.0, "forward"), (10.0, 30.0, "backward")]
    on_other_thread = NS(cpu_parent=None, time_range=NS(start=12.0))  # e.g. CUDA's autograd device thread
    assert pf.phase_of(on_other_thread, marks) == "backward"
    nested = NS(cpu_parent=NS(name="s2ft_phase:optimizer", cpu_parent=None), time_range=NS(start=12.0))
    assert pf.phase_of(nested, marks) == "optimizer"  # an enclosing mark wins over the time rule
    assert pf.phase_of(NS(cpu_parent=None, time_range=NS(start=31.0)), marks) is None


# ---------------------------------------------------------------------------------------------- long context


def test_long_context_sweep_records_every_series_and_point(tmp_path):
    from benchmarks import long_context as lc

    c = lc.get_config("long-context-tiny", modes=["frozen", "s2ft-chunked"], seqs=[16, 8], isolate=False)
    c["checkpointing"] = [False, True, "transformers"]
    runs = lc.run_sweep(c, log=lambda s: None)
    got = [(r["mode"], lc.setting(r), r["seq"]) for r in runs]
    assert lc.series(c)[-1] == ("s2ft-chunked", "transformers") and len(lc.series(c)) == 5  # frozen: once with
    assert got == [(m, ck, s) for m, ck in lc.series(c) for s in (8, 16)]
    for r in runs:
        assert r["status"] == "ok", r.get("error")
        assert {"mode", "seq", "checkpointing", "peak_mib", "step_ms", "loss_path"} <= set(r)
        assert r["loss_path"] == ("chunked" if r["mode"] == "s2ft-chunked" else "stock")
    impl = {(r["mode"], lc.setting(r)): r.get("checkpointing_impl") for r in runs}
    assert impl[("s2ft-chunked", True)] == "s2ft" and impl[("s2ft-chunked", "transformers")] == "transformers"
    assert impl[("frozen", True)] == "transformers" and impl[("frozen", False)] is None
    doc = lc.result_document(c, runs)
    assert doc["targets"][0]["note"].startswith("CPU points shared a process")  # --no-isolate: no memory targets
    path = rp.write_json(doc, tmp_path / "long-context.json")
    assert [p.name for p in plots.plot_file(path)] == ["long-context.png"]
    table = lc.markdown(runs).splitlines()
    assert len(table) == 2 + 5 and "MiB/token" in table[0] and "transformers' switch" in table[-1]


def test_long_context_skips_what_will_not_fit_and_stops_after_an_oom(monkeypatch):
    from benchmarks import long_context as lc

    def fake(mode, cfg, compiled, seq, device, timeout_s):
        if mode == "full" and seq == 2048:
            return {"mode": mode, "seq": seq, "checkpointing": False, "status": "oom", "error": "killed"}
        return {"mode": mode, "seq": seq, "checkpointing": False, "status": "ok", "peak_mib": 1000 + seq}

    monkeypatch.setattr(lc.ts, "run_isolated", fake)
    c = lc.get_config("long-context", modes=["frozen", "full"], checkpointing=[False], max_peak_mib=5000)
    runs = lc.run_sweep(c, log=lambda s: None)
    status = {(r["mode"], r["seq"]): r["status"] for r in runs}
    # frozen: 4096 is predicted at 5096 MiB from 1024 and 2048 -> skipped, and so is 8192
    assert [status["frozen", s] for s in c["seqs"]] == ["ok", "ok", "ok", "skipped", "skipped"]
    assert next(r for r in runs if r["seq"] == 4096)["predicted_peak_mib"] == 5096
    assert [status["full", s] for s in c["seqs"]] == ["ok", "ok", "oom", "skipped", "skipped"]


def test_long_context_targets_compare_slopes_peaks_and_steps():
    from benchmarks import long_context as lc

    def run(mode, seq, peak, ms, ckpt=False):
        return dict(mode=mode, seq=seq, tokens=seq, checkpointing=ckpt, status="ok", peak_mib=peak, step_ms=ms)

    runs = [run("frozen", s, 1000 + 2 * s, s) for s in (1024, 4096)]
    runs += [run("s2ft-chunked", s, 900 + 0.8 * s, 1.02 * s) for s in (1024, 4096)]
    runs += [run("s2ft", s, 1000 + 2 * s, s) for s in (1024, 4096)]
    runs += [run("lora", s, 1000 + 2.5 * s, s) for s in (1024, 4096)]
    t = {x["target"]: x for x in lc.evaluate_targets(runs)}
    assert t["s2ft-chunked peak growth per token / frozen's (no checkpointing)"]["value"] == 0.4
    assert t["s2ft-chunked peak / lora peak at 4096 tokens (no checkpointing)"]["value"] == round(4176.8 / 11240, 3)
    step = next(v for k, v in t.items() if k.startswith("s2ft-chunked step / s2ft (stock loss) step (step_ms)"))
    assert step["value"] == 1.02 and step["passed"]
    with pytest.raises(ValueError, match="unknown checkpointing"):
        lc.get_config("long-context", checkpointing=["sometimes"])

"""The quality-study tooling: smoke pipeline on a tiny model, LoRA count matching, report, forgetting metrics."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from benchmarks.lora_match import matched_lora_rank
from benchmarks.quality import (
    GK_MEMBER,
    QualityModule,
    choice_logprobs,
    heldout_text,
    load_general_knowledge,
    multiple_choice_accuracy,
    perplexity,
    s2ft_trainable_count,
)
from s2ft_lightning.models import load_model
from s2ft_lightning.pipeline import S2Config

sys.path.insert(0, str(Path(__file__).parent))
from tiny_tokenizer import save_tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("quality_study", ROOT / "tools" / "quality_study.py")
qs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(qs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny"))


def test_smoke_pipeline_runs_all_arms_and_records_bigbench_skip(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "no_bigbench.json"
    argv = ["run", "--smoke", "--in-process", "--model", str(tiny), "--out", str(out), "--bigbench", str(missing)]
    assert qs.main([*argv, "--lr-grid", "1e-3", "3e-3"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["schema"] == qs.SCHEMA and res["smoke"] is True
    assert set(res["arms"]) == {"s2ft", "lora", "full"}
    skip = res["settings"]["general_knowledge"]["skip_reason"]
    assert str(missing) in skip and "--fetch-bigbench" in skip
    assert res["base"]["gk_acc"] is None and res["base"]["ppl"] > 1
    assert res["settings"]["held_out_text"]["sha256"] == heldout_text()[1]["sha256"]
    for arm in res["arms"].values():
        assert [g["lr"] for g in arm["lr_grid"]] == [1e-3, 3e-3]
        best = max(arm["lr_grid"], key=lambda g: (g["val_em"], -g["val_loss"]))
        assert arm["selected_lr"] == best["lr"]
        (run,) = arm["runs"]
        assert run["seed"] == 0 and run["lr"] == arm["selected_lr"]
        assert run["gk_acc"] is None and run["gk_delta"] is None
        assert run["ppl_delta"] == pytest.approx(run["ppl"] - res["base"]["ppl"])
        assert 0 <= run["test_em"] <= 1 and run["train_seconds"] > 0 and run["peak_rss_mib"] > 0
        assert run["trainable_params"] > 0 and arm["summary"]["test_em"]["n"] == 1
    full = res["arms"]["full"]["runs"][0]
    assert full["trainable_params"] == full["total_params"]
    assert res["arms"]["s2ft"]["runs"][0]["trainable_params"] < full["trainable_params"] / 10
    assert res["arms"]["lora"]["runs"][0]["lora_rank"] >= 1
    md = (out / "results.md").read_text()
    assert "General-knowledge forgetting skipped" in md and "| s2ft |" in md and "not comparable" in md
    assert (out / "results.png").stat().st_size > 1000
    jobs = sorted(p.name for p in (out / "jobs").iterdir())
    assert jobs == sorted(["base"] + [f"{a}_lr{lr}_s0" for a in ("s2ft", "lora", "full") for lr in ("0.001", "0.003")])
    # A rerun with the same specs reuses every finished job instead of training again.
    capsys.readouterr()
    assert qs.main([*argv, "--lr-grid", "1e-3", "3e-3"]) == 0
    assert capsys.readouterr().out.count("reusing") == len(jobs)
    assert json.loads((out / "results.json").read_text())["arms"] == res["arms"]


def test_lora_rank_matches_s2ft_trainable_count(tiny):
    s2 = S2Config(o_ratio=0.25, d_ratio=0.22, seed=0)
    model, _ = load_model(tiny)
    count = s2ft_trainable_count(model, s2)
    rank, per_rank = matched_lora_rank(model, count)
    # The closest uniform rank: no other rank is nearer to the S²FT count.
    assert all(abs(rank * per_rank - count) <= abs(r * per_rank - count) for r in range(1, 3 * rank + 2))
    s2ft = QualityModule(str(tiny), "s2ft", s2=s2)
    s2ft.configure_model()
    assert s2ft.info["trainable_params"] == count  # the planned count is what S²FT actually trains
    lora = QualityModule(str(tiny), "lora", s2=s2)
    lora.configure_model()
    assert lora.info["lora_rank"] == rank and lora.info["s2ft_count_matched"] == count
    assert abs(lora.info["trainable_params"] - count) / count <= 0.05
    fixed = QualityModule(str(tiny), "lora", s2=s2, lora_rank=3)
    fixed.configure_model()
    assert fixed.info["trainable_params"] == 3 * per_rank


def _fabricated_results(values: dict[str, list[float]]) -> dict:
    runs = {
        arm: [
            {"seed": i, "test_em": v, "gk_delta": v / 10, "ppl": 10 + v, "ppl_delta": v, "train_seconds": 5.0}
            | {"peak_rss_mib": 100.0, "trainable_params": 1000}
            for i, v in enumerate(vals)
        ]
        for arm, vals in values.items()
    }
    return {
        "schema": qs.SCHEMA,
        "settings": {
            "model": "m",
            "task": "t",
            "steps": 2,
            "batch_size": 1,
            "seeds": [0, 1],
            "general_knowledge": {"skip_reason": None},
            "held_out_text": {"source": "x", "sha256": "0" * 64, "max_tokens": 5},
        },
        "base": {"test_em": 0.1, "gk_acc": 0.5, "ppl": 10.0},
        "arms": {
            arm: {"selected_lr": 1e-3, "lr_grid": [{"lr": 1e-3, "val_em": 0.5, "val_loss": 1.0}], "runs": r}
            for arm, r in runs.items()
        },
    }


def test_report_renders_mean_and_sample_std(tmp_path):
    values = {"s2ft": [0.5, 0.7], "lora": [0.2, 0.3, 0.4]}
    results = _fabricated_results(values)
    (tmp_path / "results.json").write_text(json.dumps(results))
    md = qs.write_report(tmp_path)
    for arm, xs in values.items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {arm} |"))
        em = f"{100 * statistics.fmean(xs):.1f} ± {100 * statistics.stdev(xs):.1f}"
        assert em in row
        assert f"{statistics.fmean(xs):+.2f} ± {statistics.stdev(xs):.2f}" in row  # ppl Δ column
    a, b = values["s2ft"], values["lora"]
    diff = 100 * (statistics.fmean(a) - statistics.fmean(b))
    se = 100 * (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
    assert f"| lora | {diff:+.2f} (SE {se:.2f}; " in md
    assert (tmp_path / "results.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="schema"):
        qs.markdown({**results, "schema": "other"})


def _sdist(path: Path, task: dict | None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        name, data = ("bigbench-1.0.0/setup.py", b"") if task is None else (GK_MEMBER, json.dumps(task).encode())
        info = tarfile.TarInfo(f"bigbench-1.0.0/{name}" if task is not None else name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_general_knowledge_from_sdist_scores_choices_by_loglikelihood(tiny, tmp_path):
    task = {
        "canary": "do not train",
        "examples": [
            {"input": "How many legs do horses have?", "target_scores": {"two": 0, "four": 1, "six": 0}},
            {"input": "What is the capital of France?", "target_scores": {"Paris": 1, "Rome": 0}},
        ],
    }
    items, info = load_general_knowledge(_sdist(tmp_path / "bb.tar.gz", task), cache=tmp_path / "cache")
    assert info["skip_reason"] is None and info["n"] == 2 and items[0]["choices"] == ["two", "four", "six"]
    model, tok = load_model(tiny)
    prompt = "Q: How many legs do horses have?\nA:"
    batched = choice_logprobs(model, tok, prompt, items[0]["choices"])
    for choice, lp in zip(items[0]["choices"], batched):  # padding must not change any choice's score
        p = tok(prompt)["input_ids"]
        ids = torch.tensor([p + tok(" " + choice, add_special_tokens=False)["input_ids"]])
        logp = model(input_ids=ids).logits.detach().log_softmax(-1)[0]
        assert lp == pytest.approx(float(sum(logp[i - 1, ids[0, i]] for i in range(len(p), ids.shape[1]))), abs=1e-4)
    expected = []
    for item in items:
        lps = choice_logprobs(model, tok, f"Q: {item['input']}\nA:", item["choices"])
        expected.append(item["scores"][lps.index(max(lps))] == 1)
    assert multiple_choice_accuracy(model, tok, items) == sum(expected) / len(items)
    with pytest.raises(FileNotFoundError, match="general_knowledge"):
        load_general_knowledge(_sdist(tmp_path / "other.tar.gz", None), cache=tmp_path / "cache2")


def test_perplexity_matches_the_model_loss_on_one_window(tiny):
    model, tok = load_model(tiny)
    text, info = heldout_text()
    assert "Apache" in text and len(info["sha256"]) == 64
    ids = tok(text, add_special_tokens=False)["input_ids"][:33]
    loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.detach()
    assert perplexity(model, tok, text, window=32, max_tokens=33) == pytest.approx(float(loss.exp()), rel=1e-5)


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="method must be"):
        QualityModule("x", "adapters")
    with pytest.raises(FileNotFoundError, match="study.yaml"):
        qs.load_configs(tmp_path, ["s2ft"], smoke=False)
    with pytest.raises(FileNotFoundError, match="no config for arm 'lora'"):
        qs.load_configs(_configs_without(tmp_path, "lora"), ["lora"], smoke=False)
    with pytest.raises(SystemExit):
        qs.main(["run", "--steps", "0", "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="run `python tools/quality_study.py run"):
        qs.main(["report", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def _configs_without(tmp_path: Path, arm: str) -> Path:
    d = tmp_path / "cfg"
    d.mkdir()
    for f in (ROOT / "configs" / "quality").glob("*.yaml"):
        if f.stem != arm:
            (d / f.name).write_text(f.read_text())
    return d


def _multi_task_sdist(path: Path, tasks: dict[str, dict]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, task in tasks.items():
            data = json.dumps(task).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_sweep_smoke_resumes_and_writes_the_fronts(tiny, tmp_path, monkeypatch, capsys):
    sw = _load_tool("quality_sweep")
    import benchmarks.quality as bq

    examples = [
        {"input": f"Is {i} even?", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2)}} for i in range(4)
    ]
    tasks = {t: {"canary": "do not train", "examples": examples} for t in bq.FORGET_TASKS}
    sdist = _multi_task_sdist(tmp_path / "bigbench-1.0.0.tar.gz", tasks)
    monkeypatch.setattr(bq, "BIGBENCH_CACHE", tmp_path / "cache")
    out = tmp_path / "out"
    # A claim left by a process that is gone (a killed sweep) does not block the job.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = out / "sweep" / "jobs" / "s2ft_lr0.001_n2_s0" / "RUNNING"
    stale.parent.mkdir(parents=True)
    stale.write_text(str(gone.pid))
    argv = ["run", "--smoke", "--in-process", "--model", str(tiny), "--bigbench", str(sdist), "--out", str(out)]
    # The later phases are planned from the finished grid: asked for first, they refuse and say why.
    with pytest.raises(RuntimeError, match="phase long is planned from the finished grid, which still lacks 3 runs"):
        sw.main([*argv, "--phases", "long"])
    assert sw.main([*argv, "--phases", "grid"]) == 0
    assert not stale.exists() and (stale.parent / "result.json").is_file()
    partial = json.loads((out / "pareto.json").read_text())
    assert partial["grid_done"] and not partial["complete"] and len(partial["runs"]) == 3
    assert len(partial["missing"]) == 2 + 3 + 1  # 2 variants, 3 arms at the long budget, down_only long
    # then they run apart (as two processes side by side would), each writing pareto.json from every finished job
    assert sw.main([*argv, "--phases", "long"]) == 0 and sw.main([*argv, "--phases", "variants"]) == 0
    data = json.loads((out / "pareto.json").read_text())
    assert data["complete"] and data["missing"] == [] and len(data["runs"]) == 3 + 6
    assert data["schema"] == sw.SCHEMA and data["base"]["mc_items"] == 4 * 3  # 3 items per task in the smoke
    runs = data["runs"]
    by_phase = {(r["arm"], r["variant"], r["steps"]) for r in runs}
    # grid (2 steps) for every arm, the long budget (3 steps) at each arm's top lr, S²FT variants at its best
    assert {("s2ft", "base", 2), ("lora", "base", 2), ("full", "base", 2)} <= by_phase
    assert {("s2ft", "base", 3), ("lora", "base", 3), ("full", "base", 3)} <= by_phase
    # The variants train at S²FT's best point of the short-budget grid (whatever the long budget found).
    at = data["variants_at"]
    short = [p for p in data["points"] if p["arm"] == "s2ft" and p["variant"] == "base" and p["steps"] == 2]
    assert at["steps"] == 2 and at in sw.front(short)
    assert {("s2ft", "weight_small", 2), ("s2ft", "down_only", 2)} <= by_phase
    assert ("s2ft", "down_only", 3) in by_phase  # long.variants: confirmed at the long budget too
    assert {r["lr"] for r in runs if r["variant"] != "base"} == {at["lr"]}
    for r in runs:
        for k in ("arm", "lr", "steps", "seed", "test_em", "forget_acc_delta", "ppl_delta", "trainable_params"):
            assert r[k] is not None, k
        assert r["train_seconds"] > 0 and r["peak_rss_mib"] > 0
        assert (r["s2"] is not None) == (r["arm"] == "s2ft")
    variant = next(r for r in runs if r["variant"] == "weight_small")
    assert variant["s2"]["strategy"] == "weight" and variant["s2"]["variant"] == "small"
    lora = next(r for r in runs if r["arm"] == "lora")
    assert lora["lora_rank"] >= 1
    # The front holds only non-dominated points, and each arm's best point is on it.
    for arm, f in data["fronts"].items():
        pts = [p for p in data["points"] if p["arm"] == arm and p["variant"] == "base"]
        for p in f:
            assert not any(q["test_em"] > p["test_em"] and q["forget_acc_delta"] > p["forget_acc_delta"] for q in pts)
        assert data["best"][arm] in f
    md = (out / "pareto.md").read_text()
    assert (out / "pareto.png").stat().st_size > 1000 and "| s2ft | base |" in md
    assert f"S²FT variants train at lr {at['lr']:g}, 2 steps" in md
    # Rerunning resumes: every job is reused, nothing trains again.
    capsys.readouterr()
    assert sw.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("reusing") == len(runs) + 1 and "running" not in printed
    # Two sweeps over one --out never run the same job: a job claimed by a live process is refused, untouched.
    # Here the claimer exits without releasing (as when killed) after starting a child that inherits the claim, as
    # a sweep's `_job` child does: the claim lasts until the child ends too.
    (stale.parent / "result.json").unlink()
    claimer = (
        "import subprocess, sys, os; from pathlib import Path; sys.path.insert(0, 'tools'); import quality_study as q\n"
        f"with q._claim(Path({str(stale.parent)!r}), 'job') as fd:\n"
        "    c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(4)'], pass_fds=(fd,),\n"
        "                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # the test reads ours to EOF\n"
        "    print(os.getpid(), c.pid, flush=True); os._exit(0)\n"
    )
    owner, child = subprocess.run(
        [sys.executable, "-c", claimer], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    try:
        with pytest.raises(qs.JobClaimed, match=f"being run by process {owner}"), qs._claim(stale.parent, "job"):
            pass
        assert stale.read_text() == owner and not (stale.parent / "result.json").exists()
        # A sweep skips the claimed job, and as the later phases are planned from the whole grid, waits for it;
        # the claimer ends without a result (as if killed), so the sweep then runs the job itself.
        capsys.readouterr()
        assert sw.main(argv) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(child), signal.SIGKILL)
    printed = capsys.readouterr().out
    name = stale.parent.name
    assert f"{name}: skipped, job {name} is being run by process {owner}" in printed
    assert printed.index(f"{name}: waiting") < printed.index(f"{name}: running") < printed.index("s2ft_lr0.001_n3_s0")
    assert (stale.parent / "result.json").is_file() and not stale.exists()
    # While a sweep runs, `report --from-jobs` rebuilds pareto.json from the finished jobs, marked unfinished;
    # a job folder that is not what today's settings would run (here a copy under another name) is left out.
    jobs = out / "sweep" / "jobs"
    first = next(p.parent for p in sorted(jobs.glob("s2ft_*/result.json")))
    shutil.copytree(first, jobs / (first.name[:-1] + "7"))
    (jobs / "full_lr0.0001_n3_s0" / "result.json").rename(tmp_path / "result.json")
    report = ["report", "--from-jobs", "--smoke", "--model", str(tiny), "--bigbench", str(sdist), "--out", str(out)]
    assert sw.main(report) == 0
    rebuilt = json.loads((out / "pareto.json").read_text())
    assert rebuilt["complete"] is False and rebuilt["missing"] == ["full_lr0.0001_n3_s0"]

    def key(r):
        return r["arm"], r["variant"], r["lr"], r["steps"], r["seed"]

    assert sorted(map(key, rebuilt["runs"])) == sorted(key(r) for r in runs if key(r) != ("full", "base", 1e-4, 3, 0))
    assert f"UNFINISHED SWEEP: {len(runs) - 1} runs so far, 1 more to run" in (out / "pareto.md").read_text()


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

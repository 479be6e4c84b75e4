"""Generalization study: S²FT (Down only; O + Down) vs rank-matched LoRA vs full fine-tuning on SmolLM2-135M.

    python tools/generalization_study.py run    [--out DIR] [--bigbench SDIST] [--smoke] [--model M] [--in-process]
    python tools/generalization_study.py status [--out DIR] ...     finished, running and planned jobs, hours left
    python tools/generalization_study.py report [--out DIR] ...     generalization.{json,md,png} from finished jobs

configs/quality/generalization.yaml sets the design. Every run trains steps x batch fresh 3-digit add/subtract
questions and is scored per question on 500 held-out in-domain questions, on out-of-domain sets never trained on
(more digits, more terms, the same arithmetic phrased in English, another reasoning-gym task), on BIG-bench
multiple-choice tasks through lm-evaluation-harness (acc and acc_norm, in a prompt format unlike training's) and on
perplexity over three different held-out texts; an in-domain curve (the val split every ``curve_every`` steps) is
stored with it. Job order, so an unfinished study already compares every arm:

1. the base model (no training);
2. the learning-rate bracket on the first seed, arm by arm in turn: each arm's grid, middle lr first; then, while
   an arm's best lr (val accuracy; ties: lower val loss) is at an edge of its grid, one half-decade step beyond it;
3. the other seeds at each arm's best lr of the bracket, seed by seed over every arm; then the same at its
   second best lr (``top_lrs``). An arm's seeds enter the plan as soon as its own bracket has ended.

Each job is a folder under <out>/generalization/jobs/ holding result.json (small) and outputs.json.gz (every
question's id, prediction and correctness), reused when rerun with the same spec: an interrupted study resumes where
it stopped. A running job holds its folder (a lock), so two processes never run the same job, and a second ``run``
beside the first takes the next job nobody holds (one per core). Each job runs in a fresh subprocess and records
the code commit it ran with.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import quality_study as qs

SCHEMA = "s2ft-generalization-job/1"
PHASES = ("base", "bracket", "seeds")
_STUDY_KEYS = ("model", "dtype", "task", "task_kwargs", "prompt_template", "data_seed", "batch_size", "max_length",
               "steps", "warmup_ratio", "weight_decay", "eval")  # fmt: skip


# ---- configuration ----------------------------------------------------------------------------------------------


def load_design(path: Path, smoke: bool, model: str | None = None, arms: list[str] | None = None) -> dict:
    """The study design from ``path`` (--smoke sizes merged over it; only ``arms`` if given), checked."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; pass --config with the study design (see configs/quality/)")
    design = yaml.safe_load(path.read_text())
    smoke_sizes = design.pop("smoke", {})
    if smoke:
        design = qs._merge(design, smoke_sizes)
    if model:
        design["model"] = model
    for arm, cfg in design["arms"].items():
        if cfg.get("method") not in ("s2ft", "lora", "full"):
            raise ValueError(f"{path}: arm {arm}: method must be s2ft, lora or full, got {cfg.get('method')!r}")
        bad = [lr for lr in cfg["lrs"] if ladder(lr, 0) != lr]
        if bad or len(set(cfg["lrs"])) != len(cfg["lrs"]):
            raise ValueError(f"{path}: arm {arm}: lrs must be distinct values 1eN or 3eN (the ladder), got {bad}")
        if cfg["method"] == "lora" and cfg.get("lora", {}).get("rank", 0) <= 0:
            if design["arms"].get(cfg.get("match"), {}).get("method") != "s2ft":
                raise ValueError(f"{path}: arm {arm}: rank 0 matches an S²FT arm's count; set match to one")
            cfg["s2"] = design["arms"][cfg["match"]]["s2"]  # the S²FT count LoRA's rank is matched to
    if arms:
        unknown = sorted(set(arms) - set(design["arms"]))
        if unknown:
            raise ValueError(f"unknown arms {unknown}; {path} defines {list(design['arms'])}")
        design["arms"] = {a: c for a, c in design["arms"].items() if a in arms}
    if design["steps"] < 1 or design["top_lrs"] < 1 or not design["seeds"]:
        raise ValueError(f"{path}: need steps >= 1, top_lrs >= 1 and at least one seed")
    return design


def ladder(lr: float, step: int) -> float:
    """``lr`` moved ``step`` half-decades along the 1-3-10 ladder (1e-3 -> 3e-3 -> 1e-2); 0 snaps to it."""
    import math

    e = math.floor(math.log10(lr) + 1e-9)
    rung = 2 * e + (1 if lr / 10**e >= 2 else 0) + step  # even rungs 1eN, odd rungs 3eN
    value = (3 if rung % 2 else 1) * 10.0 ** (rung // 2)
    return float(f"{value:.1g}")


def study_spec(design: dict) -> dict:
    """The settings every job shares (part of each job's key)."""
    return {k: design[k] for k in _STUDY_KEYS}


def job(design: dict, arm: str | None, lr: float = 0.0, seed: int = 0) -> tuple[str, dict]:
    """(job name, spec) of one run; ``arm`` None is the base model (evaluation only)."""
    spec: dict[str, Any] = {"schema": SCHEMA, **study_spec(design)}
    if arm is None:
        return "base", {**spec, "method": "base", "arm": "base", "lr": 0.0, "seed": 0}
    cfg = {k: v for k, v in design["arms"][arm].items() if k != "lrs"}
    spec.update(method=cfg["method"], arm=arm, arm_config=cfg, lr=lr, seed=seed)
    spec["train_size"] = design["steps"] * design["batch_size"]  # every question seen once
    return f"{arm}_lr{lr:g}_n{design['steps']}_s{seed}", spec


def job_key(spec: dict) -> str:
    """What identifies a job's result: its spec (never where it ran or where its folder is)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


# ---- one job ----------------------------------------------------------------------------------------------------


def run_job(spec: dict, runtime: dict) -> tuple[dict, dict]:
    """Train one (arm, lr, seed) run (or only evaluate the base), then score it: (result, per-question outputs)."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback

    from benchmarks.generalization import items_digest, score_items
    from benchmarks.quality import QualityModule, answer_loss

    cpu0 = time.process_time()
    L.seed_everything(spec["seed"], verbose=False)
    ev = spec["eval"]
    dm = qs._datamodule({**spec, "train_size": spec.get("train_size", spec["batch_size"]),
                         "val_size": ev["val_size"], "test_size": ev["test_size"]})  # fmt: skip
    dm.setup()
    val = _split_items(dm, "val")
    gen = {"max_new_tokens": ev["max_new_tokens"], "batch_size": ev["batch_size"]}
    result: dict[str, Any] = {"threads": torch.get_num_threads(), "code": qs._code_version()}
    outputs: dict[str, Any] = {}
    curve: list[dict] = []

    def val_point(model: Any, step: int) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        scored = score_items(model, dm.tokenizer, dm.gym, val, **gen)
        curve.append({"step": step, "correct": sum(r[2] for r in scored), "n": len(scored)})
        curve[-1].update(seconds=time.perf_counter() - t0, cpu=time.process_time() - c0)
        outputs["val"] = scored
        outputs.setdefault("curve", {})[str(step)] = [r[2] for r in scored]  # per val question, for paired tests
        print(f"[generalization]   step {step}: val {curve[-1]['correct']}/{len(scored)}", flush=True)

    if spec["method"] == "base":
        from s2ft_lightning.models import load_model

        model, _ = load_model(spec["model"], dtype=spec["dtype"])
        val_point(model, 0)
    else:

        class Meter(Callback):
            def __init__(self) -> None:
                self.losses: list[float] = []
                self.step_times: list[float] = []

            def on_train_start(self, trainer, pl_module) -> None:
                self.t0, self.c0 = time.perf_counter(), time.process_time()

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
                self.t_step = time.perf_counter()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                self.step_times.append(time.perf_counter() - self.t_step)
                self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))
                step = trainer.global_step
                if step % ev["curve_every"] == 0 or step == spec["steps"]:
                    val_point(pl_module.model, step)

            def on_train_end(self, trainer, pl_module) -> None:
                self.seconds, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0

        module = QualityModule.for_job(spec)
        meter = Meter()
        trainer = L.Trainer(
            accelerator="auto", devices=1, max_steps=spec["steps"], limit_val_batches=0, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[meter],
            default_root_dir=runtime["job_dir"],
        )  # fmt: skip
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        curve_seconds, curve_cpu = sum(c["seconds"] for c in curve), sum(c["cpu"] for c in curve)
        k = max(1, min(10, len(meter.losses) // 4))
        result.update(module.info)
        result.update(
            train_seconds=meter.seconds - curve_seconds,  # the fit loop without the curve's evaluations
            train_cpu_seconds=meter.cpu - curve_cpu,
            setup_seconds=time.perf_counter() - t0 - meter.seconds,
            step_seconds=statistics.median(meter.step_times),  # forward + backward + optimizer step
            peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            first_loss=statistics.fmean(meter.losses[:k]),  # mean of the first / last k = min(10, steps / 4) steps
            final_loss=statistics.fmean(meter.losses[-k:]),
            curve_seconds=curve_seconds,
            curve_cpu_seconds=curve_cpu,
        )
        model = module.model
    t0 = time.perf_counter()
    result["val"] = {**{k: curve[-1][k] for k in ("correct", "n")}, "loss": answer_loss(model, dm.val_dataloader())}
    result["curve"] = [{k: c[k] for k in ("step", "correct", "n")} for c in curve]
    test = _split_items(dm, "test")
    outputs["in_domain"] = score_items(model, dm.tokenizer, dm.gym, test, **gen)
    result["in_domain"] = _count(outputs["in_domain"])
    digests = {"val": items_digest(val), "in_domain": items_digest(test)}
    seconds = {"in_domain": time.perf_counter() - t0}
    exclude = {e["question"] for e in dm.train_entries} | {e["metadata"]["expression"] for e in dm.train_entries}
    result["ood"], outputs["ood"] = {}, {}
    for name, set_spec in ev["ood"].items():
        t1 = time.perf_counter()
        from benchmarks.generalization import build_set

        gym, items = build_set(name, set_spec, exclude)
        outputs["ood"][name] = score_items(model, dm.tokenizer, gym, items, **gen)
        result["ood"][name] = _count(outputs["ood"][name])
        digests[name] = items_digest(items)
        seconds[f"ood_{name}"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    result["mc"], outputs["mc"] = _forgetting_mc(model, dm.tokenizer, spec, runtime)
    seconds["mc"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    result["ppl"], outputs["ppl_windows"] = _perplexities(model, dm.tokenizer, ev["ppl"])
    seconds["ppl"] = time.perf_counter() - t1
    seconds["total"] = time.perf_counter() - t0
    # CPU time of this job's process (all threads): the budget's unit, unlike wall time on a shared machine
    result.update(eval_seconds=seconds, sets_sha256=digests, cpu_seconds=time.process_time() - cpu0)
    if torch.cuda.is_available():
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result, outputs


def _split_items(dm: Any, split: str) -> list[dict]:
    from benchmarks.generalization import render

    name = {"val": "val", "test": "in_domain"}[split]
    return [
        {"id": f"{name}/{i}", "prompt": render(dm.prompt_template, e), "entry": e}
        for i, e in enumerate(getattr(dm, f"{split}_entries"))
    ]


def _count(scored: list[list]) -> dict:
    return {"n": len(scored), "correct": sum(r[2] for r in scored)}


def _forgetting_mc(model: Any, tokenizer: Any, spec: dict, runtime: dict) -> tuple[dict, dict]:
    """BIG-bench MC tasks as local lm-eval tasks (written to a private temp folder), scored in memory."""
    from benchmarks.generalization import lm_eval_scores, mc_rows, write_lm_eval_task
    from benchmarks.quality import read_mc_items

    fg = spec["eval"]["forgetting"]
    with tempfile.TemporaryDirectory(prefix="s2ft-lm-eval-") as tmp:
        names = {}
        for task, path in runtime["mc_tasks"].items():
            items, sha = read_mc_items(Path(path))
            if sha != spec["eval"]["mc_sha256"][task]:
                raise RuntimeError(f"{path} (sha256 {sha[:12]}) is not the {task} file this job's spec names")
            names[f"s2ft_bb_{task}"] = task
            write_lm_eval_task(f"s2ft_bb_{task}", mc_rows(items, fg["max_items_per_task"]), Path(tmp))
        scores = lm_eval_scores(model, tokenizer, Path(tmp), list(names), batch_size=fg["batch_size"])
    summary = {names[t]: {k: v for k, v in s.items() if k != "items"} for t, s in scores.items()}
    return summary, {names[t]: s["items"] for t, s in scores.items()}


def _perplexities(model: Any, tokenizer: Any, cfg: dict) -> tuple[dict, dict]:
    from benchmarks.generalization import heldout_texts
    from benchmarks.quality import perplexity_of, window_nll

    out, windows = {}, {}
    for name, (text, info) in heldout_texts().items():
        windows[name] = window_nll(model, tokenizer, text, window=cfg["window"], max_tokens=cfg["max_tokens"])
        out[name] = {"ppl": perplexity_of(windows[name]), "tokens": sum(w[1] for w in windows[name]), **info}
    return out, windows


# ---- running jobs (resumable, one process per job) --------------------------------------------------------------


def finished(job_dir: Path, spec: dict) -> dict | None:
    """The job's result if its folder holds one for exactly this spec."""
    done = job_dir / "result.json"
    if not done.is_file():
        return None
    prev = json.loads(done.read_text())
    return prev if prev.get("key") == job_key(spec) and (job_dir / "outputs.json.gz").is_file() else None


def execute(name: str, spec: dict, out: Path, runtime: dict, in_process: bool) -> dict:
    """Run one job (reusing a finished result with the same spec) in ``out/jobs/<name>``; return its result."""
    job_dir = out / "jobs" / name
    if prev := finished(job_dir, spec):
        print(f"[generalization] {name}: reusing {job_dir / 'result.json'}", flush=True)
        return prev
    job_dir.mkdir(parents=True, exist_ok=True)
    with qs._claim(job_dir, name) as lock_fd:
        if prev := finished(job_dir, spec):  # another process finished it between our first look and the claim
            return prev
        print(f"[generalization] {name}: running", flush=True)
        t0 = time.perf_counter()
        runtime = {**runtime, "job_dir": str(job_dir)}
        if in_process:
            result, outputs = run_job(spec, runtime)
            result["rss_isolated"] = False
        else:
            (job_dir / "spec.json").write_text(json.dumps({"spec": spec, "runtime": runtime}, indent=1))
            # the child inherits the claim: were this process killed, the job stays claimed until the child ends
            subprocess.run([sys.executable, __file__, "_job", str(job_dir)], check=True, pass_fds=(lock_fd,))
            result = {**json.loads((job_dir / "child.json").read_text()), "rss_isolated": True}
            outputs = None
            (job_dir / "child.json").unlink()
            (job_dir / "spec.json").unlink()
        result.update(key=job_key(spec), spec=spec, name=name, wall_seconds=time.perf_counter() - t0)
        if outputs is not None:
            _write_outputs(job_dir, outputs)
        (job_dir / "result.json").write_text(json.dumps(result, indent=1))  # last: marks the job done
    return result


def _write_outputs(job_dir: Path, outputs: dict) -> None:
    tmp = job_dir / "outputs.json.gz.tmp"
    with gzip.open(tmp, "wt", compresslevel=9) as f:
        json.dump(outputs, f, separators=(",", ":"))
    tmp.replace(job_dir / "outputs.json.gz")


# ---- planning -----------------------------------------------------------------------------------------------------


def _rank_key(r: dict) -> tuple[float, float]:
    return (r["val"]["correct"] / r["val"]["n"], -r["val"]["loss"])


def bracket_state(design: dict, arm: str, results: dict[str, dict]) -> dict:
    """The arm's bracket on the first seed from finished ``results`` (by job name): grid, best, next lr to run.

    ``next`` lists the lrs to run now: the initial grid's missing ones (middle first), else one half-decade step
    beyond the edge holding the best lr while extensions remain, else nothing (``bracketed`` says whether the best
    lies strictly inside the grid). ``sequence`` is every lr of the arm's bracket known now, in run order.
    """
    seed, initial = design["seeds"][0], sorted(design["arms"][arm]["lrs"])
    lo, hi = design["bracket"]["lr_bounds"]
    mid = len(initial) // 2
    order = sorted(initial, key=lambda lr: (abs(initial.index(lr) - mid), lr))  # middle, then outwards
    runs = {lr: results.get(job(design, arm, lr, seed)[0]) for lr in order}
    missing = [lr for lr in order if runs[lr] is None]
    state = {"arm": arm, "grid": initial, "runs": {}, "next": missing, "best": None, "bracketed": False}
    state.update(sequence=list(order), provisional=bool(missing))
    if missing:  # the finished part of the grid and its best so far, for the report of an unfinished study
        done = sorted(lr for lr in order if runs[lr] is not None)
        if done:
            ranked = sorted(done, key=lambda lr: _rank_key(runs[lr]), reverse=True)
            state.update(runs={lr: runs[lr] for lr in done}, best=ranked[0], ranking=ranked)
        return state
    grid = list(initial)
    while True:
        state["sequence"] = order + [lr for lr in grid if lr not in order]
        ranked = sorted(grid, key=lambda lr: _rank_key(runs[lr]), reverse=True)
        best = ranked[0]
        state.update(grid=sorted(grid), best=best, ranking=ranked, bracketed=min(grid) < best < max(grid))
        state["runs"] = {lr: runs[lr] for lr in sorted(grid)}
        if state["bracketed"] or len(grid) - len(initial) >= design["bracket"]["max_extensions"]:
            state["next"] = []
            return state
        step = ladder(best, -1 if best == min(grid) else 1)
        if not lo <= step <= hi:
            state["next"] = []
            return state
        if step not in runs:
            runs[step] = results.get(job(design, arm, step, seed)[0])
        if runs[step] is None:
            state["next"] = [step]
            state["sequence"].append(step)
            return state
        grid.append(step)


def planned_jobs(design: dict, results: dict[str, dict]) -> tuple[list[tuple[str, dict]], dict[str, dict]]:
    """(every job the study runs that is known now, in run order; each arm's ``bracket_state``)."""
    jobs = [job(design, None)]
    states = {arm: bracket_state(design, arm, results) for arm in design["arms"]}
    # the bracket arm by arm in turn: every arm's first lr (its grid's middle), then every arm's second, ...
    turns = sorted((k, i, arm, lr) for i, (arm, st) in enumerate(states.items()) for k, lr in enumerate(st["sequence"]))
    jobs += [job(design, arm, lr, design["seeds"][0]) for _, _, arm, lr in turns]
    # An arm's seeds are planned once its own bracket has ended (a second runner need not wait for another arm's):
    # each arm's best lr at every seed first (the comparison the report leads with), then the runners-up.
    for rank in range(design["top_lrs"]):
        for seed in design["seeds"][1:]:
            jobs += [job(design, arm, top_lrs(st, rank + 1)[rank], seed) for arm, st in states.items()
                     if not st["next"] and len(top_lrs(st, rank + 1)) > rank]  # fmt: skip
    return jobs, states


def bracket_done(states: dict[str, dict]) -> bool:
    """Whether every arm's learning-rate bracket has ended (nothing left to try on the first seed)."""
    return all(not st["next"] for st in states.values())


def top_lrs(state: dict, k: int) -> list[float]:
    """The arm's ``k`` best lrs on the first seed (val accuracy, ties: lower val loss)."""
    return state.get("ranking", [])[:k]


def finished_results(design: dict, out: Path) -> dict[str, dict]:
    """Finished results (by job name) whose key is what today's design would run: stale jobs are left out."""
    found = {}
    for f in sorted((out / "jobs").glob("*/result.json")):
        r = json.loads(f.read_text())
        spec = r.get("spec", {})
        arm = spec.get("arm")
        if arm == "base":
            name, want = job(design, None)
        elif arm in design["arms"]:
            name, want = job(design, arm, spec["lr"], spec["seed"])
        else:
            continue
        if name == f.parent.name and finished(f.parent, want):
            found[name] = r
    return found


# ---- the study ----------------------------------------------------------------------------------------------------


def prepare(args: argparse.Namespace) -> tuple[dict, dict, Path]:
    """(design with the forgetting files' sha256 in every spec, runtime inputs, the jobs' folder)."""
    from benchmarks.quality import extract_task, fetch_bigbench_sdist, read_mc_items

    design = load_design(Path(args.config), args.smoke, args.model, args.arms)
    sdist = Path(args.bigbench) if args.bigbench else fetch_bigbench_sdist()
    tasks = {t: str(extract_task(sdist, t)) for t in design["eval"]["forgetting"]["tasks"]}
    design["eval"]["mc_sha256"] = {t: read_mc_items(Path(p))[1] for t, p in tasks.items()}
    return design, {"mc_tasks": tasks}, Path(args.out) / "generalization"


def next_job(todo: list[tuple[str, dict]], out: Path) -> tuple[str, dict]:
    """The first planned job no live process holds, so a second ``run`` over the same --out works beside the
    first (the planned jobs never depend on each other: the planner lists a job only once its inputs are done);
    the first job when all are held (the caller then waits for it)."""
    free = [(n, s) for n, s in todo if not _held(out / "jobs" / n / "RUNNING")]
    return (free or todo)[0]


def run_study(args: argparse.Namespace) -> None:
    """Run (or resume) every job in order, re-planning after each so the bracket extends as results come in."""
    design, runtime, out = prepare(args)
    done = finished_results(design, out)
    print(f"[generalization] {out}: {len(done)} of the jobs planned so far are finished", flush=True)
    failed: dict[str, str] = {}
    while True:
        results = finished_results(design, out)
        jobs, _ = planned_jobs(design, results)
        todo = [(n, s) for n, s in jobs if n not in results and n not in failed]
        if not todo:
            break
        name, spec = next_job(todo, out)
        try:
            execute(name, spec, out, runtime, args.in_process)
        except qs.JobClaimed as e:  # every planned job is running elsewhere: wait for the first, then re-plan
            print(f"[generalization] {name}: waiting, {e}", flush=True)
            qs.wait_for_claim(out / "jobs" / name)
        except (subprocess.CalledProcessError, RuntimeError) as e:
            # one broken job must not stop a night's study: the jobs that do not depend on it go on, and a rerun
            # retries it (its folder has no result)
            failed[name] = str(e)
            print(f"[generalization] {name}: FAILED ({e}); going on with the jobs that do not need it", flush=True)
    report(args)
    if failed:
        raise RuntimeError(f"{len(failed)} job(s) failed: {', '.join(failed)}; see the log above, fix, and rerun")


def status(args: argparse.Namespace) -> str:
    """Finished / running / planned jobs and the hours left, estimated from the finished jobs' measured costs."""
    design, _, out = prepare(args)
    results = finished_results(design, out)
    jobs, states = planned_jobs(design, results)
    cost = _measured_costs(results)
    lines, left, unknown = [], [0.0, 0.0], 0
    for name, spec in jobs:
        if name in results:
            r = results[name]
            lines.append(f"done     {name}  ({r['cpu_seconds'] / 60:.0f} CPU-min, {r['wall_seconds'] / 60:.0f} min)")
            continue
        running = _held(out / "jobs" / name / "RUNNING")
        est = cost.get(spec["arm"], cost.get("*"))
        if est is None:
            unknown += 1
        else:
            left = [left[0] + est[0], left[1] + est[1]]
        cpu = "?" if est is None else f"{est[0] / 60:.0f}"
        lines.append(f"{'running' if running else 'planned'}  {name}  (~{cpu} CPU-min)")
    more = ""
    # an arm's seeds are planned once its bracket ends: count top_lrs x other seeds for the arms still bracketing
    if not bracket_done(states):
        more = " (with the seed phase, planned when each arm's bracket ends, estimated)"
        for arm, st in states.items():
            if not st["next"]:
                continue  # its seeds are in the plan above
            est = cost.get(arm, cost.get("*"))
            n = design["top_lrs"] * (len(design["seeds"]) - 1)
            if est is None:
                unknown += n
            else:
                left = [left[0] + n * est[0], left[1] + n * est[1]]
    if unknown:
        more += f"; {unknown} job(s) not counted: no training job has finished yet to measure their cost"
    spent = [sum(r["cpu_seconds"] for r in results.values()), sum(r["wall_seconds"] for r in results.values())]
    lines.append(
        f"{len(results)} done ({spent[0] / 3600:.1f} CPU-h, {spent[1] / 3600:.1f} h wall); about {left[0] / 3600:.1f} "
        f"CPU-h left{more}, {left[1] / 3600:.1f} h wall at the pace so far"
    )
    return "\n".join(lines)


def _held(lock: Path) -> bool:
    """Whether a live process holds this job's claim (a RUNNING file left by a killed run holds nothing)."""
    import fcntl

    try:
        fd = os.open(lock, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _measured_costs(results: dict[str, dict]) -> dict[str, tuple[float, float]]:
    """(mean CPU seconds, mean wall seconds) of a finished training job per arm (``*``: over all arms)."""
    by_arm: dict[str, list[tuple[float, float]]] = {}
    for r in results.values():
        if r["spec"]["arm"] != "base":
            by_arm.setdefault(r["spec"]["arm"], []).append((r["cpu_seconds"], r["wall_seconds"]))
    cost = {a: (statistics.fmean(c for c, _ in v), statistics.fmean(w for _, w in v)) for a, v in by_arm.items()}
    if cost:
        cost["*"] = (statistics.fmean(c for c, _ in cost.values()), statistics.fmean(w for _, w in cost.values()))
    return cost


def report(args: argparse.Namespace) -> str:
    from benchmarks.generalization_report import write_report

    design, _, out = prepare(args)
    results = finished_results(design, out)
    jobs, states = planned_jobs(design, results)
    complete = bracket_done(states) and all(n in results for n, _ in jobs)
    return write_report(Path(args.out), design, results, states, complete=complete)


# ---- CLI ------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in (("run", "run (or resume) the study, then write the report"),
                        ("status", "finished, running and planned jobs, with the hours left"),
                        ("report", "generalization.{json,md,png} from the finished jobs")):  # fmt: skip
        c = sub.add_parser(name, help=help_)
        c.add_argument("--config", default=str(REPO / "configs" / "quality" / "generalization.yaml"))
        c.add_argument("--model", help="model folder/.gguf/alias (default: the config's, demo:smollm2)")
        c.add_argument("--bigbench", help="bigbench-1.0.0.tar.gz sdist (default: fetch it once into the cache)")
        c.add_argument("--smoke", action="store_true", help="tiny sizes (the config's `smoke`): a pipeline check")
        c.add_argument("--arms", nargs="+", help="only these arms of the config (default: all)")
        c.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality"), help="results folder")
        if name == "run":
            c.add_argument("--in-process", action="store_true", help="no subprocess per job (RSS not isolated)")
    job_p = sub.add_parser("_job", help=argparse.SUPPRESS)
    job_p.add_argument("job_dir")
    args = p.parse_args(argv)
    if args.cmd == "_job":
        d = Path(args.job_dir)
        given = json.loads((d / "spec.json").read_text())
        result, outputs = run_job(given["spec"], given["runtime"])
        _write_outputs(d, outputs)
        (d / "child.json").write_text(json.dumps(result, indent=1))
        return 0
    if args.cmd == "run":
        run_study(args)
        print((Path(args.out) / "generalization.md").read_text())
    elif args.cmd == "status":
        print(status(args))
    else:
        print(report(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

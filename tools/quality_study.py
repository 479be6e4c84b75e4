"""Quality study: S²FT vs PEFT LoRA vs full fine-tuning on SmolLM2-135M-Instruct, in-domain and forgetting.

    python tools/quality_study.py run [--arms s2ft lora full] [--seeds 0 1 2] [--steps N] [--lr-grid ...]
                                      [--bigbench SDIST_OR_JSON | --fetch-bigbench] [--out DIR] [--smoke]
    python tools/quality_study.py report [--out DIR]

Arms (configs/quality/<arm>.yaml) share configs/quality/study.yaml: the same task (reasoning-gym
basic_arithmetic, 3-digit add/subtract), tokens, steps, batch and warmup+linear-decay AdamW schedule. The
learning rate of each arm is the best of its grid by exact match on a validation split (ties: lower val loss),
chosen on the first seed; that seed's run is kept and the other seeds run at the chosen lr. Metrics per run:
exact match on a held-out test split, BIG-bench general_knowledge multiple-choice accuracy (log-likelihood of
each choice, evaluation only) and perplexity on held-out plain text (the Apache-2.0 LICENSE shipped with the
installed transformers), both as change vs the base model; training time (fit loop only) and peak RSS (each run
is a fresh subprocess). Writes <out>/results.json, results.md and results.png; per-run JSON under <out>/jobs/
(reused on a rerun with the same spec, so an interrupted study resumes).

Sizing (configs/quality/study.yaml): 100 steps x batch 16 (the 1600 training questions once), 50 validation and
100 test questions, 2-point lr grids, 3 seeds: 3 arms x (2 grid lrs + 2 more seeds) = 12 runs + the base. Time
scales linearly with --steps; measured durations are in the README. Evaluation is very sensitive to other load
on the machine: run the study on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SCHEMA = "s2ft-quality/1"
ARMS = ("s2ft", "lora", "full")
METRICS = ("test_em", "gk_delta", "ppl", "ppl_delta", "train_seconds", "peak_rss_mib", "trainable_params")


# ---- configuration ----------------------------------------------------------------------------------------------


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_configs(config_dir: Path, arms: list[str], smoke: bool) -> tuple[dict, dict[str, dict]]:
    """(study settings, {arm: arm settings}) from ``config_dir``; --smoke sizes merged over the study's."""
    study_file = config_dir / "study.yaml"
    if not study_file.is_file():
        raise FileNotFoundError(f"{study_file} is missing; pass --config-dir with study.yaml and one YAML per arm")
    study = yaml.safe_load(study_file.read_text())
    smoke_sizes = study.pop("smoke", {})
    if smoke:
        study = _merge(study, smoke_sizes)
    loaded = {}
    for arm in arms:
        f = config_dir / f"{arm}.yaml"
        if not f.is_file():
            raise FileNotFoundError(f"no config for arm {arm!r}: {f} is missing (arms: {list(ARMS)})")
        cfg = yaml.safe_load(f.read_text())
        if cfg.get("method") not in ARMS:
            raise ValueError(f"{f}: method must be one of {list(ARMS)}, got {cfg.get('method')!r}")
        if cfg["method"] == "lora" and cfg.get("lora", {}).get("rank", 0) <= 0:
            cfg["s2"] = yaml.safe_load((config_dir / cfg.get("match", "s2ft.yaml")).read_text())["s2"]
        loaded[arm] = cfg
    return study, loaded


# ---- one run (in a fresh subprocess by default) -----------------------------------------------------------------


def _datamodule(spec: dict) -> Any:
    from s2ft_lightning.data import ReasoningGymDataModule

    dm = ReasoningGymDataModule(
        spec["model"],
        task=spec["task"],
        task_kwargs=spec["task_kwargs"],
        train_size=spec["train_size"],
        val_size=spec["val_size"],
        test_size=spec["test_size"],
        prompt_template=spec["prompt_template"],
        batch_size=spec["batch_size"],
        max_length=spec["max_length"],
        seed=spec["data_seed"],
    )
    dm.seed = spec["data_seed"] + spec["seed"]  # the shuffle order follows the run seed; the splits do not
    return dm


def _evaluate(model: Any, tokenizer: Any, dm: Any, spec: dict) -> dict:
    from benchmarks.quality import answer_loss, heldout_text, load_general_knowledge, perplexity
    from benchmarks.quality import multiple_choice_accuracy as mc_acc

    ev = spec["eval"]
    t0 = time.perf_counter()
    gen = {"max_new_tokens": ev["max_new_tokens"], "batch_size": ev["batch_size"]}
    out = {"val_em": dm.evaluate(model, "val", **gen), "test_em": dm.evaluate(model, "test", **gen)}
    out["val_loss"] = answer_loss(model, dm.val_dataloader())
    items, _ = load_general_knowledge(spec["gk_path"]) if spec.get("gk_path") else ([], {})
    items = items[: ev["gk_max_items"]] if ev.get("gk_max_items") else items
    out["gk_acc"] = mc_acc(model, tokenizer, items) if items else None
    if spec.get("mc_tasks"):  # the sweep's forgetting probes: several BIG-bench tasks, pooled and per task
        from benchmarks.quality import read_mc_items

        out["mc"], n_right, n_all = {}, 0.0, 0
        for name, path in spec["mc_tasks"].items():
            task_items = read_mc_items(Path(path))[0][: ev["mc_max_items"]]
            acc = mc_acc(model, tokenizer, task_items)
            out["mc"][name] = {"acc": acc, "n": len(task_items)}
            n_right += acc * len(task_items)
            n_all += len(task_items)
        out["mc_acc"], out["mc_items"] = n_right / n_all, n_all
    text, _ = heldout_text()
    out["ppl"] = perplexity(model, tokenizer, text, window=ev["ppl_window"], max_tokens=ev["ppl_max_tokens"])
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def run_job(spec: dict) -> dict:
    """Train one (arm, lr, seed) with the Lightning Trainer (or only evaluate the base) and measure it."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback

    import s2ft_lightning
    from benchmarks.quality import QualityModule

    L.seed_everything(spec["seed"], verbose=False)
    dm = _datamodule(spec)
    result: dict[str, Any] = {"spec": spec, "threads": torch.get_num_threads(), "code": _code_version()}
    result["code"]["package"] = str(Path(s2ft_lightning.__file__).parent)
    if spec["method"] == "base":
        from s2ft_lightning.models import load_model

        model, tok = load_model(spec["model"], dtype=spec["dtype"])
        return {**result, **_evaluate(model, tok, dm, spec)}

    class Meter(Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []
            self.step_times: list[float] = []

        def on_train_start(self, trainer, pl_module) -> None:
            self.t0 = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.t_step = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.step_times.append(time.perf_counter() - self.t_step)
            self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

        def on_train_end(self, trainer, pl_module) -> None:
            self.seconds = time.perf_counter() - self.t0
            self.peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    module = QualityModule.for_job(spec)
    meter = Meter()
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=spec["steps"],
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[meter],
        default_root_dir=spec["job_dir"],
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    k = max(1, min(10, len(meter.losses) // 4))
    result.update(module.info)
    result.update(
        train_seconds=meter.seconds,
        setup_seconds=time.perf_counter() - t0 - meter.seconds,
        step_seconds=statistics.median(meter.step_times),  # forward + backward + optimizer step
        peak_rss_mib=meter.peak_rss_mib,
        first_loss=statistics.fmean(meter.losses[:k]),  # mean of the first / last k = min(10, steps / 4) steps
        final_loss=statistics.fmean(meter.losses[-k:]),
    )
    if torch.cuda.is_available():
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return {**result, **_evaluate(module.model, dm.tokenizer, dm, spec)}


def _code_version() -> dict:
    """The git commit (and whether the tree had local changes) of the code a job ran with; not part of its key."""

    def git(*a: str) -> str:
        proc = subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "HEAD") or None,
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def _job_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def execute(spec: dict, out: Path, in_process: bool, name: str | None = None) -> dict:
    """Run one job (reusing a finished result with the same spec) and save it under ``out/jobs/<name>``."""
    if name is None:
        name = f"{spec['arm']}_lr{spec['lr']:g}_s{spec['seed']}" if spec["method"] != "base" else "base"
    job_dir = out / "jobs" / name
    spec = {**spec, "job_dir": str(job_dir)}
    done = job_dir / "result.json"

    def finished() -> dict | None:
        prev = json.loads(done.read_text()) if done.is_file() else None
        if prev is not None and prev.get("key") == _job_key(spec):
            print(f"[quality] {name}: reusing {done}", flush=True)
            return prev
        return None

    if prev := finished():
        return prev
    job_dir.mkdir(parents=True, exist_ok=True)
    with _claim(job_dir, name) as lock_fd:
        if prev := finished():  # another process finished it between our first look and the claim
            return prev
        print(f"[quality] {name}: running", flush=True)
        if in_process:
            result = {**run_job(spec), "rss_isolated": False}
        else:
            (job_dir / "spec.json").write_text(json.dumps(spec, indent=1))
            # the child inherits the claim: were this process killed, the job would stay claimed until it ends
            subprocess.run([sys.executable, __file__, "_job", str(job_dir)], check=True, pass_fds=(lock_fd,))
            result = {**json.loads((job_dir / "child.json").read_text()), "rss_isolated": True}
        result["key"] = _job_key(spec)
        done.write_text(json.dumps(result, indent=1))
    return result


class JobClaimed(RuntimeError):
    """Another live process (a sweep or study over the same --out) is running this job."""


@contextlib.contextmanager
def _claim(job_dir: Path, name: str) -> Iterator[int]:
    """Hold an exclusive lock on ``job_dir/RUNNING`` while the job runs, so two sweeps never run one job.

    The kernel drops a ``flock`` when the last process holding its file closes, so a killed sweep leaves no claim
    behind, while a ``_job`` child that outlives its killed parent (it inherits the fd) still holds it. Yields the fd.
    """
    lock = job_dir / "RUNNING"
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode().strip() or "(starting)"
            os.close(fd)
            raise JobClaimed(
                f"job {name} is being run by process {owner} (another sweep or study over the same --out); "
                "wait for it, or stop it and rerun"
            ) from None
        # The holder before us unlinks the file before unlocking: a lock on an unlinked file claims nothing.
        if lock.exists() and os.fstat(fd).st_ino == lock.stat().st_ino:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    try:
        yield fd
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def wait_for_claim(job_dir: Path) -> None:
    """Return once no process holds ``job_dir``'s claim (at once if none does)."""
    try:
        fd = os.open(job_dir / "RUNNING", os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # granted when the holder's exclusive lock is gone
    finally:
        os.close(fd)


# ---- the study --------------------------------------------------------------------------------------------------

_RUN_FIELDS = (
    "seed",
    "lr",
    "test_em",
    "val_em",
    "val_loss",
    "gk_acc",
    "ppl",
    "train_seconds",
    "step_seconds",
    "setup_seconds",
    "eval_seconds",
    "peak_rss_mib",
    "trainable_params",
    "total_params",
    "lora_rank",
    "s2ft_count_matched",
    "first_loss",
    "final_loss",
    "rss_isolated",
    "peak_cuda_mib",
)


def _run_record(result: dict, base: dict) -> dict:
    rec = {k: result.get(k, result["spec"].get(k)) for k in _RUN_FIELDS if k in result or k in result["spec"]}
    rec["gk_delta"] = None if result["gk_acc"] is None else result["gk_acc"] - base["gk_acc"]
    rec["ppl_delta"] = result["ppl"] - base["ppl"]
    return rec


def run_study(args: argparse.Namespace) -> dict:
    """Base evaluation, then per arm the lr grid on the first seed and the remaining seeds at the chosen lr."""
    from benchmarks.quality import fetch_bigbench_sdist, heldout_text, load_general_knowledge
    from benchmarks.sysinfo import describe

    study, arms = load_configs(Path(args.config_dir), args.arms, args.smoke)
    if args.model:
        study["model"] = args.model
    if args.steps:
        study["steps"] = args.steps
    if args.seeds:
        study["seeds"] = args.seeds
    source = args.bigbench
    if args.fetch_bigbench and not source:
        source = str(fetch_bigbench_sdist())
    _, gk_info = load_general_knowledge(source)
    text, text_info = heldout_text()
    out = Path(args.out)
    common = {k: v for k, v in study.items() if k != "seeds"}
    common["gk_path"] = gk_info["path"] if gk_info["skip_reason"] is None else None
    text_info["max_tokens"] = study["eval"]["ppl_max_tokens"]
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "smoke": args.smoke,
        "system": describe(),
        "settings": {**common, "seeds": study["seeds"], "held_out_text": text_info, "general_knowledge": gk_info},
        "notes": [
            "lr chosen per arm on the val split with the first seed (ties: lower val answer loss); that run is "
            "kept, the other seeds run at the chosen lr; test split is used for reporting only",
            "gk_delta and ppl_delta are run minus base; std is the sample std over seeds",
        ],
    }
    base = execute({**common, "method": "base", "arm": "base", "lr": 0.0, "seed": 0}, out, args.in_process)
    results["base"] = {k: base[k] for k in ("val_em", "test_em", "val_loss", "gk_acc", "ppl")}
    results["arms"] = {}
    for arm, cfg in arms.items():
        grid_lrs = args.lr_grid or cfg["lr_grid"]
        spec = {**common, "method": cfg["method"], "arm": arm, "arm_config": cfg}
        first, *rest = study["seeds"]
        grid = [execute({**spec, "lr": lr, "seed": first}, out, args.in_process) for lr in grid_lrs]
        best = max(grid, key=lambda r: (r["val_em"], -r["val_loss"]))
        lr = best["spec"]["lr"]
        runs = [best] + [execute({**spec, "lr": lr, "seed": s}, out, args.in_process) for s in rest]
        records = [_run_record(r, results["base"]) for r in runs]
        results["arms"][arm] = {
            "method": cfg["method"],
            "config": {k: v for k, v in cfg.items() if k != "lr_grid"},
            "lr_grid": [
                {"lr": r["spec"]["lr"], "val_em": r["val_em"], "val_loss": r["val_loss"], "test_em": r["test_em"]}
                for r in grid
            ],
            "selected_lr": lr,
            "runs": records,
            "summary": summarize(records),
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


# ---- report -----------------------------------------------------------------------------------------------------


def fmt(stat: dict | None, scale: float = 1.0, digits: int = 1, signed: bool = False) -> str:
    """``mean ± std`` of a summary entry (scaled), ``mean (n=1)`` for one value, ``n/a`` when missing."""
    if not stat or stat.get("mean") is None:
        return "n/a"
    mean = f"{stat['mean'] * scale:{'+' if signed else ''}.{digits}f}"
    if stat.get("std") is None:
        return f"{mean} (n={stat['n']})"
    return f"{mean} ± {stat['std'] * scale:.{digits}f}"


def _diff(a: dict, b: dict, scale: float) -> str:
    if a.get("mean") is None or b.get("mean") is None:
        return "n/a"
    d = (a["mean"] - b["mean"]) * scale
    if a.get("std") is None or b.get("std") is None:
        return f"{d:+.2f} (no seed spread)"
    se = (a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"]) ** 0.5 * scale
    verdict = "beyond" if abs(d) > 2 * se else "within"
    return f"{d:+.2f} (SE {se:.2f}; {verdict} 2 SE)"


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Mean and sample std over seeds of every reported metric, from the raw per-run records."""
    from benchmarks.quality import mean_std

    return {m: mean_std([r.get(m) for r in runs]) for m in METRICS}


def markdown(results: dict) -> str:
    """The results table (mean ± sample std over seeds), the lr grids and S²FT's differences vs the other arms."""
    if results.get("schema") != SCHEMA:
        raise ValueError(f"results schema is {results.get('schema')!r}, expected {SCHEMA!r}")
    base, s = results["base"], results["settings"]
    arms = {name: {**a, "summary": summarize(a["runs"])} for name, a in results["arms"].items()}
    gk_skip = s["general_knowledge"].get("skip_reason")
    lines = [
        f"# Quality study: {s['model']}, {s['task']} {s.get('task_kwargs', {})}",
        "",
        f"{s['steps']} steps x batch {s['batch_size']}, seeds {s['seeds']}; mean ± sample std over seeds."
        + (" SMOKE RUN: sizes are tiny, numbers mean nothing." if results.get("smoke") else ""),
        "",
        "| arm | trainable | lr | test EM (%) | GK acc Δ (pp) | held-out ppl | ppl Δ | train (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    gk_base = "skipped" if base.get("gk_acc") is None else f"{100 * base['gk_acc']:.1f} (abs)"
    lines.append(f"| base | 0 | - | {100 * base['test_em']:.1f} | {gk_base} | {base['ppl']:.2f} | - | - | - |")
    for name, a in arms.items():
        m = a["summary"]
        lines.append(
            f"| {name} | {m['trainable_params']['mean']:,.0f} | {a['selected_lr']:g} | {fmt(m['test_em'], 100)} | "
            f"{fmt(m['gk_delta'], 100, signed=True)} | {fmt(m['ppl'], 1, 2)} | {fmt(m['ppl_delta'], 1, 2, True)} | "
            f"{fmt(m['train_seconds'], 1, 0)} | {fmt(m['peak_rss_mib'], 1, 0)} |"
        )
    if gk_skip:
        lines += ["", f"General-knowledge forgetting skipped: {gk_skip}"]
    if any(not r.get("rss_isolated", True) for a in arms.values() for r in a["runs"]):
        lines += ["", "Peak RSS is not comparable here: runs shared one process (--in-process)."]
    lines += ["", "Learning-rate grid (first seed; chosen by val EM, ties by val loss):", ""]
    lines += ["| arm | lr | val EM (%) | val loss | chosen |", "|---|---|---|---|---|"]
    for name, a in arms.items():
        for g in a["lr_grid"]:
            mark = "yes" if g["lr"] == a["selected_lr"] else ""
            lines.append(f"| {name} | {g['lr']:g} | {100 * g['val_em']:.1f} | {g['val_loss']:.3f} | {mark} |")
    if "s2ft" in arms:
        lines += ["", "S²FT minus other arm (difference of means; SE from the seed spread):", ""]
        lines += ["| vs | test EM (pp) | GK acc Δ (pp) | ppl Δ |", "|---|---|---|---|"]
        me = arms["s2ft"]["summary"]
        for name, a in arms.items():
            if name != "s2ft":
                o = a["summary"]
                row = [_diff(me[k], o[k], sc) for k, sc in (("test_em", 100), ("gk_delta", 100), ("ppl_delta", 1))]
                lines.append(f"| {name} | " + " | ".join(row) + " |")
    text = s["held_out_text"]
    lines += [
        "",
        f"Held-out text: {text['source']} (sha256 {text['sha256'][:12]}, up to {text['max_tokens']} tokens).",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Bars with seed-std error bars for each metric and arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("test_em", 100, "test exact match (%)"),
        ("gk_delta", 100, "GK accuracy Δ vs base (pp)"),
        ("ppl_delta", 1, "held-out ppl Δ vs base"),
        ("train_seconds", 1, "training time (s)"),
        ("peak_rss_mib", 1, "peak RSS (MiB)"),
    ]
    summaries = {name: summarize(a["runs"]) for name, a in results["arms"].items()}
    names = list(summaries)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    for ax, (key, scale, title) in zip(axes, panels):
        stats = [summaries[n][key] for n in names]
        means = [(st["mean"] or 0) * scale for st in stats]
        errs = [(st["std"] or 0) * scale for st in stats]
        ax.bar(names, means, yerr=errs, capsize=4, color=["C0", "C1", "C2", "C3"][: len(names)])
        ax.set_title(title + (" (skipped)" if all(st["mean"] is None for st in stats) else ""), fontsize=9)
        ax.axhline(0, color="k", lw=0.5)
    fig.suptitle(f"{results['settings']['model']}: mean ± std over {len(results['settings']['seeds'])} seed(s)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: Path) -> str:
    """Write results.md and results.png next to ``out/results.json``; return the markdown."""
    src = out / "results.json"
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist; run `python tools/quality_study.py run --out {out}` first")
    results = json.loads(src.read_text())
    md = markdown(results)
    (out / "results.md").write_text(md)
    plot(results, out / "results.png")
    return md


# ---- CLI --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="train and evaluate every arm, then write the report")
    r.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    r.add_argument("--seeds", nargs="+", type=int, help="default: study.yaml (first seed runs the lr grid)")
    r.add_argument("--steps", type=int, help="training steps per run (default: study.yaml)")
    r.add_argument("--lr-grid", nargs="+", type=float, help="one grid for every arm (default: per-arm YAML)")
    r.add_argument("--model", help="model folder/.gguf/alias (default: study.yaml, demo:smollm2)")
    r.add_argument("--bigbench", help="bigbench-1.0.0.tar.gz sdist or general_knowledge task.json")
    r.add_argument("--fetch-bigbench", action="store_true", help="pip download the 358 MB bigbench sdist")
    r.add_argument("--config-dir", default=str(REPO / "configs" / "quality"))
    r.add_argument("--smoke", action="store_true", help="tiny sizes (study.yaml `smoke`): a pipeline check")
    r.add_argument("--in-process", action="store_true", help="no subprocess per run (peak RSS not isolated)")
    r.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality"))
    rep = sub.add_parser("report", help="markdown table + PNG from <out>/results.json")
    rep.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality"))
    job = sub.add_parser("_job", help=argparse.SUPPRESS)
    job.add_argument("job_dir")
    args = p.parse_args(argv)
    if args.cmd == "_job":
        d = Path(args.job_dir)
        (d / "child.json").write_text(json.dumps(run_job(json.loads((d / "spec.json").read_text())), indent=1))
        return 0
    if args.cmd == "run":
        if args.steps is not None and args.steps < 1:
            p.error("--steps must be >= 1")
        if args.lr_grid and any(lr <= 0 for lr in args.lr_grid):
            p.error("--lr-grid values must be > 0")
        run_study(args)
    print(write_report(Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

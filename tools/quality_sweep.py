"""Accuracy–forgetting sweep: S²FT vs rank-matched PEFT LoRA vs full fine-tuning on SmolLM2-135M, and its fronts.

    python tools/quality_sweep.py run [--phases grid variants long] [--bigbench SDIST | --fetch-bigbench]
                                      [--out DIR] [--smoke] [--model M] [--in-process]
    python tools/quality_sweep.py report [--out DIR] [--from-jobs --bigbench SDIST]  -> pareto.md, pareto.png

configs/quality/sweep.yaml (over study.yaml's task, data, schedule and evaluation) sets three phases: ``grid``
trains every arm at each lr of its grid x seed at the short budget; ``variants`` runs S²FT's other selection
strategies and trainable components at S²FT's best front point of that grid (so they compare with the grid's seeds
whatever ran before); ``long`` reruns each arm's best lrs (its front points at the short budget) at the long
budget, and the S²FT variants named in ``long.variants`` at the variants' lr. Every point trains on steps x batch
fresh questions and is scored on the held-out test split (exact match), on BIG-bench multiple-choice tasks
(forgetting: pooled accuracy change vs the base, in pp) and on held-out text perplexity. Each run is a job
directory under <out>/sweep/, reused when rerun with the same spec, so an interrupted sweep picks up where it
stopped; pareto.json always holds every finished job, ``complete`` once none is missing.

A job being run holds its folder (a lock), so sweeps over the same --out share the work: each skips the jobs
another is running, and waits for the grid's before planning the later phases from the grid's job folders. Two
sweeps with one thread each (``OMP_NUM_THREADS=1 python tools/quality_sweep.py run ...`` twice) finished 1.16x
the runs per hour of one sweep on both cores of a 2-core CPU (a 100-step S²FT run: 420 s each beside the other
vs 243 s alone).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tools"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import quality_study as qs

SCHEMA = "s2ft-pareto/1"
PHASES = ("grid", "variants", "long")


# ---- configuration -------------------------------------------------------------------------------------------


def load_sweep(config_dir: Path, smoke: bool) -> tuple[dict, dict, dict[str, dict]]:
    """(study settings, sweep settings, {arm: arm config}) with --smoke sizes merged over both."""
    sweep = yaml.safe_load((config_dir / "sweep.yaml").read_text())
    smoke_sweep = sweep.pop("smoke", {})
    study, arms = qs.load_configs(config_dir, list(sweep["arms"]), smoke)
    if smoke:
        variants = smoke_sweep.pop("variants", None)
        sweep = qs._merge(sweep, smoke_sweep)
        sweep["variants"] = variants or sweep["variants"]  # replaced, not merged: the smoke runs fewer
    return study, sweep, arms


def job(study: dict, arm: str, cfg: dict, *, lr: float, seed: int, steps: int, variant: str = "base",
        s2: dict | None = None) -> tuple[str, dict]:  # fmt: skip
    """(job name, spec) of one training run; ``s2`` overrides the S²FT settings (variants)."""
    cfg = json.loads(json.dumps(cfg))
    if s2:
        cfg["s2"] = {**cfg.get("s2", {}), **s2}
    spec = {
        **study,
        "method": cfg["method"],
        "arm": arm,
        "arm_config": cfg,
        "variant": variant,
        "lr": lr,
        "seed": seed,
        "steps": steps,
        "train_size": steps * study["batch_size"],  # every question seen once, whatever the budget
    }
    tag = arm if variant == "base" else f"{arm}-{variant}"
    return f"{tag}_lr{lr:g}_n{steps}_s{seed}", spec


# ---- aggregation -----------------------------------------------------------------------------------------------

_KEYS = ("arm", "variant", "lr", "steps")


def record(result: dict, base: dict) -> dict:
    """One run as pareto.json lists it (metrics as deltas against the base model)."""
    spec = result["spec"]
    rec = {k: spec[k] for k in (*_KEYS, "seed")}
    rec.update(
        test_em=result["test_em"],
        val_em=result["val_em"],
        forget_acc_delta=100 * (result["mc_acc"] - base["mc_acc"]),
        forget_task_deltas={t: 100 * (v["acc"] - base["mc"][t]["acc"]) for t, v in result["mc"].items()},
        ppl=result["ppl"],
        ppl_delta=result["ppl"] - base["ppl"],
        trainable_params=result["trainable_params"],
        train_seconds=result["train_seconds"],
        step_seconds=result["step_seconds"],
        peak_rss_mib=result["peak_rss_mib"],
        final_loss=result["final_loss"],
        lora_rank=result.get("lora_rank"),
        s2=spec["arm_config"].get("s2") if spec["method"] == "s2ft" else None,
    )
    return rec


def points(runs: list[dict]) -> list[dict]:
    """Mean and sample std over seeds per (arm, variant, lr, steps)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(r[k] for k in _KEYS), []).append(r)
    out = []
    for key, rs in groups.items():
        p = dict(zip(_KEYS, key))
        p["seeds"] = sorted(r["seed"] for r in rs)
        for m in ("test_em", "forget_acc_delta", "ppl_delta", "train_seconds", "peak_rss_mib", "trainable_params"):
            xs = [float(r[m]) for r in rs]
            p[m] = statistics.fmean(xs)
            p[f"{m}_std"] = statistics.stdev(xs) if len(xs) > 1 else None
        out.append(p)
    return out


def front(pts: list[dict], key: str = "forget_acc_delta", sign: int = 1) -> list[dict]:
    """Points not dominated in (test EM up, ``sign`` × ``key`` up), sorted by test EM (sign -1: lower is better)."""
    keep = []
    for p in pts:
        dominated = any(
            q["test_em"] >= p["test_em"]
            and sign * q[key] >= sign * p[key]
            and (q["test_em"] > p["test_em"] or sign * q[key] > sign * p[key])
            for q in pts
        )
        if not dominated:
            keep.append(p)
    return sorted(keep, key=lambda p: p["test_em"])


def best(pts: list[dict]) -> dict:
    """The front point with the largest in-domain gain plus retention (test EM pp + forgetting delta pp)."""
    return max(front(pts), key=lambda p: 100 * p["test_em"] + p["forget_acc_delta"])


# ---- the sweep -------------------------------------------------------------------------------------------------


def _base_eval(study: dict, out: Path, in_process: bool) -> dict:
    spec = {**study, "method": "base", "arm": "base", "lr": 0.0, "seed": 0}
    return qs.execute(spec, out, in_process, name="base")


def settings(args: argparse.Namespace) -> tuple[dict, dict, dict[str, dict]]:
    """(study, sweep, arms) as the run uses them: the forgetting tasks extracted from the BIG-bench sdist."""
    from benchmarks.quality import extract_task, fetch_bigbench_sdist

    study, sweep, arms = load_sweep(Path(args.config_dir), args.smoke)
    if args.model:
        study["model"] = args.model
    sdist = Path(args.bigbench) if args.bigbench else fetch_bigbench_sdist()
    study["mc_tasks"] = {t: str(extract_task(sdist, t)) for t in sweep["forgetting"]["tasks"]}
    study["eval"]["mc_max_items"] = sweep["forgetting"]["max_items_per_task"]
    study["gk_path"] = None  # general_knowledge is one of the pooled tasks
    return study, sweep, arms


def finished_runs(args: argparse.Namespace) -> tuple[dict, dict, dict, dict, list[dict]]:
    """(study, sweep, arms, base result, finished run results) read from the job folders of an unfinished sweep.

    A result counts only if it is the job today's settings would run (same key), so stale jobs are left out.
    """
    study, sweep, arms = settings(args)
    out = Path(args.out) / "sweep"
    base_file = out / "jobs" / "base" / "result.json"
    if not base_file.is_file():
        raise FileNotFoundError(f"{base_file} does not exist: the sweep has not evaluated the base model yet")
    overrides = variant_settings(sweep)
    results = []
    for f in sorted((out / "jobs").glob("*/result.json")):
        r = json.loads(f.read_text())
        spec = r["spec"]
        if f.parent.name == "base" or spec.get("arm") not in arms:
            continue
        variant = spec.get("variant", "base")
        name, want = job(study, spec["arm"], arms[spec["arm"]], lr=spec["lr"], seed=spec["seed"],
                         steps=spec["steps"], variant=variant, s2=overrides.get(variant))  # fmt: skip
        if name == f.parent.name and r.get("key") == qs._job_key({**want, "job_dir": str(f.parent)}):
            results.append(r)
    return study, sweep, arms, json.loads(base_file.read_text()), results


def phase_jobs(
    phase: str, study: dict, sweep: dict, arms: dict, base: dict, grid: list[dict]
) -> list[tuple[str, dict]]:
    """(name, spec) of every job of one phase; ``variants`` and ``long`` are planned from the finished ``grid``."""
    seeds, short = sweep["seeds"], sweep["grid"]
    if phase == "grid":  # seed by seed over every arm, so an unfinished grid already compares the arms
        n_lrs = len(next(iter(short["lrs"].values())))
        return [
            job(study, arm, cfg, lr=short["lrs"][arm][i], seed=s, steps=short["steps"])
            for s in seeds
            for i in range(n_lrs)
            for arm, cfg in arms.items()
        ]
    pts = points([record(r, base) for r in grid])
    variants = variant_settings(sweep)
    at = variants_point(pts, short["steps"]) if "s2ft" in arms else None
    if phase == "variants":  # seed by seed over every variant, so an unfinished phase already compares them all
        if at is None:
            return []
        return [
            job(study, "s2ft", arms["s2ft"], lr=at["lr"], seed=s, steps=at["steps"], variant=name, s2=s2)
            for s in seeds
            for name, s2 in variants.items()
        ]
    long = sweep["long"]
    jobs = [
        job(study, arm, cfg, lr=lr, seed=s, steps=long["steps"])
        for arm, cfg in arms.items()
        for lr in _top_lrs([p for p in pts if p["arm"] == arm], short["steps"], long["top_lrs"])
        for s in seeds
    ]
    if at is not None:  # variants named in long.variants (the candidates for the default) at the variants' lr
        jobs += [
            job(study, "s2ft", arms["s2ft"], lr=at["lr"], seed=s, steps=long["steps"], variant=name, s2=variants[name])
            for name in long.get("variants") or []
            for s in seeds
        ]
    return jobs


def finished_grid(study: dict, sweep: dict, arms: dict, base: dict, results: list[dict]) -> tuple[list, list[str]]:
    """(the grid's results, names of its jobs without one) among ``results``."""
    done = {Path(r["spec"]["job_dir"]).name: r for r in results}
    names = [name for name, _ in phase_jobs("grid", study, sweep, arms, base, [])]
    return [done[n] for n in names if n in done], [n for n in names if n not in done]


def remaining(study: dict, sweep: dict, arms: dict, base: dict, results: list[dict]) -> tuple[list[str], bool]:
    """(names of the sweep's jobs without a result, whether the grid has finished so the later phases are known)."""
    grid, missing = finished_grid(study, sweep, arms, base, results)
    if missing:
        return missing, False
    done = {Path(r["spec"]["job_dir"]).name for r in results}
    later = [name for ph in PHASES[1:] for name, _ in phase_jobs(ph, study, sweep, arms, base, grid)]
    return [n for n in later if n not in done], True


def run_sweep(args: argparse.Namespace) -> None:
    """Run the chosen phases (each job reused if finished), then pareto.json from every finished job."""
    study, sweep, arms = settings(args)
    out = Path(args.out) / "sweep"
    base = _base_eval(study, out, args.in_process)
    for phase in [ph for ph in PHASES if ph in args.phases]:
        grid = []
        if phase != "grid":
            # from the job folders, so a phase can run beside (or after) the sweep that ran the grid
            grid, missing = finished_grid(study, sweep, arms, base, finished_runs(args)[-1])
            if missing:
                raise RuntimeError(
                    f"phase {phase} is planned from the finished grid, which still lacks {len(missing)} runs "
                    f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): run `--phases grid` first "
                    "(or wait for the sweep running it)"
                )
        busy = []
        for name, spec in phase_jobs(phase, study, sweep, arms, base, grid):
            try:
                qs.execute(spec, out, args.in_process, name=name)
            except qs.JobClaimed as e:  # another sweep over this --out runs it: go on with the next job
                print(f"[quality] {name}: skipped, {e}", flush=True)
                busy.append((name, spec))
        if phase == "grid" and busy and set(args.phases) - {"grid"}:
            for name, spec in busy:  # the later phases are planned from the whole grid
                print(f"[quality] {name}: waiting for the process running it", flush=True)
                qs.wait_for_claim(out / "jobs" / name)
                qs.execute(spec, out, args.in_process, name=name)  # its result, or run here if that process died
    report_from_jobs(args)


def report_from_jobs(args: argparse.Namespace) -> dict:
    """pareto.json from every finished job folder; complete once no job of the whole sweep is missing."""
    study, sweep, arms, base, results = finished_runs(args)
    missing, grid_done = remaining(study, sweep, arms, base, results)
    return write_pareto(Path(args.out), study, sweep, base, results, args.smoke, missing=missing, grid_done=grid_done)


def variant_settings(sweep: dict) -> dict[str, dict]:
    """Every S²FT variant by name: its s2 settings (selection strategies and components alike)."""
    return {**sweep["variants"]["strategies"], **sweep["variants"]["components"]}


def variants_point(pts: list[dict], steps: int) -> dict:
    """S²FT's best front point among its base runs at the short budget: where the variants train."""
    return best([p for p in pts if p["arm"] == "s2ft" and p["variant"] == "base" and p["steps"] == steps])


def _top_lrs(pts: list[dict], steps: int, k: int) -> list[float]:
    """The arm's ``k`` best lrs at ``steps``: front points first (by test EM), then the rest by test EM."""
    pts = [p for p in pts if p["steps"] == steps and p["variant"] == "base"]
    on_front = {p["lr"] for p in front(pts)}
    ranked = sorted(pts, key=lambda p: (p["lr"] in on_front, p["test_em"]), reverse=True)
    return [p["lr"] for p in ranked[:k]]


def write_pareto(
    out: Path,
    study: dict,
    sweep: dict,
    base: dict,
    results: list[dict],
    smoke: bool,
    missing: list[str],
    grid_done: bool,
) -> dict:
    """pareto.json (every run, points, fronts, recommendation), then pareto.md and pareto.png from it."""
    from benchmarks.sysinfo import describe

    runs = [record(r, base) for r in results]
    pts = points(runs)
    base_pts = [p for p in pts if p["variant"] == "base"]
    arms = sorted({p["arm"] for p in base_pts})
    data = {
        "schema": SCHEMA,
        "smoke": smoke,
        "complete": grid_done and not missing,
        "missing": missing,  # jobs without a result (only the grid's until it finishes: it plans the rest)
        "grid_done": grid_done,
        "system": describe(),
        "settings": {k: v for k, v in study.items() if k not in ("seeds", "smoke")} | {"sweep": sweep},
        "base": {
            "test_em": base["test_em"],
            "mc_acc": base["mc_acc"],
            "mc": base["mc"],
            "mc_items": base["mc_items"],
            "ppl": base["ppl"],
        },
        "runs": runs,
        "points": pts,
        "fronts": {a: front([p for p in base_pts if p["arm"] == a]) for a in arms},
        "best": {a: best([p for p in base_pts if p["arm"] == a]) for a in arms},
    }
    if "s2ft" in arms:
        data["variants_at"] = variants_point(pts, sweep["grid"]["steps"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "pareto.json").write_text(json.dumps(data, indent=1))
    write_report(out)
    return data


# ---- report ------------------------------------------------------------------------------------------------------


def _unfinished(data: dict) -> str:
    n, left = len(data["runs"]), len(data.get("missing", []))
    to_go = f"{left} more to run" if data.get("grid_done") else f"the grid still lacks {left}, then the later phases"
    return f"UNFINISHED SWEEP: {n} runs so far, {to_go}; fronts and best points may still move."


def _pm(p: dict, key: str, scale: float = 1.0, digits: int = 1) -> str:
    sd = p.get(f"{key}_std")
    v = f"{p[key] * scale:.{digits}f}"
    return v if sd is None else f"{v} ± {sd * scale:.{digits}f}"


def markdown(data: dict) -> str:
    """Tables: every point (mean ± std over seeds), the fronts, the best point per arm and the variants."""
    if data.get("schema") != SCHEMA:
        raise ValueError(f"pareto schema is {data.get('schema')!r}, expected {SCHEMA!r}")
    s, b = data["settings"], data["base"]
    lines = [
        f"# Accuracy–forgetting sweep: {s['model']}, {s['task']} {s.get('task_kwargs', {})}",
        "",
        f"Base: test EM {100 * b['test_em']:.1f}%, pooled BIG-bench MC accuracy {100 * b['mc_acc']:.1f}% on "
        f"{b['mc_items']} items ("
        + ", ".join(f"{t} {100 * v['acc']:.1f}% of {v['n']}" for t, v in b["mc"].items())
        + f"), held-out ppl {b['ppl']:.2f}."
        + (" SMOKE RUN: sizes are tiny, numbers mean nothing." if data.get("smoke") else "")
        + ("" if data.get("complete", True) else f" {_unfinished(data)}"),
        "",
        "Forgetting Δ = pooled MC accuracy minus the base's (pp; negative = forgot); mean ± sample std over seeds.",
        "",
        "| arm | variant | lr | steps | test EM % | forgetting Δ pp | ppl Δ | trainable | train s | peak MiB | front |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    on_front = {(p["arm"], p["lr"], p["steps"]) for f in data["fronts"].values() for p in f}
    for p in sorted(data["points"], key=lambda p: (p["arm"], p["variant"], p["steps"], p["lr"])):
        mark = "yes" if p["variant"] == "base" and (p["arm"], p["lr"], p["steps"]) in on_front else ""
        lines.append(
            f"| {p['arm']} | {p['variant']} | {p['lr']:g} | {p['steps']} | {_pm(p, 'test_em', 100)} | "
            f"{_pm(p, 'forget_acc_delta')} | {_pm(p, 'ppl_delta', 1, 2)} | {p['trainable_params']:,.0f} | "
            f"{p['train_seconds']:.0f} | {p['peak_rss_mib']:.0f} | {mark} |"
        )
    lines += ["", "Best front point per arm (largest test EM pp + forgetting Δ pp):", ""]
    lines += ["| arm | lr | steps | test EM % | forgetting Δ pp | ppl Δ |", "|---|---|---|---|---|---|"]
    for arm, p in data["best"].items():
        lines.append(
            f"| {arm} | {p['lr']:g} | {p['steps']} | {_pm(p, 'test_em', 100)} | {_pm(p, 'forget_acc_delta')} | "
            f"{_pm(p, 'ppl_delta', 1, 2)} |"
        )
    if "variants_at" in data:
        at = data["variants_at"]
        lines += ["", f"S²FT variants train at lr {at['lr']:g}, {at['steps']} steps: S²FT's best front point of the "
                  "short-budget grid."]  # fmt: skip
    return "\n".join(lines) + "\n"


# Plotted series: each arm's learning-rate grid, and S²FT Down only (the quickstart's setting, run at both budgets).
_SERIES = {("s2ft", "base"): ("s2ft", "C0"), ("lora", "base"): ("lora", "C1"), ("full", "base"): ("full", "C2"),
           ("s2ft", "down_only"): ("s2ft Down only", "C4")}  # fmt: skip


def plot(data: dict, path: Path) -> None:
    """Forgetting Δ and ppl Δ against test EM: a colour per series, a marker per budget, seed-std error bars, fronts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = ["o", "s", "^", "D"]
    budgets = sorted({p["steps"] for p in data["points"]})
    groups: dict[tuple, list[dict]] = {}
    for p in data["points"]:
        if (p["arm"], p["variant"]) in _SERIES:
            groups.setdefault((p["arm"], p["variant"]), []).append(p)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, key, label in ((axes[0], "forget_acc_delta", "forgetting Δ, pooled MC accuracy (pp)"),
                           (axes[1], "ppl_delta", "held-out perplexity Δ")):  # fmt: skip
        for series, pts in groups.items():
            c = _SERIES[series][1]
            for p in pts:
                ax.errorbar(
                    100 * p["test_em"], p[key], xerr=100 * (p["test_em_std"] or 0), yerr=p[f"{key}_std"] or 0,
                    fmt=markers[budgets.index(p["steps"]) % len(markers)], color=c, capsize=2, ms=5, alpha=0.85,
                )  # fmt: skip
                ax.annotate(
                    f"{p['lr']:g}", (100 * p["test_em"], p[key]), fontsize=6, xytext=(3, 2), textcoords="offset points"
                )
            f = front(pts, key, sign=1 if key == "forget_acc_delta" else -1)  # lower perplexity Δ is better
            ax.plot([100 * p["test_em"] for p in f], [p[key] for p in f], "-", color=c, lw=1.2)
        ax.axhline(0, color="k", lw=0.5)
        ax.set_xlabel("held-out test exact match (%)")
        ax.set_ylabel(label)
    handles = [
        plt.Line2D([], [], color=_SERIES[s][1], marker="o", ls="-", label=_SERIES[s][0]) for s in _SERIES if s in groups
    ]
    handles += [
        plt.Line2D([], [], color="k", marker=markers[i % 4], ls="", label=f"{b} steps") for i, b in enumerate(budgets)
    ]
    axes[0].legend(handles=handles, fontsize=7, loc="best")
    fig.suptitle(f"{data['settings']['model']}: mean ± std over seeds; lines = accuracy–forgetting fronts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(out: Path) -> str:
    src = out / "pareto.json"
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist; run `python tools/quality_sweep.py run --out {out}` first")
    data = json.loads(src.read_text())
    md = markdown(data)
    (out / "pareto.md").write_text(md)
    plot(data, out / "pareto.png")
    return md


def _settings_args(p: argparse.ArgumentParser) -> None:
    """The options that decide every job's spec (shared by `run` and `report --from-jobs`)."""
    p.add_argument("--model", help="model folder/.gguf/alias (default: study.yaml, demo:smollm2)")
    p.add_argument("--bigbench", help="bigbench-1.0.0.tar.gz sdist (default: fetch it once into the cache)")
    p.add_argument("--config-dir", default=str(REPO / "configs" / "quality"), help="sweep.yaml and the arm configs")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (sweep.yaml `smoke`): a pipeline check")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality"), help="results folder")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run (or resume) the sweep, then write pareto.json/md/png")
    _settings_args(r)
    r.add_argument(
        "--phases",
        nargs="+",
        default=list(PHASES),
        choices=PHASES,
        help="phases to run (always in the order grid, variants, long)",
    )
    r.add_argument("--in-process", action="store_true", help="no subprocess per run (peak RSS not isolated)")
    rep = sub.add_parser("report", help="pareto.md + pareto.png from <out>/pareto.json")
    _settings_args(rep)
    rep.add_argument(
        "--from-jobs",
        action="store_true",
        help="first rebuild pareto.json from the runs finished so far (an unfinished or still running sweep)",
    )
    args = p.parse_args(argv)
    if args.cmd == "run":
        run_sweep(args)
    elif args.from_jobs:
        report_from_jobs(args)
    print(write_report(Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

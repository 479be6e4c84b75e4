"""Census: run S²FT end to end on every model type of the installed transformers that builds as a tiny model.

    python tools/census.py [--only TYPE ...] [--limit N] [--redo] [--timeout S] [--memory-gb G] [--jobs J] [--report]

For each model type: build a tiny random model (`benchmarks.tiny_models`, every sub-config shrunk) with every
parameter and persistent buffer perturbed, analyse it (with the probe), plan and prepare it (permutation
verified), train a few steps, extract the adapter, merge it into a fresh stock copy and compare logits with the
trained model. Each type runs in a forked child with a time limit and an address-space limit, and its result
is written to ``--work`` (default ~/.cache/s2ft-lightning/census-<transformers version>) at once, so a crash in
one family is recorded, not fatal, and an interrupted census resumes where it stopped (``--redo`` after a code
change). ``--report`` (also run at the end) writes docs/CENSUS.md and docs/census.json.

Outcomes: ``verified`` (everything trains and round-trips), ``partial`` (it does, and some part stays frozen,
named with the reason), ``refused`` (the analysis or the pipeline refuses with the reason), ``crash`` (anything
else: an unexpected exception, a wrong round trip, a timeout or the memory guard after the build), and
``not built`` (the tiny builder could not make the model: no text/vision-language class, or an invalid config).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # benchmarks/ (tiny models) is repository code, not installed

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("S2FT_KERNELS", "torch")

DOCS = REPO / "docs"
RATIO = {"o_ratio": 0.5, "v_ratio": 0.5, "u_ratio": 0.25, "d_ratio": 0.25}
ROLES = {"o_ratio": "o", "v_ratio": "v", "u_ratio": "up", "d_ratio": "down"}
STEPS = 3
ROUND_TRIP_TOL = 1e-5  # relative to the logit scale, fp32
TINY_PARAMS = 200_000_000  # tiny models stay far below; above it a sub-config was not shrunk (a memory risk)


def model_types() -> list[str]:
    """Every model type with a model class in the installed transformers (sub-config-only types excluded)."""
    from transformers.models.auto import modeling_auto as ma

    names: set[str] = set()
    for attr in dir(ma):
        if attr.startswith("MODEL_") and attr.endswith("_MAPPING_NAMES") and isinstance(getattr(ma, attr), dict):
            names.update(getattr(ma, attr))
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return sorted(n for n in names if n in CONFIG_MAPPING_NAMES)


def _logits(model, inputs) -> Any:
    import torch

    from surgery.verify import logits_of

    with torch.no_grad():
        out = model(**inputs, **({"use_cache": False} if hasattr(model.config, "use_cache") else {}))
    return logits_of(out).detach().double()


def _rel(a, b) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def _build(model_type: str):
    from benchmarks.tiny_models import perturb, tiny_model

    return perturb(tiny_model(model_type, seed=0), seed=1, scale=0.05)


def census_one(model_type: str, progress: Any = None) -> dict[str, Any]:
    """Run the whole pipeline on one tiny model; never raises (every outcome is a result)."""
    t0 = time.perf_counter()
    result = _census(model_type, progress or (lambda stage: None))
    return {**result, "seconds": round(time.perf_counter() - t0, 2)}


def _census(model_type: str, step: Any) -> dict[str, Any]:
    import torch

    from benchmarks.tiny_models import tiny_model_class
    from s2ft_lightning import layers
    from s2ft_lightning.adapters import extract_adapter, merge_adapter
    from s2ft_lightning.pipeline import S2Config, prepare_model
    from surgery.analyze import StructureError, analyze
    from surgery.coverage import main_input_refusal
    from surgery.planner import make_plan
    from surgery.select import role_members
    from surgery.verify import make_inputs

    res: dict[str, Any] = {"model_type": model_type}
    step("build")
    try:
        cls = tiny_model_class(model_type)
    except Exception as e:  # the tiny builder: no model class for the type, or an invalid shrunk config
        try:  # the class of the full-size default config still says whether it is a token model at all
            from transformers import AutoConfig

            cls = tiny_model_class(model_type, AutoConfig.for_model(model_type))
        except Exception:
            cls = None
        if cls is None or main_input_refusal(cls) is None:
            return {**res, "status": "not built", "reason": f"{type(e).__name__}: {str(e)[:300]}"}
    why = main_input_refusal(cls)  # decided from the class, as the analysis would: no need to build it
    if why is not None:
        return {**res, "class": cls.__name__, "status": "refused", "stage": "analysis", "reason": why}
    try:
        model = _build(model_type)
    except Exception as e:  # the tiny builder: invalid shrunk config, missing dependency
        return {**res, "status": "not built", "reason": f"{type(e).__name__}: {str(e)[:300]}"}
    res["class"] = type(model).__name__
    res["params"] = sum(p.numel() for p in model.parameters())
    if res["params"] > TINY_PARAMS:  # a sub-config the builder does not know how to shrink: not a tiny model
        why = (
            f"the tiny builder left {res['params']:,} parameters (more than {TINY_PARAMS:,}): a config it cannot shrink"
        )
        return {**res, "status": "not built", "reason": why}
    step("analyse")
    try:
        try:
            structures = analyze(model)
        except StructureError as e:
            return {**res, "status": "refused", "stage": "analysis", "reason": str(e)[:600]}
        res["couplings"] = len(structures.couplings)
        res["frozen"] = [f.to_dict() for f in structures.frozen]
        ratios = {k: v for k, v in RATIO.items() if any(role_members(c, ROLES[k]) for c in structures.couplings)}
        res["ratios"] = ratios
        if not ratios:
            reasons = sorted({r for role in ROLES.values() for r in structures.frozen_reasons(role)})
            return {**res, "status": "refused", "stage": "selection", "reason": "; ".join(reasons)[:600]}
        cfg = S2Config(**{**dict.fromkeys(RATIO, 0.0), **ratios}, seed=3)
        inputs = make_inputs(model, 2, 12, seed=5)
        base_logits = _logits(model.eval(), inputs)
        step("plan")
        plan = make_plan(model, structures, cfg)
        step("prepare")
        plan = prepare_model(model, cfg, plan=plan)
        res["trainable"] = sum(p.numel() for p in layers.block_parameters(model))
        res["verify_rel"] = plan.certificate["rel_diff"] if plan.certificate else None
        step("train")
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        g = torch.Generator().manual_seed(7)
        losses = []
        for _ in range(STEPS):
            batch = make_inputs(model, 2, 12, seed=int(torch.randint(0, 1 << 30, (1,), generator=g)))
            out = model(**batch, **({"use_cache": False} if hasattr(model.config, "use_cache") else {}))
            from surgery.verify import logits_of

            logits = logits_of(out).float()
            targets = torch.randint(0, logits.shape[-1], logits.shape[:-1], generator=g)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
        res["losses"] = losses
        moved = sum(int(p.detach().abs().max() > 0) for p in layers.block_parameters(model))
        if not all(map(lambda x: x == x and abs(x) != float("inf"), losses)) or moved == 0:
            return {**res, "status": "crash", "stage": "train", "reason": f"losses {losses}, {moved} deltas moved"}
        model.eval()
        trained = _logits(model, inputs)
        res["trained_vs_base"] = _rel(base_logits, trained)
        step("round trip")
        adapter = extract_adapter(model, plan)
        fresh = _build(model_type).eval()
        stock = _logits(fresh, inputs)
        if _rel(base_logits, stock) > 0:
            return {**res, "status": "crash", "stage": "round trip", "reason": "the tiny builder is not deterministic"}
        merge_adapter(fresh, adapter)
        res["round_trip_rel"] = _rel(trained, _logits(fresh, inputs))
        if not res["round_trip_rel"] <= ROUND_TRIP_TOL:
            return {**res, "status": "crash", "stage": "round trip", "reason": f"rel {res['round_trip_rel']:.2e}"}
    except Exception as e:  # a refusal by the pipeline names its reason; anything else is a crash
        from s2ft_lightning.layers import S2InstallError
        from surgery.config import SelectionError
        from surgery.plan import PlanError

        refused = isinstance(e, (S2InstallError, SelectionError, PlanError))
        return {
            **res,
            "status": "refused" if refused else "crash",
            "stage": "pipeline",
            "reason": f"{type(e).__name__}: {str(e)[:500]}",
            **({} if refused else {"traceback": traceback.format_exc()[-2500:]}),
        }
    return {**res, "status": "partial" if res["frozen"] else "verified"}


def _child(model_type: str, out: Path, memory_gb: float) -> None:
    limit = int(memory_gb * (1 << 30))
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    stage = out.with_suffix(".stage")
    result = {**census_one(model_type, progress=lambda s: stage.write_text(s)), "code": _commit()}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, out)
    stage.unlink(missing_ok=True)


def _start(model_type: str, work: Path, memory_gb: float) -> int:
    """Fork the child that runs ``model_type``; returns its pid (the child never returns)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            import torch

            torch.set_num_threads(1)
            _child(model_type, work / f"{model_type}.json", memory_gb)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid


def _finish(model_type: str, work: Path, status: int | None, timeout: float, memory_gb: float) -> dict[str, Any]:
    """The child's result, or a timeout, a signal or a failed child recorded as the result."""
    out = work / f"{model_type}.json"
    stage = out.with_suffix(".stage")
    if out.is_file() and status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return json.loads(out.read_text())
    where = stage.read_text() if stage.is_file() else "start"
    stage.unlink(missing_ok=True)
    if status is None:
        why = f"timeout after {timeout:.0f}s"
    elif os.WIFSIGNALED(status):
        why = f"killed by signal {os.WTERMSIG(status)} (memory guard {memory_gb:g} GB or OOM)"
    else:
        why = f"child exited with {os.WEXITSTATUS(status)} (memory guard {memory_gb:g} GB hit?)"
    status_name = "not built" if where == "build" else "crash"
    result = {"model_type": model_type, "status": status_name, "stage": where, "reason": why, "code": _commit()}
    out.write_text(json.dumps(result, indent=1))
    return result


def run_all(todo: list[str], work: Path, timeout: float, memory_gb: float, jobs: int = 1) -> list[dict[str, Any]]:
    """Run ``todo`` in forked children, ``jobs`` at a time, each killed after ``timeout`` seconds."""
    running: dict[int, tuple[str, float]] = {}
    results, queue, n = [], list(todo), len(todo)
    while queue or running:
        while queue and len(running) < jobs:
            t = queue.pop(0)
            running[_start(t, work, memory_gb)] = (t, time.monotonic())
        time.sleep(0.1)
        for pid, (t, t0) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if not done and time.monotonic() - t0 < timeout:
                continue
            if not done:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = None
            del running[pid]
            results.append(_finish(t, work, status, timeout, memory_gb))
            r = results[-1]
            print(f"[{len(results)}/{n}] {t}: {r['status']} {r.get('reason', '')[:120]}", flush=True)
    return results


def run_one(model_type: str, work: Path, timeout: float, memory_gb: float) -> dict[str, Any]:
    """`run_all` for one model type."""
    return run_all([model_type], work, timeout, memory_gb)[0]


# ---------------------------------------------------------------------------------------------------- report
_ORDER = ("verified", "partial", "refused", "crash", "not built")


def _frozen_summary(r: dict) -> str:
    """What stays frozen, one entry per distinct reason: the reason, how many modules, the first one."""
    parts: dict[str, list[str]] = {}
    for f in r.get("frozen", []):
        parts.setdefault(f["reason"], []).append(f["name"])
    out = []
    for reason, names in parts.items():
        where = names[0] if len(names) == 1 else f"{len(names)} modules, e.g. {names[0]}"
        out.append(f"{where}: {reason[:240]}")
    return "; ".join(out).replace("|", "\\|")


_CODE = ("surgery", "s2ft_lightning", "benchmarks/tiny_models.py", "tools/census.py")


def _commit() -> str:
    """The last commit that changed the code a census result depends on (+changes when that code is edited)."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "log", "-1", "--format=%h", "--", *_CODE], cwd=REPO, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *_CODE], cwd=REPO, capture_output=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def report(work: Path, docs: Path) -> dict[str, Any]:
    """Gather the per-type results into docs/census.json and docs/CENSUS.md."""
    import torch
    import transformers

    results = [json.loads(p.read_text()) for p in sorted(work.glob("*.json"))]
    counts = {s: sum(r["status"] == s for r in results) for s in _ORDER}
    codes = sorted({r.get("code", "unknown") for r in results})
    summary = {
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "code": _commit(),
        "results_from_code": codes,
        "model_types": len(results),
        "counts": counts,
        "results": [{k: v for k, v in r.items() if k != "traceback"} for r in results],
    }
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "census.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    lines = [
        "# Census: S²FT on every model type of transformers " + transformers.__version__,
        "",
        f"Generated by `python tools/census.py` (do not edit; torch {summary['torch']}, results from code "
        f"{', '.join(codes)}): "
        "per model type a tiny random model with every "
        "parameter and persistent buffer perturbed is analysed and probed, planned (o/v 0.5, up/down 0.25 where "
        "the structure exists), prepared with verification, trained 3 AdamW steps, and its adapter merged into a "
        f"fresh stock copy must give the trained model's logits (fp32, ≤ {ROUND_TRIP_TOL:g} of the logit scale).",
        "",
        "| outcome | model types |",
        "|---|---:|",
        *(f"| {s} | {counts[s]} |" for s in _ORDER),
        "",
    ]
    for s in _ORDER:
        rows = [r for r in results if r["status"] == s]
        if not rows:
            continue
        lines += [f"## {s} ({len(rows)})", ""]
        if s in ("verified", "partial"):
            lines += ["| model type | class | trains | round trip | frozen |", "|---|---|---|---:|---|"]
            for r in rows:
                trains = ", ".join(ROLES[k] for k in r.get("ratios", {}))
                lines.append(
                    f"| {r['model_type']} | {r.get('class', '')} | {trains} | {r.get('round_trip_rel', 0):.1e} | "
                    f"{_frozen_summary(r) or '-'} |"
                )
        else:
            lines += ["| model type | class | stage | reason |", "|---|---|---|---|"]
            for r in rows:
                reason = str(r.get("reason", "")).replace("|", "\\|").replace("\n", " ")[:400]
                lines.append(f"| {r['model_type']} | {r.get('class', '')} | {r.get('stage', '')} | {reason} |")
        lines.append("")
    (docs / "CENSUS.md").write_text("\n".join(lines))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", help="these model types (default: every one)")
    p.add_argument("--limit", type=int, default=0, help="run at most N types not yet done, then report")
    p.add_argument("--redo", action="store_true", help="run types that already have a result again")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per model type")
    p.add_argument("--memory-gb", type=float, default=6.0, help="address-space limit of each child")
    p.add_argument("--jobs", type=int, default=1, help="children at a time")
    p.add_argument("--work", type=Path, default=None, help="per-type results (resumable)")
    p.add_argument("--docs", type=Path, default=DOCS, help="where CENSUS.md and census.json go")
    p.add_argument("--report", action="store_true", help="only write the report from the results so far")
    args = p.parse_args(argv)
    if args.work is None:
        import transformers

        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
        args.work = cache / "s2ft-lightning" / f"census-{transformers.__version__}"
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.report:
        import torch  # noqa: F401 - imported once here, inherited by every forked child

        import s2ft_lightning.pipeline  # noqa: F401
        import surgery.analyze  # noqa: F401

        todo = args.only or model_types()
        if not args.redo:
            todo = [t for t in todo if not (args.work / f"{t}.json").is_file()]
        if args.limit:
            todo = todo[: args.limit]
        run_all(todo, args.work, args.timeout, args.memory_gb, args.jobs)
    summary = report(args.work, args.docs)
    print(json.dumps(summary["counts"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

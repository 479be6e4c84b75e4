"""The `long-context` benchmark: peak memory and step time against sequence length, a fresh process per point.

Series: the frozen floor (stock loss), S²FT with the stock and the chunked loss, PEFT LoRA at S²FT's trainable
count (stock and chunked loss) and full fine-tuning, each without and with activation checkpointing, batch 1,
512 → 8192 tokens. Each series runs its lengths in ascending order; once it has two measured points, a length
whose peak (linear in tokens through them) would pass ``max_peak_mib`` is recorded as ``skipped`` with the
prediction, and a series stops after an out-of-memory kill or a timeout. Built on `train_suite` (the same model
build, modes, step and fresh-process measurement).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import train_suite as ts

MODES = ["frozen", "s2ft", "s2ft-chunked", "lora", "lora-chunked", "full"]

# SmolLM2-135M (the demo model): Llama, hidden 576, 30 layers, 9 q / 3 kv heads, FFN 1536, tied 49,152 vocabulary.
SMOLLM2 = dict(
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    intermediate_size=1536,
    vocab_size=49152,
    tie_word_embeddings=True,
    rope_theta=100000.0,
)

CONFIGS: dict[str, dict[str, Any]] = {
    # The quickstart's S²FT (Down columns of 6.2% of the channels, 1.64 M weights) on random SmolLM2 weights, fp32.
    "long-context": dict(
        model=SMOLLM2,
        dtype="float32",
        device="cpu",
        threads=None,  # every core: run it on a quiet machine
        batch=1,
        seqs=[512, 1024, 2048, 4096, 8192],
        o_ratio=0.0,
        d_ratio=0.062,
        slices="hand",
        modes=MODES,
        checkpointing=[False, True],
        steps=2,
        warmup=1,
        timeout_s=3600,
        compile_timeout_s=3600,
        max_peak_mib=16000,
        isolate=True,
    ),
    # LLaMA-7B shapes in bf16 on one GPU with the paper's LLaMA-2 ratios (tools/gpu_check.sh).
    "long-context-7b": dict(
        model=ts._LLAMA_7B,
        dtype="bfloat16",
        device="cuda",
        threads=None,
        batch=1,
        seqs=[512, 1024, 2048, 4096, 8192],
        o_ratio=0.052,
        d_ratio=0.02,
        slices="hand",
        modes=MODES,
        checkpointing=[False, True],
        # A GPU's time is short: the series the targets need first, full fine-tuning last.
        order=[
            ["s2ft-chunked", False],
            ["frozen", False],
            ["lora", False],
            ["s2ft-chunked", True],
            ["frozen", True],
            ["lora", True],
            ["s2ft", False],
            ["s2ft", True],
            ["lora-chunked", False],
            ["lora-chunked", True],
            ["full", False],
            ["full", True],
        ],  # fmt: skip
        steps=3,
        warmup=1,
        timeout_s=300,
        compile_timeout_s=300,
        max_peak_mib=None,  # CUDA: an out-of-memory error is caught and recorded
        isolate=False,
    ),
    # Seconds-long: tests and dry runs of the sweep itself.
    "long-context-tiny": dict(
        ts.CONFIGS["tiny"],
        model=dict(ts.CONFIGS["tiny"]["model"], vocab_size=2048, tie_word_embeddings=True),
        seqs=[32, 64, 128],
        modes=MODES,
        checkpointing=[False, True],
        steps=1,
        warmup=1,
        max_peak_mib=None,
        isolate=True,
    ),
}


def get_config(name: str, **overrides: Any) -> dict[str, Any]:
    """A deep copy of a named sweep config with non-None ``overrides`` applied (unknown names raise)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown long-context config {name!r}; choose one of {sorted(CONFIGS)}")
    cfg = copy.deepcopy(CONFIGS[name])
    cfg["name"] = name
    for k, v in overrides.items():
        if v is None:
            continue
        if k not in cfg:
            raise ValueError(f"unknown config override {k!r}; known keys: {sorted(cfg)}")
        cfg[k] = v
    bad = [m for m in cfg["modes"] if m not in ts.MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; choose from {list(ts.MODES)}")
    bad = [c for c in cfg["checkpointing"] if c not in ts.CHECKPOINTING]
    if bad:
        raise ValueError(f"unknown checkpointing {bad}; choose from {list(ts.CHECKPOINTING)}")
    return cfg


def predicted_peak(points: Sequence[tuple[int, float]], seq: int) -> float | None:
    """Peak at ``seq`` on the line through the last two measured (seq, peak) points (None with fewer)."""
    if len(points) < 2:
        return None
    (s0, p0), (s1, p1) = points[-2], points[-1]
    return p1 + (p1 - p0) / (s1 - s0) * (seq - s1)


def series(cfg: dict[str, Any]) -> list[tuple[str, Any]]:
    """The (mode, checkpointing) series to run, in order: the config's ``order`` restricted to its modes and
    checkpointing settings, then any others (checkpointing outer, modes inner). ``"transformers"`` is a series
    of its own for S²FT modes only; for the others it is what ``True`` already runs."""
    wanted: list[tuple[str, Any]] = []
    for c in cfg["checkpointing"]:
        for m in cfg["modes"]:
            key = (m, True if c == "transformers" and not m.startswith("s2ft") else c)
            if key not in wanted:
                wanted.append(key)
    first = [tuple(p) for p in cfg.get("order", []) if tuple(p) in wanted]
    return first + [p for p in wanted if p not in first]


def run_sweep(
    cfg: dict[str, Any],
    on_result: Callable[[list[dict[str, Any]]], None] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Every (mode, checkpointing) series of ``cfg`` over its lengths; one record per point (see module doc).

    On CPU each point runs in a fresh process (its peak RSS is its own); on CUDA (or with ``isolate=False``,
    for dry runs) each series runs in this process, one model build for all its lengths, with the CUDA
    allocator's peak reset per length.
    """
    runs: list[dict[str, Any]] = []
    for mode, ckpt in series(cfg):
        if cfg["device"] == "cpu" and cfg.get("isolate", True):
            new = _cpu_series(cfg, mode, ckpt, log, lambda r, prev=list(runs): on_result and on_result(prev + r))
        else:
            t = time.perf_counter()
            new = ts.measure(
                mode, dict(cfg, modes=[mode], checkpointing=ckpt), False, sorted(cfg["seqs"]), cfg["device"]
            )
            for r in new:
                r["wall_s"] = round(time.perf_counter() - t, 1)
                _log(log, r, ckpt)
        runs += new
        if on_result is not None:
            on_result(runs)
    return runs


def _cpu_series(cfg: dict[str, Any], mode: str, ckpt: Any, log: Callable[[str], None], partial: Callable) -> list:
    """One series on CPU, a fresh process per length, skipping what the previous points say will not fit."""
    out: list[dict[str, Any]] = []
    done: list[tuple[int, float]] = []
    stop = None
    limit = cfg.get("max_peak_mib")
    for seq in sorted(cfg["seqs"]):
        base = {"mode": mode, "seq": seq, "batch": cfg["batch"], "tokens": cfg["batch"] * seq}
        base.update(checkpointing=bool(ckpt), checkpointing_impl=expected_impl(mode, ckpt), compiled=False)
        pred = predicted_peak(done, seq)
        if stop is not None:
            r = dict(base, status="skipped", error=stop)
        elif limit and pred is not None and pred > limit:
            why = f"predicted peak {pred:.0f} MiB > limit {limit:.0f} MiB (linear in tokens)"
            r = dict(base, status="skipped", error=why, predicted_peak_mib=round(pred, 1))
        else:
            t = time.perf_counter()
            one = dict(cfg, modes=[mode], seqs=[seq], checkpointing=ckpt)
            r = ts.run_isolated(mode, one, False, seq, "cpu", cfg["timeout_s"])
            r["wall_s"] = round(time.perf_counter() - t, 1)
        if r.get("status") == "ok":
            done.append((seq, r["peak_mib"]))
        elif r.get("status") in ("oom", "timeout"):
            stop = f"a shorter length ended with {r['status']}"
        out.append(r)
        _log(log, r, ckpt)
        partial(out)
    return out


def _log(log: Callable[[str], None], r: dict[str, Any], ckpt: Any) -> None:
    log(
        f"[long-context] {r['mode']:13s} ckpt={ckpt!s:5s} seq={r['seq']:5d} {r.get('status', '?'):7s} "
        f"peak={r.get('peak_mib', '-')} MiB step={r.get('step_ms', '-')} ms "
        f"({r.get('wall_s', 0)} s) {str(r.get('error', ''))[:160]}"
    )


# ---------------------------------------------------------------------------------------------- report


def expected_impl(mode: str, ckpt: Any) -> str | None:
    """Whose checkpointing a series uses: S2FTModule's for S²FT modes with ``True``, else transformers' switch."""
    if not ckpt:
        return None
    return "s2ft" if ckpt is True and mode.startswith("s2ft") else "transformers"


def setting(r: dict[str, Any]) -> Any:
    """A record's checkpointing setting as configs name it: False, True, or "transformers" (forced on S²FT)."""
    if not r["checkpointing"]:
        return False
    forced = r["mode"].startswith("s2ft") and r.get("checkpointing_impl") == "transformers"
    return "transformers" if forced else True


def _ok(runs: Sequence[dict], mode: str, ckpt: Any) -> list[dict]:
    return sorted(
        (r for r in runs if r["mode"] == mode and setting(r) == ckpt and r.get("status") == "ok"),
        key=lambda r: r["seq"],
    )


def slope(runs: Sequence[dict], mode: str, ckpt: bool) -> float | None:
    """Peak-memory growth in MiB per token: least-squares slope over the series' measured points."""
    pts = [(r["tokens"], r["peak_mib"]) for r in _ok(runs, mode, ckpt)]
    if len(pts) < 2:
        return None
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den


def _at(runs: Sequence[dict], mode: str, ckpt: bool, seq: int) -> dict | None:
    return next((r for r in _ok(runs, mode, ckpt) if r["seq"] == seq), None)


def evaluate_targets(runs: Sequence[dict], peaks_per_point: bool = True) -> list[dict[str, Any]]:
    """The issue's targets per checkpointing setting (data, never assertions), and S2FTModule's checkpointing
    against transformers' switch on the same S²FT model where both ran. Without ``peaks_per_point`` (CPU runs
    sharing a process) the memory targets are not evaluated."""
    out: list[dict[str, Any]] = []
    if not peaks_per_point:
        note = "CPU points shared a process (--no-isolate): peak RSS is the process's, not the point's"
        out.append({"target": "memory targets", "value": None, "limit": None, "passed": None, "note": note})
    for ckpt in [c for c in (False, True) if any(setting(r) == c for r in runs)]:
        tag = "checkpointing" if ckpt else "no checkpointing"
        if peaks_per_point:
            out += _memory_targets(runs, ckpt, tag)
        pairs = [(r, _at(runs, "s2ft", ckpt, r["seq"])) for r in _ok(runs, "s2ft-chunked", ckpt)]
        pairs = [(a, b) for a, b in pairs if b is not None]
        # CPU: process CPU time per step (what the step costs, whatever else holds the cores), as the train suite.
        key = "cpu_ms" if pairs and all("cpu_ms" in r for p in pairs for r in p) else "step_ms"
        ratios = {a["seq"]: round(a[key] / b[key], 3) for a, b in pairs}
        t = {"target": f"s2ft-chunked step / s2ft (stock loss) step ({key}), worst length ({tag})", "limit": "<= 1.05"}
        if not ratios:
            out.append(dict(t, value=None, passed=None, note="no length with both"))
        else:
            v = max(ratios.values())
            out.append(dict(t, value=v, passed=bool(v <= 1.05), per_seq=ratios))
    for mode in ("s2ft-chunked", "s2ft"):
        pairs = [(r, _at(runs, mode, "transformers", r["seq"])) for r in _ok(runs, mode, True)]
        pairs = [(a, b) for a, b in pairs if b is not None]
        if pairs:
            key = "cpu_ms" if all("cpu_ms" in r for p in pairs for r in p) else "step_ms"
            value = {a["seq"]: {key: round(a[key] / b[key], 3)} for a, b in pairs}
            if peaks_per_point:
                for a, b in pairs:
                    value[a["seq"]]["peak"] = round(a["peak_mib"] / b["peak_mib"], 3)
            name = f"{mode}: S2FTModule's checkpointing / transformers' switch (info)"
            out.append({"target": name, "value": value, "limit": None, "passed": None})
    return out


def _memory_targets(runs: Sequence[dict], ckpt: bool, tag: str) -> list[dict[str, Any]]:
    out = []
    s, f = slope(runs, "s2ft-chunked", ckpt), slope(runs, "frozen", ckpt)
    t = {"target": f"s2ft-chunked peak growth per token / frozen's ({tag})", "limit": "<= 0.5"}
    if s is None or not f:
        out.append(dict(t, value=None, passed=None, note="need >= 2 ok lengths of s2ft-chunked and frozen"))
    else:
        v = s / f
        out.append(dict(t, value=round(v, 3), passed=bool(v <= 0.5), mib_per_token={"s2ft-chunked": s, "frozen": f}))
    if ckpt:  # what checkpointing with the chunked loss gives against the plain floor (info)
        f0 = slope(runs, "frozen", False)
        if s is not None and f0:
            name = "s2ft-chunked with checkpointing: growth / frozen's without (info)"
            out.append({"target": name, "value": round(s / f0, 3), "limit": None, "passed": None})
    a, b = _at(runs, "s2ft-chunked", ckpt, 4096), _at(runs, "lora", ckpt, 4096)
    t = {"target": f"s2ft-chunked peak / lora peak at 4096 tokens ({tag})", "limit": "<= 0.7"}
    if a is None or b is None:
        out.append(dict(t, value=None, passed=None, note="missing an ok 4096-token point"))
    else:
        v = a["peak_mib"] / b["peak_mib"]
        out.append(dict(t, value=round(v, 3), passed=bool(v <= 0.7)))
    return out


_LABEL = {
    "frozen": "frozen floor (stock loss)",
    "s2ft": "S²FT (stock loss)",
    "s2ft-chunked": "**S²FT (chunked loss)**",
    "lora": "PEFT LoRA (stock loss)",
    "lora-chunked": "PEFT LoRA (chunked loss)",
    "full": "full fine-tuning (stock loss)",
}


def markdown(runs: Sequence[dict]) -> str:
    """Peak MiB per length (status where not measured), growth MiB/token and step ms per series."""
    seqs = sorted({r["seq"] for r in runs})
    head = ["method", "ckpt", *[f"{s}" for s in seqs], "MiB/token", *[f"ms @{s}" for s in seqs]]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    keys = []
    for r in runs:
        if (r["mode"], setting(r)) not in keys:
            keys.append((r["mode"], setting(r)))
    for mode, ckpt in keys:
        cells = []
        for s in seqs:
            r = next((x for x in runs if x["mode"] == mode and setting(x) == ckpt and x["seq"] == s), None)
            cells.append(
                "–" if r is None else f"{r['peak_mib']:,.0f}" if r.get("status") == "ok" else str(r.get("status"))
            )
        g = slope(runs, mode, ckpt)
        times = []
        for s in seqs:
            r = _at(runs, mode, ckpt, s)
            times.append(f"{r['step_ms']:,.0f}" if r else "–")
        how = {False: "no", True: "yes", "transformers": "yes (transformers' switch)"}[ckpt]
        row = [_LABEL.get(mode, mode), how, *cells, "–" if g is None else f"{g:.3f}", *times]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def result_document(cfg: dict[str, Any], runs: Sequence[dict], extra: dict | None = None) -> dict[str, Any]:
    """The JSON document: machine, versions, git, config, ``runs`` (one record per point) and target checks."""
    from benchmarks import report, sysinfo

    doc = {"suite": "long-context", "schema_version": report.SCHEMA_VERSION, **sysinfo.describe()}
    per_point = cfg["device"] != "cpu" or cfg.get("isolate", True)
    doc.update(config=cfg, runs=list(runs), targets=evaluate_targets(runs, peaks_per_point=per_point))
    if extra:
        doc.update(extra)
    return doc

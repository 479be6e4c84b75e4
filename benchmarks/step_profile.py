"""Where one training step's time and memory go, per mode: the breakdown behind a missed ratio target.

Time: ``torch.profiler`` over a few steps; each op's self time (device time on CUDA) is charged to the phase it
ran in (forward / backward / optimizer, marked with ``record_function``) and to a kind (matmul, attention,
other). Memory: the bytes autograd saves for backward (unique storages that are not parameters, counted with
saved-tensor hooks) and the training state (trainable weights, their grads, AdamW's two moments).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch.autograd.profiler import record_function

from benchmarks import train_suite as ts

PHASES = ("forward", "backward", "optimizer")
KINDS = ("matmul", "attention", "other", "python")  # python: time inside a phase outside any aten op
_MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation", "aten::addbmm"}
_MARK = "s2ft_phase:"


def _kind(name: str) -> str:
    if name in _MATMUL:
        return "matmul"
    if "attention" in name or "flash" in name:  # sdpa and its backward, math / flash / efficient kernels
        return "attention"
    return "other"


def saved_activation_bytes(built: ts.Built, ids: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages one forward saves for backward (then runs that backward)."""
    params = {p.untyped_storage().data_ptr() for p in built.model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in built.model.buffers()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = built.model(input_ids=ids, labels=ids).loss
    loss.backward()
    for p in built.params:
        p.grad = None
    return sum(seen.values())


def phase_of(ev: Any, marks: Sequence[tuple[float, float, str]]) -> str | None:
    """The phase an op ran in: its enclosing phase mark, else the mark whose interval holds its start.

    The second rule covers ops on other threads (CUDA's autograd engine runs backward on a device thread,
    so those ops have no parent chain to the mark set around ``loss.backward()``).
    """
    p = ev.cpu_parent
    while p is not None:
        if p.name.startswith(_MARK):
            return p.name[len(_MARK) :]
        p = p.cpu_parent
    start = ev.time_range.start
    return next((name for lo, hi, name in marks if lo <= start < hi), None)


def profile_mode(mode: str, cfg: dict[str, Any], steps: int = 3, warmup: int = 2) -> dict[str, Any]:
    """Build ``mode`` (eager) and return its per-step time by phase x kind (ms) and its memory breakdown (MiB)."""
    with ts.torch_threads(cfg.get("threads")):
        return _profile(mode, cfg, steps, warmup)


def _profile(mode: str, cfg: dict[str, Any], steps: int, warmup: int) -> dict[str, Any]:
    dev = torch.device(cfg["device"])
    built = ts.setup_mode(mode, cfg, dev)
    seq = cfg["seqs"][0]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg["model"]["vocab_size"], (cfg["batch"], seq), generator=gen).to(dev)
    model, opt = built.model, torch.optim.AdamW(built.params, lr=1e-5) if built.params else None

    def step() -> None:
        with record_function(_MARK + "forward"):
            loss = model(input_ids=ids, labels=ids).loss
        with record_function(_MARK + "backward"):
            loss.backward()
        with record_function(_MARK + "optimizer"):
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    walls = []
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            ts._sync(dev)
            t = time.perf_counter()
            step()
            ts._sync(dev)
            walls.append((time.perf_counter() - t) * 1e3)
    ms = {p: dict.fromkeys(KINDS, 0.0) for p in PHASES}
    per_op: dict[tuple[str, str], float] = {}
    events = prof.events()
    marks = [(e.time_range.start, e.time_range.end, e.name[len(_MARK) :]) for e in events if e.name.startswith(_MARK)]
    for ev in events:
        us = ev.self_device_time_total if dev.type == "cuda" else ev.self_cpu_time_total
        if ev.name.startswith(_MARK):
            phase, kind = ev.name[len(_MARK) :], "python"
        elif (phase := phase_of(ev, marks)) is not None:
            kind = _kind(ev.name)
            per_op[phase, ev.name] = per_op.get((phase, ev.name), 0.0) + us / 1e3 / steps
        else:
            continue
        ms[phase][kind] += us / 1e3 / steps
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:12]
    state = sum(p.numel() * p.element_size() for p in built.params)
    opt_state = sum(
        t.numel() * t.element_size() for s in (opt.state.values() if opt else ()) for t in s.values() if t.dim() > 0
    )
    saved = saved_activation_bytes(built, ids)
    mib = 2**20
    return {
        "mode": mode,
        "seq": seq,
        "batch": cfg["batch"],
        "trainable_params": built.info["trainable_params"],
        "lora_rank": built.info.get("lora_rank"),
        "profiled_step_ms": round(statistics.median(walls), 2),
        "ms": {p: {k: round(v, 2) for k, v in kinds.items()} for p, kinds in ms.items()},
        "top_ops_ms": [{"phase": p, "op": n, "ms": round(v, 3)} for (p, n), v in top],
        "saved_activations_mib": round(saved / mib, 2),
        "trainable_mib": round(state / mib, 2),
        "grad_mib": round(state / mib, 2),
        "adamw_state_mib": round(opt_state / mib, 2),
    }


def profile_suite(cfg: dict[str, Any], modes: Sequence[str], steps: int = 3) -> list[dict[str, Any]]:
    """``profile_mode`` for each mode in this process (time shares, not peak memory, are what it measures)."""
    out = []
    for mode in modes:
        out.append(profile_mode(mode, cfg, steps=steps, warmup=max(1, cfg.get("warmup", 2))))
        ts._cleanup(torch.device(cfg["device"]))
    return out


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One row per mode: phase totals, matmul share of forward/backward, memory parts; ratios vs frozen."""
    ref = next((r for r in rows if r["mode"] == "frozen"), None)
    head = (
        "| mode | step ms (profiled) | fwd ms | bwd ms | opt ms | fwd matmul | bwd matmul | attention | other |"
        " python | saved act. MiB | weights+grads+AdamW MiB | vs frozen (time) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        m = r["ms"]
        tot = {p: sum(m[p].values()) for p in PHASES}
        att = sum(m[p]["attention"] for p in PHASES)
        oth = sum(m[p]["other"] for p in PHASES)
        py = sum(m[p]["python"] for p in PHASES)
        st = r["trainable_mib"] + r["grad_mib"] + r["adamw_state_mib"]
        rel = f"{r['profiled_step_ms'] / ref['profiled_step_ms']:.2f}x" if ref else "-"
        lines.append(
            f"| {r['mode']} | {r['profiled_step_ms']:.1f} | {tot['forward']:.1f} | {tot['backward']:.1f} | "
            f"{tot['optimizer']:.1f} | {m['forward']['matmul']:.1f} | {m['backward']['matmul']:.1f} | {att:.1f} | "
            f"{oth:.1f} | {py:.1f} | {r['saved_activations_mib']:.1f} | {st:.1f} | {rel} |"
        )
    return "\n".join(lines)

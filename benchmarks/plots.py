"""PNG plots from `train` result JSON: step time and peak memory per mode; growth with sequence length."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_COLORS = {
    "frozen": "#888888",
    "s2ft": "#d62728",
    "full": "#1f77b4",
    "lora": "#2ca02c",
    "lora_all": "#9467bd",
    "s2ft-chunked": "#ff7f0e",
    "lora-chunked": "#17becf",
    "inplace": "#8c564b",
}


def _title(doc: dict[str, Any]) -> str:
    m, v = doc["machine"], doc["versions"]
    where = m.get("gpu") or f"{m.get('cpu')} x{m.get('cpu_count')}"
    c = doc["config"]
    return (
        f"{c['name']}: {where}, {c['dtype']}, batch {c['batch']}; torch {v.get('torch')}, "
        f"commit {str(doc['git']['commit'])[:12]}"
    )


def plot_modes(doc: dict[str, Any], path: Path) -> Path:
    """Two panels: median step time and peak memory per mode, eager and compiled side by side."""
    runs = [r for r in doc["runs"] if r.get("status") == "ok"]
    seq = min(r["seq"] for r in runs) if runs else 0
    runs = [r for r in runs if r["seq"] == seq]
    modes = [m for m in doc["config"]["modes"] if any(r["mode"] == m for r in runs)]
    variants = sorted({r["compiled"] for r in runs})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(variants))
    cpu = any("peak_over_build_mib" in r for r in runs)
    for j, compiled in enumerate(variants):
        for i, m in enumerate(modes):
            r = next((r for r in runs if r["mode"] == m and r["compiled"] == compiled), None)
            if r is None:
                continue
            x = i + (j - (len(variants) - 1) / 2) * width
            hatch = "//" if compiled else None
            axes[0].bar(x, r["step_ms"], width, color=_COLORS.get(m), hatch=hatch, edgecolor="black")
            axes[0].text(x, r["step_ms"], f"{r['step_ms']:.0f}", ha="center", va="bottom", fontsize=7)
            if cpu and "rss_after_build_mib" in r:
                base = r["rss_after_build_mib"]
                axes[1].bar(x, base, width, color="#dddddd", edgecolor="black", hatch=hatch)
                axes[1].bar(
                    x,
                    r["peak_mib"] - base,
                    width,
                    bottom=base,
                    color=_COLORS.get(m),
                    edgecolor="black",
                    hatch=hatch,
                )
            else:
                axes[1].bar(x, r["peak_mib"], width, color=_COLORS.get(m), edgecolor="black", hatch=hatch)
            axes[1].text(x, r["peak_mib"], f"{r['peak_mib']:.0f}", ha="center", va="bottom", fontsize=7)
    for ax, label in zip(
        axes,
        (
            "median step time (ms)",
            "peak RSS (MiB; grey = after model build)" if cpu else "peak CUDA memory allocated (MiB)",
        ),
    ):
        ax.set_xticks(range(len(modes)), modes)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    if len(variants) > 1:
        axes[0].legend(
            handles=[
                plt.Rectangle((0, 0), 1, 1, fc="white", ec="black"),
                plt.Rectangle((0, 0), 1, 1, fc="white", ec="black", hatch="//"),
            ],
            labels=["eager", "torch.compile"],
            fontsize=8,
        )
    fig.suptitle(_title(doc) + f", seq {seq}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(doc: dict[str, Any], path: Path) -> Path:
    """Two panels: peak memory and step time against tokens per step, one line per mode/variant."""
    runs = [r for r in doc["runs"] if r.get("status") == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in doc["config"]["modes"]:
        for compiled in (False, True):
            pts = sorted(
                (r["tokens"], r["peak_mib"], r["step_ms"]) for r in runs if r["mode"] == m and r["compiled"] == compiled
            )
            if not pts:
                continue
            style = "--" if compiled else "-"
            label = m + (" +compile" if compiled else "")
            xs = [p[0] for p in pts]
            axes[0].plot(xs, [p[1] for p in pts], style, marker="o", color=_COLORS.get(m), label=label)
            axes[1].plot(xs, [p[2] for p in pts], style, marker="o", color=_COLORS.get(m), label=label)
    ticks = sorted({r["tokens"] for r in runs})
    for ax, label in zip(axes, ("peak memory (MiB)", "median step time (ms)")):
        ax.set_xlabel("tokens per step")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_title(doc), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_long_context(doc: dict[str, Any], path: Path) -> Path:
    """Peak memory and step time against tokens, one colour per mode; dashed = activation checkpointing (dotted:
    transformers' switch on an S²FT model)."""
    runs = [r for r in doc["runs"] if r.get("status") == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for m in doc["config"]["modes"]:
        for ckpt in (False, True):
            pts = sorted(
                (r["tokens"], r["peak_mib"], r["step_ms"]) for r in runs if (r["mode"], r["checkpointing"]) == (m, ckpt)
            )
            if not pts:
                continue
            style, label = ("--", f"{m} + ckpt") if ckpt else ("-", m)
            xs = [p[0] for p in pts]
            for ax, k in ((axes[0], 1), (axes[1], 2)):
                ax.plot(xs, [p[k] for p in pts], style, marker="o", ms=3, color=_COLORS.get(m), label=label)
    ticks = sorted({r["tokens"] for r in runs})
    cuda = any(r.get("device") == "cuda" for r in runs)
    peak = "peak CUDA memory allocated (MiB)" if cuda else "peak RSS of the process (MiB)"
    for ax, label in zip(axes, (peak, "median step time (ms)")):
        ax.set_xlabel("tokens per step (batch 1)")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7, ncol=2)
    m, v, c = doc["machine"], doc["versions"], doc["config"]
    where = m.get("gpu") or f"{m.get('cpu')} x{m.get('cpu_count')}"
    fig.suptitle(
        f"{c['name']}: {where}, {c['dtype']}; torch {v.get('torch')}, commit {str(doc['git']['commit'])[:12]}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_file(json_path: str | os.PathLike, outdir: str | os.PathLike | None = None) -> list[Path]:
    """All plots for one result file; PNGs are named after the JSON (``<stem>.png``, ``<stem>-growth.png``)."""
    json_path = Path(json_path)
    doc = json.loads(json_path.read_text())
    out = Path(outdir) if outdir else json_path.parent
    if doc.get("suite") == "long-context":
        out.mkdir(parents=True, exist_ok=True)
        return [plot_long_context(doc, out / f"{json_path.stem}.png")] if doc["runs"] else []
    if doc.get("suite") != "train":
        raise ValueError(f"{json_path} is not a train result (suite={doc.get('suite')!r}); nothing to plot")
    out.mkdir(parents=True, exist_ok=True)
    made = []
    if any(r.get("status") == "ok" for r in doc["runs"]):
        made.append(plot_modes(doc, out / f"{json_path.stem}.png"))
    if len({r["seq"] for r in doc["runs"] if r.get("status") == "ok"}) > 1:
        made.append(plot_sweep(doc, out / f"{json_path.stem}-growth.png"))
    return made

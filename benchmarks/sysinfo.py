"""Machine, library versions and git commit for benchmark JSON, so every number says where it came from."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "triton",
    "lightning",
    "numpy",
    "torch-pruning",
    "s2ft-lightning",
)
_REPO = Path(__file__).resolve().parent.parent


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries that decide the numbers (None when not installed)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = _md.version(name)
        except _md.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["torch"] = torch.__version__
        out["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """CPU model and cores, memory, and the GPU (name, memory, capability) when CUDA is available."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["ram_gib"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        info["ram_gib"] = None
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = p.name
            info["gpu_count"] = torch.cuda.device_count()
            info["gpu_mem_gib"] = round(p.total_memory / 2**30, 1)
            info["gpu_capability"] = f"{p.major}.{p.minor}"
        else:
            info["gpu"] = None
    except ImportError:
        info["gpu"] = None
    return info


def git_state(repo: Path = _REPO) -> dict[str, Any]:
    """HEAD commit ("uncommitted" when the repo has no commit or git is missing) and a dirty flag."""

    def _git(*args: str) -> str | None:
        try:
            r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return r.stdout.strip() if r.returncode == 0 else None

    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit or "uncommitted", "dirty": bool(status) if status is not None else None}


def describe() -> dict[str, Any]:
    """Everything above plus a UTC timestamp, as one JSON-ready dict."""
    return {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "versions": versions(),
        "git": git_state(),
    }

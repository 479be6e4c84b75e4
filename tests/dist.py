"""Run benchmarks/dist_worker.py in fresh processes and read back what it trained (shared by the DDP/FSDP tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

WORKER = Path(__file__).resolve().parents[1] / "benchmarks" / "dist_worker.py"


def run_worker(model_dir: Path, out: Path, strategy: str, *extra: str) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """(deltas, per-rank stats) of one worker run; a failure shows the worker's output."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(WORKER), str(model_dir), str(out), "--strategy", strategy, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=out)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    stats = [json.loads(p.read_text()) for p in sorted(out.glob("stats_rank*.json"))]
    return load_file(out / "deltas.safetensors"), stats

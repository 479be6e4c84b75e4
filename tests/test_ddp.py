"""Lightning DDP (2 CPU processes, gloo) gives the same blocks as one process with the same global batch."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("ddp_worker.py")


def _run(model_dir: Path, out: Path, devices: int) -> dict[str, torch.Tensor]:
    r = subprocess.run(
        [sys.executable, str(WORKER), str(model_dir), str(out), str(devices)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=out.parent,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return load_file(out)


@pytest.mark.slow
def test_ddp_two_processes_equals_single_process(tiny_llama_dir, tmp_path):
    single = _run(tiny_llama_dir, tmp_path / "single.safetensors", 1)
    ddp = _run(tiny_llama_dir, tmp_path / "ddp.safetensors", 2)
    assert single.keys() == ddp.keys() and single
    worst = max(float((single[k] - ddp[k]).abs().max()) for k in single)
    moved = max(float(single[k].abs().max()) for k in single)
    assert moved > 0
    assert worst < 1e-5, f"DDP differs from single-process by {worst:.3e}"

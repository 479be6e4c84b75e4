"""The Triton kernels compile for an H100 (sm_90) through Triton's real compiler, here on the CPU.

The interpreter tests (test_kernels.py, test_serving.py) check the kernels' math but never run the GPU
compiler; `tools/compile_kernels.py` compiles every launch specialisation to PTX and cubin with the ptxas
in the triton wheel, so a kernel that would fail to build or overflow shared memory on the GPU fails here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_kernel_specialisation_compiles_for_sm90(tmp_path):
    out = tmp_path / "compile.json"
    # A fresh Triton cache, so every kernel really goes through the compiler; TRITON_INTERPRET=1 (set by
    # conftest) must not leak into the tool, which drops it before importing triton.
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_INTERPRET="1")
    cmd = [sys.executable, str(REPO / "tools" / "compile_kernels.py"), "--quick", "--arch", "90", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    rows = {r["variant"]: r for r in doc["rows"]}
    assert doc["arch"] == 90 and len(rows) == 24
    assert all(r["ok"] and r["cubin_bytes"] > 0 for r in rows.values())
    assert {v.split()[0] for v in rows} == {"block_grad", "serve_cols", "serve_rows", "adamw"}
    # bf16 / fp16 block gradients run on Hopper tensor cores (wgmma); fp32 stays IEEE (no TF32 rounding)
    assert all(
        r["mma"] == "wgmma" for v, r in rows.items() if v.startswith(("block_grad bf16xbf16", "block_grad fp16"))
    )
    assert all(r["mma"] is None for v, r in rows.items() if v.startswith("block_grad fp32"))
    assert max(r["shared_bytes"] for r in rows.values()) <= 227 * 1024

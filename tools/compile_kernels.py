#!/usr/bin/env python
"""Compile every Triton kernel for a CUDA GPU through Triton's real compiler, on a machine without one.

Each kernel is compiled (TTIR -> PTX -> cubin with the ptxas shipped in the triton wheel) in every
specialisation its wrapper launches on a GPU: the wrappers' own launch-config functions pick the
constexprs. The interpreter tests check the kernels' math; this checks what the interpreter cannot:
that the GPU compile succeeds, fits the target's shared memory, and that 16-bit block-gradient matmuls
use tensor-core MMA instructions.

    python tools/compile_kernels.py [--arch 90] [--quick] [--json out.json]   # 90 = H100, 80 = A100, 100 = B200
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# The interpreter replaces triton.language at import time; the real compiler needs it untouched.
os.environ.pop("TRITON_INTERPRET", None)

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from s2ft_lightning.ops.kernels import adamw, block_grad, multi_adapter

# Max shared memory one block may opt into, bytes (CUDA programming guide, compute capabilities table).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024}
_TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def variants(quick: bool = False) -> list[tuple[str, Any, dict[str, str], dict[str, Any]]]:
    """(label, kernel, pointer/float argument types, constexprs) for every GPU launch specialisation.

    ``quick``: every flag combination for bf16 block grads, one for the other dtypes, and the smallest and
    largest serving tiles per dtype (the shared-memory extremes): 24 compiles instead of 69.
    """
    out = []
    pairs = [(torch.bfloat16,) * 2, (torch.float16,) * 2, (torch.float32,) * 2, (torch.bfloat16, torch.float32)]
    for (da, db), has_ia, has_ib, atomic in itertools.product(pairs, (True, False), (True, False), (True, False)):
        if quick and (da, db) != pairs[0] and not (has_ia and not has_ib and atomic):
            continue
        upcast, (bm, bp, bn) = block_grad.launch_config(da, db)
        types = dict(a_ptr="*" + _TY[da], b_ptr="*" + _TY[db], c_ptr="*fp32", ia_ptr="*i32", ib_ptr="*i32")
        const = dict(HAS_IA=has_ia, HAS_IB=has_ib, UPCAST=upcast, ATOMIC=atomic, BLOCK_M=bm, BLOCK_P=bp, BLOCK_N=bn)
        label = f"block_grad {_TY[da]}x{_TY[db]} ia={has_ia:d} ib={has_ib:d} atomic={atomic:d}"
        out.append((label, block_grad._tn_kernel, types, const))
    for name, kernel, width in (
        ("cols", multi_adapter._cols_kernel, "BLOCK_O"),
        ("rows", multi_adapter._rows_kernel, "BLOCK_J"),
    ):
        seen = set()
        shapes = [(1, 64), (512, 4096)] if quick else list(itertools.product((1, 32, 512), (64, 4096)))
        for dt, (tokens, features) in itertools.product(_TY, shapes):
            bt, bw, bk = multi_adapter.launch_blocks(tokens, features)
            if (dt, bt, bw, bk) in seen:
                continue
            seen.add((dt, bt, bw, bk))
            types = dict(x_ptr="*" + _TY[dt], y_ptr="*" + _TY[dt], d_ptr="*fp32")
            types |= dict.fromkeys(("aid_ptr", "idx_ptr", "k_ptr"), "*i32")
            const = {"BLOCK_T": bt, width: bw, "BLOCK_K": bk, "IEEE": True}
            out.append((f"serve_{name} {_TY[dt]} T{bt} {width[6:]}{bw}", kernel, types, const))
    ptrs = ("p_ptrs", "g_ptrs", "m_ptrs", "v_ptrs", "numels", "chunk_tensor", "chunk_start")
    types = {p: "*i64" for p in ptrs} | dict.fromkeys(
        ("lr", "beta1", "beta2", "eps", "decay", "step_size", "bc2_sqrt"), "fp32"
    )
    out.append(("adamw fp32", adamw._adamw_kernel, types, dict(CHUNK=adamw.CHUNK, BLOCK=min(1024, adamw.CHUNK))))
    return out


def compile_one(kernel: Any, types: dict[str, str], const: dict[str, Any], arch: int) -> Any:
    """``triton.compile`` of one specialisation for ``sm_<arch>``; other integer arguments are i32."""
    names = kernel.arg_names
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in names}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32))


def check_all(arch: int = 90, quick: bool = False) -> list[dict[str, Any]]:
    """Compile every variant; one row per variant with shared memory, MMA use and whether it passed."""
    limit = SHARED_LIMIT.get(arch)
    rows = []
    for label, kernel, types, const in variants(quick):
        t = time.perf_counter()
        row: dict[str, Any] = {"variant": label}
        try:
            k = compile_one(kernel, types, const, arch)
        except Exception as e:  # noqa: BLE001 - a failed compile is this variant's result
            row.update(ok=False, error=f"{type(e).__name__}: {e}"[:400])
            rows.append(row)
            continue
        ptx = k.asm["ptx"]
        row.update(
            shared_bytes=int(k.metadata.shared),
            num_warps=int(k.metadata.num_warps),
            cubin_bytes=len(k.asm["cubin"]),
            mma="wgmma" if "wgmma." in ptx else "mma" if "mma.sync" in ptx else None,
            compile_s=round(time.perf_counter() - t, 2),
        )
        needs_mma = label.startswith("block_grad") and not const.get("UPCAST", True)
        problems = []
        if limit is not None and row["shared_bytes"] > limit:
            problems.append(f"shared memory {row['shared_bytes']} B > {limit} B")
        if needs_mma and row["mma"] is None:
            problems.append("16-bit block grad without tensor-core MMA")
        row.update(ok=not problems, problems=problems)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100)")
    ap.add_argument("--quick", action="store_true", help="the 24 extreme specialisations instead of all 69")
    ap.add_argument("--json", help="write the rows as JSON here")
    a = ap.parse_args(argv)
    rows = check_all(a.arch, a.quick)
    print(f"| variant (sm_{a.arch}, triton {triton.__version__}) | ok | shared B | warps | MMA | compile s |")
    print("|---|---|---:|---:|---|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | FAILED: {r['error']} | | | | |")
        else:
            ok = "yes" if r["ok"] else "NO: " + "; ".join(r["problems"])
            cells = [r["variant"], ok, r["shared_bytes"], r["num_warps"], r["mma"] or "-", r["compile_s"]]
            print("| " + " | ".join(map(str, cells)) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps({"arch": a.arch, "triton": triton.__version__, "rows": rows}, indent=1))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Mutation check: apply one deliberate one-line bug at a time, run the tests that should catch it, revert.

Each mutation must make at least one of its tests fail (issue #23: "tests that bite"). Prints a markdown table
(mutation → first failing test) and exits 1 if any mutation survives. Not part of the suite (it runs pytest once
per mutation); run it after changing the code or the tests a mutation names:

    python tools/mutation_check.py            # all mutations
    python tools/mutation_check.py --only merge-sign fingerprint
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation(
        "block-gradient",
        "row-block gradient read one row off",
        "s2ft_lightning/ops/delta_linear.py",
        "grads.append(tn_matmul(g2, x2.to(g2.dtype), runs, None).to(dt))",
        "grads.append(tn_matmul(g2, x2.to(g2.dtype), [(s + 1, e + 1) for s, e in runs], None).to(dt))",
        ("tests/test_ops.py", "tests/test_layers.py"),
    ),
    Mutation(
        "bias-not-permuted",
        "a coupling's bias members are not moved with their rows",
        "surgery/permute.py",
        "            if key in done:",
        '            if key in done or (m.role or "").endswith("_bias"):',
        ("tests/test_permute.py", "tests/test_analyze.py"),
    ),
    Mutation(
        "verification",
        "the logits comparison ignores its tolerance",
        "surgery/verify.py",
        "        return self.finite and self.rel_diff <= self.tolerance",
        "        return self.finite",
        ("tests/test_permute.py", "tests/test_analyze.py", "tests/test_plan.py"),
    ),
    Mutation(
        "extract-unpermute",
        "extraction records permuted positions instead of original indices",
        "s2ft_lightning/adapters/extract.py",
        "block_delta(s.module, s.feature, s.original, delta, base)",
        "block_delta(s.module, s.feature, s.positions(), delta, base)",
        ("tests/test_adapters.py", "tests/test_train_state.py"),
    ),
    Mutation(
        "merge-sign",
        "merging subtracts the delta",
        "s2ft_lightning/blocks.py",
        "        acc = acc + t.to(acc.dtype)",
        "        acc = acc - t.to(acc.dtype)",
        ("tests/test_layers.py", "tests/test_train_state.py"),
    ),
    Mutation(
        "merge-scale",
        "an adapter merged at a scale is merged at scale 1",
        "s2ft_lightning/adapters/bank.py",
        "contrib = contrib if scale == 1.0 else contrib * scale\n                    out.index_add_",
        "contrib = contrib\n                    out.index_add_",
        ("tests/test_merge.py",),
    ),
    Mutation(
        "checkpoint-trim",
        "the checkpoint cut keeps the frozen base keys",
        "s2ft_lightning/attach.py",
        "    for key in [k for k in state_dict if k.startswith(cut) and k not in trainable]:",
        "    for key in [k for k in state_dict if k.startswith(cut) and k not in state_dict]:",
        ("tests/test_checkpoints.py",),
    ),
    Mutation(
        "fingerprint",
        "the fingerprint hashes parameter names without their shapes",
        "surgery/plan.py",
        '        h.update(f"{name}:{tuple(p.shape)};".encode())',
        '        h.update(f"{name};".encode())',
        ("tests/test_plan.py",),
    ),
    Mutation(
        "gqa-grouping",
        "kv groups never move with their q heads",
        "surgery/permute.py",
        "    return [perm[g * r] // r for g in range(coupling.num_groups)]",
        "    return list(range(coupling.num_groups))",
        ("tests/test_permute.py", "tests/test_analyze.py"),
    ),
    Mutation(
        "expert-correction",
        "the expert correction is not weighted by the routing weight",
        "s2ft_lightning/experts.py",
        "        terms.append(corr * top_k_weights.reshape(-1).index_select(0, pairs).to(dtype)[:, None])",
        "        terms.append(corr)",
        ("tests/test_experts.py",),
    ),
    Mutation(
        "expert-clamp",
        "gpt-oss's clamped gate is corrected as if linear in the Up delta",
        "surgery/expert_storage.py",
        "    f.linear_in_up = False  # clamped: the Up rows' change is computed as h(u + du) − h(u)",
        "    f.linear_in_up = True",
        ("tests/test_expert_layouts.py",),
    ),
    Mutation(
        "expert-interleave",
        "interleaved gate/up (gpt-oss) read as Up row 2c instead of 2c + 1",
        "surgery/expert_storage.py",
        "        return 2 * channels + 1 if self.interleaved else channels + self.width",
        "        return 2 * channels if self.interleaved else channels + self.width",
        ("tests/test_expert_layouts.py",),
    ),
    Mutation(
        "lora-export-indices",
        "the LoRA export's one-hot columns come in reverse order",
        "s2ft_lightning/adapters/peft_export.py",
        "        a[torch.arange(k), idx] = 1.0",
        "        a[torch.arange(k), idx.flip(0)] = 1.0",
        ("tests/test_peft_export.py",),
    ),
    Mutation(
        "rollback",
        "a journaled move is not undone",
        "surgery/permute.py",
        'txn.step(functools.partial(_apply_member, t, m, torch.argsort(idx)), f"the move of {m.param}")',
        'txn.step(lambda: None, f"the move of {m.param}")',
        ("tests/test_transactions.py", "tests/test_permute.py"),
    ),
    Mutation(
        "own-dtype-check",
        "a bf16 model is checked in its own dtype (not upcast to fp32)",
        "surgery/upcast.py",
        "        if not low_precision(model):\n            return fn()",
        "        if True:\n            return fn()",
        ("tests/test_verify_dtype.py",),
    ),
    Mutation(
        "experts-not-driven",
        "a changed expert output is not counted as a failure",
        "surgery/expert_check.py",
        '                failed.append(f"{d.path}[{e}]")',
        "                pass",
        ("tests/test_verify_dtype.py",),
    ),
)


def run(m: Mutation) -> tuple[str, float]:
    """Apply ``m``, run its tests until the first failure, revert; (first failing test or "SURVIVED", seconds)."""
    path = ROOT / m.path
    source = path.read_text()
    if source.count(m.old) != 1:
        raise SystemExit(
            f"{m.name}: the line to mutate is not in {m.path} exactly once; update tools/mutation_check.py"
        )
    path.write_text(source.replace(m.old, m.new))
    t0 = time.perf_counter()
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:warnings", *m.tests],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
    finally:
        path.write_text(source)
    failed = re.search(r"^FAILED (\S+)", out.stdout, re.M)
    if out.returncode == 0:
        return "SURVIVED", time.perf_counter() - t0
    return (failed.group(1) if failed else f"(pytest exit {out.returncode})"), time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", help="mutation names to run (default: all)")
    args = p.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or m.name in args.only]
    print("| mutation | where | first failing test | s |\n|---|---|---|---:|")
    survived = 0
    for m in chosen:
        result, seconds = run(m)
        survived += result == "SURVIVED"
        print(f"| {m.name}: {m.what} | `{m.path}` | {result} | {seconds:.0f} |", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main())

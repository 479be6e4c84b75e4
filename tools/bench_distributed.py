"""DDP vs FSDP2 step time and per-rank memory on this CPU (2 processes, gloo), same model, batch and steps.

    python tools/bench_distributed.py [--steps 12] [--out benchmarks/results/distributed-cpu.json]

Builds a random Llama of the cpu-small shape (hidden 512, 4 layers) on disk, trains it with S²FT under DDP and
under FSDP2 (Lightning's ModelParallelStrategy) with benchmarks/dist_worker.py, and reports the median step time
and the frozen bytes each rank holds. DDP all-reduces only the deltas' gradients; FSDP also all-gathers every
layer's frozen weights in forward and again in backward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _model(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.train_suite import CONFIGS

    cfg = LlamaConfig(**{**CONFIGS["cpu-small"]["model"], "vocab_size": 300}, max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok = REPO / "tests"
    sys.path.insert(0, str(tok))
    from tiny_tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer().save_pretrained(folder)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per strategy (median reported)")
    p.add_argument(
        "--out", default=str(REPO / "benchmarks" / "results" / "distributed-cpu.json"), help="JSON result file"
    )
    a = p.parse_args(argv)
    from benchmarks.sysinfo import describe

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        _model(model)
        for strategy in ("ddp", "fsdp"):
            out = Path(tmp) / strategy
            out.mkdir()
            worker = str(REPO / "benchmarks" / "dist_worker.py")
            cmd = [sys.executable, worker, str(model), str(out), "--strategy", strategy, "--steps", str(a.steps)]
            cmd += ["--optimizer", "adamw", "--rows-per-device", "2"]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out)
            if proc.returncode:
                raise SystemExit(f"{strategy} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            stats = [json.loads(f.read_text()) for f in sorted(out.glob("stats_rank*.json"))]
            steps = [t for s in stats for t in s["step_seconds"][2:]]  # the first steps warm up
            results[strategy] = {
                "median_step_ms": 1000 * statistics.median(steps),
                "frozen_mib_per_rank": [s["frozen_bytes_local"] / 2**20 for s in stats],
                "trainable_kib_per_rank": [s["trainable_bytes_local"] / 2**10 for s in stats],
            }
    doc = {"system": describe(), "steps": a.steps, "shape": "cpu-small (hidden 512, 4 layers), 2 x 12 tokens per rank",
           "results": results}  # fmt: skip
    Path(a.out).write_text(json.dumps(doc, indent=1))
    print("| strategy | median step ms | frozen MiB per rank | trainable KiB per rank |\n|---|---:|---:|---:|")
    for s, r in results.items():
        frozen, trainable = r["frozen_mib_per_rank"][0], r["trainable_kib_per_rank"][0]
        print(f"| {s} | {r['median_step_ms']:.1f} | {frozen:.1f} | {trainable:.1f} |")
    print(f"[bench] wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

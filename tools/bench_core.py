"""Benchmark of the S²FT training core: step time and peak memory vs frozen floor, full FT and LoRA.

CPU (default): each mode runs in a fresh subprocess for peak memory (``ru_maxrss``), then all modes are timed
interleaved in one process (so background load hits them alike). CUDA (``--device cuda --preset 7b
--dtype bfloat16``): each mode in its own process, timed there, peak = ``max_memory_allocated``. Modes:
frozen (all weights frozen, input grads on: forward + full input-gradient backward, no optimizer),
s2ft (blocks merged in the frozen weight, this package), s2ft_delta (alternative: frozen W0 plus a block
delta added to the output), full (full fine-tuning), lora (PEFT LoRA on q,k,v,up,down at matched
trainable count). ``--compile`` adds torch.compile variants of frozen and s2ft (inductor; slow to build).
Usage: python tools/bench_core.py [--steps 30] [--compile]  -> table + benchmarks/results/core_cpu.json
       python tools/bench_core.py --device cuda --preset 7b --dtype bfloat16 --out benchmarks/results/core_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

PRESETS = {
    "small": (dict(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512), 2, 256),
    "7b": (dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096), 1, 512),
}  # fmt: skip
CFG: dict = {}
BATCH, SEQ = 0, 0
O_RATIO, D_RATIO = 0.052, 0.02
MODES = ["frozen", "s2ft", "s2ft_delta", "full", "lora"]


def _apply_preset(name: str) -> None:
    global BATCH, SEQ
    cfg, BATCH, SEQ = PRESETS[name]
    CFG.clear()
    CFG.update(cfg, attn_implementation="eager")


def _slices():
    from surgery.plan import BlockSlice

    heads, hd = CFG["num_attention_heads"], CFG["hidden_size"] // CFG["num_attention_heads"]
    k_heads = max(1, round(O_RATIO * heads))
    k_ch = max(1, round(D_RATIO * CFG["intermediate_size"]))
    out = []
    for i in range(CFG["num_hidden_layers"]):
        o = list(range(k_heads * hd))
        d = list(range(k_ch))
        out.append(BlockSlice(f"model.layers.{i}.self_attn.o_proj", "o", "in", [(0, len(o))], o))
        out.append(BlockSlice(f"model.layers.{i}.mlp.down_proj", "down", "in", [(0, len(d))], d))
    return out


def _install_delta(model, slices):
    """Alternative design: y = x W0ᵀ + x[:, cols] Bᵀ with W0's block columns zeroed and B the trainable delta."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class DeltaLinear(nn.Module):
        def __init__(self, base, s):
            super().__init__()
            self.weight, self.bias = base.weight, base.bias
            (a, b), = s.runs  # fmt: skip
            self.a, self.b = a, b
            half = base.weight.dtype in (torch.bfloat16, torch.float16)
            self.block = nn.Parameter(base.weight[:, a:b].detach().clone().to(torch.float32 if half else None))
            with torch.no_grad():
                self.weight[:, a:b] = 0

        def forward(self, x):
            xs = x[..., self.a : self.b].contiguous()  # own copy: saving a view would pin all of x
            return F.linear(x, self.weight, self.bias) + F.linear(xs, self.block.to(x.dtype))

    for p in model.parameters():
        p.requires_grad_(False)
    for s in slices:
        parent, _, child = s.module.rpartition(".")
        setattr(model.get_submodule(parent), child, DeltaLinear(model.get_submodule(s.module), s))


def build(mode: str, compile_: bool = False, device: str = "cpu", dtype: str = "float32"):
    """(callable step, trainable count, extra info) for one mode on a fresh seeded model."""
    import torch
    import transformers

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CFG)).train()
    finally:
        torch.set_default_dtype(old)
    slices = _slices()
    params, extra = [], {}
    if mode == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()
    elif mode == "s2ft":
        from s2ft_lightning.layers import block_parameters, install

        install(model, slices)
        params = block_parameters(model)
    elif mode == "s2ft_delta":
        _install_delta(model, slices)
        params = [p for p in model.parameters() if p.requires_grad]
    elif mode == "full":
        params = list(model.parameters())
    elif mode == "lora":
        import peft

        from surgery.planner import LORA_TARGETS, matched_lora_rank, slice_weight_count

        r, _ = matched_lora_rank(model, slice_weight_count(model, slices))
        extra["lora_r"] = r
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
        model = peft.get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    ids = torch.randint(0, CFG["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0)).to(device)
    fwd = torch.compile(model) if compile_ else model

    def step() -> None:
        fwd(ids, labels=ids).loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params), extra


def memory_child(mode: str, steps: int, device: str, dtype: str, timed_steps: int = 0) -> dict:
    """Fresh process: peak memory after a few steps, FLOPs of one step; on CUDA also the step time."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import s2ft_lightning.layers  # noqa: F401  (same imports in every mode: RSS compares training, not imports)

    cuda = device == "cuda"
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    name, _, comp = mode.partition("+")
    step, trainable, extra = build(name, comp == "compile", device, dtype)
    rss_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if cuda:
        rss_build = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + timed_steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= steps:
            times.append(time.perf_counter() - t0)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    flops = None
    if not comp:
        with FlopCounterMode(display=False) as fc:
            step()
        flops = fc.get_total_flops()
    if times:
        extra.update(step_ms_median=statistics.median(times) * 1e3, step_ms_min=min(times) * 1e3)
    return {"mode": mode, "trainable": trainable, "peak_rss_mib": peak, "rss_after_build_mib": rss_build,
            "gflop_per_step": flops / 1e9 if flops else None, **extra}  # fmt: skip


def time_interleaved(modes: list[str], steps: int, warmup: int) -> dict[str, dict]:
    """All modes in one process, one step each per round, so background load hits every mode alike."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    fns = {}
    for m in modes:
        name, _, comp = m.partition("+")
        fns[m] = build(name, comp == "compile")[0]  # CPU only
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(warmup + steps):
        for m, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[m].append(time.perf_counter() - t0)
    ref = times.get("frozen")
    out = {}
    for m, ts in times.items():
        ratios = [a / b for a, b in zip(ts, ref)] if ref else [float("nan")]
        out[m] = {"step_ms_median": statistics.median(ts) * 1e3, "step_ms_min": min(ts) * 1e3,
                  "x_frozen_median_of_rounds": statistics.median(ratios)}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--mem-steps", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="also frozen+compile and s2ft+compile (inductor)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/core_cpu.json")
    args = ap.parse_args()
    _apply_preset(args.preset)
    cuda = args.device == "cuda"
    if args.child:
        timed = args.steps if cuda else 0
        print(json.dumps(memory_child(args.child, args.mem_steps if not cuda else args.warmup, args.device,
                                      args.dtype, timed)))  # fmt: skip
        return
    modes = args.modes.split(",") + (["frozen+compile", "s2ft+compile"] if args.compile else [])
    os.environ.update({"S2FT_KERNELS": "torch", "TRITON_INTERPRET": "0"})
    results = {}
    for m in modes:
        cmd = [sys.executable, __file__, "--child", m, "--mem-steps", str(args.mem_steps), "--preset", args.preset,
               "--device", args.device, "--dtype", args.dtype, "--steps", str(args.steps),
               "--warmup", str(args.warmup)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"{m}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        results[m] = json.loads(proc.stdout.strip().splitlines()[-1])
    load = os.getloadavg()[0]
    if not cuda:
        if args.dtype != "float32":
            raise SystemExit("CPU timing runs in float32; use --dtype only with --device cuda")
        for m, t in time_interleaved(list(results), args.steps, args.warmup).items():
            results[m].update(t)
    elif "frozen" in results:
        for r in results.values():
            r["x_frozen_median_of_rounds"] = r["step_ms_median"] / results["frozen"]["step_ms_median"]
    base = results.get("frozen")
    print(f"Llama h={CFG['hidden_size']} L={CFG['num_hidden_layers']} I={CFG['intermediate_size']} "
          f"heads={CFG['num_attention_heads']}/{CFG['num_key_value_heads']} vocab={CFG['vocab_size']}, "
          f"batch {BATCH}x{SEQ}, {args.dtype} on {args.device}; time: median of {args.steps} "
          f"{'steps' if cuda else 'interleaved rounds'} after {args.warmup}; load avg at start {load:.1f}")  # fmt: skip
    hdr = (f"{'mode':<16}{'trainable':>11}{'GFLOP':>8}{'step ms':>9}{'min ms':>8}{'x frozen':>9}"
           f"{'peak MiB':>9}{'+frozen':>8}{'train MiB':>10}")  # fmt: skip
    print(hdr)
    print("-" * len(hdr))
    for m, r in results.items():
        dmem = r["peak_rss_mib"] - base["peak_rss_mib"] if base else float("nan")
        r["d_frozen_peak_mib"] = dmem
        gf = f"{r['gflop_per_step']:.1f}" if r.get("gflop_per_step") else "-"
        print(f"{m:<16}{r['trainable']:>11,}{gf:>8}{r['step_ms_median']:>9.0f}{r['step_ms_min']:>8.0f}"
              f"{r['x_frozen_median_of_rounds']:>9.2f}{r['peak_rss_mib']:>9.0f}{dmem:>8.0f}"
              f"{r['peak_rss_mib'] - r['rss_after_build_mib']:>10.0f}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"preset": args.preset, "device": args.device, "dtype": args.dtype,
            "config": CFG, "batch": BATCH, "seq": SEQ, "o_ratio": O_RATIO, "d_ratio": D_RATIO,
            "load_avg": load, "threads": int(os.environ.get("BENCH_THREADS", "2")),
            "steps": args.steps, "warmup": args.warmup}  # fmt: skip
    out.write_text(json.dumps({"meta": meta, "results": list(results.values())}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

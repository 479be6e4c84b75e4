#!/usr/bin/env python
"""Benchmarks CLI: ``train`` (step time / memory per mode), ``switch`` and ``serve`` (adapters), ``plot``.

Examples::

    python tools/bench.py train --config cpu-small              # eager, fresh process per mode
    python tools/bench.py train --config cpu-small --compile    # eager and torch.compile
    python tools/bench.py train --config gpu-7b --compile       # on an H100
    python tools/bench.py train --config sweep                  # 7B at 512..4096 tokens
    python tools/bench.py long-context                          # memory vs sequence, 512..8192, +-checkpointing
    python tools/bench.py profile --config cpu-small            # where each mode's step time/memory goes
    python tools/bench.py memory                                # memory model: checks and what fits where
    python tools/bench.py plot                                  # PNGs next to benchmarks/results/*.json
    python tools/bench.py switch | serve [args passed to tools/bench_adapters.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # benchmarks/ is not an installed package

from benchmarks import report as rp
from benchmarks import train_suite as ts


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="training step time and peak memory per mode")
    p.add_argument("--config", required=True, choices=sorted(ts.CONFIGS), help="benchmark config")
    p.add_argument("--modes", nargs="+", choices=ts.MODES, help="subset of modes (default: the config's)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--compile", action="store_true", help="also run every mode under torch.compile")
    g.add_argument("--compile-only", action="store_true", help="run only the torch.compile variants")
    p.add_argument(
        "--compile-scope",
        choices=("layers", "model"),
        default="layers",
        help="compile each decoder layer (default) or the whole model",
    )
    p.add_argument("--steps", type=int, help="timed steps per run (median reported; >= 10 for real numbers)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps")
    p.add_argument("--batch", type=int, help="override batch size")
    p.add_argument("--seq", type=int, nargs="+", help="override sequence length(s)")
    p.add_argument("--layers", type=int, help="override the model's number of decoder layers")
    p.add_argument("--repeat", type=int, default=1, help="rounds per mode, interleaved; keeps the fastest")
    p.add_argument(
        "--slices",
        choices=("planner", "hand"),
        help="S²FT blocks: real selection + surgery, or the first heads/channels",
    )
    p.add_argument("--master-dtype", choices=("auto", "float32", "bfloat16"), help="S²FT block dtype")
    p.add_argument("--timeout", type=float, help="per-run timeout (s) of isolated eager runs")
    p.add_argument("--compile-timeout", type=float, help="per-run timeout (s) of isolated compiled runs")
    iso = p.add_mutually_exclusive_group()
    iso.add_argument(
        "--isolate",
        dest="isolate",
        action="store_true",
        default=None,
        help="fresh subprocess per run (default on CPU: peak RSS is per mode)",
    )
    iso.add_argument("--no-isolate", dest="isolate", action="store_false", help="all runs in this process")
    p.add_argument("--device", help="override the config's device (cpu|cuda)")
    p.add_argument("--threads", type=int, help="torch intra-op threads per run (cpu-small default: 1)")
    p.add_argument("--quantize", choices=("none", "int8", "nf4"), help="store the frozen base quantized (torchao)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/train-<config>.json)")


def cmd_train(a: argparse.Namespace) -> int:
    cfg = ts.get_config(
        a.config,
        modes=a.modes,
        steps=a.steps,
        warmup=a.warmup,
        batch=a.batch,
        seqs=a.seq,
        slices=a.slices,
        master_dtype=a.master_dtype,
        quantize=a.quantize,
        timeout_s=a.timeout,
        compile_timeout_s=a.compile_timeout,
        compile_scope=a.compile_scope,
        device=a.device,
        threads=a.threads,
    )
    if a.layers is not None:
        if a.layers < 1:
            raise SystemExit(f"--layers must be >= 1 (got {a.layers})")
        cfg["model"] = dict(cfg["model"], num_hidden_layers=a.layers)
    if cfg["steps"] < 1 or cfg["warmup"] < 0:
        raise SystemExit(f"--steps must be >= 1 and --warmup >= 0 (got {cfg['steps']}, {cfg['warmup']})")
    compile_mode = "only" if a.compile_only else "both" if a.compile else "off"
    out = Path(a.out) if a.out else rp.default_out(a.config)

    def save(runs: list[dict[str, Any]]) -> None:
        rp.write_json(rp.result_document(cfg, runs, compile_mode, {"partial": True}), out)

    print(f"[bench] train config={a.config} compile={compile_mode} modes={cfg['modes']} seqs={cfg['seqs']}")
    try:
        runs = ts.run_suite(cfg, compile_mode, isolate=a.isolate, repeat=a.repeat, on_result=save)
    except RuntimeError as e:
        print(f"[bench] error: {e}", file=sys.stderr)
        return 2
    doc = rp.result_document(cfg, runs, compile_mode)
    rp.write_json(doc, out)
    m = doc["machine"]
    where = m.get("gpu") or f"{m['cpu']} ({m['cpu_count']} cores)"
    v, commit = doc["versions"], doc["git"]["commit"]
    print(f"\n### train {a.config} on {where}, torch {v['torch']}, commit {commit}\n")
    print(rp.markdown_table(runs))
    print()
    print(rp.targets_table(doc["targets"]))
    print(f"\n[bench] wrote {out}")
    return 0 if all(r["status"] == "ok" for r in runs) else 1


def _long_context_parser(sub: argparse._SubParsersAction) -> None:
    from benchmarks import long_context as lc

    p = sub.add_parser("long-context", help="peak memory and step time against sequence length, fresh process each")
    p.add_argument("--config", default="long-context", choices=sorted(lc.CONFIGS), help="sweep config")
    p.add_argument("--modes", nargs="+", choices=ts.MODES, help="subset of modes (default: the config's)")
    p.add_argument("--seq", type=int, nargs="+", help="sequence lengths (default: the config's)")
    p.add_argument(
        "--checkpointing",
        nargs="+",
        choices=("off", "on", "transformers"),
        help="series to run: off, on (S²FT: S2FTModule's; others: transformers'), transformers (its switch for all)",
    )
    p.add_argument("--steps", type=int, help="timed steps per point (median reported)")
    p.add_argument("--warmup", type=int, help="untimed warm-up steps")
    p.add_argument("--threads", type=int, help="torch intra-op threads per point (default: every core)")
    p.add_argument("--max-peak-mib", type=float, help="skip a point whose predicted peak passes this (CPU)")
    p.add_argument("--timeout", type=float, help="per-point timeout (s)")
    p.add_argument("--device", help="override the config's device (cpu|cuda)")
    p.add_argument(
        "--no-isolate",
        dest="isolate",
        action="store_false",
        default=None,
        help="run each series in this process (dry runs; CPU peaks then are the process's, not the point's)",
    )
    p.add_argument("--out", help="JSON path (default benchmarks/results/long-context.json; a .png beside it)")


def cmd_long_context(a: argparse.Namespace) -> int:
    from benchmarks import long_context as lc
    from benchmarks import plots

    ckpt = None if a.checkpointing is None else [{"off": False, "on": True}.get(c, c) for c in a.checkpointing]
    cfg = lc.get_config(
        a.config, modes=a.modes, seqs=a.seq, checkpointing=ckpt, steps=a.steps, warmup=a.warmup,
        threads=a.threads, max_peak_mib=a.max_peak_mib, timeout_s=a.timeout, device=a.device, isolate=a.isolate,
    )  # fmt: skip
    if cfg["device"] == "cuda":
        import torch

        if not torch.cuda.is_available():
            print(f"[bench] error: config {a.config!r} needs a CUDA GPU; none is available", file=sys.stderr)
            return 2
    out = Path(a.out) if a.out else REPO / "benchmarks" / "results" / "long-context.json"
    print(f"[bench] long-context config={a.config} modes={cfg['modes']} seqs={cfg['seqs']} ckpt={cfg['checkpointing']}")
    runs = lc.run_sweep(cfg, on_result=lambda r: rp.write_json(lc.result_document(cfg, r, {"partial": True}), out))
    doc = lc.result_document(cfg, runs)
    rp.write_json(doc, out)
    print()
    print(lc.markdown(runs))
    print()
    print(rp.targets_table(doc["targets"]))
    for png in plots.plot_file(out):
        print(f"[bench] wrote {png}")
    print(f"[bench] wrote {out}")
    return 0 if all(r["status"] in ("ok", "skipped") for r in runs) else 1


def cmd_profile(a: argparse.Namespace) -> int:
    from benchmarks import step_profile as pf
    from benchmarks import sysinfo

    cfg = ts.get_config(a.config, modes=a.modes, batch=a.batch, seqs=a.seq, device=a.device, threads=a.threads)
    if a.steps < 1:
        raise SystemExit(f"--steps must be >= 1 (got {a.steps})")
    print(f"[bench] profile config={a.config} modes={cfg['modes']} seq={cfg['seqs'][0]} (eager, one process)")
    rows = pf.profile_suite(cfg, cfg["modes"], steps=a.steps)
    doc = {"suite": "profile", "schema_version": rp.SCHEMA_VERSION, **sysinfo.describe()}
    doc.update(config=cfg, results=rows)
    out = Path(a.out) if a.out else REPO / "benchmarks" / "results" / f"profile-{a.config}.json"
    rp.write_json(doc, out)
    print()
    print(pf.markdown(rows))
    print(f"\n[bench] wrote {out}")
    return 0


def cmd_plot(a: argparse.Namespace) -> int:
    from benchmarks import plots

    files = [Path(f) for f in a.inputs] if a.inputs else sorted((REPO / "benchmarks/results").glob("train-*.json"))
    if not files:
        print("[bench] no train-*.json results to plot; run `tools/bench.py train` first", file=sys.stderr)
        return 2
    for f in files:
        for png in plots.plot_file(f, a.outdir):
            print(f"[bench] wrote {png}")
    return 0


def _load_bench_adapters() -> Any:
    path = REPO / "tools" / "bench_adapters.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("bench_adapters", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def adapter_targets(suite: str, part: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's adapter targets: switch >= 5x faster than PEFT's; 8-adapter forward <= 1.1x base."""
    if suite == "switch":
        v = part["peft_switch_ms"] / part["s2ft_switch_ms"] if part.get("s2ft_switch_ms") else None
        t = {"target": "PEFT LoRA switch time / S2FT switch time", "limit": ">= 5"}
        return [dict(t, value=None if v is None else round(v, 2), passed=None if v is None else bool(v >= 5))]
    out = []
    for name, sv in part.items():  # "serving" (full sequences) and, when present, "serving_seq1" (decode)
        tag = f"{name}, seq {sv.get('seq')}"
        v = sv.get("s2ft_over_base")
        t = {"target": f"S2FT 8-adapter mixed batch forward / base forward ({tag})", "limit": "<= 1.1"}
        out.append(dict(t, value=None if v is None else round(v, 3), passed=None if v is None else bool(v <= 1.1)))
        if sv.get("peft_over_base") is not None:
            out.append(
                {
                    "target": f"PEFT mixed batch forward / base forward ({tag}, info)",
                    "value": round(sv["peft_over_base"], 3),
                    "limit": None,
                    "passed": None,
                }
            )
    return out


def cmd_adapters(suite: str, rest: list[str]) -> int:
    """Run tools/bench_adapters.py (owned by the adapters work) and save its ``suite`` part with targets."""
    import tempfile

    from benchmarks import sysinfo

    mod = _load_bench_adapters()
    if mod is None or not callable(getattr(mod, "main", None)):
        print(f"[bench] {suite}: tools/bench_adapters.py with main(argv) is missing; not available", file=sys.stderr)
        return 2
    out = None
    if "--out" in rest:  # our --out names this suite's JSON; bench_adapters writes its own file to a temp dir
        i = rest.index("--out")
        out, rest = Path(rest[i + 1]), rest[:i] + rest[i + 2 :]
    with tempfile.TemporaryDirectory() as tmp:
        result = mod.main([*rest, "--out", str(Path(tmp) / "adapters.json")])
    keys = ["switch"] if suite == "switch" else ["serving", "serving_seq1"]
    if not isinstance(result, dict) or keys[0] not in result:
        print(f"[bench] {suite}: bench_adapters.main returned no {keys[0]!r} result", file=sys.stderr)
        return 2
    part = result["switch"] if suite == "switch" else {k: result[k] for k in keys if k in result}
    device = str(result.get("config", {}).get("device", "cpu")).split(":")[0]
    doc = {"suite": suite, "schema_version": rp.SCHEMA_VERSION, **sysinfo.describe()}
    doc.update(config=result.get("config"), result=part, targets=adapter_targets(suite, part))
    out = out or REPO / "benchmarks" / "results" / f"{suite}-{device}.json"
    rp.write_json(doc, out)
    print()
    print(rp.targets_table(doc["targets"]))
    print(f"[bench] wrote {out}")
    return 0


def cmd_memory(a: argparse.Namespace) -> int:
    """The memory model: its parts checked against CPU measurements, then what fits where."""
    import json

    import torch

    from benchmarks import memory_check as mc
    from benchmarks import memory_model as mm

    torch.set_num_threads(1)
    shape = mm.Shape("cpu-small", **{k: v for k, v in _CPU_SMALL_SHAPE.items()})
    checks = mc.check_activations(shape) + mc.check_weights(shape) + mc.check_training_state(shape)
    print("| part (cpu-small shape) | measured | predicted | error |\n|---|---:|---:|---:|")
    for r in checks:
        print(f"| {r['part']} | {r['measured']:,.0f} | {r['predicted']:,.0f} | {100 * r['rel_err']:+.1f}% |")
    rows = mm.fits_table(card_gib=a.card_gib, tokens=a.tokens)
    print(f"\nwhat fits on one {a.card_gib:g} GiB card, 1 x {a.tokens} tokens (GiB per device):\n")
    print("| model | method | base | devices | checkpointing | GiB | fits |\n|---|---|---|---:|---|---:|---|")
    for r in rows:
        ckpt, fits = ("yes" if r["checkpointing"] else "no"), ("yes" if r["fits"] else "no")
        print(f"| {r['model']} | {r['method']} | {r['base']} | {r['devices']} | {ckpt} | {r['gib']:.1f} | {fits} |")
    traffic = {name: {m: mm.fsdp_traffic(s, m, 8, a.tokens) for m in mm.METHODS} for name, s in mm.SHAPES.items()}
    out = Path(a.out) if a.out else REPO / "benchmarks" / "results" / "memory.json"
    doc = {"checks": checks, "fits": rows, "fsdp_traffic_8_devices": traffic, "card_gib": a.card_gib,
           "tokens": a.tokens, "shapes": {n: mm.shape_dict(s) for n, s in mm.SHAPES.items()}}  # fmt: skip
    out.write_text(json.dumps(doc, indent=1))
    print(f"[bench] wrote {out}")
    worst = max(abs(r["rel_err"]) for r in checks)
    return 0 if worst <= 0.10 else 1


_CPU_SMALL_SHAPE = dict(hidden=512, layers=4, intermediate=1376, heads=8, kv_heads=4, vocab=8192)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("switch", "serve"):
        return cmd_adapters(argv[0], argv[1:])
    ap = argparse.ArgumentParser(
        prog="tools/bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="suite", required=True)
    _train_parser(sub)
    _long_context_parser(sub)
    pr = sub.add_parser("profile", help="per-mode step breakdown: phase x op kind, saved activations, state")
    pr.add_argument("--config", required=True, choices=sorted(ts.CONFIGS), help="benchmark config")
    pr.add_argument("--modes", nargs="+", choices=ts.MODES, help="subset of modes (default: the config's)")
    pr.add_argument("--steps", type=int, default=3, help="profiled steps per mode (after the config's warm-up)")
    pr.add_argument("--batch", type=int, help="override batch size")
    pr.add_argument("--seq", type=int, nargs=1, help="override the sequence length")
    pr.add_argument("--device", help="override the config's device (cpu|cuda)")
    pr.add_argument("--threads", type=int, help="torch intra-op threads")
    pr.add_argument("--out", help="JSON path (default benchmarks/results/profile-<config>.json)")
    pm = sub.add_parser("memory", help="memory model: checked against CPU measurements, what fits where")
    pm.add_argument("--card-gib", type=float, default=80.0, help="device memory (GiB)")
    pm.add_argument("--tokens", type=int, default=2048, help="tokens per device per step")
    pm.add_argument("--out", help="JSON path (default benchmarks/results/memory.json)")
    pp = sub.add_parser("plot", help="PNG plots from train-*.json results")
    pp.add_argument("inputs", nargs="*", help="result JSON files (default: benchmarks/results/train-*.json)")
    pp.add_argument("--outdir", help="where to write PNGs (default: next to each JSON)")
    sub.add_parser("switch", help="adapter switch time: S²FT vs PEFT LoRA (tools/bench_adapters.py)")
    sub.add_parser("serve", help="multi-adapter batched forward (tools/bench_adapters.py)")
    a = ap.parse_args(argv)
    if a.suite == "train":
        return cmd_train(a)
    if a.suite == "profile":
        return cmd_profile(a)
    if a.suite == "long-context":
        return cmd_long_context(a)
    if a.suite == "memory":
        return cmd_memory(a)
    return cmd_plot(a)


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark S²FT adapter switching and multi-adapter batched serving against PEFT LoRA, on CPU.

Switch: S²FT ``AdapterBank.switch`` (touches only the union of rows/columns, exact) vs PEFT LoRA with a
matched parameter count (``unmerge_adapter`` + ``set_adapter`` + ``merge_adapter``). Serving: a batch of
8 rows with 8 different adapters over one unmerged base (S²FT ``MultiAdapterModel``; PEFT mixed-batch
``adapter_names=``) vs the plain base forward. Prints a table; writes JSON with machine info.

    python tools/bench_adapters.py [--layers 8 --hidden 512 --seq 128 --repeats 15 --trials 3 --dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from s2ft_lightning.adapters import AdapterBank, MultiAdapterModel, diff_adapter


def build_base(args, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(256, args.seq),
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).to(args.device).eval()


def s2_adapters(model, args, n: int):
    """``n`` adapters in the paper's layout: O columns of a few heads + Down columns of a few channels."""
    g = torch.Generator().manual_seed(1)
    head_dim = args.hidden // args.heads
    n_heads = max(1, round(args.o_ratio * args.heads))
    n_ch = max(1, round(args.d_ratio * args.intermediate))
    ads = {}
    for i in range(n):
        targets = {}
        for layer in range(args.layers):
            heads = torch.randperm(args.heads, generator=g)[:n_heads].tolist()
            cols = [h * head_dim + j for h in sorted(heads) for j in range(head_dim)]
            targets[f"model.layers.{layer}.self_attn.o_proj"] = {"in": cols}
            chans = sorted(torch.randperm(args.intermediate, generator=g)[:n_ch].tolist())
            targets[f"model.layers.{layer}.mlp.down_proj"] = {"in": chans}
        ad = diff_adapter(model, model, targets, name=f"a{i}")
        for b in ad.blocks:
            b.delta = 0.02 * torch.randn(b.delta.shape, generator=g)
        ads[f"a{i}"] = ad
    return ads


def peft_model(base, args, n: int, n_params: int):
    """PEFT LoRA on the same modules with (about) the same number of weights per adapter."""
    from peft import LoraConfig, get_peft_model

    per_rank = args.layers * ((args.hidden + args.hidden) + (args.intermediate + args.hidden))
    r = max(1, round(n_params / per_rank))
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["o_proj", "down_proj"], lora_dropout=0.0,
                     init_lora_weights=False)  # fmt: skip
    torch.manual_seed(2)
    model = get_peft_model(base, cfg, adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", cfg)
    model.eval()
    lora_params = sum(p.numel() for n_, p in model.named_parameters() if "lora_" in n_ and ".a0." in n_)
    return model, r, lora_params


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" not in k}


def max_drift(model, ref: dict[str, torch.Tensor]) -> float:
    sd = {k.replace("base_model.model.", "").replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    return max((sd[k].float() - v.float()).abs().max().item() for k, v in ref.items())


def bench_switch(args, dtype) -> dict:
    base = build_base(args, dtype)
    ref = weights(base)
    ads = s2_adapters(base, args, args.adapters)
    names = list(ads)
    bank = AdapterBank(base)
    for n, a in ads.items():
        bank.add(a, n)
    bank.merge(names[0])
    it = iter(range(10**9))
    s2_t = timeit(lambda: bank.switch(names[next(it) % len(names)]), args.repeats * 2)
    for i in range(args.cycles):
        bank.switch(names[i % len(names)])
    bank.unmerge()
    s2_drift = max_drift(base, ref)

    pbase = build_base(args, dtype)
    pref = weights(pbase)
    pm, r, lora_params = peft_model(pbase, args, args.adapters, ads[names[0]].num_params)
    pm.set_adapter("a0")
    pm.merge_adapter()

    counter = iter(range(10**9))

    def peft_switch() -> None:
        pm.unmerge_adapter()
        pm.set_adapter(names[next(counter) % len(names)])
        pm.merge_adapter()

    peft_t = timeit(peft_switch, args.repeats * 2)
    for _ in range(args.cycles):
        peft_switch()
    pm.unmerge_adapter()
    peft_drift = max_drift(pm, pref)
    return {
        "s2ft_switch_ms": 1e3 * s2_t,
        "peft_switch_ms": 1e3 * peft_t,
        "s2ft_params_per_adapter": ads[names[0]].num_params,
        "lora_rank": r,
        "lora_params_per_adapter": lora_params,
        "cycles": args.cycles,
        "s2ft_max_abs_drift_after_cycles": s2_drift,
        "peft_max_abs_drift_after_cycles": peft_drift,
    }


def bench_serving(args, dtype, seq: int, repeats: int) -> dict:
    base = build_base(args, dtype)
    ads = s2_adapters(base, args, args.adapters)
    names = list(ads)
    ids = torch.randint(0, args.vocab, (args.adapters, seq), generator=torch.Generator().manual_seed(3))
    ids = ids.to(args.device)
    mam = MultiAdapterModel(base, ads, backend=args.backend)
    pbase = build_base(args, dtype)
    pm, r, _ = peft_model(pbase, args, args.adapters, ads[names[0]].num_params)
    exported = peft_exported(build_base(args, dtype), ads)  # the same S²FT adapters, served by PEFT

    with torch.no_grad():
        # correctness spot check: row 3 equals the base with adapter a3 merged
        got = mam(input_ids=ids, adapter_names=names).logits[3]
        check = build_base(args, dtype)
        bank = AdapterBank(check)
        bank.merge(bank.add(ads[names[3]], names[3]))
        err = (check(ids[3:4]).logits[0] - got).abs().max().item()
        del check
        exported_err = (exported(input_ids=ids, adapter_names=names).logits[3] - got).abs().max().item()

        fns = {
            "base": lambda: base(ids),
            "s2ft_mixed": lambda: mam(input_ids=ids, adapter_names=names),
            "peft_mixed": lambda: pm(input_ids=ids, adapter_names=names),
            "peft_exported_mixed": lambda: exported(input_ids=ids, adapter_names=names),
        }
        times: dict[str, list[float]] = {k: [] for k in fns}
        for fn in fns.values():
            fn()
        for _ in range(repeats):  # interleaved, so background load hits every variant alike
            for k, fn in fns.items():
                _sync()
                t0 = time.perf_counter()
                fn()
                _sync()
                times[k].append(time.perf_counter() - t0)
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {
        "base_forward_ms": med["base"],
        "s2ft_mixed_ms": med["s2ft_mixed"],
        "peft_mixed_ms": med["peft_mixed"],
        "s2ft_over_base": med["s2ft_mixed"] / med["base"],
        "peft_over_base": med["peft_mixed"] / med["base"],
        "peft_exported_mixed_ms": med["peft_exported_mixed"],
        "peft_exported_over_base": med["peft_exported_mixed"] / med["base"],
        "s2ft_row_vs_merged_max_abs_err": err,
        "peft_exported_vs_s2ft_max_abs_err": exported_err,
        "batch": args.adapters,
        "seq": seq,
        "repeats": repeats,
    }


def peft_exported(base, ads: dict):
    """A PeftModel serving the S²FT adapters exported as PEFT LoRA adapters (`export_peft_lora`)."""
    import tempfile

    import peft

    from s2ft_lightning.adapters import export_peft_lora

    names = list(ads)
    with tempfile.TemporaryDirectory() as tmp:
        for n in names:
            export_peft_lora(ads[n], Path(tmp) / n)
        model = peft.PeftModel.from_pretrained(base, Path(tmp) / names[0], adapter_name=names[0])
        for n in names[1:]:
            model.load_adapter(Path(tmp) / n, adapter_name=n)
    return model.eval()


def median_of_trials(trials: list[dict]) -> dict:
    """Median over trials of each timing/ratio, the worst drift/error, and every trial's timings."""
    out: dict = {}
    for k, v in trials[0].items():
        vals = [t[k] for t in trials]
        if "drift" in k or "err" in k:
            out[k] = max(vals)
        elif isinstance(v, float):
            out[k] = statistics.median(vals)
        else:
            out[k] = v
    out["trials"] = {k: [t[k] for t in trials] for k, v in trials[0].items() if k.endswith(("_ms", "_over_base"))}
    return out


def machine_info() -> dict:
    import peft
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "git_commit": commit or "unknown (no commit yet)",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],  # other processes share the CPUs
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8, help="decoder layers of the synthetic Llama")
    p.add_argument("--hidden", type=int, default=512, help="hidden size")
    p.add_argument("--intermediate", type=int, default=1408, help="FFN width")
    p.add_argument("--heads", type=int, default=8, help="attention heads")
    p.add_argument("--vocab", type=int, default=8000, help="vocabulary size")
    p.add_argument("--seq", type=int, default=128, help="prefill sequence length")
    p.add_argument("--adapters", type=int, default=8, help="adapters in the bank / rows in the mixed batch")
    p.add_argument("--o-ratio", type=float, default=0.125, help="fraction of heads whose O columns train")
    p.add_argument("--d-ratio", type=float, default=0.03, help="fraction of FFN channels whose Down columns train")
    p.add_argument("--repeats", type=int, default=15, help="samples per timed variant")
    p.add_argument("--decode-repeats", type=int, default=60, help="samples per variant for the seq-1 case")
    p.add_argument("--trials", type=int, default=3, help="whole-benchmark repeats; the JSON keeps their medians")
    p.add_argument("--cycles", type=int, default=200, help="switches before measuring drift")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="base and compute dtype")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--backend", choices=["auto", "torch", "triton"], default="torch", help="S2FT serving path")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is stable on a shared machine)")
    p.add_argument("--out", default=None, help="default: benchmarks/results/adapters_<device>[_bf16].json")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    load_start = [round(x, 2) for x in os.getloadavg()]
    runs = []
    for _ in range(args.trials):  # whole repeats, so a burst of background load moves one trial, not all
        runs.append(
            (
                bench_switch(args, dtype),
                bench_serving(args, dtype, args.seq, args.repeats),
                # one token per row: the per-module overhead is most visible; cheap, so more samples
                bench_serving(args, dtype, 1, args.decode_repeats),
            )
        )
    switch, serving, decode = (median_of_trials([r[i] for r in runs]) for i in range(3))
    machine = machine_info()
    machine["loadavg_at_start"] = load_start
    result = {
        "machine": machine,
        "config": vars(args),
        "switch": switch,
        "serving": serving,
        "serving_seq1": decode,
    }
    sw, sv = switch, serving
    rows = [
        ("switch (ms)", f"{sw['s2ft_switch_ms']:.2f}", f"{sw['peft_switch_ms']:.2f}", ""),
        ("weights per adapter", f"{sw['s2ft_params_per_adapter']:,}",
         f"{sw['lora_params_per_adapter']:,} (r={sw['lora_rank']})", ""),
        (f"max |W-W0| after {args.cycles} switches+unmerge", f"{sw['s2ft_max_abs_drift_after_cycles']:.3g}",
         f"{sw['peft_max_abs_drift_after_cycles']:.3g}", ""),
        (f"8 rows x 8 adapters, seq {args.seq} (ms)", f"{sv['s2ft_mixed_ms']:.1f}",
         f"{sv['peft_mixed_ms']:.1f}", f"{sv['base_forward_ms']:.1f}"),
        ("  ratio to base forward", f"{sv['s2ft_over_base']:.3f}x", f"{sv['peft_over_base']:.3f}x", "1x"),
        ("8 rows x 8 adapters, seq 1 (ms)", f"{decode['s2ft_mixed_ms']:.2f}", f"{decode['peft_mixed_ms']:.2f}",
         f"{decode['base_forward_ms']:.2f}"),
        ("  ratio to base forward", f"{decode['s2ft_over_base']:.3f}x", f"{decode['peft_over_base']:.3f}x", "1x"),
        (f"same S2FT adapters served by PEFT, seq {args.seq} (ms)", f"{sv['s2ft_mixed_ms']:.1f}",
         f"{sv['peft_exported_mixed_ms']:.1f}", f"{sv['base_forward_ms']:.1f}"),
        ("same S2FT adapters served by PEFT, seq 1 (ms)", f"{decode['s2ft_mixed_ms']:.2f}",
         f"{decode['peft_exported_mixed_ms']:.2f}", f"{decode['base_forward_ms']:.2f}"),
    ]  # fmt: skip
    threads = torch.get_num_threads()
    print(f"\nadapters benchmark ({args.dtype}, {args.device}, {threads} threads, torch {torch.__version__})")
    print(f"{'':44s} {'S2FT':>14s} {'PEFT LoRA':>20s} {'base':>8s}")
    for r in rows:
        print(f"{r[0]:44s} {r[1]:>14s} {r[2]:>20s} {r[3]:>8s}")
    err = sv["s2ft_row_vs_merged_max_abs_err"]
    print(f"S2FT mixed-batch row vs merged model: max |dlogits| = {err:.2e}")
    print(f"PEFT serving the exported adapters vs S2FT serving them: max |dlogits| = "
          f"{sv['peft_exported_vs_s2ft_max_abs_err']:.2e}")  # fmt: skip
    print(f"load average (1/5/15 min) at start {load_start}, at end {machine['loadavg_1_5_15']}")
    suffix = "_bf16" if args.dtype == "bfloat16" else ""
    default = ROOT / "benchmarks" / "results" / f"adapters_{torch.device(args.device).type}{suffix}.json"
    out = Path(args.out or default)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()

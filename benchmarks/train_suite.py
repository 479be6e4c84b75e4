"""The `train` benchmark: one training step per mode (frozen floor, S²FT, full, PEFT LoRA) on one model.

Every mode builds the same random-init Llama from a seed, trains on the same random tokens with AdamW and
is timed as forward + backward + optimizer.step + zero_grad (median after warm-up). Peak memory is CUDA
``max_memory_allocated`` on GPU and the peak RSS of a fresh subprocess per run on CPU. A ``-chunked`` mode
computes the loss with `s2ft_lightning.loss` (no full logits) instead of the model's ``labels=`` path; the
config's ``checkpointing`` turns on activation checkpointing as each method's users would (S²FT:
`S2FTModule`'s; the others: transformers' switch) or transformers' switch for every mode (``"transformers"``).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.lora_match import LORA_TARGETS
from s2ft_lightning.models import resolve_dtype

# "inplace": the S²FT reference code's design (blocks trained inside the weight), `benchmarks.inplace_s2ft`.
MODES = ("frozen", "s2ft", "full", "lora", "lora_all", "s2ft-chunked", "lora-chunked", "inplace")
CHECKPOINTING = (False, True, "transformers")
REPO = Path(__file__).resolve().parent.parent
RESULT_TAG = "BENCH_RESULT "

_LLAMA_7B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    intermediate_size=11008,
    vocab_size=32000,
)

# Each config: model shape, dtype, batch, the sequence lengths to run, S²FT ratios and run settings.
CONFIGS: dict[str, dict[str, Any]] = {
    "cpu-small": dict(
        model=dict(
            hidden_size=512,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            intermediate_size=1376,
            vocab_size=8192,
        ),
        dtype="float32",
        device="cpu",
        # One intra-op thread: OpenMP barriers stall for whole scheduler slices when other processes share
        # the 2 cores (measured: every op ~30 ms with 2 threads under load), which would swamp the ratios.
        threads=1,
        batch=2,
        seqs=[256],
        o_ratio=0.052,
        d_ratio=0.02,
        slices="planner",
        modes=list(MODES),
        steps=10,
        warmup=3,
        timeout_s=600,
        compile_timeout_s=420,
    ),
    "gpu-7b": dict(
        model=_LLAMA_7B,
        dtype="bfloat16",
        device="cuda",
        threads=None,
        batch=1,
        seqs=[512],
        o_ratio=0.052,
        d_ratio=0.02,
        # The planner's torch-pruning trace of 7B costs minutes; permutation does not change cost.
        slices="hand",
        modes=list(MODES),
        steps=10,
        warmup=3,
        timeout_s=600,
        compile_timeout_s=600,
    ),
    "sweep": dict(
        model=_LLAMA_7B,
        dtype="bfloat16",
        device="cuda",
        threads=None,
        batch=1,
        seqs=[512, 1024, 2048, 4096],
        o_ratio=0.052,
        d_ratio=0.02,
        slices="hand",
        modes=["frozen", "s2ft", "lora", "lora_all"],  # full FT at 4096 tokens does not fit in 80 GB
        steps=10,
        warmup=2,
        timeout_s=600,
        compile_timeout_s=600,
    ),
    # Seconds-long config for tests and dry runs of the harness itself.
    "tiny": dict(
        model=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=160,
            vocab_size=256,
        ),
        dtype="float32",
        device="cpu",
        threads=1,
        batch=2,
        seqs=[32],
        o_ratio=0.25,
        d_ratio=0.05,
        slices="planner",
        modes=list(MODES),
        steps=2,
        warmup=1,
        timeout_s=300,
        compile_timeout_s=300,
    ),
}


# A small Qwen3-MoE (8 experts, top 2) on CPU, run like cpu-small: S²FT trains Down columns of every expert
# (the paper's LLaMA-3 ratio); PEFT LoRA adapts the same 3-D expert weights (`target_parameters`) at a matched count.
CONFIGS["moe-small"] = dict(
    CONFIGS["cpu-small"],
    arch="qwen3_moe",
    model=dict(
        CONFIGS["cpu-small"]["model"], head_dim=64, moe_intermediate_size=704, num_experts=8, num_experts_per_tok=2
    ),
    o_ratio=0.0,
    d_ratio=0.03,
    lora="experts",
    modes=["frozen", "s2ft", "full", "lora"],
)


def get_config(name: str, **overrides: Any) -> dict[str, Any]:
    """A deep copy of a named config with non-None ``overrides`` applied (unknown names raise)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown benchmark config {name!r}; choose one of {sorted(CONFIGS)}")
    cfg = copy.deepcopy(CONFIGS[name])
    cfg["name"] = name
    for k, v in overrides.items():
        if v is None:
            continue
        if k not in cfg and k not in ("compile_scope", "master_dtype", "quantize", "checkpointing"):
            raise ValueError(f"unknown config override {k!r}; known keys: {sorted(cfg)}")
        cfg[k] = v
    bad = [m for m in cfg["modes"] if m not in MODES]
    if bad:
        raise ValueError(f"unknown mode(s) {bad}; choose from {list(MODES)}")
    return cfg


# ---------------------------------------------------------------- model and modes


def build_model(cfg: dict[str, Any], device: str | torch.device) -> nn.Module:
    """The config's random-init causal LM (Llama unless ``arch`` says), built on ``device`` in the config dtype."""
    from transformers import AutoConfig, AutoModelForCausalLM

    mcfg = AutoConfig.for_model(
        cfg.get("arch", "llama"), **cfg["model"], max_position_embeddings=max(4096, max(cfg["seqs"])), use_cache=False
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(mcfg, dtype=resolve_dtype(cfg["dtype"]))
    return model.to(device).train()  # no-op when the device context already placed it


def _named_linear(model: nn.Module, suffix: str) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n.endswith("." + suffix) and isinstance(m, nn.Linear)]


def hand_slices(model: nn.Module, o_ratio: float, d_ratio: float) -> list:
    """First k heads' o_proj columns and first k channels' down_proj columns of every layer.

    Which indices are chosen does not change the cost, so benchmarks may skip the planner.
    """
    from surgery.plan import BlockSlice

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    k_heads = max(1, round(o_ratio * c.num_attention_heads)) if o_ratio > 0 else 0
    k_ch = max(1, round(d_ratio * c.intermediate_size)) if d_ratio > 0 else 0
    out = []
    for suffix, role, k in (("o_proj", "o", k_heads * head_dim), ("down_proj", "down", k_ch)):
        if k == 0:
            continue
        for name, _ in _named_linear(model, suffix):
            out.append(BlockSlice(module=name, role=role, feature="in", runs=[(0, k)], original=list(range(k))))
    return out


def s2ft_slices(model: nn.Module, cfg: dict[str, Any], apply: bool) -> tuple[Any, str]:
    """(plan or slices, "planner"|"hand") as the config's ``slices`` says; ``apply`` permutes by the plan.

    "planner" runs the real selection and surgery (a failure is an error, never a silent substitute); "hand"
    takes the first heads/channels without surgery, for shapes too large to analyse cheaply.
    """
    how = cfg.get("slices", "planner")
    if how == "hand":
        return hand_slices(model, cfg["o_ratio"], cfg["d_ratio"]), "hand"
    if how != "planner":
        raise ValueError(f"slices={how!r}: use 'planner' or 'hand'")
    from surgery.planner import apply_plan, make_plan

    plan = make_plan(model, o_ratio=cfg["o_ratio"], d_ratio=cfg["d_ratio"], seed=0)
    return (apply_plan(model, plan) if apply else plan), "planner"


@dataclass
class Built:
    """A model set up for one mode plus what it trains."""

    model: nn.Module
    params: list[nn.Parameter]
    info: dict[str, Any] = field(default_factory=dict)


def split_mode(mode: str) -> tuple[str, str]:
    """(method, loss) of a mode: ``"s2ft-chunked"`` -> ("s2ft", "chunked"), ``"lora"`` -> ("lora", "stock")."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {list(MODES)}")
    method, _, loss = mode.partition("-")
    return method, loss or "stock"


def setup_mode(mode: str, cfg: dict[str, Any], device: str | torch.device) -> Built:
    """Build the config's model and make it train like ``mode`` (see MODES)."""
    mode, loss = split_mode(mode)
    ckpt = cfg.get("checkpointing", False)
    if ckpt not in CHECKPOINTING:
        raise ValueError(f"checkpointing={ckpt!r} is not one of {CHECKPOINTING}")
    model = build_model(cfg, device)
    info: dict[str, Any] = {"total_params": sum(p.numel() for p in model.parameters()), "loss_path": loss}
    quantize = cfg.get("quantize") or "none"
    if quantize != "none" and mode == "full":
        raise ValueError("full fine-tuning trains every weight: there is no frozen base to quantize")
    if mode == "frozen":
        model.requires_grad_(False)
        model.enable_input_require_grads()  # embeddings output requires grad: the full input backward runs
        _quantize(model, quantize)
    elif mode == "full":
        model.requires_grad_(True)
    elif mode == "s2ft":
        from s2ft_lightning.layers import install

        plan, how = s2ft_slices(model, cfg, apply=True)
        info.update(slices=how)
        md = cfg.get("master_dtype", "auto")
        install(model, plan, master_dtype=md if md == "auto" else resolve_dtype(md))
        _quantize(model, quantize)  # after surgery, as S2FTModule does
        from s2ft_lightning.ops import backend_for

        info["s2ft_backend"] = backend_for(device)
    elif mode == "inplace":
        from benchmarks.inplace_s2ft import install_inplace

        if quantize != "none":
            raise ValueError("the in-place baseline writes its blocks into the weight: it needs a dense base")
        plan, how = s2ft_slices(model, cfg, apply=True)
        install_inplace(model, plan.slices if hasattr(plan, "slices") else plan)
        info.update(slices=how)
    else:
        from peft import LoraConfig, get_peft_model

        from benchmarks.lora_match import matched_expert_lora_rank, matched_lora_rank
        from surgery.planner import slice_weight_count

        slices, how = s2ft_slices(model, cfg, apply=False)
        count = slice_weight_count(model, slices.slices if hasattr(slices, "slices") else slices)
        if cfg.get("lora") == "experts":  # the same 3-D expert weights S²FT trains (PEFT's target_parameters)
            targets = ["mlp.experts.down_proj"]
            rank, per_rank = matched_expert_lora_rank(model, count, "down_proj")
            lcfg = LoraConfig(
                r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=[], target_parameters=targets
            )
        else:
            targets = list(LORA_TARGETS) if mode == "lora" else "all-linear"
            rank, per_rank = matched_lora_rank(model, count, targets)
            lcfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, bias="none")
        _quantize(model.requires_grad_(False), quantize)  # QLoRA-style: the same quantized base under the adapters
        model = get_peft_model(model, lcfg)
        info.update(lora_rank=rank, lora_targets=targets, s2ft_count_matched=count, lora_params_per_rank=per_rank)
    if ckpt:
        info["checkpointing_impl"] = _enable_checkpointing(model, mode == "s2ft" and ckpt is True)
    info["checkpointing"] = bool(ckpt)
    params = [p for p in model.parameters() if p.requires_grad]
    info["trainable_params"] = sum(p.numel() for p in params)
    info["trainable_bytes"] = sum(p.numel() * p.element_size() for p in params)
    if quantize != "none":
        from s2ft_lightning.quantize import weight_bytes

        info.update(quantize=quantize, weight_bytes=weight_bytes(model))
    return Built(model, params, info)


def _enable_checkpointing(model: nn.Module, s2ft_aware: bool) -> str:
    """Activation checkpointing of every decoder layer: S2FTModule's (``s2ft_aware``) or transformers' switch."""
    if s2ft_aware:
        from s2ft_lightning.activation_checkpointing import enable_activation_checkpointing

        enable_activation_checkpointing(model)
        return "s2ft"
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x (the old name warns there)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return "transformers"


def _quantize(model: nn.Module, mode: str) -> None:
    if mode != "none":
        from s2ft_lightning.quantize import quantize_base

        quantize_base(model, mode)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of decoder layers (works through PEFT wrappers)."""
    for name, m in model.named_modules():
        if name.endswith("layers") and isinstance(m, nn.ModuleList):
            return m
    raise ValueError("no `layers` ModuleList found in the model; cannot compile per layer")


def compile_model(model: nn.Module, scope: str) -> nn.Module:
    """``torch.compile`` each decoder layer in place (``layers``) or the whole model (``model``)."""
    import torch._dynamo

    if scope == "layers":
        layers = decoder_layers(model)
        # Layers share code but guard on per-layer attributes: allow one cache entry per layer.
        limit = max(torch._dynamo.config.cache_size_limit, 2 * len(layers) + 8)
        torch._dynamo.config.cache_size_limit = limit
        if hasattr(torch._dynamo.config, "accumulated_cache_size_limit"):
            torch._dynamo.config.accumulated_cache_size_limit = max(
                torch._dynamo.config.accumulated_cache_size_limit, 4 * limit
            )
        for layer in layers:
            layer.compile()
        return model
    if scope == "model":
        model.compile()
        return model
    raise ValueError(f"compile scope {scope!r} is not 'layers' or 'model'")


# ---------------------------------------------------------------- measurement


def _rss_mib() -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(built: Built, ids: torch.Tensor) -> Callable[[], float]:
    """One training step: forward + backward + AdamW step + zero_grad; returns the loss."""
    from s2ft_lightning.loss import NextTokenLoss

    model = built.model
    opt = torch.optim.AdamW(built.params, lr=1e-5) if built.params else None
    lm_loss = NextTokenLoss(built.info.get("loss_path", "stock"))  # "chunked" refuses rather than falls back
    batch = {"input_ids": ids, "labels": ids}

    def step() -> float:
        loss = lm_loss(model, batch).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _mib(b: float) -> float:
    return round(b / 2**20, 1)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads (None: as they are), restoring the caller's count after: a config's thread
    count must not leak into whatever runs next in the process (its sums would round differently)."""
    prev = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def measure(mode: str, cfg: dict[str, Any], compiled: bool, seqs: Sequence[int], device: str) -> list[dict[str, Any]]:
    """Build ``mode`` once and time it at each sequence length (at ``cfg["threads"]``); one result dict per length."""
    with torch_threads(cfg.get("threads")):
        return _measure(mode, cfg, compiled, seqs, device)


def _measure(mode: str, cfg: dict[str, Any], compiled: bool, seqs: Sequence[int], device: str) -> list[dict[str, Any]]:
    dev = torch.device(device)
    results = []
    base = {"mode": mode, "compiled": compiled, "batch": cfg["batch"], "device": dev.type}
    base["checkpointing"] = bool(cfg.get("checkpointing", False))
    base["threads"] = torch.get_num_threads() if not cfg.get("threads") else int(cfg["threads"])
    if compiled:
        base["compile_scope"] = cfg.get("compile_scope", "layers")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        # Runs share one process on GPU: memory still held by an earlier mode would inflate this one's peak.
        base["alloc_at_start_mib"] = _mib(torch.cuda.memory_allocated(dev))
    _preimport()  # same libraries loaded in every mode, so RSS differences are the mode's own
    rss_before = _rss_mib()
    t0 = time.perf_counter()
    try:
        built = setup_mode(mode, cfg, dev)
        if compiled:
            compile_model(built.model, base["compile_scope"])
    except Exception as e:  # noqa: BLE001 - report the failed setup as this mode's result
        err = f"setup failed: {type(e).__name__}: {e}"[:500]
        _cleanup(dev)
        return [
            dict(
                base,
                seq=s,
                tokens=cfg["batch"] * s,
                status="error",
                error=err,
                traceback=traceback.format_exc()[-2000:],
            )
            for s in seqs
        ]
    base.update(built.info, build_s=round(time.perf_counter() - t0, 2))
    _trim()  # hand freed setup memory (planner trace, init temporaries) back, so RSS is what the mode keeps
    if dev.type == "cuda":
        base["model_mib"] = _mib(torch.cuda.memory_allocated(dev))
    else:
        base.update(rss_start_mib=rss_before, rss_after_build_mib=_rss_mib(), maxrss_after_build_mib=_maxrss_mib())
    step = None
    gen = torch.Generator().manual_seed(1)
    for seq in seqs:
        r = dict(base, seq=seq, tokens=cfg["batch"] * seq)
        try:
            ids = torch.randint(0, cfg["model"]["vocab_size"], (cfg["batch"], seq), generator=gen).to(dev)
            step = make_step(built, ids)  # a fresh AdamW per length: its state is part of the peak
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            times, cpu_times = [], []
            for i in range(cfg["warmup"] + cfg["steps"]):
                _sync(dev)
                t, c = time.perf_counter(), time.process_time()
                loss = step()
                _sync(dev)
                dt, dc = time.perf_counter() - t, time.process_time() - c
                if i == 0:
                    r["first_step_s"] = round(dt, 3)
                if i >= cfg["warmup"]:
                    times.append(dt * 1e3)
                    cpu_times.append(dc * 1e3)
            r["loss"] = round(float(loss), 4)
            r["step_ms_all"] = [round(x, 3) for x in times]
            r["step_ms"] = round(statistics.median(times), 3)
            if dev.type == "cpu":
                # Process CPU time per step: what the step costs, minus time other processes held the cores.
                r["cpu_ms_all"] = [round(x, 3) for x in cpu_times]
                r["cpu_ms"] = round(statistics.median(cpu_times), 3)
            r["tokens_per_s"] = round(r["tokens"] / (r["step_ms"] / 1e3), 1)
            if dev.type == "cuda":
                r["peak_mib"] = _mib(torch.cuda.max_memory_allocated(dev))
                r["peak_reserved_mib"] = _mib(torch.cuda.max_memory_reserved(dev))
            else:
                r["peak_mib"] = round(_maxrss_mib(), 1)
                if r.get("rss_after_build_mib") is not None:
                    r["peak_over_build_mib"] = round(r["peak_mib"] - r["rss_after_build_mib"], 1)
                if r.get("rss_start_mib") is not None:
                    r["peak_over_start_mib"] = round(r["peak_mib"] - r["rss_start_mib"], 1)
            r["status"] = "ok"
        except torch.OutOfMemoryError as e:
            r.update(status="oom", error=str(e).splitlines()[0][:300])
        except Exception as e:  # noqa: BLE001 - a failing mode is a result, not a crash of the suite
            r.update(
                status="error",
                error=f"{type(e).__name__}: {e}"[:500],
                traceback=traceback.format_exc()[-2000:],
            )
        results.append(r)
        step = None
        for p in built.params:  # a failed step must not leave grads behind for the next length
            p.grad = None
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    del built, step
    _cleanup(dev)
    return results


def _trim() -> None:
    gc.collect()
    with contextlib.suppress(Exception):  # glibc only; elsewhere RSS just keeps the freed heap
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _preimport() -> None:
    import transformers  # noqa: F401

    for name in ("peft", "triton", "triton.language", "s2ft_lightning.layers", "surgery.planner"):
        # A missing optional part shows up later as that mode's error.
        with contextlib.suppress(Exception):
            __import__(name)


def _cleanup(dev: torch.device) -> None:
    gc.collect()
    try:
        import torch._dynamo

        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- orchestration


def run_isolated(
    mode: str, cfg: dict[str, Any], compiled: bool, seq: int, device: str, timeout_s: float
) -> dict[str, Any]:
    """Run one (mode, compiled, seq) in a fresh Python process, so its peak RSS is its own."""
    spec = {"mode": mode, "cfg": cfg, "compiled": compiled, "seqs": [seq], "device": device}
    cmd = [sys.executable, "-m", "benchmarks.train_suite", "--worker", json.dumps(spec)]
    base = {
        "mode": mode,
        "compiled": compiled,
        "seq": seq,
        "batch": cfg["batch"],
        "tokens": cfg["batch"] * seq,
        "checkpointing": bool(cfg.get("checkpointing", False)),
    }
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return dict(base, status="timeout", error=f"worker exceeded {timeout_s:.0f} s")
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])[0]
    status = "oom" if p.returncode == -9 else "error"  # SIGKILL: the kernel's out-of-memory killer
    return dict(base, status=status, error=f"worker exited {p.returncode}: {p.stderr[-1500:]}")


def run_suite(
    cfg: dict[str, Any],
    compile_mode: str = "off",
    isolate: bool | None = None,
    device: str | None = None,
    repeat: int = 1,
    on_result: Callable[[list[dict[str, Any]]], None] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """All modes of ``cfg`` eager and/or compiled (``compile_mode`` off|both|only); a list of run results.

    ``isolate`` (default: on CPU) runs each (mode, compiled, seq) in a fresh subprocess. ``repeat`` > 1 runs
    all modes in rounds (interleaved, against load drift) and keeps each run's fastest round. ``on_result``
    gets all results so far after each mode, so a stage killed by a timeout keeps what it measured.
    """
    if compile_mode not in ("off", "both", "only"):
        raise ValueError(f"compile_mode {compile_mode!r} is not one of off|both|only")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    device = device or cfg["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"config {cfg['name']!r} needs a CUDA GPU; none is available (use --config cpu-small)")
    if isolate is None:
        isolate = device == "cpu"
    variants = {"off": [False], "both": [False, True], "only": [True]}[compile_mode]
    runs: list[dict[str, Any]] = []
    for compiled in variants:
        rounds: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for rnd in range(repeat):
            for mode in cfg["modes"]:
                t = time.perf_counter()
                if isolate:
                    limit = cfg["compile_timeout_s"] if compiled else cfg["timeout_s"]
                    new = [run_isolated(mode, cfg, compiled, s, device, limit) for s in cfg["seqs"]]
                else:
                    new = measure(mode, cfg, compiled, cfg["seqs"], device)
                for r in new:
                    rounds.setdefault((mode, r["seq"]), []).append(r)
                    log(
                        f"[bench] {mode:9s} compiled={compiled!s:5s} seq={r['seq']:5d} round={rnd} "
                        f"{r['status']:7s} step={r.get('step_ms', float('nan')):.1f} ms "
                        f"peak={r.get('peak_mib', float('nan'))} MiB "
                        f"({time.perf_counter() - t:.0f} s) {r.get('error', '')[:200]}"
                    )
                if on_result is not None:
                    on_result(runs + [combine_rounds(v) for v in rounds.values()])
        runs += [combine_rounds(v) for v in rounds.values()]
    return runs


def combine_rounds(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from repeated runs: least step time and CPU time over ok rounds, median peak."""
    ok = [r for r in rounds if r.get("status") == "ok"]
    if len(rounds) == 1 or not ok:
        return dict(rounds[0])
    key = "cpu_ms" if all("cpu_ms" in r for r in ok) else "step_ms"
    best = dict(min(ok, key=lambda r: r[key]))
    best["step_ms_rounds"] = [r["step_ms"] for r in ok]
    best["step_ms"] = min(best["step_ms_rounds"])  # wall and CPU time each from their least disturbed round
    best["tokens_per_s"] = round(best["tokens"] / (best["step_ms"] / 1e3), 1)
    if key == "cpu_ms":
        best["cpu_ms_rounds"] = [r["cpu_ms"] for r in ok]
    best["peak_mib_rounds"] = [r["peak_mib"] for r in ok]
    best["peak_mib"] = statistics.median(best["peak_mib_rounds"])
    for k in ("peak_over_build_mib", "peak_over_start_mib"):
        if k in best:
            best[k] = statistics.median(r[k] for r in ok)
    best["rounds"] = len(rounds)
    return best


def _worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    res = measure(spec["mode"], spec["cfg"], spec["compiled"], spec["seqs"], spec["device"])
    print(RESULT_TAG + json.dumps(res, default=str), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker_main(sys.argv[2])
    else:
        sys.exit("usage: python -m benchmarks.train_suite --worker '<json spec>' (use tools/bench.py instead)")

"""Model audit: the coupled structures S²FT sees, what it would train, and proof the surgery is safe.

    python tools/inspect_structure.py MODEL [--tiny] [--o-ratio R --d-ratio R --v-ratio R --u-ratio R]
                                     [--strategy S] [--variant V] [--allocation A] [--seed N] [--verify] [--json]

MODEL is a local HF folder, a .gguf file, ``demo:smollm2`` (the offline demo model), or with
``--tiny`` a transformers model_type from which a tiny random-init model is built (nested text / vision
configs shrunk too). Parts that stay frozen (an unrecognised token mixer, an expert layout S²FT cannot train
yet, a vision tower) are listed with the reason. Exit code 1 when verification fails, 2 when the model is
unsupported or the input is bad.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # benchmarks/ (tiny models) is repository code, not installed

from surgery.analyze import StructureError, analyze
from surgery.config import SelectionConfig, SelectionError, add_arguments, from_namespace
from surgery.linear import linear_shape, split_expert_name
from surgery.plan import PlanError, S2Plan
from surgery.planner import apply_plan, make_plan, slice_weight_count
from surgery.structures import ModelStructures

LORA_ROLES = ("q", "k", "v", "up", "down")


def load(model: str, tiny: bool) -> nn.Module:
    if tiny:
        from transformers import CONFIG_MAPPING

        from benchmarks.tiny_models import tiny_model

        types = [t for t in CONFIG_MAPPING if t.islower()]
        if model not in types:  # transformers' own error lists every model type (~12,000 characters)
            close = difflib.get_close_matches(model, types, n=4, cutoff=0.6)
            mean = f"did you mean {', '.join(close)}? " if close else ""
            raise ValueError(
                f"--tiny builds a model from a transformers model_type and {model!r} is none of the {len(types)} "
                f"this transformers knows; {mean}(e.g. llama, qwen3, gpt2, mixtral; without --tiny, MODEL is a "
                "model folder, a .gguf file or demo:smollm2)"
            )
        return tiny_model(model)
    from s2ft_lightning.models import load_model

    return load_model(model, dtype=torch.float32)[0]


def lora_rank_for(model: nn.Module, structures: ModelStructures, trainable: int) -> float:
    """LoRA rank on q,k,v,up,down whose parameter count equals ``trainable`` (fractional)."""
    modules = {
        m.module
        for c in structures.couplings
        if c.kind in ("heads", "ffn") and c.parent is None
        for m in c.members
        if m.role in LORA_ROLES and m.module
    }
    per_rank = sum(sum(linear_shape(model.get_submodule(name))[:2]) for name in modules)
    return trainable / per_rank if per_rank else 0.0


def audit(model: nn.Module, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    structures = analyze(model)
    t_analyze = time.perf_counter() - t0
    plan: S2Plan = make_plan(model, structures, args.selection)
    t1 = time.perf_counter()
    plan = apply_plan(model, plan, structures, verify=args.verify)
    t_apply = time.perf_counter() - t1
    trainable = 0
    per_layer: dict[int, dict] = defaultdict(lambda: {"couplings": [], "trains": []})
    layer_of = {c.name: c.layer for c in structures.couplings}
    for s in plan.slices:
        trainable += slice_weight_count(model, [s])
        layer = next((layer_of[c] for c in layer_of if s.module.startswith(c + ".")), -1)
        axis = "cols" if s.feature == "in" else "rows"
        runs = f"{len(s.runs)} runs" if len(s.runs) > 1 else "1 run"
        role = f"expert {s.role}" if split_expert_name(s.module) else s.role
        per_layer[layer]["trains"].append(f"{role} {s.numel_features} {axis} ({runs})")
    for c in structures.couplings:
        desc = f"{'expert ' if c.parent else ''}{c.kind}[{c.size}]"
        if c.kind == "heads":
            desc = f"heads[{c.size}q/{c.num_groups}kv d={c.head_dim}{' rope' if c.rope else ''}]"
        per_layer[c.layer]["couplings"].append(desc)
    total = sum(p.numel() for p in model.parameters())
    cert = plan.certificate or {}
    return {
        "model_type": structures.model_type,
        "layers": structures.num_layers,
        "couplings": len(structures.couplings),
        "per_layer": {str(k): v for k, v in sorted(per_layer.items())},
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / total,
        "lora_rank_equivalent": lora_rank_for(model, structures, trainable),
        "verified": bool(cert.get("passed", False)) if args.verify else None,
        "max_abs_diff": cert.get("max_abs_diff"),
        "rel_diff": cert.get("rel_diff"),
        "analyze_s": t_analyze,
        "apply_s": t_apply,
        "notes": structures.notes,
        "frozen": [f.to_dict() for f in structures.frozen],
    }


def _collapse(items: list[str]) -> str:
    """``a, b ×4`` for a list with repeats (per-expert entries), in first-seen order."""
    counts = Counter(items)
    return ", ".join(f"{x} ×{counts[x]}" if counts[x] > 1 else x for x in dict.fromkeys(items))


def print_table(r: dict) -> None:
    print(f"model_type {r['model_type']}  layers {r['layers']}  couplings {r['couplings']}")
    print(f"{'layer':>5}  {'couplings':<48} trains")
    for layer, v in r["per_layer"].items():
        print(f"{layer:>5}  {_collapse(v['couplings']):<48} {_collapse(v['trains']) or '-'}")
    print(
        f"trainable {r['trainable_params']:,} of {r['total_params']:,} ({100 * r['trainable_fraction']:.3f}%)"
        f"  = LoRA rank {r['lora_rank_equivalent']:.1f} on q,k,v,up,down"
    )
    if r["verified"] is None:
        print("verification: skipped (--verify not given)")
    else:
        print(
            f"verification: {'PASSED' if r['verified'] else 'FAILED'}  max|Δlogits| {r['max_abs_diff']:.3g}"
            f"  relative {r['rel_diff']:.3g}"
        )
    print(f"time: analyze {r['analyze_s']:.2f}s, permute+verify {r['apply_s']:.2f}s")
    for f in r["frozen"]:
        where = "whole tower" if f["layer"] < 0 else f"layer {f['layer']}"
        print(f"frozen: {f['name']} ({where}; no {'/'.join(f['roles'])} trained there): {f['reason']}")
    for n in r["notes"]:
        print(f"note: {n}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "model",
        help="a local Hugging Face model folder, a .gguf file or demo:smollm2 (the offline demo model); with --tiny, "
        "a transformers model_type (llama, qwen3, gpt2, mixtral, ...) built tiny with random weights",
    )
    p.add_argument("--tiny", action="store_true", help="MODEL is a model_type; build a tiny random model")
    add_arguments(p.add_argument_group("what S²FT would train"), SelectionConfig, o_ratio=0.052, seed=0)
    p.add_argument("--verify", action="store_true", help="permute the model and prove it computes the same function")
    p.add_argument("--json", action="store_true", help="print the audit as JSON")
    args = p.parse_args(argv)
    from s2ft_lightning.models import quiet_torchao_import

    quiet_torchao_import()
    try:
        args.selection = from_namespace(args, SelectionConfig)
        model = load(args.model, args.tiny)
        result = audit(model, args)
    except (StructureError, PlanError, SelectionError, ValueError, OSError) as e:
        msg = f"{type(e).__name__}: {e}"
        if args.json:
            print(json.dumps({"error": msg, "verified": False}))
        else:
            print(f"error: {msg}", file=sys.stderr)
        return 2
    except Exception as e:  # verification failure or anything unexpected: non-zero, never a traceback-less pass
        if args.json:
            print(json.dumps({"error": f"{type(e).__name__}: {e}", "verified": False}))
        else:
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, default=float))
    else:
        print_table(result)
    return 0 if result["verified"] in (True, None) else 1


if __name__ == "__main__":
    sys.exit(main())
